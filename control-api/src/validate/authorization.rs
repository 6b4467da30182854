//! Authorization policies: their listener and port, the identities they allow (exact or glob), their
//! per-route lists; and across the set, no listener port guarded by two policies.

use std::collections::{HashMap, HashSet};

use super::Checker;
use crate::resource::{Kind, Resource, describe};
use crate::v1;

impl Checker {
    pub(super) fn patterns(&mut self, subject: &str, field: &str, patterns: &[String]) {
        if let Err((i, e)) = crate::identity::parse_patterns(patterns) {
            self.fail(subject, format!("{field}[{i}]"), e.to_string());
        }
    }

    pub(super) fn authorization(&mut self, subject: &str, policy: &v1::AuthorizationPolicy) {
        if policy.listener.is_empty() {
            self.fail(subject, "listener", "is required");
        }
        if policy.port > u32::from(u16::MAX) {
            self.fail(subject, "port", format!("must be 0 to 65535, got {}", policy.port));
        }
        if v1::authorization_policy::Mode::try_from(policy.mode).is_err() {
            self.fail(subject, "mode", format!("unknown value {}", policy.mode));
        }
        self.patterns(subject, "allow", &policy.allow);
        let mut seen = HashSet::new();
        for (i, route) in policy.routes.iter().enumerate() {
            if route.route_table.is_empty() {
                self.fail(subject, format!("routes[{i}].route_table"), "is required");
            }
            if route.route.is_empty() {
                self.fail(subject, format!("routes[{i}].route"), "is required");
            }
            if !seen.insert((&route.route_table, &route.route)) {
                self.fail(subject, format!("routes[{i}]"), "names the same route as an earlier entry");
            }
            self.patterns(subject, &format!("routes[{i}].allow"), &route.allow);
        }
    }

    /// No two authorization policies may cover the same listener and port.
    pub(super) fn guarded_ports(&mut self, resources: &[&Resource]) {
        let mut owners: HashMap<(&str, u32), &str> = HashMap::new();
        for resource in resources {
            let Resource::AuthorizationPolicy(policy) = resource else { continue };
            if let Some(other) = owners.insert((&policy.listener, policy.port), &policy.name) {
                let port = if policy.port == 0 { "every port".to_owned() } else { format!("port {}", policy.port) };
                self.fail(
                    describe(Kind::AuthorizationPolicy, &policy.name),
                    "port",
                    format!("{port} of listener {:?} is already covered by policy {other:?}", policy.listener),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::problems;

    #[test]
    fn mesh_settings_and_authorization_policies_are_checked() {
        let text = problems(
            r#"
resources:
- {kind: Cluster, name: plain, peer_identities: ["spiffe://td/a"], hbone_port: 15008}
- {kind: Cluster, name: tunnelled, tls: mesh, hbone_port: 70000}
- {kind: Cluster, name: http-untunnelled, tls: mesh, http_over_hbone: true}
- {kind: Cluster, name: mesh, tls: mesh, peer_identities: ["spiffe://td/ok/*", "web"]}
- {kind: Endpoints, cluster: mesh, endpoints: [{address: "127.0.0.1:1", identity: "spiffe://TD/x"}]}
- {kind: AuthorizationPolicy, name: a, listener: in, allow: ["spiffe://td/ns/*"]}
- {kind: AuthorizationPolicy, name: b, listener: in, mode: permissive}
- {kind: AuthorizationPolicy, name: c, port: 70000, allow: ["nope"], routes: [{route_table: t, route: r}, {route_table: t, route: r}, {route: x}]}
"#,
        );
        for expected in [
            r#"cluster "plain": peer_identities: applies only to tls: mesh"#,
            r#"cluster "plain": hbone_port: applies only to tls: mesh"#,
            r#"cluster "tunnelled": hbone_port: must be a port number, got 70000"#,
            r#"cluster "http-untunnelled": http_over_hbone: needs hbone_port"#,
            r#"cluster "mesh": peer_identities[1]: "web" is not a SPIFFE ID"#,
            r#"endpoints "mesh": endpoints[0].identity: "spiffe://TD/x""#,
            r#"authorization policy "b": port: every port of listener "in" is already covered by policy "a""#,
            r#"authorization policy "c": listener: is required"#,
            r#"authorization policy "c": port: must be 0 to 65535"#,
            r#"authorization policy "c": allow[0]: "nope" is not a SPIFFE ID"#,
            r#"authorization policy "c": routes[1]: names the same route"#,
            r#"authorization policy "c": routes[2].route_table: is required"#,
        ] {
            assert!(text.contains(expected), "{expected} not in {text}");
        }
    }
}
