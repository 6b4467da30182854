//! Compiles the resource schema in `proto/` into Rust types (prost) with their proto3-JSON serde
//! implementations (pbjson). protox parses the `.proto` files in Rust, so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let files: Vec<PathBuf> = ["bootstrap", "listener", "route", "cluster", "endpoints"]
        .iter()
        .map(|name| root.join("remora/v1").join(format!("{name}.proto")))
        .collect();
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(&files, [&root])?;
    let encoded = prost::Message::encode_to_vec(&descriptors);

    prost_build::Config::new()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        // Files are written by hand: keep the names they were written with in /config_dump output.
        .preserve_proto_field_names()
        .build(&[".remora.v1"])?;
    Ok(())
}
