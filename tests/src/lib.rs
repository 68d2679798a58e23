//! End-to-end tests: a real QEMU guest with memory hotplug, driven through the bridge
