//! Generates the qga.bridge.v1 messages, clients and servers, and the file descriptor set
//! that the bridge serves through gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("qga_bridge_v1_descriptor.bin"))
        .compile_protos(&["qga/bridge/v1/bridge.proto"], &["."])?;
    println!("cargo:rerun-if-changed=qga/bridge/v1/bridge.proto");
    Ok(())
}
