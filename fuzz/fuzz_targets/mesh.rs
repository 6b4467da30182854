//! The automatic mesh and Gateway API translation: arbitrary Kubernetes objects (Services,
//! EndpointSlices, Pods, Namespaces, HTTPRoutes, GRPCRoutes, ReferenceGrants) as YAML or JSON
//! documents, as the control plane's directory or the API server hands them over.
//!
//! Holds whatever the objects: what the mesh makes validates, every proxy's shared view alone and
//! each scope's view (its scoped resources in place of the shared ones they replace); and making
//! is deterministic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_control_api::{Resource, config, validate};
use remora_control_plane::mesh::{self, Objects, Settings};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(file) = config::parse_mixed(text, "fuzz.yaml") else { return };
    let settings = Settings::default();
    let objects = Objects::read(&settings.trust_domain, &file.kubernetes);
    let made = mesh::resources(&objects, &[], &settings);
    assert_eq!(made, mesh::resources(&objects, &[], &settings), "making is not deterministic");
    if let Err(errors) = validate::validate(&made.shared) {
        panic!("the shared view does not validate: {errors}\n{text}");
    }
    for (scope, scoped) in &made.scoped {
        let key = |r: &Resource| (r.kind(), r.name().to_owned());
        let mut view: Vec<Resource> =
            made.shared.iter().filter(|r| !scoped.iter().any(|s| key(s) == key(r))).cloned().collect();
        view.extend(scoped.iter().cloned());
        if let Err(errors) = validate::validate(&view) {
            panic!("the view of {scope} does not validate: {errors}\n{text}");
        }
    }
});
