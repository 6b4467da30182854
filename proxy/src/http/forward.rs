//! Forwarding under a route's policy: the injected delay, the request timeout, retries, hedging,
//! the mirror and the fallback.
//!
//! `http::plan` hands over a request it has routed, admitted and prepared, with the route's
//! [`RoutePolicy`]; [`policed`] carries it to a response:
//!
//! 1. waits out an injected delay;
//! 2. starts the route's timeout, which from here bounds everything up to the response head;
//! 3. wraps the body for replay when a retry or a mirror may need it again (`replay`), and sends a
//!    mirrored copy if this request is chosen (`mirror`);
//! 4. runs attempts: each picks an endpoint (avoiding ones already tried), takes its breaker slots,
//!    sends with the per-try timeout, and reports how it ended to outlier detection. A failure the
//!    policy retries waits out its backoff and tries again while attempts, the replay record, the
//!    budget and the `max_retries` breaker all allow. With hedging, an attempt still waiting after
//!    the hedge delay gets a sibling on another endpoint; the first answer that stands wins and the
//!    other is cancelled (dropped: its connection is closed or its stream reset);
//! 5. answers with the route's fallback instead when the cluster had no healthy endpoint or a breaker
//!    was open; or, with the response, sets the route's idle timeout on its body.
//!
//! Costs, since every request of a route with a policy comes this way: the whole path is one boxed
//! future (`http::proxy` keeps its own small for the plain path). Attempts one after another run
//! inline in it, reading the request head from one kept copy (no copy per attempt for HTTP/1.1),
//! with one timer for the per-try and the route timeout; a body is recorded only if there is one.
//! Only hedged attempts, which run side by side, are futures of their own.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri};
use hyper::body::Incoming;

use super::body::{ClientBody, InFlight, ProxyBody, UpstreamBody};
use super::client::{self, Outcome};
use super::error::ProxyError;
use super::observe::Observe;
use super::replay::ReplayBody;
use super::{Attempt, HttpConnection, mirror, no_endpoint, respond};
use crate::limits;
use crate::policy::RoutePolicy;
use crate::policy::breaker::Slot;
use crate::policy::retry::{RetryPolicy, Verdict};
use crate::state::cluster::Cluster;
use crate::timer;

/// A routed, admitted and prepared request's instructions.
pub(crate) struct Policed {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) policy: Arc<RoutePolicy>,
    pub(crate) observe: Option<Arc<Observe>>,
    pub(crate) delay: Option<Duration>,
    pub(crate) version: client::Version,
    pub(crate) downstream_version: http::Version,
    pub(crate) upgrade: bool,
    pub(crate) downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// When the request arrived: the route's timeout runs from here (from the end of an injected
    /// delay when there is one).
    pub(crate) arrived: Instant,
}

/// A request's head, kept to build each attempt's request from.
pub(crate) struct Template {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: http::Version,
    pub(crate) headers: HeaderMap,
}

impl super::h1::Head for Template {
    fn method(&self) -> &Method {
        &self.method
    }

    fn uri(&self) -> &Uri {
        &self.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// An attempt's head: the template's, with the attempt's own trace headers when traced.
struct AttemptHead<'a> {
    template: &'a Template,
    trace: Option<Vec<(HeaderName, HeaderValue)>>,
}

impl super::h1::Head for AttemptHead<'_> {
    fn method(&self) -> &Method {
        &self.template.method
    }

    fn uri(&self) -> &Uri {
        &self.template.uri
    }

    fn headers(&self) -> &HeaderMap {
        &self.template.headers
    }

    fn write_extra(&self, out: &mut bytes::BytesMut) {
        for (name, value) in self.trace.iter().flatten() {
            super::h1::write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

impl Template {
    fn new(parts: http::request::Parts) -> Template {
        Template { method: parts.method, uri: parts.uri, version: parts.version, headers: parts.headers }
    }

    /// A request with a copy of this head and `body`.
    pub(crate) fn request(&self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// A request body that later attempts, or a mirrored copy, may read again.
pub(crate) enum Reusable {
    /// The client sent no body: every reader gets an empty one, and nothing is recorded.
    Empty,
    /// The client's body, recorded as it streams (`replay`).
    Recorded(ReplayBody),
}

impl Reusable {
    fn new(body: ClientBody, limit: usize) -> Reusable {
        if hyper::body::Body::is_end_stream(&body) {
            Reusable::Empty
        } else {
            Reusable::Recorded(ReplayBody::new(body, limit))
        }
    }

    /// A body for another attempt, from the start; `None` once the body can no longer be replayed.
    fn attempt(&self) -> Option<UpstreamBody> {
        match self {
            Reusable::Empty => Some(UpstreamBody::Empty),
            Reusable::Recorded(body) => body.replay().map(UpstreamBody::Replay),
        }
    }

    /// A body for a mirrored copy, following the attempts' reading; `None` as for `attempt`.
    pub(crate) fn copy(&self) -> Option<UpstreamBody> {
        match self {
            Reusable::Empty => Some(UpstreamBody::Empty),
            Reusable::Recorded(body) => body.follow().map(UpstreamBody::Replay),
        }
    }
}

/// The last few endpoints a request's attempts went to, which its next attempt avoids where it can.
/// Inline: this is on every retried route's path, and three is enough to steer a retry elsewhere.
struct Tried {
    slots: [SocketAddr; 3],
    len: usize,
    next: usize,
}

impl Default for Tried {
    fn default() -> Self {
        Tried { slots: [SocketAddr::from(([0, 0, 0, 0], 0)); 3], len: 0, next: 0 }
    }
}

impl Tried {
    fn push(&mut self, endpoint: SocketAddr) {
        self.slots[self.next % 3] = endpoint;
        self.next += 1;
        self.len = (self.len + 1).min(3);
    }

    fn as_slice(&self) -> &[SocketAddr] {
        &self.slots[..self.len]
    }
}

/// Carries a request to a response under its route's policy: see the module documentation.
pub(crate) async fn policed(
    request: Request<Incoming>,
    policed: Policed,
    connection: &Arc<HttpConnection>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Policed { cluster, policy, observe, delay, version, downstream_version, upgrade, downstream_upgrade, arrived } =
        policed;
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
        return Err(with_fallback(no_endpoint(&cluster)));
    }
    // Upgrades take their connection over: they are never retried or copied.
    let retry = policy.retry.as_ref().filter(|_| !upgrade);
    let mirror = policy.mirror.as_ref().filter(|m| !upgrade && m.chosen());
    let (parts, body) = request.into_parts();
    let template = Template::new(parts);
    let attempts = Attempts {
        cluster: &cluster,
        connection,
        observe: observe.as_ref(),
        version,
        timeout: policy.timeout.map(|limit| (limit, started + limit)),
        started,
    };
    let result = if retry.is_none() && mirror.is_none() {
        attempts
            .once(&template, UpstreamBody::Direct(ClientBody::new(body, observe.as_ref())), downstream_upgrade)
            .await
    } else {
        let limit = retry.map_or(limits::MIRROR_BODY_BUFFER, |r| r.replay_limit);
        let body = Reusable::new(ClientBody::new(body, observe.as_ref()), limit);
        if let Some(mirror) = mirror {
            mirror::send(mirror, &template, &body, downstream_version, policy.timeout, connection);
        }
        match retry {
            Some(retry) if retry.hedge_delay.is_some() => attempts.hedged(retry, template, body).await,
            Some(retry) => attempts.sequential(retry, template, body).await,
            None => {
                let first = body.attempt().ok_or(ProxyError::BadRequest("the request body failed"))?;
                attempts.once(&template, first, None).await
            }
        }
    };
    if let Err(ProxyError::RequestTimeout(_)) = &result {
        cluster.stats.request_timeouts.inc();
    }
    match (result, policy.idle_timeout) {
        (Ok(response), Some(limit)) => {
            let stats = cluster.stats.clone();
            Ok(response.map(|body| body.idle_timeout(limit, stats)))
        }
        (result, _) => result.map_err(with_fallback),
    }
}

/// An attempt on its way: the exchange, and what it counts and will report.
struct Running<'a> {
    exchange: Pin<Box<dyn Future<Output = Result<Outcome, ProxyError>> + Send + 'a>>,
    attempt: Attempt,
    /// Held while a retry is in flight (the `max_retries` breaker).
    _retry_slot: Option<Slot>,
}

/// What the attempts of one request share.
struct Attempts<'a> {
    cluster: &'a Arc<Cluster>,
    connection: &'a Arc<HttpConnection>,
    observe: Option<&'a Arc<Observe>>,
    version: client::Version,
    /// The route's timeout and when it runs out.
    timeout: Option<(Duration, tokio::time::Instant)>,
    /// When the first attempt started.
    started: tokio::time::Instant,
}

// Lives on the stack for one turn of the loop and is matched at once: its size costs nothing.
#[allow(clippy::large_enum_variant)]
enum Event {
    Deadline,
    Done(usize, Result<Outcome, ProxyError>),
    Hedge,
}

impl Attempts<'_> {
    /// One attempt, within the route's timeout.
    async fn once(
        &self,
        template: &Template,
        body: UpstreamBody,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = downstream_upgrade.is_some();
        let (endpoint, attempt) = self.pick(&template.headers, &[], self.started)?;
        let trace = attempt.trace_headers();
        let result = self.exchange(endpoint, template, trace, body, upgrade, None).await;
        self.finish(result, attempt, downstream_upgrade)
    }

    /// Sends a prepared request to `endpoint` and waits for its response head, within `per_try`
    /// (its length, and when it runs out) and the route's timeout. The exchange is polled where it
    /// was made (pinned in this future), and one timer serves both limits: wrapping it in a timeout
    /// per limit would copy the whole exchange (a kilobyte or more) into each wrapper, on every
    /// request.
    async fn exchange(
        &self,
        endpoint: SocketAddr,
        template: &Template,
        trace: Option<Vec<(HeaderName, HeaderValue)>>,
        body: UpstreamBody,
        upgrade: bool,
        per_try: Option<(Duration, tokio::time::Instant)>,
    ) -> Result<Outcome, ProxyError> {
        let cluster = &**self.cluster;
        // Whichever limit runs out first: (is it the per-try one, its length, when).
        let per_try = per_try.map(|(limit, at)| (true, limit, at));
        let route = self.timeout.map(|(limit, at)| (false, limit, at));
        let limit = match (per_try, route) {
            (Some(a), Some(b)) => Some(if a.2 < b.2 { a } else { b }),
            (a, b) => a.or(b),
        };
        let result = match self.version {
            client::Version::Http1 => {
                // The head is read from the template in place: an attempt costs no copy of it.
                let head = AttemptHead { template, trace };
                let exchange = std::pin::pin!(client::send_http1(cluster, endpoint, head, body, upgrade));
                within(exchange, limit.map(|(_, _, at)| at)).await
            }
            client::Version::Http2 => {
                // Boxed, as on the plain path: it is the larger of the two, and inline it would make
                // every HTTP/1.1 request's future as large. hyper takes the request whole.
                let mut request = template.request(body);
                if let Some(trace) = trace {
                    request.headers_mut().extend(trace);
                }
                let mut exchange =
                    Box::pin(client::send_http2(&self.connection.data.client, cluster, endpoint, request));
                within(exchange.as_mut(), limit.map(|(_, _, at)| at)).await
            }
        };
        match (result, limit) {
            (Some(result), _) => result,
            (None, Some((true, limit, _))) => {
                cluster.stats.per_try_timeouts.inc();
                Err(ProxyError::PerTryTimeout(limit))
            }
            (None, Some((false, limit, _))) => Err(ProxyError::RequestTimeout(limit)),
            // `within` only gives up at a deadline.
            (None, None) => Err(ProxyError::RequestTimeout(Duration::ZERO)),
        }
    }

    /// Balances for the next attempt, starting at `at`, avoiding `tried`, within the `max_requests`
    /// breaker.
    fn pick(
        &self,
        headers: &HeaderMap,
        tried: &[SocketAddr],
        at: tokio::time::Instant,
    ) -> Result<(SocketAddr, Attempt), ProxyError> {
        let cluster = self.cluster;
        let picked = cluster
            .pick(self.connection.original_destination, Some(headers), Some(self.connection.peer), tried)
            .ok_or_else(|| no_endpoint(cluster))?;
        let slot =
            cluster.breakers.request(&cluster.stats).map_err(|b| ProxyError::Overflow(cluster.name.clone(), b))?;
        let observe = self.observe.map(|o| (&**o, &**self.connection));
        Ok((picked.address, Attempt::start(cluster, &picked, slot, observe, at.into_std())))
    }

    /// Starts an attempt reading `body`, with the retry policy's per-try timeout, as a future of
    /// its own (hedged attempts run side by side).
    fn launch<'b>(
        &'b self,
        retry: &RetryPolicy,
        template: &'b Template,
        body: UpstreamBody,
        tried: &mut Tried,
        retry_slot: Option<Slot>,
    ) -> Result<Running<'b>, ProxyError> {
        let now = tokio::time::Instant::now();
        let (endpoint, attempt) = self.pick(&template.headers, tried.as_slice(), now)?;
        tried.push(endpoint);
        let trace = attempt.trace_headers();
        let per_try = retry.per_try_timeout.map(|limit| (limit, now + limit));
        let exchange = Box::pin(self.exchange(endpoint, template, trace, body, false, per_try));
        Ok(Running { exchange, attempt, _retry_slot: retry_slot })
    }

    /// Whether the policy may send one more attempt after `started` attempts: the attempts, the
    /// body's replay record, the budget and the `max_retries` breaker must all allow it. Returns the
    /// body for it and the breaker slot it holds.
    fn next_retry(&self, retry: &RetryPolicy, body: &Reusable, started: u32) -> Option<(UpstreamBody, Option<Slot>)> {
        let cluster = self.cluster;
        if started > retry.attempts {
            return None;
        }
        let replay = body.attempt()?;
        if !retry.budget.withdraw(Instant::now()) {
            cluster.stats.retry_budget_exhausted.inc();
            return None;
        }
        let slot = cluster.breakers.retry(&cluster.stats).ok()?;
        cluster.stats.retries.inc();
        Some((replay, slot))
    }

    /// What `retry` makes of an attempt's `result`. With `siblings` (hedged attempts still out), any
    /// failure without a response waits for them rather than standing.
    fn verdict(retry: &RetryPolicy, result: &Result<Outcome, ProxyError>, siblings: bool) -> Verdict {
        match result {
            Ok(Outcome::Response(response)) => {
                retry.retries_response(response.status().as_u16(), response.version(), response.headers())
            }
            Ok(Outcome::Switched(..)) => Verdict::Final,
            Err(error) if siblings || retry.retries_error(error) => Verdict::Retry(None),
            Err(_) => Verdict::Final,
        }
    }

    /// After a failure the policy retries: the body and breaker slot for the next attempt and how
    /// long to wait first, or `None` when no retry may follow (see [`Attempts::next_retry`]) or its
    /// wait would outlast the route's timeout (the last failure then says more than the timeout).
    fn retry_after_failure(
        &self,
        retry: &RetryPolicy,
        body: &Reusable,
        started: u32,
        retry_after: Option<Duration>,
    ) -> Option<(UpstreamBody, Option<Slot>, Duration)> {
        let (next, slot) = self.next_retry(retry, body, started)?;
        let wait = retry.backoff(started).max(retry_after.unwrap_or_default());
        if self.timeout.is_some_and(|(_, at)| tokio::time::Instant::now() + wait >= at) {
            return None;
        }
        Some((next, slot, wait))
    }

    /// Records, for outlier detection and the counters, an attempt's failure that the client may
    /// never see (it is about to be retried).
    fn record_failure(&self, result: &Result<Outcome, ProxyError>, attempt: &mut Attempt) {
        match result {
            Ok(Outcome::Response(response)) => {
                self.cluster.stats.record_response(response.status().as_u16());
                attempt.observe_response(self.cluster, response.status().as_u16());
            }
            Err(error) => attempt.failed(self.cluster, error),
            Ok(Outcome::Switched(..)) => {}
        }
    }

    /// Attempts one after another until one stands (no hedging): see the module documentation.
    /// Each attempt runs inline in this future: no allocation per attempt.
    async fn sequential(
        &self,
        retry: &RetryPolicy,
        template: Template,
        body: Reusable,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        retry.budget.deposit(self.started.into_std());
        let mut tried = Tried::default();
        let mut started = 1_u32;
        let mut sent = self.started;
        let mut next = body.attempt().ok_or(ProxyError::BadRequest("the request body failed"))?;
        let mut retry_slot = None;
        let mut previous: Option<(Result<Outcome, ProxyError>, Attempt)> = None;
        loop {
            let (endpoint, mut attempt) = match self.pick(&template.headers, tried.as_slice(), sent) {
                Ok(picked) => picked,
                // No endpoint for a retry: the last failure is the answer.
                Err(error) => return previous.map_or(Err(error), |(result, attempt)| give_up(result, attempt)),
            };
            drop(previous.take());
            tried.push(endpoint);
            let trace = attempt.trace_headers();
            let per_try = retry.per_try_timeout.map(|limit| (limit, sent + limit));
            let result = self.exchange(endpoint, &template, trace, next, false, per_try).await;
            drop(retry_slot.take());
            let Verdict::Retry(retry_after) = Self::verdict(retry, &result, false) else {
                return self.finish(result, attempt, None);
            };
            self.record_failure(&result, &mut attempt);
            let Some((body, slot, wait)) = self.retry_after_failure(retry, &body, started, retry_after) else {
                return give_up(result, attempt);
            };
            tokio::time::sleep(wait).await;
            sent = tokio::time::Instant::now();
            previous = Some((result, attempt));
            (next, retry_slot, started) = (body, slot, started + 1);
        }
    }

    /// Attempts with hedging, side by side, until one stands: see the module documentation.
    async fn hedged(
        &self,
        retry: &RetryPolicy,
        template: Template,
        body: Reusable,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let cluster = self.cluster;
        retry.budget.deposit(self.started.into_std());
        let mut tried = Tried::default();
        let mut started = 1_u32;
        let mut running: Vec<Running<'_>> = Vec::with_capacity(2);
        let first = body.attempt().ok_or(ProxyError::BadRequest("the request body failed"))?;
        running.push(self.launch(retry, &template, first, &mut tried, None)?);
        let mut deadline = self.timeout.map(|(_, at)| timer::Deadline::at(at));
        let arm_hedge = |started: u32| {
            retry
                .hedge_delay
                .filter(|_| started <= retry.attempts)
                .map(|d| timer::Deadline::at(tokio::time::Instant::now() + d))
        };
        let mut hedge = arm_hedge(started);
        loop {
            let event = poll_fn(|cx| {
                if let Some(deadline) = deadline.as_mut()
                    && Pin::new(deadline).poll(cx).is_ready()
                {
                    return Poll::Ready(Event::Deadline);
                }
                for (index, attempt) in running.iter_mut().enumerate() {
                    if let Poll::Ready(result) = attempt.exchange.as_mut().poll(cx) {
                        return Poll::Ready(Event::Done(index, result));
                    }
                }
                if let Some(timer) = hedge.as_mut()
                    && Pin::new(timer).poll(cx).is_ready()
                {
                    return Poll::Ready(Event::Hedge);
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Deadline => {
                    let limit = self.timeout.map_or(Duration::ZERO, |(limit, _)| limit);
                    let error = ProxyError::RequestTimeout(limit);
                    // Attempts still waiting count against their endpoints, as slow as the limit.
                    for mut attempt in running.drain(..) {
                        attempt.attempt.failed(cluster, &error);
                    }
                    return Err(error);
                }
                Event::Hedge => {
                    hedge = None;
                    let Some((replay, slot)) = self.next_retry(retry, &body, started) else { continue };
                    match self.launch(retry, &template, replay, &mut tried, slot) {
                        Ok(attempt) => {
                            cluster.stats.hedges.inc();
                            started += 1;
                            running.push(attempt);
                            hedge = arm_hedge(started);
                        }
                        Err(error) => tracing::debug!(%error, "no endpoint for a hedged attempt"),
                    }
                }
                Event::Done(index, result) => {
                    let Running { mut attempt, .. } = running.swap_remove(index);
                    let Verdict::Retry(retry_after) = Self::verdict(retry, &result, !running.is_empty()) else {
                        return self.finish(result, attempt, None);
                    };
                    self.record_failure(&result, &mut attempt);
                    if !running.is_empty() {
                        continue;
                    }
                    let Some((replay, slot, wait)) = self.retry_after_failure(retry, &body, started, retry_after)
                    else {
                        return give_up(result, attempt);
                    };
                    drop((result, attempt));
                    tokio::time::sleep(wait).await;
                    running.push(self.launch(retry, &template, replay, &mut tried, slot)?);
                    started += 1;
                    hedge = arm_hedge(started);
                }
            }
        }
    }

    /// The client's answer from an attempt that stands, recorded.
    fn finish(
        &self,
        result: Result<Outcome, ProxyError>,
        mut attempt: Attempt,
        downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        match result {
            Ok(outcome) => respond(outcome, self.cluster, downstream_upgrade, self.connection, attempt),
            Err(error) => {
                attempt.failed(self.cluster, &error);
                Err(error)
            }
        }
    }
}

/// The client's answer from an attempt already recorded, when no retry may follow it.
fn give_up(result: Result<Outcome, ProxyError>, attempt: Attempt) -> Result<Response<ProxyBody>, ProxyError> {
    match result {
        Ok(Outcome::Response(response)) => {
            let in_flight: InFlight = attempt.into_in_flight();
            Ok(response.map(|body| body.hold(in_flight)))
        }
        Ok(Outcome::Switched(..)) => Err(ProxyError::Http1(super::h1::Error::UnexpectedSwitch)),
        Err(error) => Err(error),
    }
}

/// Polls `exchange` to its end, or until `deadline`: `None` if the deadline came first.
async fn within<F: Future>(mut exchange: Pin<&mut F>, deadline: Option<tokio::time::Instant>) -> Option<F::Output> {
    let Some(deadline) = deadline else { return Some(exchange.await) };
    let mut timer = timer::Deadline::at(deadline);
    poll_fn(|cx| {
        if let Poll::Ready(output) = exchange.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(&mut timer).poll(cx).map(|()| None)
    })
    .await
}
