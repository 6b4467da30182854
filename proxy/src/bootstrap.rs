//! Start-up configuration: where the config comes from, and the settings fixed for the process's life.
//!
//! A [`ConfigSource`] (a YAML file, or the built-in defaults) is read by [`load`] into a [`Loaded`]
//! config: the raw bootstrap section, the resources, and a version derived from the text. The
//! bootstrap section becomes a [`Bootstrap`], which never changes after start-up; the resources go to
//! `state` to become the live snapshot, and are read again on every reload.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use remora_control_api::config::FieldError;
use remora_control_api::config::{self, ConfigError};
use remora_control_api::identity::SpiffeId;
use remora_control_api::validate::{self, References, ValidationErrors};
use remora_control_api::{Resource, v1};

use crate::limits;
use crate::telemetry::access_log::AccessLogSettings;
use crate::telemetry::export::ExportSettings;

/// The configuration `remora proxy` runs with when given no `--config`: an outbound listener on
/// 127.0.0.1:15001 and [::1]:15001 and an inbound one on 0.0.0.0:15006 and [::]:15006, both
/// transparent (behind iptables REDIRECT), both passing traffic through to its original
/// destination, an HBONE listener on 0.0.0.0:15008 and [::]:15008 (TCP) and an HBONE-over-QUIC one
/// on the same addresses (UDP), serving tunnels once the proxy has an identity, whose tunnels the
/// inbound listener serves, and the admin server on
/// 127.0.0.1:15000. Where IPv6 is off, the IPv6 addresses
/// (the `additional_addresses` lines) are left out ([`ConfigSource::defaults`]).
pub const DEFAULT_CONFIG: &str = r#"# Remora's built-in defaults: a transparent pass-through sidecar.
bootstrap:
  admin_address: 127.0.0.1:15000
  drain_time: 5s
resources:
  - kind: Listener
    name: outbound
    address: 127.0.0.1:15001
    additional_addresses: ["[::1]:15001"]
    direction: outbound
    protocol: auto
    transparent: true
    default_cluster: passthrough
  - kind: Listener
    name: inbound
    address: 0.0.0.0:15006
    additional_addresses: ["[::]:15006"]
    direction: inbound
    protocol: auto
    transparent: true
    default_cluster: passthrough
  - kind: Listener
    name: hbone
    address: 0.0.0.0:15008
    additional_addresses: ["[::]:15008"]
    direction: inbound
    protocol: hbone
    inbound_listener: inbound
  - kind: Listener
    name: hbone-quic
    address: 0.0.0.0:15008
    additional_addresses: ["[::]:15008"]
    direction: inbound
    protocol: hbone_quic
    inbound_listener: inbound
  - kind: Cluster
    name: passthrough
    original_destination: true
"#;

/// [`DEFAULT_CONFIG`], with its IPv6 addresses or without.
fn default_config(ipv6: bool) -> String {
    if ipv6 {
        return DEFAULT_CONFIG.to_owned();
    }
    let lines: Vec<&str> =
        DEFAULT_CONFIG.lines().filter(|line| !line.trim_start().starts_with("additional_addresses:")).collect();
    lines.join("\n") + "\n"
}

/// Where the proxy's configuration comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// A YAML file, watched for changes (and re-read on SIGHUP).
    File(PathBuf),
    /// YAML text held in memory (the built-in defaults, or the demo's config); never changes.
    Text {
        /// Names the text in error messages and `/config_dump`.
        origin: String,
        /// The YAML.
        text: String,
    },
}

impl ConfigSource {
    /// The built-in defaults ([`DEFAULT_CONFIG`]), without their IPv6 addresses where this host
    /// cannot bind IPv6 loopback (IPv6 turned off).
    pub fn defaults() -> Self {
        let ipv6 = std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_ok();
        ConfigSource::Text { origin: "built-in defaults".into(), text: default_config(ipv6) }
    }

    /// Names the source in messages: the file's path, or the text's origin.
    pub fn origin(&self) -> String {
        match self {
            ConfigSource::File(path) => path.display().to_string(),
            ConfigSource::Text { origin, .. } => origin.clone(),
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The text is not a valid config document.
    #[error(transparent)]
    Parse(#[from] ConfigError),
    /// The resources, or the bootstrap, break a rule.
    #[error("{origin}: {errors}")]
    Invalid {
        /// Where the config came from.
        origin: String,
        /// Every problem found.
        errors: ValidationErrors,
    },
}

/// One reading of a config source, validated.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The bootstrap section as written (defaults not yet applied).
    pub bootstrap: v1::Bootstrap,
    /// The resources, in file order.
    pub resources: Vec<Resource>,
    /// Identifies this content: the FNV-1a hash of the text, in hex. Equal text, equal version.
    pub version: String,
}

/// Reads, parses and validates the config; every reference must resolve within the file.
pub fn load(source: &ConfigSource) -> Result<Loaded, LoadError> {
    load_with(source, References::Required)
}

/// Like [`load`]; with [`References::Pending`] the file may refer to resources a control plane sends.
pub fn load_with(source: &ConfigSource, references: References) -> Result<Loaded, LoadError> {
    let origin = source.origin();
    let owned;
    let text = match source {
        ConfigSource::File(path) => {
            owned = config::read_text(path).map_err(|error| LoadError::Read { path: origin.clone(), error })?;
            owned.as_str()
        }
        ConfigSource::Text { text, .. } => text.as_str(),
    };
    let file = config::parse(text, &origin)?;
    let bootstrap = file.bootstrap.unwrap_or_default();
    let invalid = |errors| LoadError::Invalid { origin: origin.clone(), errors };
    validate::validate_bootstrap(&bootstrap).map_err(invalid)?;
    validate::validate_with(&file.resources, references).map_err(invalid)?;
    Ok(Loaded { bootstrap, resources: file.resources, version: version_of(text) })
}

/// The FNV-1a 64-bit hash of `text` as 16 hex digits: stable across runs and builds, so a version in
/// `/config_dump` can be compared between proxies.
pub fn version_of(text: &str) -> String {
    let hash = text
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    format!("{hash:016x}")
}

/// The start-up settings with every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Bootstrap {
    /// Names this proxy (defaults to the host name).
    pub node_id: String,
    /// Where the admin server listens.
    pub admin_address: SocketAddr,
    /// Worker threads (each with its own event loop).
    pub workers: usize,
    /// How long a drain may take.
    pub drain_time: Duration,
    /// The control plane's URL, if resources come from one.
    pub control_plane: Option<String>,
    /// How long readiness waits for the control plane's first configuration.
    pub initial_fetch_timeout: Duration,
    /// Where spans go, if anywhere.
    pub tracing: Option<ExportSettings>,
    /// The access log, if there is one.
    pub access_log: Option<AccessLogSettings>,
    /// This proxy's workload identity, if it has one.
    pub identity: Option<IdentitySettings>,
    /// The roots an https:// control plane (or CA) must present a certificate from.
    pub control_plane_ca_file: Option<PathBuf>,
    /// The same roots as PEM text (used when there is no file).
    pub control_plane_ca: Option<String>,
}

/// Where this proxy's certificate comes from, and how long handshakes may take.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentitySettings {
    /// The CA or files.
    pub source: IdentitySource,
    /// The TLS handshake timeout with peer sidecars.
    pub handshake_timeout: Duration,
}

/// The two sources of certificates.
#[derive(Clone, Debug, PartialEq)]
pub enum IdentitySource {
    /// Issued by the control plane's CA.
    Ca {
        /// The SPIFFE ID asked for.
        identity: SpiffeId,
        /// The CA's URL.
        ca_address: String,
        /// The bearer token's file.
        token_file: PathBuf,
        /// The lifetime asked for.
        ttl: Duration,
    },
    /// Read from files, reloaded on change.
    Files {
        /// PEM chain.
        cert: PathBuf,
        /// PEM key.
        key: PathBuf,
        /// PEM trust bundle.
        ca: PathBuf,
    },
}

impl Bootstrap {
    /// Applies the defaults to a (validated) bootstrap section, and the `OTEL_*` environment
    /// variables to what it leaves open.
    pub fn resolve(raw: &v1::Bootstrap) -> Result<Self, ValidationErrors> {
        Self::resolve_with(raw, &|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// Like [`Bootstrap::resolve`], reading environment variables through `env`.
    pub fn resolve_with(raw: &v1::Bootstrap, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ValidationErrors> {
        validate::validate_bootstrap(raw)?;
        let admin_address = if raw.admin_address.is_empty() {
            SocketAddr::from(([127, 0, 0, 1], 15000))
        } else {
            // validate_bootstrap has parsed it already; the error arm cannot be reached.
            validate::parse_address(&raw.admin_address).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 15000)))
        };
        let workers = match raw.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        };
        let drain_time =
            validate::duration(raw.drain_time.as_ref()).ok().flatten().unwrap_or(limits::DEFAULT_DRAIN_TIME);
        let node_id = if raw.node_id.is_empty() { host_name() } else { raw.node_id.clone() };
        let control_plane = (!raw.control_plane.is_empty()).then(|| raw.control_plane.clone());
        let initial_fetch_timeout = validate::duration(raw.initial_fetch_timeout.as_ref())
            .ok()
            .flatten()
            .unwrap_or(limits::DEFAULT_INITIAL_FETCH_TIMEOUT);
        let access_log = match &raw.access_log {
            None => None,
            Some(log) => Some(
                AccessLogSettings::new(&log.path, &log.fields)
                    .map_err(|message| {
                        ValidationErrors(vec![FieldError::new("bootstrap", "access_log.fields", message)])
                    })?
                    .sampling_successes(log.success_sampling_ratio.unwrap_or(1.0)),
            ),
        };
        let tracing = tracing_settings(raw.tracing.as_ref(), &node_id, env)?;
        let identity = raw.identity.as_ref().map(|identity| identity_settings(identity, control_plane.as_deref()));
        if let Some(IdentitySettings { source: IdentitySource::Ca { ca_address, .. }, .. }) = &identity
            && ca_address.is_empty()
        {
            let message = "is required with spiffe_id when there is no control_plane (--control)";
            return Err(ValidationErrors(vec![FieldError::new("bootstrap", "identity.ca_address", message)]));
        }
        Ok(Bootstrap {
            node_id,
            admin_address,
            workers,
            drain_time,
            control_plane,
            initial_fetch_timeout,
            tracing,
            access_log,
            identity,
            control_plane_ca_file: (!raw.control_plane_ca_file.is_empty())
                .then(|| PathBuf::from(&raw.control_plane_ca_file)),
            control_plane_ca: (!raw.control_plane_ca.trim().is_empty()).then(|| raw.control_plane_ca.clone()),
        })
    }
}

/// The (validated) identity section with its defaults.
fn identity_settings(raw: &v1::Identity, control_plane: Option<&str>) -> IdentitySettings {
    let handshake_timeout =
        validate::duration(raw.handshake_timeout.as_ref()).ok().flatten().unwrap_or(limits::DEFAULT_HANDSHAKE_TIMEOUT);
    // Validation guarantees a valid ID with a token file and an address, or the three files.
    let source = match SpiffeId::parse(&raw.spiffe_id) {
        Ok(identity) => IdentitySource::Ca {
            identity,
            ca_address: Some(raw.ca_address.clone())
                .filter(|a| !a.is_empty())
                .or(control_plane.map(str::to_owned))
                .unwrap_or_default(),
            token_file: PathBuf::from(&raw.token_file),
            ttl: validate::duration(raw.certificate_ttl.as_ref()).ok().flatten().unwrap_or(limits::DEFAULT_CERT_TTL),
        },
        Err(_) => IdentitySource::Files {
            cert: PathBuf::from(&raw.cert_file),
            key: PathBuf::from(&raw.key_file),
            ca: PathBuf::from(&raw.ca_file),
        },
    };
    IdentitySettings { source, handshake_timeout }
}

/// The trace export settings: the bootstrap's, then the standard `OTEL_*` variables, then the
/// defaults. `None` when no collector is named anywhere (or `OTEL_SDK_DISABLED=true`).
fn tracing_settings(
    raw: Option<&v1::Tracing>,
    node_id: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ExportSettings>, ValidationErrors> {
    let fail = |field: &str, message: String| ValidationErrors(vec![FieldError::new("bootstrap", field, message)]);
    let default = v1::Tracing::default();
    let raw = raw.unwrap_or(&default);
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) && raw.endpoint.is_empty() {
        return Ok(None);
    }
    let endpoint = Some(raw.endpoint.clone())
        .filter(|e| !e.is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let Some(endpoint) = endpoint else { return Ok(None) };
    let tls = endpoint.starts_with("https://");
    if !(tls || endpoint.starts_with("http://")) {
        return Err(fail("tracing.endpoint", format!("must be an http:// or https:// URL, got {endpoint:?}")));
    }
    let protocol = Some(raw.protocol.clone())
        .filter(|p| !p.is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "grpc".into());
    let http = match protocol.as_str() {
        "grpc" => false,
        "http/protobuf" => true,
        other => return Err(fail("tracing.protocol", format!("must be grpc or http/protobuf, got {other:?}"))),
    };
    let ca_file = Some(raw.ca_file.clone())
        .filter(|f| !f.is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_CERTIFICATE"))
        .map(PathBuf::from);
    if tls && ca_file.is_none() {
        return Err(fail("tracing.ca_file", "is required to check an https:// collector's certificate".into()));
    }
    let sampling_ratio = match raw.sampling_ratio {
        Some(ratio) => ratio,
        None => match env("OTEL_TRACES_SAMPLER").as_deref() {
            Some("always_off" | "parentbased_always_off") => 0.0,
            Some("traceidratio" | "parentbased_traceidratio") => {
                let arg = env("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|| "1".into());
                arg.trim().parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r)).ok_or_else(|| {
                    fail("tracing.sampling_ratio", format!("OTEL_TRACES_SAMPLER_ARG must be from 0 to 1, got {arg:?}"))
                })?
            }
            _ => 1.0,
        },
    };
    let service_name = Some(raw.service_name.clone())
        .filter(|s| !s.is_empty())
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "remora".into());
    let interval = validate::duration(raw.export_interval.as_ref()).ok().flatten();
    let timeout = validate::duration(raw.export_timeout.as_ref()).ok().flatten();
    Ok(Some(ExportSettings {
        endpoint,
        http,
        ca_file: if tls { ca_file } else { None },
        service_name,
        instance: node_id.to_owned(),
        sampling_ratio,
        propagate_unsampled: raw.propagate_unsampled.unwrap_or(true),
        max_queue: match raw.max_queue_size {
            0 => 2048,
            n => n as usize,
        },
        max_batch: match raw.max_export_batch_size {
            0 => 512,
            n => n as usize,
        },
        interval: interval.unwrap_or(Duration::from_secs(1)),
        timeout: timeout.unwrap_or(Duration::from_secs(10)),
    }))
}

fn host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn built_in_defaults_load_and_resolve() {
        let loaded = load(&ConfigSource::defaults()).unwrap();
        assert_eq!(loaded.resources.len(), 5);
        let bootstrap = Bootstrap::resolve(&loaded.bootstrap).unwrap();
        assert_eq!(bootstrap.admin_address, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(bootstrap.drain_time, Duration::from_secs(5));
        assert!(bootstrap.workers >= 1);
        assert!(!bootstrap.node_id.is_empty());
        assert_eq!(bootstrap.control_plane, None);
    }

    #[test]
    fn the_defaults_listen_on_both_families_or_on_ipv4_alone() {
        let listeners = |ipv6| {
            let source = ConfigSource::Text { origin: "test".into(), text: default_config(ipv6) };
            let loaded = load(&source).unwrap();
            loaded
                .resources
                .into_iter()
                .filter_map(|r| match r {
                    Resource::Listener(l) => Some((l.address, l.additional_addresses)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let v6 = |a: &str| vec![a.to_owned()];
        assert_eq!(
            listeners(true),
            [
                ("127.0.0.1:15001".into(), v6("[::1]:15001")),
                ("0.0.0.0:15006".into(), v6("[::]:15006")),
                ("0.0.0.0:15008".into(), v6("[::]:15008")),
                ("0.0.0.0:15008".into(), v6("[::]:15008"))
            ]
        );
        assert_eq!(
            listeners(false),
            [
                ("127.0.0.1:15001".into(), vec![]),
                ("0.0.0.0:15006".into(), vec![]),
                ("0.0.0.0:15008".into(), vec![]),
                ("0.0.0.0:15008".into(), vec![])
            ]
        );
    }

    #[test]
    fn control_plane_must_be_an_http_url() {
        let mut raw = v1::Bootstrap { control_plane: "http://127.0.0.1:15010".into(), ..Default::default() };
        assert_eq!(Bootstrap::resolve(&raw).unwrap().control_plane.as_deref(), Some("http://127.0.0.1:15010"));
        raw.control_plane = "127.0.0.1:15010".into();
        let error = Bootstrap::resolve(&raw).unwrap_err().to_string();
        assert!(error.contains("control_plane: must be an http:// or https:// URL"), "{error}");
        raw.control_plane = "https://control.mesh:15010".into();
        let error = Bootstrap::resolve(&raw).unwrap_err().to_string();
        assert!(error.contains("control_plane_ca_file: is required"), "{error}");
        raw.control_plane_ca = "-----BEGIN CERTIFICATE-----\n...".into();
        assert!(Bootstrap::resolve(&raw).is_ok(), "inline roots serve as well as a file");
        raw.control_plane_ca_file = "/etc/remora/ca.crt".into();
        let resolved = Bootstrap::resolve(&raw).unwrap();
        assert_eq!(resolved.control_plane_ca_file, Some(PathBuf::from("/etc/remora/ca.crt")));
    }

    #[test]
    fn tracing_over_tls_needs_grpc_and_roots_from_the_bootstrap_or_otel_variables() {
        let raw = |tracing: &str| {
            let text = format!("bootstrap:\n  tracing: {tracing}\n");
            remora_control_api::config::parse(&text, "t").unwrap().bootstrap.unwrap()
        };
        let none = |_: &str| None;
        let resolved =
            Bootstrap::resolve_with(&raw("{endpoint: \"https://otel:4317\", ca_file: /etc/ca.pem}"), &none).unwrap();
        assert_eq!(resolved.tracing.unwrap().ca_file, Some(PathBuf::from("/etc/ca.pem")));
        let error = Bootstrap::resolve_with(&raw("{endpoint: \"https://otel:4317\"}"), &none).unwrap_err().to_string();
        assert!(error.contains("tracing.ca_file: is required"), "{error}");
        let env = |name: &str| (name == "OTEL_EXPORTER_OTLP_CERTIFICATE").then(|| "/run/otel/ca.pem".to_owned());
        let resolved = Bootstrap::resolve_with(&raw("{endpoint: \"https://otel:4317\"}"), &env).unwrap();
        assert_eq!(resolved.tracing.unwrap().ca_file, Some(PathBuf::from("/run/otel/ca.pem")));
        let http = Bootstrap::resolve_with(
            &raw("{endpoint: \"https://otel:4318\", protocol: http/protobuf, ca_file: /c}"),
            &none,
        )
        .unwrap();
        assert_eq!(http.tracing.unwrap().ca_file, Some(PathBuf::from("/c")), "TLS over OTLP/HTTP too");
        let plain = Bootstrap::resolve_with(&raw("{endpoint: \"http://otel:4317\", ca_file: /c}"), &none).unwrap();
        assert_eq!(plain.tracing.unwrap().ca_file, None, "roots are for TLS only");
    }

    #[test]
    fn identity_comes_from_the_ca_or_from_files() {
        let text =
            |identity: &str| format!("bootstrap:\n  control_plane: http://127.0.0.1:15010\n  identity: {identity}\n");
        let resolve = |identity: &str| {
            let source = ConfigSource::Text { origin: "t".into(), text: text(identity) };
            load(&source)
                .map_err(|e| e.to_string())
                .and_then(|l| Bootstrap::resolve(&l.bootstrap).map_err(|e| e.to_string()))
        };
        let ca = resolve("{spiffe_id: \"spiffe://td/ns/a/sa/b\", token_file: /t, certificate_ttl: 60s}").unwrap();
        let identity = ca.identity.unwrap();
        assert_eq!(identity.handshake_timeout, limits::DEFAULT_HANDSHAKE_TIMEOUT);
        let IdentitySource::Ca { ca_address, ttl, .. } = identity.source else { panic!("not the CA") };
        assert_eq!((ca_address.as_str(), ttl), ("http://127.0.0.1:15010", Duration::from_secs(60)));
        let files = resolve("{cert_file: /c, key_file: /k, ca_file: /a}").unwrap();
        assert!(matches!(files.identity.unwrap().source, IdentitySource::Files { .. }));
        for (identity, expected) in [
            ("{spiffe_id: \"spiffe://td/ns/a/sa/b\"}", "identity.token_file: is required"),
            ("{spiffe_id: \"web\", token_file: /t}", "identity.spiffe_id: \"web\" is not a SPIFFE ID"),
            ("{spiffe_id: \"spiffe://td/a\", token_file: /t, cert_file: /c}", "not both"),
            ("{cert_file: /c}", "identity.key_file: is required"),
            ("{spiffe_id: \"spiffe://td/a\", token_file: /t, certificate_ttl: 5s}", "from 10s to 30 days"),
        ] {
            let error = resolve(identity).unwrap_err();
            assert!(error.contains(expected), "{identity}: {error}");
        }
    }

    #[test]
    fn version_follows_content() {
        assert_eq!(version_of("a"), version_of("a"));
        assert_ne!(version_of("a"), version_of("b"));
        assert_eq!(version_of("").len(), 16);
    }

    #[test]
    fn invalid_set_is_reported_with_its_origin() {
        let source =
            ConfigSource::Text { origin: "inline".into(), text: "kind: Listener\nname: l\naddress: nowhere\n".into() };
        let error = load(&source).unwrap_err().to_string();
        assert_eq!(error, "inline: listener \"l\": address: must be ip:port, got \"nowhere\"");
    }
}
