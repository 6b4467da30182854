//! The injector as a mutating admission webhook (`remora control --injector`).
//!
//! The API server POSTs an `AdmissionReview` (`admission.k8s.io/v1`) for each pod created in a
//! namespace labelled `remora.dev/inject: enabled`; [`review`] injects the pod with the same
//! [`Injector`] as `remora inject` and answers with the JSON patch from the pod as it came to the pod
//! injected ([`super::patch`]). A pod left alone is allowed with no patch; a pod with a bad capture
//! annotation is refused, the message naming the annotation, so its creation fails loudly rather
//! than running unmeshed. A body that is not an `AdmissionReview` is a 400. The server side (TLS,
//! the route, metrics) lives with the control plane, in `crate::control`.

use base64::Engine as _;
use serde_json::{Value, json};

use super::{Injector, Outcome, Report};

/// The path the webhook configuration points at.
pub const PATH: &str = "/inject";

/// What became of one review, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed with a patch: the pod has the sidecar.
    Injected,
    /// Allowed unchanged.
    Skipped,
    /// Refused (a bad annotation).
    Denied,
}

impl Verdict {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Skipped => "skipped",
            Verdict::Denied => "denied",
        }
    }
}

/// A request body that is not an AdmissionReview of an object.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("not an AdmissionReview: {0}")]
pub struct BadReview(String);

/// Answers one `AdmissionReview` request body: the response review, and what was done.
pub fn review(injector: &Injector, body: &[u8]) -> Result<(Value, Verdict, Option<Report>), BadReview> {
    let request: Value = serde_json::from_slice(body).map_err(|e| BadReview(e.to_string()))?;
    let api_version = request.get("apiVersion").and_then(Value::as_str).unwrap_or("admission.k8s.io/v1");
    let uid =
        request.pointer("/request/uid").and_then(Value::as_str).ok_or_else(|| BadReview("no request.uid".into()))?;
    let object = request.pointer("/request/object").ok_or_else(|| BadReview("no request.object".into()))?;
    let mut injected = object.clone();
    let mut reports = Vec::new();
    let response = match injector.inject_object(&mut injected, &mut reports) {
        Ok(true) => {
            let patch = serde_json::to_vec(&super::patch::diff(object, &injected)).unwrap_or_default();
            let patch = base64::engine::general_purpose::STANDARD.encode(patch);
            (json!({"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch}), Verdict::Injected)
        }
        Ok(false) => (json!({"uid": uid, "allowed": true}), Verdict::Skipped),
        Err(error) => {
            let message = format!("remora injector: {error}");
            (json!({"uid": uid, "allowed": false, "status": {"code": 400, "message": message}}), Verdict::Denied)
        }
    };
    let report = reports.pop().map(|mut report| {
        // A pod being created often has no name yet, only a prefix; its namespace says where.
        let namespace = request.pointer("/request/namespace").and_then(Value::as_str).unwrap_or_default();
        if report.object.ends_with("(unnamed)")
            && let Some(prefix) = object.pointer("/metadata/generateName").and_then(Value::as_str)
        {
            report.object = format!("pod/{prefix}*");
        }
        if !namespace.is_empty() {
            report.object = format!("{namespace}/{}", report.object);
        }
        report
    });
    let verdict = match (&report, response.1) {
        (Some(Report { outcome: Outcome::Skipped(_), .. }), _) => Verdict::Skipped,
        (_, verdict) => verdict,
    };
    let review = json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response.0});
    Ok((review, verdict, report))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn admission(pod: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "namespace": "shop", "operation": "CREATE",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"}, "object": pod}
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "web-7d4b9c-", "annotations": annotations},
               "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
    }

    #[test]
    fn a_pod_is_answered_with_a_patch_adding_the_sidecar() {
        let (answer, verdict, report) = review(&Injector::default(), &admission(pod(json!({})))).unwrap();
        assert_eq!(verdict, Verdict::Injected);
        assert_eq!(report.unwrap().to_string(), "shop/pod/web-7d4b9c-* injected");
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD.decode(response["patch"].as_str().unwrap()).unwrap();
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        assert_eq!(patch[0]["op"], "add");
        assert_eq!(patch[0]["path"], "/spec/initContainers");
        assert_eq!(patch[0]["value"][1]["name"], "remora-proxy");
    }

    #[test]
    fn opted_out_pods_pass_and_bad_annotations_are_refused() {
        let (answer, verdict, _) =
            review(&Injector::default(), &admission(pod(json!({"remora.dev/inject": "disabled"})))).unwrap();
        assert_eq!((verdict, &answer["response"]["allowed"]), (Verdict::Skipped, &json!(true)));
        assert!(answer["response"].get("patch").is_none());

        let bad = pod(json!({"remora.dev/exclude-inbound-ports": "http"}));
        let (answer, verdict, _) = review(&Injector::default(), &admission(bad)).unwrap();
        assert_eq!(verdict, Verdict::Denied);
        assert_eq!(answer["response"]["allowed"], false);
        assert!(answer["response"]["status"]["message"].as_str().unwrap().contains("remora.dev/exclude-inbound-ports"));

        assert!(review(&Injector::default(), b"{\"kind\": \"AdmissionReview\"}").is_err());
        assert!(review(&Injector::default(), b"not json").is_err());
    }
}
