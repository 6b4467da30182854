//! Compiles what only the control plane speaks, with no system `protoc` (protox parses the files):
//!
//! - the server halves of the Delta-ADS and CA services, whose messages are the API crate's own
//!   (`remora_control_api::pb` and `::capb`, by `extern_path`): proxies link only the clients;
//! - `etcd/*`: the trimmed etcd v3 API the service registry calls (client stubs).

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let api = PathBuf::from("../control-api/proto");
    let own = PathBuf::from("proto");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=../control-api/proto");
    let externs = [
        (".google.rpc", "::remora_control_api::pb::google::rpc"),
        (".envoy.config.core.v3", "::remora_control_api::pb::envoy::config::core::v3"),
        (".envoy.service.discovery.v3", "::remora_control_api::pb::envoy::service::discovery::v3"),
        (".remora.ca.v1", "::remora_control_api::capb"),
    ];
    servers(&api, &["envoy/service/discovery/v3/discovery.proto", "remora/ca/v1/ca.proto"], &externs)?;
    let files = [own.join("etcd/rpc.proto")];
    let descriptors = protox::compile(&files, [&own])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .bytes(".")
        .include_file("etcd.rs")
        .compile_fds(descriptors)?;
    Ok(())
}

/// Server stubs for the services in `files`, their messages taken from the API crate.
fn servers(root: &Path, files: &[&str], externs: &[(&str, &str)]) -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    let descriptors = protox::compile(&files, [root])?;
    let mut config = tonic_prost_build::configure().build_server(true).build_client(false).include_file("servers.rs");
    for (proto, rust) in externs {
        config = config.extern_path(*proto, *rust);
    }
    config.compile_fds(descriptors)?;
    Ok(())
}
