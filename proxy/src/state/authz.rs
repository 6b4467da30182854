//! Authorization policies, compiled: for each inbound listener, the policy that covers each
//! destination port, ready to judge a peer identity without parsing anything.
//!
//! Built with the snapshot from the AuthorizationPolicy resources that name a listener; the listener
//! holds its [`ListenerAuthz`]. The inbound path asks it for the connection's port once, at accept
//! (plaintext in strict mode is refused there; an mTLS peer of a TCP connection is judged there),
//! and the HTTP path asks the policy again for each request, with the route it took.

use std::collections::HashMap;
use std::sync::Arc;

use remora_control_api::identity::{self, IdentityPattern};
use remora_control_api::v1;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::telemetry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    listener: String,
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaintextLabels {
    listener: String,
    policy: String,
    result: &'static str,
}

/// The authorization metric families: what the policies denied, and the plaintext they let in or
/// refused.
#[derive(Clone, Debug, Default)]
pub struct AuthzMetrics {
    denied: Family<PolicyLabels, Counter>,
    plaintext: Family<PlaintextLabels, Counter>,
}

impl AuthzMetrics {
    /// Declares the families in `registry`.
    pub fn register(registry: &mut Registry) -> AuthzMetrics {
        let m = AuthzMetrics::default();
        registry.register(
            "authorization_denied",
            "Connections (TCP) and requests (HTTP, answered 403) an authorization policy denied",
            m.denied.clone(),
        );
        registry.register(
            "authorization_plaintext",
            "Plaintext connections to a port an authorization policy covers, by result (accepted: permissive; refused: strict)",
            m.plaintext.clone(),
        );
        m
    }

    /// The counters of policy `policy` on listener `listener`, made when the policy is compiled, so
    /// judging a connection or request never builds a label.
    fn policy(&self, listener: &str, policy: &str) -> PolicyCounters {
        let labels = PolicyLabels { listener: listener.to_owned(), policy: policy.to_owned() };
        let plaintext = |result| PlaintextLabels { listener: listener.to_owned(), policy: policy.to_owned(), result };
        PolicyCounters {
            denied: self.denied.get_or_create_owned(&labels),
            plaintext_accepted: self.plaintext.get_or_create_owned(&plaintext("accepted")),
            plaintext_refused: self.plaintext.get_or_create_owned(&plaintext("refused")),
        }
    }
}

/// What one authorization policy decided: connections (TCP) and requests (HTTP) denied, plaintext
/// connections accepted (permissive) and refused (strict).
#[derive(Clone, Debug, Default)]
pub struct PolicyCounters {
    /// Denied connections and requests.
    pub denied: Counter,
    /// Plaintext connections let in by a permissive policy.
    pub plaintext_accepted: Counter,
    /// Plaintext connections closed by a strict policy.
    pub plaintext_refused: Counter,
}

/// The policies guarding one listener.
#[derive(Debug, Default)]
pub struct ListenerAuthz {
    by_port: HashMap<u16, Arc<Policy>>,
    every_port: Option<Arc<Policy>>,
}

impl ListenerAuthz {
    /// Compiles the (validated) policies that name listener `listener`; `None` if there are none.
    pub fn compile<'a>(
        policies: impl Iterator<Item = &'a v1::AuthorizationPolicy>,
        listener: &str,
        metrics: &AuthzMetrics,
    ) -> Option<ListenerAuthz> {
        let mut authz = ListenerAuthz::default();
        let mut any = false;
        for policy in policies {
            any = true;
            let compiled = Arc::new(Policy::compile(policy, metrics.policy(listener, &policy.name)));
            match u16::try_from(policy.port) {
                Ok(0) | Err(_) => authz.every_port = Some(compiled),
                Ok(port) => {
                    authz.by_port.insert(port, compiled);
                }
            }
        }
        any.then_some(authz)
    }

    /// The policy covering destination `port`: the one for that port, else the listener-wide one.
    pub fn for_port(&self, port: u16) -> Option<&Arc<Policy>> {
        self.by_port.get(&port).or(self.every_port.as_ref())
    }
}

/// One AuthorizationPolicy.
#[derive(Debug)]
pub struct Policy {
    /// Its name, for metrics and logs.
    pub name: Arc<str>,
    /// Whether plaintext is refused.
    pub strict: bool,
    /// What it decided.
    pub counters: PolicyCounters,
    allow: Vec<IdentityPattern>,
    /// Routes with lists of their own: table, route, allow list. Few, so scanned in order, with no
    /// key to build per request.
    routes: Vec<(String, String, Vec<IdentityPattern>)>,
}

impl Policy {
    fn compile(policy: &v1::AuthorizationPolicy, counters: PolicyCounters) -> Policy {
        // Validation has parsed every pattern; one that still fails (it cannot) allows nothing.
        let patterns = |texts: &[String]| identity::parse_patterns(texts).unwrap_or_default();
        Policy {
            name: policy.name.as_str().into(),
            strict: policy.mode() == v1::authorization_policy::Mode::Strict,
            counters,
            allow: patterns(&policy.allow),
            routes: policy
                .routes
                .iter()
                .map(|r| (r.route_table.clone(), r.route.clone(), patterns(&r.allow)))
                .collect(),
        }
    }

    /// Whether `peer` may connect at all (TCP), or send a request no route entry covers (HTTP).
    pub fn allows(&self, peer: &str) -> bool {
        identity::any_matches(&self.allow, peer)
    }

    /// Whether `peer` may do anything at all: connect, or send a request on some route. An HBONE
    /// tunnel is refused at its `CONNECT` when not; what it carries is judged again inside.
    pub fn allows_anything(&self, peer: &str) -> bool {
        self.allows(peer) || self.routes.iter().any(|(_, _, allow)| identity::any_matches(allow, peer))
    }

    /// Whether `peer` may send a request that route `route` of table `table` took.
    pub fn allows_route(&self, table: &str, route: &str, peer: &str) -> bool {
        match self.routes.iter().find(|(t, r, _)| t == table && r == route) {
            Some((_, _, allow)) => identity::any_matches(allow, peer),
            None => self.allows(peer),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_most_specific_policy_judges() {
        let yaml = r#"
resources:
  - {kind: AuthorizationPolicy, name: all, listener: in, allow: ["spiffe://td/ns/shop/*"]}
  - kind: AuthorizationPolicy
    name: admin
    listener: in
    port: 9000
    mode: permissive
    allow: ["spiffe://td/ns/ops/sa/admin"]
    routes: [{route_table: t, route: metrics, allow: ["spiffe://td/ns/mon/*"]}]
"#;
        let file = remora_control_api::config::parse(yaml, "t").unwrap();
        let policies: Vec<_> = file
            .resources
            .iter()
            .filter_map(|r| match r {
                remora_control_api::Resource::AuthorizationPolicy(p) => Some(p),
                _ => None,
            })
            .collect();
        let metrics = AuthzMetrics::default();
        let authz = ListenerAuthz::compile(policies.into_iter(), "in", &metrics).unwrap();
        let all = authz.for_port(80).unwrap();
        assert!(all.strict);
        assert!(all.allows("spiffe://td/ns/shop/sa/web"));
        assert!(!all.allows("spiffe://td/ns/ops/sa/admin"));
        let admin = authz.for_port(9000).unwrap();
        assert!(!admin.strict);
        assert!(admin.allows("spiffe://td/ns/ops/sa/admin"));
        assert!(!admin.allows("spiffe://td/ns/shop/sa/web"));
        assert!(admin.allows_route("t", "metrics", "spiffe://td/ns/mon/sa/prom"));
        assert!(!admin.allows_route("t", "metrics", "spiffe://td/ns/ops/sa/admin"), "the route's list replaces");
        assert!(admin.allows_route("t", "other", "spiffe://td/ns/ops/sa/admin"));
        assert!(admin.allows_anything("spiffe://td/ns/mon/sa/prom"), "a route allows it");
        assert!(!admin.allows_anything("spiffe://td/ns/shop/sa/web"));
        assert!(ListenerAuthz::compile(std::iter::empty(), "in", &metrics).is_none());
    }
}
