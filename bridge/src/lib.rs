//! Host-side bridge: gRPC and JSON-RPC in front of per-VM QEMU Guest Agent channels
