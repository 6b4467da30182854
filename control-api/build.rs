//! Compiles the `.proto` files in `proto/` into Rust, with no system `protoc`: protox parses them.
//!
//! - `remora/v1/*`: the resource schema, as prost types with proto3-JSON serde (pbjson), the form
//!   YAML files and `/config_dump` use.
//! - `envoy/...` and `google/rpc/...`: the trimmed Delta-ADS service (server and client stubs, tonic).
//! - `etcd/*`: the trimmed etcd v3 API the service registry calls (client stubs, tonic).
//! - `remora/ca/v1/ca.proto`: the CA's signing service (server and client stubs, tonic).

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    println!("cargo:rerun-if-changed=proto");

    let schema: Vec<PathBuf> = ["bootstrap", "listener", "route", "cluster", "endpoints", "authorization"]
        .iter()
        .map(|name| root.join("remora/v1").join(format!("{name}.proto")))
        .collect();
    let descriptors = protox::compile(&schema, [&root])?;
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

    services(&root, &["envoy/service/discovery/v3/discovery.proto"], "xds.rs", true)?;
    services(&root, &["etcd/rpc.proto"], "etcd.rs", false)?;
    services(&root, &["remora/ca/v1/ca.proto"], "ca.rs", true)?;
    Ok(())
}

/// Compiles `files` with tonic stubs into one nested-module file `include` in OUT_DIR.
fn services(root: &Path, files: &[&str], include: &str, server: bool) -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    let descriptors = protox::compile(&files, [root])?;
    tonic_prost_build::configure()
        .build_server(server)
        .build_client(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .bytes(".")
        .include_file(include)
        .compile_fds(descriptors)?;
    Ok(())
}
