//! Clusters (balancer, protocol, timeouts, circuit breakers, outlier detection, health checks,
//! locality, mesh TLS and peer identities, Kubernetes services) and the endpoints that fill them.

use std::collections::{HashMap, HashSet};

use super::{Checker, References, is_dns_label, is_token, parse_address};
use crate::v1;

impl Checker {
    pub(super) fn cluster(&mut self, subject: &str, cluster: &v1::Cluster) {
        let balancer = v1::cluster::Balancer::try_from(cluster.balancer);
        if balancer.is_err() {
            self.fail(subject, "balancer", format!("unknown value {}", cluster.balancer));
        }
        if v1::cluster::Protocol::try_from(cluster.protocol).is_err() {
            self.fail(subject, "protocol", format!("unknown value {}", cluster.protocol));
        }
        self.duration(subject, "connect_timeout", cluster.connect_timeout.as_ref(), true);
        self.duration(subject, "idle_timeout", cluster.idle_timeout.as_ref(), true);
        let ring_hash = balancer == Ok(v1::cluster::Balancer::RingHash);
        match (&cluster.hash_policy, ring_hash) {
            (None, true) => self.fail(subject, "hash_policy", "is required with balancer ring_hash"),
            (Some(_), false) => self.fail(subject, "hash_policy", "applies only to balancer ring_hash"),
            (Some(policy), true) => {
                use v1::hash_policy::Key;
                match &policy.key {
                    None => self.fail(subject, "hash_policy", "needs one of header, cookie, source_ip"),
                    Some(Key::Header(name)) if !is_token(name) => {
                        self.fail(subject, "hash_policy.header", format!("{name:?} is not a header name"));
                    }
                    Some(Key::Cookie(name)) if !is_token(name) => {
                        self.fail(subject, "hash_policy.cookie", format!("{name:?} is not a cookie name"));
                    }
                    Some(Key::SourceIp(false)) => {
                        self.fail(subject, "hash_policy.source_ip", "must be true when given");
                    }
                    Some(_) => {}
                }
            }
            (None, false) => {}
        }
        if let Some(outlier) = &cluster.outlier_detection {
            self.duration(subject, "outlier_detection.interval", outlier.interval.as_ref(), true);
            self.duration(subject, "outlier_detection.base_ejection_time", outlier.base_ejection_time.as_ref(), true);
            self.duration(subject, "outlier_detection.max_ejection_time", outlier.max_ejection_time.as_ref(), true);
            if let Some(percent) = outlier.max_ejection_percent {
                self.percent(subject, "outlier_detection.max_ejection_percent", f64::from(percent));
            }
            if let Some(rate) = &outlier.success_rate
                && let Some(margin) = rate.margin_percent
            {
                self.percent(subject, "outlier_detection.success_rate.margin_percent", margin);
            }
            if let Some(latency) = &outlier.latency {
                if let Some(multiple) = latency.multiple
                    && !(multiple >= 1.5 && multiple.is_finite())
                {
                    self.fail(
                        subject,
                        "outlier_detection.latency.multiple",
                        format!("must be at least 1.5, got {multiple}"),
                    );
                }
                self.duration(subject, "outlier_detection.latency.min_latency", latency.min_latency.as_ref(), false);
            }
        }
        if let Some(check) = &cluster.health_check {
            self.duration(subject, "health_check.interval", check.interval.as_ref(), true);
            self.duration(subject, "health_check.timeout", check.timeout.as_ref(), true);
            for (field, value) in [
                ("health_check.healthy_threshold", check.healthy_threshold),
                ("health_check.unhealthy_threshold", check.unhealthy_threshold),
            ] {
                if value == Some(0) {
                    self.fail(subject, field, "must be above zero");
                }
            }
            if let Some(http) = &check.http {
                if !http.path.starts_with('/') {
                    self.fail(subject, "health_check.http.path", format!("must start with '/', got {:?}", http.path));
                } else if http::uri::PathAndQuery::try_from(http.path.as_str()).is_err() {
                    self.fail(subject, "health_check.http.path", format!("{:?} is not a valid path", http.path));
                }
                for (i, status) in http.expected_statuses.iter().enumerate() {
                    if !(100..=599).contains(status) {
                        self.fail(
                            subject,
                            format!("health_check.http.expected_statuses[{i}]"),
                            format!("must be 100 to 599, got {status}"),
                        );
                    }
                }
                if !http.host.is_empty() && http::uri::Authority::try_from(http.host.as_str()).is_err() {
                    self.fail(subject, "health_check.http.host", format!("{:?} is not a host", http.host));
                }
            }
        }
        if let Some(locality) = &cluster.locality_preference
            && let Some(percent) = locality.min_healthy_percent
            && !(1..=100).contains(&percent)
        {
            self.fail(subject, "locality_preference.min_healthy_percent", format!("must be 1 to 100, got {percent}"));
        }
        if let Some(threshold) = cluster.panic_threshold
            && threshold > 100
        {
            self.fail(subject, "panic_threshold", format!("must be 0 to 100, got {threshold}"));
        }
        match v1::cluster::Tls::try_from(cluster.tls) {
            Err(_) => self.fail(subject, "tls", format!("unknown value {}", cluster.tls)),
            Ok(v1::cluster::Tls::None) if !cluster.peer_identities.is_empty() => {
                self.fail(subject, "peer_identities", "applies only to tls: mesh");
            }
            Ok(_) => self.patterns(subject, "peer_identities", &cluster.peer_identities),
        }
        if cluster.quic_port > u32::from(u16::MAX) {
            self.fail(subject, "quic_port", format!("must be a port number, got {}", cluster.quic_port));
        } else if cluster.quic_port != 0 && cluster.tls() != v1::cluster::Tls::Mesh {
            self.fail(subject, "quic_port", "applies only to tls: mesh");
        }
        if cluster.hbone_port > u32::from(u16::MAX) {
            self.fail(subject, "hbone_port", format!("must be a port number, got {}", cluster.hbone_port));
        } else if cluster.hbone_port != 0 && cluster.tls() != v1::cluster::Tls::Mesh {
            self.fail(subject, "hbone_port", "applies only to tls: mesh");
        }
        if cluster.http_over_hbone && cluster.hbone_port == 0 {
            self.fail(subject, "http_over_hbone", "needs hbone_port");
        }
        if let Some(service) = &cluster.kubernetes_service {
            if cluster.original_destination {
                self.fail(subject, "kubernetes_service", "an original_destination cluster takes no endpoints");
            }
            for (field, value) in [("namespace", &service.namespace), ("name", &service.name)] {
                if !is_dns_label(value) {
                    let message = format!("must be a Kubernetes name (a DNS label), got {value:?}");
                    self.fail(subject, format!("kubernetes_service.{field}"), message);
                }
            }
            if !service.port.is_empty() && service.port.parse::<u16>().is_err() && !is_dns_label(&service.port) {
                let message = format!("must be a port name or number, got {:?}", service.port);
                self.fail(subject, "kubernetes_service.port", message);
            }
        }
        if cluster.original_destination
            && (cluster.health_check.is_some() || cluster.outlier_detection.is_some() || ring_hash)
        {
            self.fail(
                subject,
                "original_destination",
                "a pass-through cluster has no endpoint set to balance, check or eject; remove balancer ring_hash, health_check and outlier_detection",
            );
        }
    }

    pub(super) fn endpoints(
        &mut self,
        subject: &str,
        endpoints: &v1::Endpoints,
        clusters: &HashMap<&str, &v1::Cluster>,
    ) {
        match clusters.get(endpoints.cluster.as_str()) {
            None if !endpoints.cluster.is_empty() && self.references == References::Required => {
                self.fail(subject, "cluster", format!("names cluster {:?}, which is not defined", endpoints.cluster));
            }
            Some(cluster) if cluster.original_destination => {
                self.fail(subject, "cluster", "is an original_destination cluster, which takes no endpoints");
            }
            _ => {}
        }
        let mut seen = HashSet::new();
        for (i, endpoint) in endpoints.endpoints.iter().enumerate() {
            match parse_address(&endpoint.address) {
                Err(e) => self.fail(subject, format!("endpoints[{i}].address"), e),
                Ok(address) if !seen.insert(address) => {
                    self.fail(subject, format!("endpoints[{i}].address"), format!("{address} is listed twice"));
                }
                Ok(_) => {}
            }
            if !endpoint.identity.is_empty()
                && let Err(e) = crate::identity::SpiffeId::parse(&endpoint.identity)
            {
                self.fail(subject, format!("endpoints[{i}].identity"), e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::problems;

    #[test]
    fn endpoints_must_fit_their_cluster() {
        let text = problems(
            r#"
resources:
- {kind: Cluster, name: pass, original_destination: true}
- {kind: Endpoints, cluster: pass, endpoints: [{address: "127.0.0.1:1"}]}
- {kind: Endpoints, cluster: ghost}
- kind: Cluster
  name: c
- kind: Endpoints
  cluster: c
  endpoints: [{address: "127.0.0.1:1"}, {address: "127.0.0.1:1"}, {address: "nowhere"}]
"#,
        );
        assert!(text.contains("endpoints \"pass\": cluster: is an original_destination cluster"), "{text}");
        assert!(text.contains("endpoints \"ghost\": cluster: names cluster \"ghost\""), "{text}");
        assert!(text.contains("endpoints \"c\": endpoints[1].address: 127.0.0.1:1 is listed twice"), "{text}");
        assert!(text.contains("endpoints \"c\": endpoints[2].address: must be ip:port"), "{text}");
    }
}
