//! The config file: YAML text through parsing, validation and compilation into a snapshot, as a
//! reload takes it.
//!
//! Holds whatever the text: parsing is bounded (no alias expansion past the budget); a config whose
//! bootstrap validates resolves; and a set of resources that validates also compiles: validation
//! accepts nothing the proxy would then refuse (or panic on) when it builds the snapshot.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_control_api::{config, validate};
use remora_proxy::state::cluster::OwnLocality;
use remora_proxy::state::{Snapshot, SnapshotMetrics};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(file) = config::parse(text, "fuzz.yaml") else { return };
    if let Some(bootstrap) = &file.bootstrap
        && validate::validate_bootstrap(bootstrap).is_ok()
        && let Err(error) = remora_proxy::bootstrap::Bootstrap::resolve(bootstrap)
    {
        panic!("a bootstrap that validates does not resolve: {error}");
    }
    if validate::validate(&file.resources).is_err() {
        return;
    }
    if let Err(errors) =
        Snapshot::build("fuzz".into(), remora_control_api::Encoded::all(&file.resources), None, &OwnLocality::default(), &SnapshotMetrics::default())
    {
        panic!("a config that validates does not compile: {errors}");
    }
});
