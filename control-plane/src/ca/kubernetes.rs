//! Kubernetes service-account tokens as the CA's credentials, checked by the API server's
//! TokenReview (`remora control --ca-kubernetes`).
//!
//! A pod's proxy presents a projected service-account token whose audience is the CA's (`remora`
//! by default). [`TokenReview`] sends it to `POST /apis/authentication.k8s.io/v1/tokenreviews`,
//! authenticating as the control plane's own service account, and the API server answers whether
//! the token is valid, for that audience, and whose it is. An account
//! `system:serviceaccount:NAMESPACE:NAME` is entitled to exactly
//! `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/NAME`; any other user, an unauthenticated token, or a
//! token for another audience is refused. The API server unreachable or answering an error is
//! [`AuthError::Unavailable`], so the proxy retries and keeps its current certificate. Every
//! certificate request and every discovery stream (`--xds-auth`, as it opens and every five minutes
//! while it is open) is reviewed: a revoked token gets no certificate and no configuration, however
//! recently it was accepted. An accepted token is remembered for 30 s (by its SHA-256, not the
//! token) only to stand in while the API server cannot answer; a refusal forgets it.
//!
//! The requests go through the control plane's Kubernetes client (`crate::kubernetes`: in a pod,
//! the API server and credentials from the environment; outside one, explicit), as the control
//! plane's own service account; the request carries nothing the proxy controls beyond its token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::auth::{AuthError, Authenticator, Entitlement};
use remora_control_api::identity::IdentityPattern;

/// The audience the CA asks tokens to be for, unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "remora";
/// How long one review may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// How long an accepted token's review may stand in for an API server that cannot answer.
const ACCEPTED_FOR: Duration = Duration::from_secs(30);
/// The most reviews remembered at once (about 100 bytes each).
const MAX_REMEMBERED: usize = 10_000;

/// Accepted tokens' digests, with how long each is remembered and what it entitles to.
type Accepted = HashMap<[u8; 32], (Instant, Entitlement)>;

/// Asks the API server who a token belongs to.
#[derive(Clone)]
pub struct TokenReview {
    client: kube::Client,
    audience: String,
    trust_domain: String,
    /// Accepted tokens, by their SHA-256 (the token itself is not kept), and until when.
    accepted: Arc<Mutex<Accepted>>,
}

impl std::fmt::Debug for TokenReview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReview")
            .field("audience", &self.audience)
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl TokenReview {
    /// Reviews tokens through `client`, for `audience`, entitling accounts to IDs in
    /// `trust_domain`.
    pub fn new(client: kube::Client, trust_domain: &str, audience: &str) -> TokenReview {
        TokenReview {
            client,
            audience: audience.to_owned(),
            trust_domain: trust_domain.to_owned(),
            accepted: Arc::default(),
        }
    }

    fn remembered(&self, digest: &[u8; 32]) -> Option<Entitlement> {
        let accepted = self.accepted.lock().ok()?;
        accepted.get(digest).filter(|(until, _)| *until > Instant::now()).map(|(_, entitlement)| entitlement.clone())
    }

    fn remember(&self, digest: [u8; 32], entitlement: &Entitlement) {
        let Ok(mut accepted) = self.accepted.lock() else { return };
        let now = Instant::now();
        if accepted.len() >= MAX_REMEMBERED {
            accepted.retain(|_, (until, _)| *until > now);
            if accepted.len() >= MAX_REMEMBERED {
                accepted.clear();
            }
        }
        accepted.insert(digest, (now + ACCEPTED_FOR, entitlement.clone()));
    }

    /// Sends one review of `token`; the API server's answer.
    async fn review(&self, token: &str) -> Result<Value, AuthError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| AuthError::Unavailable(format!("{what}: {e}"));
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        });
        let request = http::Request::post(REVIEW_PATH)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string().into_bytes())
            .map_err(|e| unavailable("the review request", &e))?;
        self.client.request::<Value>(request).await.map_err(|e| unavailable("the API server", &e))
    }

    /// What the API server's answer entitles the token's holder to.
    fn entitlement(&self, answer: &Value) -> Result<Entitlement, AuthError> {
        let status = &answer["status"];
        if status["authenticated"] != Value::Bool(true) {
            return Err(AuthError::Unknown);
        }
        // An API server that knows audiences says which the token is for; it must be ours.
        if let Some(audiences) = status["audiences"].as_array()
            && !audiences.iter().any(|a| a.as_str() == Some(&self.audience))
        {
            return Err(AuthError::Unknown);
        }
        let username = status["user"]["username"].as_str().unwrap_or_default();
        let account = username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'));
        let Some((namespace, name)) = account.filter(|(ns, sa)| valid_name(ns) && valid_name(sa)) else {
            return Err(AuthError::Unknown);
        };
        let id = format!("spiffe://{}/ns/{namespace}/sa/{name}", self.trust_domain);
        let pattern = IdentityPattern::parse(&id).map_err(|e| AuthError::Unavailable(e.to_string()))?;
        Ok(Entitlement { identities: vec![pattern] })
    }
}

/// A Kubernetes namespace or service-account name (a DNS label or subdomain): nothing a SPIFFE
/// path or glob could read differently.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl TokenReview {
    /// Reviews `token` (its SHA-256 is `digest`) with the API server; remembers an acceptance and
    /// forgets one a refusal overturns.
    async fn ask(&self, token: &str, digest: [u8; 32]) -> Result<Entitlement, AuthError> {
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, self.review(token)).await.map_err(|_| {
            AuthError::Unavailable(format!("the API server did not answer within {REVIEW_TIMEOUT:?}"))
        })??;
        match self.entitlement(&answer) {
            Ok(entitlement) => {
                self.remember(digest, &entitlement);
                Ok(entitlement)
            }
            Err(refused) => {
                if let Ok(mut accepted) = self.accepted.lock() {
                    accepted.remove(&digest);
                }
                Err(refused)
            }
        }
    }
}

/// The SHA-256 of a non-empty token.
fn digest(token: &str) -> Result<[u8; 32], AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    let mut digest = [0_u8; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    Ok(digest)
}

impl Authenticator for TokenReview {
    /// Always asks: a revoked token gets no certificate and opens no discovery stream, even moments
    /// after it was accepted. Only when the API server cannot answer does an acceptance of the last
    /// 30 s stand in, so that a proxy renewing its certificate or reconnecting rides out a blip of
    /// the API server.
    async fn authenticate(&self, token: &str) -> Result<Entitlement, AuthError> {
        let digest = digest(token)?;
        match self.ask(token, digest).await {
            Err(AuthError::Unavailable(why)) => self.remembered(&digest).ok_or(AuthError::Unavailable(why)),
            outcome => outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A review that never sends anything (nothing listens at the address).
    fn review() -> TokenReview {
        let config = kube::Config::new("https://10.96.0.1:443".parse().unwrap());
        TokenReview::new(crate::kubernetes::from_config(config).unwrap(), "cluster.local", "remora")
    }

    #[tokio::test]
    async fn a_service_account_is_entitled_to_its_own_spiffe_id_only() {
        let review = review();
        let answer = json!({"status": {"authenticated": true, "audiences": ["remora"],
                                       "user": {"username": "system:serviceaccount:shop:web"}}});
        let entitlement = review.entitlement(&answer).unwrap();
        assert_eq!(
            entitlement.identities,
            vec![IdentityPattern::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap()]
        );
        for refused in [
            json!({"status": {"authenticated": false}}),
            json!({"status": {"authenticated": true, "audiences": ["https://kubernetes.default.svc"],
                              "user": {"username": "system:serviceaccount:shop:web"}}}),
            json!({"status": {"authenticated": true, "user": {"username": "alice@example.com"}}}),
            json!({"status": {"authenticated": true, "user": {"username": "system:serviceaccount:shop:*"}}}),
            json!({"status": {"authenticated": true, "user": {"username": "system:serviceaccount:shop"}}}),
        ] {
            assert!(matches!(review.entitlement(&refused), Err(AuthError::Unknown)), "{refused}");
        }
    }
}
