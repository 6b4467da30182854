//! The service registry: workloads' endpoints in etcd, held by leases.
//!
//! A workload joins a cluster by writing one key under the registry prefix, attached to a lease it
//! keeps alive (`remora register` does both, see [`register`]):
//!
//! ```text
//! /remora/endpoints/<cluster>/<ip:port>   →   {"weight": 2, "region": "eu-west-1", "zone": "eu-west-1a"}
//! ```
//!
//! (also `"identity": "spiffe://..."` for mesh clusters, and `"health": "draining"` or
//! `"unhealthy"`: `remora register --drain-time` writes `draining` on SIGTERM and waits before it
//! deregisters, so callers stop sending before the workload goes).
//!
//! Every field of the value is optional, and the value may be empty (weight 1, no locality).
//!
//! so `etcdctl lease grant 10` and `etcdctl put --lease=<id> /remora/endpoints/shop/10.0.0.7:8080 ''`
//! are enough. When the workload stops refreshing its lease (it crashed, or its host is gone), etcd
//! deletes the key when the TTL runs out, and the endpoint leaves the cluster.
//!
//! [`follow`] reads the prefix, then watches it from the next revision, calling back with the whole
//! registration set after every change. A dropped watch resumes from the last revision seen, so no
//! event is lost; if etcd has compacted that revision away, the prefix is read afresh.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tracing::{info, warn};

use super::etcd::{Etcd, EtcdError, EventType, KeyValue};
use remora_control_api::validate::parse_address;

/// Where registrations live unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/remora/endpoints/";
/// The default lease TTL of `remora register`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// One endpoint a workload registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The cluster it joins.
    pub cluster: String,
    /// Its `ip:port`.
    pub address: String,
    /// Its balancing weight, if set.
    pub weight: Option<u32>,
    /// Its region, if set (for clusters that prefer their own locality).
    pub region: Option<String>,
    /// Its zone, if set.
    pub zone: Option<String>,
    /// The SPIFFE ID its sidecar presents, for mesh clusters, if set.
    pub identity: Option<String>,
    /// Its declared health (`healthy`, `unhealthy`, `draining`), if set.
    pub health: Option<String>,
}

impl Registered {
    /// An endpoint of `cluster` at `address` with weight 1 and no locality.
    pub fn new(cluster: &str, address: &str) -> Registered {
        Registered {
            cluster: cluster.to_owned(),
            address: address.to_owned(),
            weight: None,
            region: None,
            zone: None,
            identity: None,
            health: None,
        }
    }

    /// The registration's etcd value: a JSON object with the fields set, or empty.
    pub fn value(&self) -> String {
        let value = Value {
            weight: self.weight,
            region: self.region.clone(),
            zone: self.zone.clone(),
            identity: self.identity.clone(),
            health: self.health.clone(),
        };
        if value == Value::default() {
            return String::new();
        }
        serde_json::to_string(&value).unwrap_or_default()
    }
}

/// Every registration, by key.
pub type Registrations = BTreeMap<Vec<u8>, Registered>;

#[derive(Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Value {
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<String>,
}

/// The key of an endpoint's registration.
pub fn key(prefix: &str, cluster: &str, address: &str) -> String {
    format!("{}/{cluster}/{address}", prefix.trim_end_matches('/'))
}

/// Reads one registration; the error says what is wrong with the key or value.
pub fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Result<Registered, String> {
    let key = std::str::from_utf8(key).map_err(|_| "the key is not UTF-8".to_owned())?;
    let rest = key.strip_prefix(prefix).ok_or_else(|| format!("{key:?} is not under {prefix:?}"))?;
    let (cluster, address) = rest
        .trim_start_matches('/')
        .split_once('/')
        .ok_or_else(|| format!("{key:?} is not <prefix>/<cluster>/<ip:port>"))?;
    if cluster.is_empty() {
        return Err(format!("{key:?} names no cluster"));
    }
    parse_address(address).map_err(|e| format!("{key:?}: the address {e}"))?;
    let value = if value.iter().all(u8::is_ascii_whitespace) {
        Value::default()
    } else {
        serde_json::from_slice::<Value>(value).map_err(|e| {
            format!(
                "{key:?}: the value is not {{\"weight\": N, \"region\": \"...\", \"zone\": \"...\", \"identity\": \"spiffe://...\", \"health\": \"draining\"}}: {e}"
            )
        })?
    };
    if let Some(identity) = &value.identity {
        remora_control_api::identity::SpiffeId::parse(identity).map_err(|e| format!("{key:?}: identity: {e}"))?;
    }
    if let Some(health) = &value.health
        && remora_control_api::v1::endpoint::Health::from_str_name(health).is_none()
    {
        return Err(format!("{key:?}: health must be healthy, unhealthy or draining, got {health:?}"));
    }
    Ok(Registered {
        cluster: cluster.to_owned(),
        address: address.to_owned(),
        weight: value.weight,
        region: value.region,
        zone: value.zone,
        identity: value.identity,
        health: value.health,
    })
}

fn insert(prefix: &str, registrations: &mut Registrations, kv: &KeyValue) {
    match parse(prefix, &kv.key, &kv.value) {
        Ok(registered) => {
            registrations.insert(kv.key.to_vec(), registered);
        }
        Err(error) => {
            // Drop any earlier, valid value of the key: the workload meant to replace it.
            registrations.remove(&kv.key[..]);
            warn!(%error, "ignoring a registry entry");
        }
    }
}

/// Follows the registrations under `prefix` in the etcd at `address` for ever, calling `on_change`
/// with the whole set after each change (and once after the first read). Reconnects with backoff.
pub async fn follow(address: String, prefix: String, mut on_change: impl FnMut(&Registrations)) {
    let mut registrations = Registrations::new();
    let mut revision: i64 = 0;
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = follow_once(&address, &prefix, &mut registrations, &mut revision, &mut on_change).await;
        let error = match result {
            Ok(()) => "the watch ended".to_owned(),
            Err(e) => e.to_string(),
        };
        warn!(%error, etcd = %address, retry_in = ?backoff, "registry watch down; keeping the endpoints known");
        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn follow_once(
    address: &str,
    prefix: &str,
    registrations: &mut Registrations,
    revision: &mut i64,
    on_change: &mut impl FnMut(&Registrations),
) -> Result<(), EtcdError> {
    let etcd = Etcd::connect(address).await?;
    if *revision == 0 {
        let (kvs, read_at) = etcd.range_prefix(prefix).await?;
        registrations.clear();
        for kv in &kvs {
            insert(prefix, registrations, kv);
        }
        *revision = read_at;
        info!(etcd = %address, endpoints = registrations.len(), revision = read_at, "registry read");
        on_change(registrations);
    }
    let mut watch = etcd.watch_prefix(prefix, *revision + 1).await?;
    while let Some(response) = watch.next().await? {
        if response.compact_revision > 0 {
            warn!(compacted = response.compact_revision, "registry history compacted; reading it afresh");
            *revision = 0;
            return Ok(());
        }
        if response.canceled {
            return Err(EtcdError::Lease(format!("the watch was cancelled: {}", response.cancel_reason)));
        }
        if response.events.is_empty() {
            continue;
        }
        for event in &response.events {
            let Some(kv) = &event.kv else { continue };
            if event.r#type == EventType::Delete as i32 {
                registrations.remove(&kv.key[..]);
            } else {
                insert(prefix, registrations, kv);
            }
            *revision = (*revision).max(kv.mod_revision);
        }
        if let Some(header) = &response.header {
            *revision = (*revision).max(header.revision);
        }
        on_change(registrations);
    }
    Ok(())
}

/// Registers one endpoint and keeps it registered until `stop` completes, then deregisters it:
/// with a `drain` time, it first marks the endpoint `draining` (proxies stop sending it new
/// requests) and keeps the lease alive that long. If the lease is lost (etcd unreachable for longer
/// than the TTL), registers again with a new one.
pub async fn register(
    address: &str,
    prefix: &str,
    endpoint: &Registered,
    ttl: Duration,
    drain: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), EtcdError> {
    parse_address(&endpoint.address).map_err(|e| EtcdError::Lease(format!("address {e}")))?;
    let key = key(prefix, &endpoint.cluster, &endpoint.address);
    let value = endpoint.value();
    tokio::pin!(stop);
    let refresh = (ttl / 3).max(Duration::from_millis(200));
    loop {
        let attempt = async {
            let etcd = Etcd::connect(address).await?;
            let lease = etcd.grant(ttl).await?;
            etcd.put(&key, value.as_bytes(), lease).await?;
            info!(%key, lease = format!("{lease:x}"), ?ttl, "registered");
            Ok::<_, EtcdError>((etcd, lease))
        };
        let (etcd, lease) = tokio::select! {
            result = attempt => match result {
                Ok(registered) => registered,
                Err(error) => {
                    warn!(%error, "registration failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(refresh) => continue,
                        _ = &mut stop => return Ok(()),
                    }
                }
            },
            _ = &mut stop => return Ok(()),
        };
        tokio::select! {
            error = etcd.keep_alive(lease, refresh) => {
                warn!(%error, "registration lease lost; registering again");
            }
            _ = &mut stop => {
                if !drain.is_zero() {
                    let draining = Registered { health: Some("draining".into()), ..endpoint.clone() };
                    match etcd.put(&key, draining.value().as_bytes(), lease).await {
                        Ok(()) => {
                            info!(%key, ?drain, "draining before deregistering");
                            let _ = tokio::time::timeout(drain, etcd.keep_alive(lease, refresh)).await;
                        }
                        Err(error) => warn!(%key, %error, "could not mark the endpoint draining"),
                    }
                }
                let _ = etcd.revoke(lease).await;
                info!(%key, "deregistered");
                return Ok(());
            }
        }
    }
}

/// Runs `remora register`: registers `endpoint` and keeps it registered until SIGTERM or SIGINT,
/// then (after `drain`, marked draining) deregisters it.
pub fn run_register(
    address: &str,
    prefix: &str,
    endpoint: &Registered,
    ttl: Duration,
    drain: Duration,
) -> Result<(), EtcdError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(EtcdError::Io)?;
    runtime.block_on(async {
        let stop = crate::signals::stop().map_err(EtcdError::Io)?;
        register(address, prefix, endpoint, ttl, drain, stop).await
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keys_and_values_parse() {
        let k = key(DEFAULT_PREFIX, "shop", "10.0.0.7:8080");
        assert_eq!(k, "/remora/endpoints/shop/10.0.0.7:8080");
        let entry = parse(DEFAULT_PREFIX, k.as_bytes(), b"").unwrap();
        assert_eq!(entry, Registered::new("shop", "10.0.0.7:8080"));
        let weighted = parse(DEFAULT_PREFIX, k.as_bytes(), br#"{"weight": 3}"#).unwrap();
        assert_eq!(weighted.weight, Some(3));
        let placed = parse(DEFAULT_PREFIX, k.as_bytes(), br#"{"region": "eu", "zone": "eu-1"}"#).unwrap();
        assert_eq!((placed.region.as_deref(), placed.zone.as_deref()), (Some("eu"), Some("eu-1")));
        assert_eq!(parse(DEFAULT_PREFIX, k.as_bytes(), placed.value().as_bytes()).unwrap(), placed);
        assert_eq!(Registered::new("shop", "10.0.0.7:8080").value(), "");
        let draining = parse(DEFAULT_PREFIX, k.as_bytes(), br#"{"health": "draining"}"#).unwrap();
        assert_eq!(draining.health.as_deref(), Some("draining"));
        assert_eq!(draining.value(), r#"{"health":"draining"}"#);
        let sick = parse(DEFAULT_PREFIX, k.as_bytes(), br#"{"health": "sick"}"#).unwrap_err();
        assert!(sick.contains("health must be healthy, unhealthy or draining"), "{sick}");
        let v6 = parse(DEFAULT_PREFIX, b"/remora/endpoints/shop/[::1]:80", b"").unwrap();
        assert_eq!(v6.address, "[::1]:80");
        assert!(parse(DEFAULT_PREFIX, b"/remora/endpoints/shop/nowhere", b"").unwrap_err().contains("address"));
        assert!(parse(DEFAULT_PREFIX, k.as_bytes(), b"{\"wait\": 1}").unwrap_err().contains("weight"));
        assert!(parse(DEFAULT_PREFIX, b"/other/shop/10.0.0.7:80", b"").is_err());
        let meshed = parse(DEFAULT_PREFIX, k.as_bytes(), br#"{"identity": "spiffe://td/ns/a/sa/b"}"#).unwrap();
        assert_eq!(meshed.identity.as_deref(), Some("spiffe://td/ns/a/sa/b"));
        assert_eq!(parse(DEFAULT_PREFIX, k.as_bytes(), meshed.value().as_bytes()).unwrap(), meshed);
        let bad = parse(DEFAULT_PREFIX, k.as_bytes(), br#"{"identity": "web"}"#).unwrap_err();
        assert!(bad.contains("identity: \"web\" is not a SPIFFE ID"), "{bad}");
    }
}
