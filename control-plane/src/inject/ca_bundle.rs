//! Keeps the injector's `MutatingWebhookConfiguration` trusting the injector: every webhook in it
//! gets the mesh CA's root as its `clientConfig.caBundle`, so installing needs no hand-made patch
//! and a configuration re-applied without it is put right within a minute.
//!
//! With `remora control --injector-name ... --injector-webhook NAME`, [`keep`] reads the
//! configuration `NAME` from the API server at start and then every [`CHECK_INTERVAL`]; when a
//! webhook's `caBundle` is not the root (base64 of its PEM), it sends a JSON patch that sets it,
//! each change guarded by a `test` of that webhook's name, so a configuration edited in between is
//! refused by the API server rather than patched at the wrong index. Each check is counted
//! (`remora_control_injector_ca_bundle_checks_total{result}`) and failures are logged and retried
//! at the next check; several control-plane replicas doing the same thing agree, as they share the
//! root. The control plane's role needs `get` and `patch` on that one configuration.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::metrics::ControlMetrics;

/// How often the configuration is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How long one check (a read, and a patch if one is needed) may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const CONFIGURATIONS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
enum Checked {
    /// Every webhook already trusted the root.
    Current,
    /// These webhooks were given it.
    Patched(Vec<String>),
}

/// Checks the configuration `name` now and every `interval`, for as long as the task runs.
pub async fn keep(
    client: kube::Client,
    name: String,
    root_pem: String,
    metrics: Arc<ControlMetrics>,
    interval: Duration,
) {
    let bundle = base64::engine::general_purpose::STANDARD.encode(root_pem.as_bytes());
    loop {
        let checked = match tokio::time::timeout(CHECK_TIMEOUT, check(&client, &name, &bundle)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        };
        match checked {
            Ok(Checked::Current) => {
                metrics.ca_bundle_checked("current");
                debug!(configuration = %name, "webhook caBundle is the CA root");
            }
            Ok(Checked::Patched(webhooks)) => {
                metrics.ca_bundle_checked("patched");
                info!(configuration = %name, ?webhooks, "webhook caBundle set to the CA root");
            }
            Err(error) => {
                metrics.ca_bundle_checked("error");
                warn!(configuration = %name, %error, "could not check the webhook caBundle; retrying later");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn check(client: &kube::Client, name: &str, bundle: &str) -> Result<Checked, String> {
    let path = format!("{CONFIGURATIONS}/{name}");
    let read = http::Request::get(&path).body(Vec::new()).map_err(|e| e.to_string())?;
    let configuration: Value =
        client.request(read).await.map_err(|e| format!("reading mutatingwebhookconfiguration {name}: {e}"))?;
    let Some((patch, webhooks)) = bundle_patch(&configuration, bundle)? else { return Ok(Checked::Current) };
    let write = http::Request::patch(&path)
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(patch.to_string().into_bytes())
        .map_err(|e| e.to_string())?;
    let _: Value =
        client.request(write).await.map_err(|e| format!("patching mutatingwebhookconfiguration {name}: {e}"))?;
    Ok(Checked::Patched(webhooks))
}

/// The JSON patch giving every webhook of `configuration` the caBundle `bundle`, and the names of
/// the webhooks it changes; `None` when all have it already.
fn bundle_patch(configuration: &Value, bundle: &str) -> Result<Option<(Value, Vec<String>)>, String> {
    let webhooks = configuration["webhooks"].as_array().ok_or("the configuration has no webhooks")?;
    let mut operations = Vec::new();
    let mut names = Vec::new();
    for (index, webhook) in webhooks.iter().enumerate() {
        if webhook["clientConfig"]["caBundle"].as_str() == Some(bundle) {
            continue;
        }
        let name = webhook["name"].as_str().ok_or_else(|| format!("webhook {index} has no name"))?;
        operations.push(json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": name}));
        operations
            .push(json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": bundle}));
        names.push(name.to_owned());
    }
    Ok((!operations.is_empty()).then(|| (Value::Array(operations), names)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_webhooks_without_the_bundle_are_patched_each_guarded_by_its_name() {
        let configuration = json!({"webhooks": [
            {"name": "a.remora.dev", "clientConfig": {"caBundle": "QQ=="}},
            {"name": "b.remora.dev", "clientConfig": {"service": {"name": "remora-injector"}}},
            {"name": "c.remora.dev", "clientConfig": {"caBundle": "b2xk"}},
        ]});
        let (patch, names) = bundle_patch(&configuration, "QQ==").unwrap().unwrap();
        assert_eq!(names, ["b.remora.dev", "c.remora.dev"]);
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/webhooks/1/name", "value": "b.remora.dev"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "QQ=="},
                {"op": "test", "path": "/webhooks/2/name", "value": "c.remora.dev"},
                {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": "QQ=="},
            ])
        );
        let current = json!({"webhooks": [{"name": "a", "clientConfig": {"caBundle": "QQ=="}}]});
        assert_eq!(bundle_patch(&current, "QQ==").unwrap(), None);
        assert!(bundle_patch(&json!({"kind": "Status"}), "QQ==").is_err());
    }
}
