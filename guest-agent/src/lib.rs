//! In-guest QEMU Guest Agent for memory-block hotplug, a drop-in for qemu-ga's memory-block commands
