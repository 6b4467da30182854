//! The injector's admission webhook: arbitrary AdmissionReview bodies (JSON), as the API server
//! posts them.
//!
//! Holds whatever the body: the JSON Patch answered turns the object sent into exactly the object
//! injected; the containers and init containers of a pod (or pod template) sent with unique names
//! keep unique names; and injecting the result again changes nothing.

#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use remora_control_plane::inject::Injector;
use remora_control_plane::inject::webhook::{Verdict, review};
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let injector = Injector::default();
    let Ok((answer, verdict, _)) = review(&injector, body) else { return };
    if verdict != Verdict::Injected {
        return;
    }
    let request: Value = serde_json::from_slice(body).expect("the review was JSON");
    let mut object = request["request"]["object"].clone();
    let patch = answer["response"]["patch"].as_str().expect("an injected answer has a patch");
    let patch = base64::engine::general_purpose::STANDARD.decode(patch).expect("the patch is base64");
    let patch: Vec<Value> = serde_json::from_slice(&patch).expect("the patch is JSON");
    for operation in &patch {
        apply(&mut object, operation);
    }
    let mut injected = request["request"]["object"].clone();
    assert!(injector.inject_object(&mut injected, &mut Vec::new()).expect("injects as the webhook did"));
    assert_eq!(object, injected, "the patch does not make the injected object");
    let sent = &request["request"]["object"];
    assert!(
        !unique_names(sent) || unique_names(&object),
        "injection repeated a container name: {}",
        serde_json::to_string(&object).unwrap_or_default()
    );
    let mut again = object.clone();
    assert!(!injector.inject_object(&mut again, &mut Vec::new()).unwrap_or(false), "injecting twice changed the pod");
});

/// Applies one `add`, `remove` or `replace` (what the webhook writes) of RFC 6902 to `document`.
fn apply(document: &mut Value, operation: &Value) {
    let path = operation["path"].as_str().expect("an operation has a path");
    let value = || operation["value"].clone();
    if path.is_empty() {
        *document = value();
        return;
    }
    let (parent, key) = path.rsplit_once('/').expect("a pointer starts with /");
    let key = key.replace("~1", "/").replace("~0", "~");
    let target = document.pointer_mut(parent).expect("the operation's parent exists");
    let object = target.as_object_mut().expect("the webhook patches objects' fields");
    match operation["op"].as_str() {
        Some("remove") => {
            object.shift_remove(&key).expect("a removed field exists");
        }
        Some("add") => {
            object.insert(key, value());
        }
        Some("replace") => {
            let slot = object.get_mut(&key).expect("a replaced field exists");
            *slot = value();
        }
        other => panic!("unexpected operation {other:?}"),
    }
}

/// Whether the containers and init containers of `object`'s pod spec (or pod template's) have
/// unique names.
fn unique_names(object: &Value) -> bool {
    [object.pointer("/spec"), object.pointer("/spec/template/spec")].into_iter().flatten().all(|spec| {
        let mut names: Vec<&str> = ["containers", "initContainers"]
            .iter()
            .flat_map(|list| spec[list].as_array().into_iter().flatten())
            .filter_map(|container| container["name"].as_str())
            .collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        names.len() == count
    })
}
