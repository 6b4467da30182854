//! The background work of clusters that check their endpoints: active health checks and outlier
//! detection's interval.
//!
//! [`run`] follows the live snapshot (`state::LiveSnapshot::subscribe`). For every cluster that
//! has a health check or outlier detection it keeps one task, started when the cluster appears and
//! replaced when its endpoint set or check settings change (an unchanged cluster keeps its task
//! across any number of snapshots, so checks keep their rhythm). A cluster's task probes each
//! endpoint every interval and flips its health when a threshold is crossed, and runs outlier
//! detection's comparisons and ejection ends every `interval`; each change rebuilds the set's view,
//! which the data path reads on its next pick. Everything runs on the control thread: probes are
//! a connect and a request every few seconds per endpoint, nothing the data path waits for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::info;

use super::EndpointSet;
use super::health::{self, HealthCheckConfig, Tally};
use super::metrics::HealthStats;
use super::outlier;
use crate::state::LiveSnapshot;
use crate::state::cluster::Targets;

/// One cluster's task, and what it was started for.
struct Watched {
    set: Arc<EndpointSet>,
    check: Option<HealthCheckConfig>,
    task: JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follows the live snapshot for as long as the runtime runs, keeping one task per checked
/// cluster. Must run inside a tokio runtime; `app` runs it on the control thread.
pub async fn run(snapshots: Arc<LiveSnapshot>) {
    let mut swaps: watch::Receiver<u64> = snapshots.subscribe();
    let mut watched: HashMap<Arc<str>, Watched> = HashMap::new();
    loop {
        let snapshot = snapshots.load_full();
        let mut current: HashMap<Arc<str>, ()> = HashMap::new();
        for cluster in snapshot.clusters() {
            let Targets::Endpoints(set) = &cluster.targets else { continue };
            if cluster.health_check.is_none() && set.config().outlier.is_none() {
                continue;
            }
            current.insert(cluster.name.clone(), ());
            let unchanged = watched
                .get(&cluster.name)
                .is_some_and(|w| Arc::ptr_eq(&w.set, set) && w.check.as_ref() == cluster.health_check.as_deref());
            if unchanged {
                continue;
            }
            let task = tokio::spawn(watch_cluster(
                set.clone(),
                cluster.health_check.as_deref().cloned(),
                cluster.stats.health.clone(),
            ));
            watched.insert(
                cluster.name.clone(),
                Watched { set: set.clone(), check: cluster.health_check.as_deref().cloned(), task },
            );
        }
        watched.retain(|name, _| current.contains_key(name));
        if swaps.changed().await.is_err() {
            return;
        }
    }
}

/// One cluster's checks, until aborted.
async fn watch_cluster(set: Arc<EndpointSet>, check: Option<HealthCheckConfig>, stats: Arc<HealthStats>) {
    // The probes live in this set: aborting this task drops it, which aborts them.
    let mut probes = JoinSet::new();
    if let Some(check) = check {
        for index in 0..set.members().len() {
            probes.spawn(probe_endpoint(set.clone(), index, check.clone(), stats.clone()));
        }
    }
    match set.config().outlier.clone() {
        Some(config) => {
            let mut tick = tokio::time::interval(config.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick fires at once; the first interval is a whole one.
            tick.tick().await;
            loop {
                tick.tick().await;
                outlier::evaluate(&set, &config);
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Probes one endpoint every interval (jittered), forever.
async fn probe_endpoint(set: Arc<EndpointSet>, index: usize, check: HealthCheckConfig, stats: Arc<HealthStats>) {
    let Some(member) = set.members().get(index) else { return };
    // (A health-checked set keeps every endpoint's state.)
    let Some(state) = member.state.get() else { return };
    let mut tally = Tally::default();
    loop {
        let result = health::probe(member.address(), &check).await;
        let counter = if result.is_ok() { &stats.checks_passed } else { &stats.checks_failed };
        counter.inc();
        if let Some(health) = tally.record(result.is_ok(), state.health(), &check)
            && state.set_health(health)
        {
            info!(
                cluster = %stats.name,
                endpoint = %member.address(),
                health = health.as_str(),
                reason = result.as_ref().err().map_or("passed", |e| e.as_str()),
                "endpoint health changed"
            );
            set.refresh();
        }
        tokio::time::sleep(jittered(check.interval)).await;
    }
}

/// `interval` give or take up to 10%, so the probes of many proxies do not arrive in step.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}
