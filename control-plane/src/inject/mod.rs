//! Sidecar injection: giving a workload's pods the Remora proxy and its capture init container.
//!
//! One [`Injector`] serves `remora inject` (manifests in, manifests out: [`Injector::inject_manifests`])
//! and the admission webhook ([`webhook`]: a pod in, a JSON patch out; [`ca_bundle`] keeps the
//! webhook's configuration trusting it). Both work on a pod *template*,
//! the `{metadata, spec}` of a Pod or of the pod template inside a Deployment, StatefulSet,
//! DaemonSet, ReplicaSet, ReplicationController, Job or CronJob (and of each item of a `List`):
//!
//! - the capture init container `remora-init` runs `remora init` as root with NET_ADMIN, excluding the
//!   admin port and whatever the pod's annotations exclude. The app's probe ports stay captured:
//!   they are usually the ports its callers use too, whose mesh TLS only the proxy can terminate,
//!   so kubelet's plaintext probes pass through the inbound listener like any unmeshed caller;
//!   a dedicated probe port can be excluded by annotation;
//! - the proxy `remora-proxy` runs as uid 1337 on its built-in defaults, configured by the control
//!   plane, its admin port serving the probes. By default it is a native sidecar (an init container
//!   with `restartPolicy: Always`, Kubernetes 1.29+): it starts before the app and its other init
//!   containers, its startup probe holds them until it is ready, and it stops after them, so Jobs
//!   complete. With `legacy` it is the first app container instead, whose postStart hook
//!   (`remora wait-ready`) holds the next containers until it is ready; the capture container then
//!   runs after the pod's own init containers, which would have no proxy to talk through;
//! - with [`IdentityConfig`], a projected service-account token for the proxy to ask the CA for
//!   its account's SPIFFE ID with, and the CA root inline to check the control plane by.
//!
//! A template is left alone, with the reason reported, when it is already injected (a container
//! named `remora-proxy`: injecting twice changes nothing), has a container named `remora-init`
//! already, opted out (`remora.dev/inject: disabled` on the template or the workload), on the host
//! network (capture rules would apply to the node), or, in legacy mode, a Job's (it would never
//! complete). Everything else is kept as it was: a document that needs no change is printed byte
//! for byte as it came.

pub mod ca_bundle;
pub mod patch;
pub mod webhook;

use std::fmt;

use remora_control_api::capture;
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The annotation that opts a workload out (`disabled`) of injection.
pub const INJECT_ANNOTATION: &str = "remora.dev/inject";
/// The annotation, on a Namespace or a Pod (which wins), that makes its inbound side `strict` (mTLS
/// only) or `permissive`; the control plane's automatic mesh applies it.
pub const INBOUND_ANNOTATION: &str = "remora.dev/inbound";
/// The proxy container's name, which also marks a pod as injected.
pub const PROXY_CONTAINER: &str = "remora-proxy";
/// The capture init container's name.
pub const INIT_CONTAINER: &str = "remora-init";
const TOKEN_VOLUME: &str = "remora-token";
const TOKEN_MOUNT: &str = "/var/run/secrets/remora";
/// How long the projected token lives (kubelet renews it before then; the proxy reads it at each
/// certificate renewal).
const TOKEN_LIFETIME_SECONDS: u32 = 3600;
const ADMIN_PORT: u16 = 15000;

/// Pod annotations that tune capture, and the `remora init` flag each becomes.
const CAPTURE_ANNOTATIONS: [(&str, &str, Kind); 6] = [
    ("remora.dev/inbound-ports", "--inbound-ports", Kind::PortSet),
    ("remora.dev/exclude-inbound-ports", "--exclude-inbound-ports", Kind::Ports),
    ("remora.dev/exclude-outbound-ports", "--exclude-outbound-ports", Kind::Ports),
    ("remora.dev/include-outbound-cidrs", "--include-outbound-cidrs", Kind::CidrSet),
    ("remora.dev/exclude-outbound-cidrs", "--exclude-outbound-cidrs", Kind::Cidrs),
    // `true`: `--ipv6`, `false`: `--no-ipv6`; unset, `remora init` decides by the pod's addresses.
    ("remora.dev/capture-ipv6", "--ipv6", Kind::Switch("--no-ipv6")),
];

#[derive(Clone, Copy)]
enum Kind {
    Ports,
    PortSet,
    Cidrs,
    CidrSet,
    /// `true` gives the flag, `false` the one named here.
    Switch(&'static str),
}

/// What the injected containers look like (`remora inject --config`, `remora control
/// --injector-config`); every field has a default.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InjectConfig {
    /// The image of both containers (the one Remora image).
    pub image: String,
    /// Its pull policy.
    pub image_pull_policy: String,
    /// The control plane the proxies connect to.
    pub control_plane: String,
    /// Workload identity (mTLS): absent, the proxies run without one.
    pub identity: Option<IdentityConfig>,
    /// The proxy's uid and gid.
    pub proxy_uid: u32,
    /// The proxy's log filter (`RUST_LOG`).
    pub log_level: String,
    /// The proxy container's resources (a Kubernetes `ResourceRequirements`).
    pub proxy_resources: Value,
    /// The capture init container's resources.
    pub init_resources: Value,
}

/// How injected proxies get their identity: a certificate from the control plane's CA for
/// `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT`, asked for with the pod's projected
/// service-account token (audience `token_audience`), which the CA checks with the API server's
/// TokenReview (`remora control --ca-kubernetes`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The trust domain.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The audience of the projected token (the CA's `--token-audience`).
    #[serde(default = "default_audience")]
    pub token_audience: String,
    /// The CA's root certificate (PEM file): proxies check the `https://` control plane with it. It
    /// is read when the config is loaded and given to each proxy inline (`REMORA_CONTROL_CA`), so no
    /// Secret or ConfigMap has to exist in the pod's namespace.
    #[serde(default)]
    pub control_plane_ca_file: Option<std::path::PathBuf>,
    /// The root's PEM, read from `control_plane_ca_file`.
    #[serde(skip)]
    pub control_plane_ca: Option<String>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_audience() -> String {
    crate::ca::kubernetes::DEFAULT_AUDIENCE.into()
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: format!("ghcr.io/remora-mesh/remora:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            control_plane: "http://remora-control.remora-system.svc:15010".into(),
            identity: None,
            proxy_uid: 1337,
            log_level: "info".into(),
            proxy_resources: json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}),
            init_resources: json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "32Mi"}}),
        }
    }
}

/// Why manifests could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A document is not YAML.
    #[error("document {document}: {message}")]
    Yaml {
        /// 1-based.
        document: usize,
        /// The parser's message.
        message: String,
    },
    /// A pod's annotation has a bad value.
    #[error("{object}: annotation {annotation}: {message}")]
    Annotation {
        /// The object (`deployment/web`).
        object: String,
        /// The annotation.
        annotation: String,
        /// What is wrong.
        message: String,
    },
    /// The injector's own config is bad.
    #[error("injector config: {0}")]
    Config(String),
}

/// What happened to one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `kind/name` (`deployment/web`).
    pub object: String,
    /// What was done.
    pub outcome: Outcome,
}

/// Whether a workload was injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It now has the sidecar.
    Injected,
    /// It was left alone, for this reason.
    Skipped(&'static str),
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.outcome {
            Outcome::Injected => write!(f, "{} injected", self.object),
            Outcome::Skipped(reason) => write!(f, "{} skipped: {reason}", self.object),
        }
    }
}

/// Injects pod templates (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Injector {
    config: InjectConfig,
    legacy: bool,
}

impl InjectConfig {
    /// Reads a config from YAML; unknown fields are refused, naming the field.
    pub fn from_yaml(text: &str) -> Result<InjectConfig, InjectError> {
        if text.trim().is_empty() {
            return Ok(InjectConfig::default());
        }
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let mut config: InjectConfig =
            serde_path_to_error::deserialize(deserializer).map_err(|e| InjectError::Config(e.to_string()))?;
        if let Some(identity) = &mut config.identity
            && let Some(path) = &identity.control_plane_ca_file
        {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| InjectError::Config(format!("identity.control_plane_ca_file: {}: {e}", path.display())))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(InjectError::Config(format!(
                    "identity.control_plane_ca_file: {}: holds no PEM certificate",
                    path.display()
                )));
            }
            identity.control_plane_ca = Some(pem);
        }
        Ok(config)
    }
}

impl Injector {
    /// An injector of `config`'s containers, as a native sidecar or (`legacy`) a first container.
    pub fn new(config: InjectConfig, legacy: bool) -> Injector {
        Injector { config, legacy }
    }

    /// Injects every workload of a multi-document YAML stream. Documents left unchanged are copied
    /// as they came; changed ones are written anew. Returns the text and a report per workload.
    pub fn inject_manifests(&self, text: &str) -> Result<(String, Vec<Report>), InjectError> {
        let mut out = String::with_capacity(text.len() * 2);
        let mut reports = Vec::new();
        for (index, (separator, document)) in documents(text).into_iter().enumerate() {
            out.push_str(separator);
            let yaml_error = |message: String| InjectError::Yaml { document: index + 1, message };
            let yaml = remora_control_api::yaml::value(document).map_err(|e| yaml_error(e.to_string()))?;
            let mut value: Value = serde_json::to_value(yaml).map_err(|e| yaml_error(e.to_string()))?;
            if self.inject_object(&mut value, &mut reports)? {
                let yaml = serde_yaml_ng::to_string(&value).map_err(|e| yaml_error(e.to_string()))?;
                out.push_str(leading_comments(document));
                out.push_str(&yaml);
            } else {
                out.push_str(document);
            }
        }
        Ok((out, reports))
    }

    /// Injects the pod templates of one object (recursing into a `List`); whether it changed.
    pub fn inject_object(&self, object: &mut Value, reports: &mut Vec<Report>) -> Result<bool, InjectError> {
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let name = object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("(unnamed)");
        let label = format!("{}/{name}", kind.to_lowercase());
        let owner_opted_out = opted_out(object.get("metadata"));
        let (pointer, is_job) = match kind.as_str() {
            "List" => {
                let mut changed = false;
                if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
                    for item in items {
                        changed |= self.inject_object(item, reports)?;
                    }
                }
                return Ok(changed);
            }
            "Pod" => ("", false),
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" => {
                ("/spec/template", false)
            }
            "Job" => ("/spec/template", true),
            "CronJob" => ("/spec/jobTemplate/spec/template", true),
            _ => return Ok(false),
        };
        let Some(template) = object.pointer_mut(pointer) else { return Ok(false) };
        let outcome = if owner_opted_out {
            Outcome::Skipped("opted out (remora.dev/inject: disabled)")
        } else if is_job && self.legacy {
            Outcome::Skipped("a Job's pods would never complete beside a legacy sidecar (use native sidecars)")
        } else {
            self.inject_template(template, &label)?
        };
        let changed = outcome == Outcome::Injected;
        reports.push(Report { object: label, outcome });
        Ok(changed)
    }

    /// Injects one pod template (`{metadata, spec}`), unless it must be skipped.
    pub fn inject_template(&self, template: &mut Value, object: &str) -> Result<Outcome, InjectError> {
        if opted_out(template.get("metadata")) {
            return Ok(Outcome::Skipped("opted out (remora.dev/inject: disabled)"));
        }
        let Some(spec) = template.get("spec").and_then(Value::as_object) else {
            return Ok(Outcome::Skipped("no pod spec"));
        };
        if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
            return Ok(Outcome::Skipped("host network (capture rules would apply to the node)"));
        }
        let named = |name: &str| {
            ["containers", "initContainers"].iter().any(|list| {
                spec.get(*list)
                    .and_then(Value::as_array)
                    .is_some_and(|l| l.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(name)))
            })
        };
        if named(PROXY_CONTAINER) {
            return Ok(Outcome::Skipped("already injected"));
        }
        // Container names are unique across a pod's containers and init containers: the API
        // server would refuse the pod with a second one.
        if named(INIT_CONTAINER) {
            return Ok(Outcome::Skipped("a container is already named remora-init"));
        }
        let Some(app) = spec.get("containers").and_then(Value::as_array).filter(|c| !c.is_empty()) else {
            return Ok(Outcome::Skipped("no containers"));
        };
        let first_app = app[0].get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
        let init = self.init_container(template.get("metadata"), object)?;
        let proxy = self.proxy_container();

        let Some(spec) = template.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(Outcome::Skipped("no pod spec"));
        };
        if self.legacy {
            with_list(spec, "initContainers", |l| l.push(init));
            with_list(spec, "containers", |l| l.insert(0, proxy));
        } else {
            with_list(spec, "initContainers", |l| l.splice(0..0, [init, proxy]).for_each(drop));
        }
        if let Some(identity) = &self.config.identity {
            let token = json!({"audience": identity.token_audience, "expirationSeconds": TOKEN_LIFETIME_SECONDS, "path": "token"});
            let volume = json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}});
            with_list(spec, "volumes", |l| l.push(volume));
        }
        if self.legacy
            && let Some(template) = template.as_object_mut()
        {
            // `kubectl logs` and `exec` still pick the app by default.
            let metadata = template.entry("metadata").or_insert_with(|| json!({}));
            if let Some(metadata) = metadata.as_object_mut() {
                let annotations = metadata.entry("annotations").or_insert_with(|| json!({}));
                if let Some(annotations) = annotations.as_object_mut() {
                    annotations.entry("kubectl.kubernetes.io/default-container").or_insert(Value::String(first_app));
                }
            }
        }
        Ok(Outcome::Injected)
    }

    fn init_container(&self, metadata: Option<&Value>, object: &str) -> Result<Value, InjectError> {
        let uid = self.config.proxy_uid.to_string();
        let mut args: Vec<String> = vec!["init".into(), "--proxy-uid".into(), uid];
        let annotation = |key: &str| metadata.and_then(|m| m.get("annotations")?.get(key)).and_then(Value::as_str);
        // The inbound side's mode is the control plane's to apply; a value it would read as strict
        // by mistake is refused here, where the author sees it.
        if let Some(mode) = annotation(INBOUND_ANNOTATION)
            && !matches!(mode, "strict" | "permissive")
        {
            return Err(InjectError::Annotation {
                object: object.to_owned(),
                annotation: INBOUND_ANNOTATION.to_owned(),
                message: format!("must be strict or permissive, got {mode:?}"),
            });
        }
        for (key, flag, kind) in CAPTURE_ANNOTATIONS {
            let value = annotation(key).map(str::trim).unwrap_or_default().to_owned();
            let bad = |message: String| InjectError::Annotation {
                object: object.to_owned(),
                annotation: key.to_owned(),
                message,
            };
            let checked = match kind {
                Kind::Ports => capture::parse_ports(&value).map(drop),
                Kind::PortSet => capture::parse_port_set(&value).map(drop),
                Kind::Cidrs => capture::parse_cidrs(&value).map(drop),
                Kind::CidrSet => capture::parse_cidr_set(&value).map(drop),
                Kind::Switch(off) => {
                    match value.as_str() {
                        "" => {}
                        "true" => args.push(flag.to_owned()),
                        "false" => args.push(off.to_owned()),
                        other => return Err(bad(format!("must be true or false, got {other:?}"))),
                    }
                    continue;
                }
            };
            checked.map_err(|e| bad(e.to_string()))?;
            if !value.is_empty() {
                args.extend([flag.to_owned(), value]);
            }
        }
        Ok(json!({
            "name": INIT_CONTAINER,
            "image": self.config.image,
            "imagePullPolicy": self.config.image_pull_policy,
            "args": args,
            "resources": self.config.init_resources,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                "privileged": false,
                "readOnlyRootFilesystem": true,
                "runAsGroup": 0,
                "runAsNonRoot": false,
                "runAsUser": 0,
            },
        }))
    }

    fn proxy_container(&self) -> Value {
        let config = &self.config;
        let mut args: Vec<String> = vec!["proxy".into(), "--admin".into(), format!("0.0.0.0:{ADMIN_PORT}")];
        args.extend(["--node-id".into(), "$(POD_NAME).$(POD_NAMESPACE)".into()]);
        args.extend(["--control".into(), config.control_plane.clone()]);
        let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
        let mut env = vec![field("POD_NAME", "metadata.name"), field("POD_NAMESPACE", "metadata.namespace")];
        let mut mounts = Vec::new();
        if let Some(identity) = &config.identity {
            env.push(field("SERVICE_ACCOUNT", "spec.serviceAccountName"));
            if let Some(pem) = &identity.control_plane_ca {
                env.push(json!({"name": "REMORA_CONTROL_CA", "value": pem}));
            }
            args.extend([
                "--identity".into(),
                format!("spiffe://{}/ns/$(POD_NAMESPACE)/sa/$(SERVICE_ACCOUNT)", identity.trust_domain),
            ]);
            args.extend(["--token-file".into(), format!("{TOKEN_MOUNT}/token")]);
            mounts.push(json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": true}));
        }
        env.push(json!({"name": "RUST_LOG", "value": config.log_level}));
        let probe = |path: &str, period: u32, failures: u32| json!({"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": period, "failureThreshold": failures});
        let mut container = json!({
            "name": PROXY_CONTAINER,
            "image": config.image,
            "imagePullPolicy": config.image_pull_policy,
            "args": args,
            "env": env,
            "ports": [{"name": "remora-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
            "startupProbe": probe("/ready", 1, 120),
            "readinessProbe": probe("/ready", 5, 3),
            "livenessProbe": probe("/live", 10, 3),
            "resources": config.proxy_resources,
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "privileged": false,
                "readOnlyRootFilesystem": true,
                "runAsGroup": config.proxy_uid,
                "runAsNonRoot": true,
                "runAsUser": config.proxy_uid,
            },
        });
        if let Some(fields) = container.as_object_mut() {
            if !mounts.is_empty() {
                fields.insert("volumeMounts".into(), Value::Array(mounts));
            }
            if self.legacy {
                // The next containers start once this hook returns: when the proxy is ready.
                fields.insert(
                    "lifecycle".into(),
                    json!({"postStart": {"exec": {"command": ["/usr/local/bin/remora", "wait-ready"]}}}),
                );
            } else {
                fields.insert("restartPolicy".into(), Value::String("Always".into()));
            }
        }
        container
    }
}

/// Whether the object's `metadata` opts it out.
fn opted_out(metadata: Option<&Value>) -> bool {
    metadata
        .and_then(|m| m.get("annotations")?.get(INJECT_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "disabled" | "false" | "off"))
}

/// Runs `f` on the array field `key` of `spec`, made an empty array first if absent (or null).
fn with_list(spec: &mut Map<String, Value>, key: &str, f: impl FnOnce(&mut Vec<Value>)) {
    let entry = spec.entry(key).or_insert_with(|| Value::Array(Vec::new()));
    if !entry.is_array() {
        *entry = Value::Array(Vec::new());
    }
    if let Value::Array(items) = entry {
        f(items);
    }
}

/// The comment (and blank) lines a document opens with, which re-serializing it would lose.
fn leading_comments(document: &str) -> &str {
    let mut end = 0;
    for line in document.split_inclusive('\n') {
        let bare = line.trim();
        if !(bare.is_empty() || bare.starts_with('#')) {
            break;
        }
        end += line.len();
    }
    &document[..end]
}

/// Splits a YAML stream into documents, each with the separator line before it (empty for the
/// first), so unchanged documents can be copied back exactly. Documents holding nothing (only
/// comments) stay with their separator and parse as null.
fn documents(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let (mut separator, mut start, mut position) = ("", 0, 0);
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            out.push((separator, &text[start..position]));
            separator = &text[position..position + line.len()];
            start = position + line.len();
        }
        position += line.len();
    }
    out.push((separator, &text[start..]));
    // A stream that starts with `---` has an empty first document: fold it away.
    if out.len() > 1 && out[0].0.is_empty() && out[0].1.trim().is_empty() {
        let (_, leading) = out.remove(0);
        if !leading.is_empty() {
            out[0].0 = &text[..leading.len() + out[0].0.len()];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pod(annotations: &str, spec: &str) -> String {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations: {{{annotations}}}\nspec:\n{spec}")
    }

    const APP: &str = "  containers:\n  - name: app\n    image: app:1\n    ports: [{name: http, containerPort: 8080}]\n    readinessProbe: {httpGet: {path: /healthz, port: http}}\n    livenessProbe: {tcpSocket: {port: 9090}}\n";

    #[test]
    fn native_sidecar_goes_first_among_init_containers() {
        let input = pod("", &format!("{APP}  initContainers:\n  - name: migrate\n    image: migrate:1\n"));
        let (out, reports) = Injector::default().inject_manifests(&input).unwrap();
        assert_eq!(reports, vec![Report { object: "pod/web".into(), outcome: Outcome::Injected }]);
        let value: Value = serde_yaml_ng::from_str(&out).unwrap();
        let names: Vec<&str> =
            value["spec"]["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["remora-init", "remora-proxy", "migrate"]);
        let proxy = &value["spec"]["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
        let init_args = value["spec"]["initContainers"][0]["args"].as_array().unwrap();
        assert_eq!(init_args.join_strings(), "init --proxy-uid 1337");
        assert_eq!(value["spec"]["containers"].as_array().unwrap().len(), 1);
    }

    trait JoinStrings {
        fn join_strings(&self) -> String;
    }

    impl JoinStrings for Vec<Value> {
        fn join_strings(&self) -> String {
            self.iter().map(|v| v.as_str().unwrap()).collect::<Vec<_>>().join(" ")
        }
    }

    #[test]
    fn injecting_twice_changes_nothing_and_skips_say_why() {
        let once = Injector::default().inject_manifests(&pod("", APP)).unwrap().0;
        let (twice, reports) = Injector::default().inject_manifests(&once).unwrap();
        assert_eq!(once, twice);
        assert_eq!(reports[0].to_string(), "pod/web skipped: already injected");

        // An app container named as the init container would be (found by the admission fuzzer).
        let clash = pod("", &APP.replace("name: app", "name: remora-init"));
        let (out, reports) = Injector::default().inject_manifests(&clash).unwrap();
        assert_eq!(out, clash);
        assert_eq!(reports[0].outcome, Outcome::Skipped("a container is already named remora-init"));

        let host = pod("", &format!("  hostNetwork: true\n{APP}"));
        let (out, reports) = Injector::default().inject_manifests(&host).unwrap();
        assert_eq!(out, host);
        assert_eq!(reports[0].outcome, Outcome::Skipped("host network (capture rules would apply to the node)"));

        let opted = pod("remora.dev/inject: disabled", APP);
        assert_eq!(Injector::default().inject_manifests(&opted).unwrap().0, opted);
    }

    #[test]
    fn a_bad_annotation_is_refused_naming_it() {
        let input = pod("remora.dev/exclude-outbound-cidrs: 10.0.0.0/40", APP);
        let error = Injector::default().inject_manifests(&input).unwrap_err();
        assert_eq!(
            error.to_string(),
            "pod/web: annotation remora.dev/exclude-outbound-cidrs: \"10.0.0.0/40\": the prefix length must be 0 to 32"
        );
        let input = pod("remora.dev/inbound: strcit", APP);
        let error = Injector::default().inject_manifests(&input).unwrap_err().to_string();
        assert!(error.contains("remora.dev/inbound: must be strict or permissive, got \"strcit\""), "{error}");
        let input = pod("remora.dev/capture-ipv6: \"yes\"", APP);
        let error = Injector::default().inject_manifests(&input).unwrap_err().to_string();
        assert!(error.contains("remora.dev/capture-ipv6: must be true or false, got \"yes\""), "{error}");
    }

    #[test]
    fn ipv6_capture_follows_the_pod_unless_its_annotation_says() {
        let init_args = |annotations: &str| {
            let (out, _) = Injector::default().inject_manifests(&pod(annotations, APP)).unwrap();
            let value: Value = serde_yaml_ng::from_str(&out).unwrap();
            value["spec"]["initContainers"][0]["args"].as_array().unwrap().join_strings()
        };
        assert_eq!(init_args(""), "init --proxy-uid 1337", "remora init decides by the pod's addresses");
        assert_eq!(init_args("remora.dev/capture-ipv6: \"true\""), "init --proxy-uid 1337 --ipv6");
        assert_eq!(init_args("remora.dev/capture-ipv6: \"false\""), "init --proxy-uid 1337 --no-ipv6");
    }

    #[test]
    fn legacy_sidecar_is_the_first_container_and_waits_for_readiness() {
        let input = pod("", &format!("{APP}  initContainers:\n  - name: migrate\n    image: migrate:1\n"));
        let (out, _) = Injector::new(InjectConfig::default(), true).inject_manifests(&input).unwrap();
        let value: Value = serde_yaml_ng::from_str(&out).unwrap();
        assert_eq!(value["spec"]["containers"][0]["name"], PROXY_CONTAINER);
        assert_eq!(value["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"][1], "wait-ready");
        assert_eq!(value["spec"]["initContainers"][1]["name"], INIT_CONTAINER);
        assert_eq!(value["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"], "app");
        let job = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: once}\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: run, image: run:1}]\n";
        let (out, reports) = Injector::new(InjectConfig::default(), true).inject_manifests(job).unwrap();
        assert_eq!(out, job);
        assert!(matches!(reports[0].outcome, Outcome::Skipped(_)));
    }

    #[test]
    fn documents_keep_their_separators_and_unchanged_ones_their_bytes() {
        let text =
            "---\n# a comment\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n--- # next\nkind: ConfigMap\n";
        let docs = documents(text);
        assert_eq!(
            docs,
            vec![
                ("---\n", "# a comment\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n"),
                ("--- # next\n", "kind: ConfigMap\n")
            ]
        );
        assert_eq!(Injector::default().inject_manifests(text).unwrap().0, text);
        assert_eq!(documents("kind: A\n"), vec![("", "kind: A\n")]);
    }

    #[test]
    fn identity_mounts_a_projected_token_and_names_the_service_account() {
        let dir = std::env::temp_dir().join(format!("remora-inject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = crate::ca::Authority::generate("example.org").unwrap();
        std::fs::write(dir.join("ca.crt"), root.root_pem()).unwrap();
        let yaml = format!(
            "identity: {{trust_domain: example.org, control_plane_ca_file: {}}}\ncontrol_plane: https://cp:15010\n",
            dir.join("ca.crt").display()
        );
        let config = InjectConfig::from_yaml(&yaml).unwrap();
        let (out, _) = Injector::new(config, false).inject_manifests(&pod("", APP)).unwrap();
        let value: Value = serde_yaml_ng::from_str(&out).unwrap();
        let proxy = &value["spec"]["initContainers"][1];
        let args = proxy["args"].as_array().unwrap().join_strings();
        assert!(
            args.ends_with("--control https://cp:15010 --identity spiffe://example.org/ns/$(POD_NAMESPACE)/sa/$(SERVICE_ACCOUNT) --token-file /var/run/secrets/remora/token"),
            "{args}"
        );
        let env = proxy["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "REMORA_CONTROL_CA" && e["value"] == root.root_pem()), "{env:?}");
        let token = &value["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!((&token["audience"], &token["path"]), (&json!("remora"), &json!("token")));
        let missing = InjectConfig::from_yaml("identity: {control_plane_ca_file: /no/such/ca.crt}").unwrap_err();
        assert!(
            missing.to_string().starts_with("injector config: identity.control_plane_ca_file: /no/such/ca.crt"),
            "{missing}"
        );
        let error = InjectConfig::from_yaml("imagee: x").unwrap_err().to_string();
        assert!(
            error.starts_with("injector config: imagee: unknown field `imagee`, expected one of `image`"),
            "{error}"
        );
    }
}
