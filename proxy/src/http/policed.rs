//! Forwarding under a route's policy: the injected delay, the route's timeout, retries and hedging,
//! the mirror, the fallback, and the response body's idle timeout.
//!
//! `plan` hands over a request it has routed, admitted and prepared, with the route's
//! [`RoutePolicy`]; [`forward`] carries it to a response:
//!
//! 1. waits out an injected delay;
//! 2. starts the route's timeout, which from here bounds everything up to the response head;
//! 3. keeps the request's head for every attempt ([`Template`]), and its body for replay when a
//!    retry or a mirror may need it again ([`Reusable`]); sends a mirrored copy if this request is
//!    chosen (`mirror`);
//! 4. runs the attempts through the retry loop (`retries`), each an attempt of `attempt`'s: one,
//!    one after another, or hedged, as the policy asks;
//! 5. settles the attempt that stands into the client's answer (`attempt::Attempt::respond`), or
//!    answers with the route's fallback instead when the cluster had no healthy endpoint or a
//!    breaker was open; puts a response's body under the route's idle timeout.
//!
//! Costs, since every request of a route with a policy comes this way: the whole path is one boxed
//! future (`http::proxy` keeps its own small for the plain path); attempts one after another run
//! inline in it, reading the request head from one kept copy (no copy per attempt for HTTP/1.1); a
//! body is recorded only if there is one.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};

use super::attempt::{self, Attempt, AttemptHead, Template};
use super::body::{ClientBody, ProxyBody, RequestBody, UpstreamBody};
use super::client::{Outcome, Version};
use super::error::ProxyError;
use super::mirror;
use super::observe::Observe;
use super::replay::Reusable;
use super::retries::{Ended, Retrying, Upstream};
use super::server::HttpConnection;
use crate::limits;
use crate::policy::RoutePolicy;
use crate::state::cluster::Cluster;

/// A routed, admitted and prepared request's instructions.
pub(crate) struct Policed {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) policy: Arc<RoutePolicy>,
    pub(crate) observe: Option<Arc<Observe>>,
    pub(crate) delay: Option<Duration>,
    pub(crate) version: Version,
    pub(crate) downstream_version: http::Version,
    pub(crate) downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// When the request arrived: the route's timeout runs from here (from the end of an injected
    /// delay when there is one).
    pub(crate) arrived: Instant,
}

/// Carries a request to a response under its route's policy: see the module documentation.
pub(crate) async fn forward(
    request: Request<RequestBody>,
    policed: Policed,
    connection: &Arc<HttpConnection>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Policed { cluster, policy, observe, delay, version, downstream_version, downstream_upgrade, arrived } = policed;
    // The arrival's clock read serves the timeout, the budget and the first try.
    let started = match delay {
        Some(delay) => {
            tokio::time::sleep(delay).await;
            tokio::time::Instant::now()
        }
        None => tokio::time::Instant::from_std(arrived),
    };
    let with_fallback = |error: ProxyError| match &policy.fallback {
        Some(response) if error.takes_fallback() => {
            ProxyError::Fallback { response: response.clone(), cause: Box::new(error) }
        }
        _ => error,
    };
    if policy.fallback.is_some() && !cluster.has_healthy() {
        return Err(with_fallback(attempt::no_endpoint(&cluster)));
    }
    // Upgrades take their connection over: they are never retried or copied.
    let upgrade = downstream_upgrade.is_some();
    let retry = policy.retry.as_ref().filter(|_| !upgrade);
    let mirror = policy.mirror.as_ref().filter(|m| !upgrade && m.chosen());
    let (parts, body) = request.into_parts();
    let template = Template::new(parts);
    let upstream =
        Sender { cluster: &cluster, connection, observe: observe.as_ref(), version, template: &template, upgrade };
    let attempts = Retrying {
        upstream: &upstream,
        breakers: &cluster.breakers,
        stats: &cluster.stats,
        timeout: policy.timeout.map(|limit| (limit, started + limit)),
        started,
    };
    let ended = if retry.is_none() && mirror.is_none() {
        attempts.once(UpstreamBody::Direct(ClientBody::new(body, observe.as_ref(), connection))).await
    } else {
        let limit = retry.map_or(limits::MIRROR_BODY_BUFFER, |r| r.replay_limit);
        let body = Reusable::new(ClientBody::new(body, observe.as_ref(), connection), limit);
        if let Some(mirror) = mirror {
            mirror::send(mirror, &template, &body, downstream_version, policy.timeout, connection);
        }
        match retry {
            Some(retry) if retry.hedge_delay.is_some() => attempts.hedged(retry, &body).await,
            Some(retry) => attempts.sequential(retry, &body).await,
            None => match body.attempt() {
                Some(first) => attempts.once(first).await,
                None => Ended::Failed(ProxyError::BadRequest("the request body failed")),
            },
        }
    };
    let result = match ended {
        Ended::Stands(result, attempt) => attempt.respond(&cluster, result, downstream_upgrade, connection),
        Ended::GaveUp(result, attempt) => attempt.give_up(result),
        Ended::Failed(error) => Err(error),
    };
    if let Err(ProxyError::RequestTimeout(_)) = &result {
        cluster.stats.policy.request_timeouts.inc();
    }
    match (result, policy.idle_timeout) {
        (Ok(response), Some(limit)) => {
            let stats = cluster.stats.clone();
            Ok(response.map(|body| body.idle_timeout(limit, stats)))
        }
        (result, _) => result.map_err(with_fallback),
    }
}

/// The real step the retry loop repeats: an attempt of `attempt`'s, on the routed cluster, sending
/// the kept head.
struct Sender<'a> {
    cluster: &'a Arc<Cluster>,
    connection: &'a Arc<HttpConnection>,
    observe: Option<&'a Arc<Observe>>,
    version: Version,
    template: &'a Template,
    upgrade: bool,
}

impl<'a> Upstream for Sender<'a> {
    type Attempt = Attempt;

    fn start(&self, tried: &[SocketAddr], at: tokio::time::Instant) -> Result<(SocketAddr, Attempt), ProxyError> {
        let observe = self.observe.map(|o| (&**o, &**self.connection));
        let origin = &self.connection.origin;
        attempt::pick(self.cluster, origin, &self.template.headers, tried, at.into_std(), observe)
    }

    fn send<'s>(
        &'s self,
        endpoint: SocketAddr,
        attempt: &Attempt,
        body: UpstreamBody,
    ) -> impl Future<Output = Result<Outcome, ProxyError>> + Send + use<'s, 'a> {
        let head = AttemptHead { template: self.template, trace: attempt.trace_headers() };
        let client = &self.connection.data.client;
        attempt::send(self.cluster, client, endpoint, self.version, head, body, self.upgrade)
    }

    fn record(&self, attempt: &mut Attempt, result: &Result<Outcome, ProxyError>) {
        attempt.record(self.cluster, result);
    }
}
