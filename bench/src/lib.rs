//! Benchmarks: agent against the reference, bridge overhead, and a host with a thousand VMs
