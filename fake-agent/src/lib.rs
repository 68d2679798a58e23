//! A scriptable, fault-injecting fake QEMU Guest Agent serving many unix sockets, for bridge tests and load benchmarks.
