//! The proxy's start-up settings: addresses, timeouts, the control plane and CA URLs (and the roots
//! an `https://` one needs), tracing, the access log, and the identity's source.

use super::ValidationErrors;
use super::values::{check_control_plane, duration, parse_address};
use crate::config::FieldError;
use crate::v1;

/// The access log's fields, in the order a line carries them when `fields` is empty.
pub const ACCESS_LOG_FIELDS: [&str; 22] = [
    "start_time",
    "duration_ms",
    "protocol",
    "listener",
    "direction",
    "method",
    "authority",
    "path",
    "status",
    "grpc_status",
    "request_bytes",
    "response_bytes",
    "bytes_received",
    "bytes_sent",
    "route",
    "upstream_cluster",
    "upstream_endpoint",
    "attempts",
    "peer",
    "peer_identity",
    "trace_id",
    "response_flags",
];

/// Checks the bootstrap settings.
pub fn validate_bootstrap(bootstrap: &v1::Bootstrap) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let mut fail = |field: &str, message: String| errors.push(FieldError::new("bootstrap", field, message));
    if !bootstrap.admin_address.is_empty()
        && let Err(e) = parse_address(&bootstrap.admin_address)
    {
        fail("admin_address", e);
    }
    if bootstrap.workers > 1024 {
        fail("workers", format!("must be at most 1024, got {}", bootstrap.workers));
    }
    if let Err(e) = duration(bootstrap.drain_time.as_ref()) {
        fail("drain_time", e);
    }
    if let Err(e) = duration(bootstrap.initial_fetch_timeout.as_ref()) {
        fail("initial_fetch_timeout", e);
    }
    if let Err(e) = check_control_plane(&bootstrap.control_plane) {
        fail("control_plane", e);
    }
    let https = |url: &str| url.starts_with("https://");
    let ca_address = bootstrap.identity.as_ref().map_or("", |i| i.ca_address.as_str());
    let no_roots = bootstrap.control_plane_ca_file.is_empty() && bootstrap.control_plane_ca.trim().is_empty();
    if (https(&bootstrap.control_plane) || https(ca_address)) && no_roots {
        fail("control_plane_ca_file", "is required to check an https:// control plane's certificate".into());
    }
    if let Some(tracing) = &bootstrap.tracing {
        let endpoint = &tracing.endpoint;
        if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            fail("tracing.endpoint", format!("must be an http:// or https:// URL, got {endpoint:?}"));
        }
        if !matches!(tracing.protocol.as_str(), "" | "grpc" | "http/protobuf") {
            fail("tracing.protocol", format!("must be grpc or http/protobuf, got {:?}", tracing.protocol));
        }
        if let Some(ratio) = tracing.sampling_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            fail("tracing.sampling_ratio", format!("must be from 0 to 1, got {ratio}"));
        }
        if let Err(e) = duration(tracing.export_interval.as_ref()) {
            fail("tracing.export_interval", e);
        }
        if let Err(e) = duration(tracing.export_timeout.as_ref()) {
            fail("tracing.export_timeout", e);
        }
    }
    if let Some(log) = &bootstrap.access_log {
        if log.path.is_empty() {
            fail("access_log.path", "is required: stdout, or a file path".into());
        }
        if let Some(ratio) = log.success_sampling_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            fail("access_log.success_sampling_ratio", format!("must be from 0 to 1, got {ratio}"));
        }
        for (i, name) in log.fields.iter().enumerate() {
            if !ACCESS_LOG_FIELDS.contains(&name.as_str()) {
                let known = ACCESS_LOG_FIELDS.join(", ");
                fail(&format!("access_log.fields[{i}]"), format!("unknown field {name:?} (known: {known})"));
            }
        }
    }
    if let Some(identity) = &bootstrap.identity {
        identity_settings(identity, &mut fail);
    }
    if errors.is_empty() { Ok(()) } else { Err(ValidationErrors(errors)) }
}

/// The bootstrap's `identity`: exactly one source (the CA or files), each complete.
fn identity_settings(identity: &v1::Identity, fail: &mut impl FnMut(&str, String)) {
    let files = [&identity.cert_file, &identity.key_file, &identity.ca_file];
    let any_file = files.iter().any(|f| !f.is_empty());
    if !identity.spiffe_id.is_empty() {
        if let Err(e) = crate::identity::SpiffeId::parse(&identity.spiffe_id) {
            fail("identity.spiffe_id", e.to_string());
        }
        if any_file {
            fail(
                "identity.cert_file",
                "give either spiffe_id (a certificate from the CA) or the files, not both".into(),
            );
        }
        if identity.token_file.is_empty() {
            fail("identity.token_file", "is required with spiffe_id: the CA signs only for a token it knows".into());
        }
    } else if any_file {
        for (field, value) in
            [("cert_file", &identity.cert_file), ("key_file", &identity.key_file), ("ca_file", &identity.ca_file)]
        {
            if value.is_empty() {
                fail(&format!("identity.{field}"), "is required with the other certificate files".into());
            }
        }
    } else {
        fail("identity", "needs spiffe_id (a certificate from the CA) or cert_file, key_file and ca_file".into());
    }
    if let Err(e) = check_control_plane(&identity.ca_address) {
        fail("identity.ca_address", e);
    }
    match duration(identity.certificate_ttl.as_ref()) {
        Err(e) => fail("identity.certificate_ttl", e),
        Ok(Some(ttl)) if !(crate::ca::MIN_TTL..=crate::ca::DEFAULT_MAX_TTL).contains(&ttl) => {
            fail("identity.certificate_ttl", format!("must be from 10s to 30 days, got {}s", ttl.as_secs()));
        }
        Ok(_) => {}
    }
    match duration(identity.handshake_timeout.as_ref()) {
        Err(e) => fail("identity.handshake_timeout", e),
        Ok(Some(timeout)) if timeout.is_zero() => {
            fail("identity.handshake_timeout", "must be greater than zero".into())
        }
        Ok(_) => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn bootstrap_is_checked() {
        let log = v1::AccessLog { path: "stdout".into(), success_sampling_ratio: Some(1.5), ..Default::default() };
        let bad =
            v1::Bootstrap { admin_address: "nope".into(), workers: 5000, access_log: Some(log), ..Default::default() };
        let text = validate_bootstrap(&bad).unwrap_err().to_string();
        assert!(text.contains("bootstrap: admin_address: must be ip:port"), "{text}");
        assert!(text.contains("bootstrap: workers: must be at most 1024"), "{text}");
        assert!(text.contains("bootstrap: access_log.success_sampling_ratio: must be from 0 to 1, got 1.5"), "{text}");
        let log = v1::AccessLog {
            path: "stdout".into(),
            fields: vec!["status".into(), "upstream_endpoint`".into()],
            ..Default::default()
        };
        let text =
            validate_bootstrap(&v1::Bootstrap { access_log: Some(log), ..Default::default() }).unwrap_err().to_string();
        assert!(text.contains(r#"bootstrap: access_log.fields[1]: unknown field "upstream_endpoint`""#), "{text}");
    }
}
