//! Resources from a control plane: arbitrary protobuf, decoded as each kind, as a proxy's
//! Delta-ADS stream decodes them, then validated and compiled.
//!
//! Input: pieces (see `remora_fuzz::pieces`), each a kind byte then the message's bytes. Holds
//! whatever the bytes: a decoded resource encodes back to what decodes as itself; its YAML form
//! (what `/config_dump` shows and a file holds) reads back as itself; and a set that validates
//! compiles.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remora_control_api::validate::References;
use remora_control_api::{Encoded, Kind, Resource, config, validate};
use remora_proxy::state::cluster::OwnLocality;
use remora_proxy::state::{Snapshot, SnapshotMetrics};

fuzz_target!(|input: &[u8]| {
    let mut resources = Vec::new();
    for piece in remora_fuzz::pieces(input) {
        let Some((&kind, message)) = piece.split_first() else { continue };
        let kind = Kind::ALL[usize::from(kind) % Kind::ALL.len()];
        let any = pbjson_any(kind, message);
        let Ok(resource) = Resource::from_any(&any) else { continue };
        let again = Resource::from_any(&resource.to_any()).expect("a resource's own encoding decodes");
        assert_eq!(again, resource, "protobuf round trip");
        // The YAML form of a resource that validates on its own, where YAML can carry its text (JSON
        // writes DEL and C1 controls raw, which no YAML stream may hold).
        let json = serde_json::to_string(&resource.to_json()).expect("JSON of a resource");
        let yaml_can_carry =
            !json.chars().any(|c| c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) && c != '\u{85}');
        if yaml_can_carry && validate::validate_with(std::slice::from_ref(&resource), References::Pending).is_ok() {
            match config::parse(&json, "dump") {
                Ok(file) => {
                    assert_eq!(file.resources, [resource.clone()], "the YAML form reads back otherwise: {json}")
                }
                Err(error) => panic!("the YAML form of a valid resource does not read back: {error}\n{json}"),
            }
        }
        resources.push(resource);
    }
    // What a proxy holds at rest decodes to what it was given (compared encoded: a NaN is not
    // equal to itself).
    let held = Encoded::all(&resources);
    for encoded in &held {
        let again = encoded.decode().expect("a resource held encoded decodes");
        assert_eq!(Encoded::all([&again])[0].as_bytes(), encoded.as_bytes(), "{} changed at rest", encoded.name());
    }
    if validate::validate(&resources).is_err() {
        return;
    }
    if let Err(errors) = Snapshot::build("fuzz".into(), held, None, &OwnLocality::default(), &SnapshotMetrics::default())
    {
        panic!("resources that validate do not compile: {errors}");
    }
});

fn pbjson_any(kind: Kind, message: &[u8]) -> pbjson_types::Any {
    pbjson_types::Any { type_url: kind.type_url().to_owned(), value: message.to_vec().into() }
}
