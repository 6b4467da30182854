//! The retry loop: attempts one after another, or hedged side by side, within the per-try and the
//! route's timeouts, until one stands.
//!
//! [`Retrying`] runs over any [`Upstream`] — the step that starts one attempt on an endpoint, sends
//! it and records how it went — so the loop knows nothing of sockets: `policed` gives it the real
//! step (an attempt through `attempt`), and the tests below a scripted endpoint on tokio's paused
//! clock. Its rules:
//!
//! - each attempt picks an endpoint not tried yet where there is one, and waits for its response
//!   head no longer than the per-try timeout and the route's, whichever ends first (one timer
//!   serves both);
//! - an outcome the retry policy retries is recorded (the client may never see it), and another
//!   attempt follows after the policy's backoff (at least a `Retry-After`) while the attempts, the
//!   body's replay record, the route's budget and the cluster's `max_retries` breaker all allow —
//!   and unless the wait would outlast the route's timeout, in which case the last failure is the
//!   answer, as it says more than a timeout would;
//! - with hedging, an attempt still waiting after the hedge delay gets a sibling on another
//!   endpoint, under the same allowances; the first answer that stands wins and the others are
//!   cancelled (dropped: their connections are closed or their streams reset). A failure with a
//!   sibling still out waits for the sibling;
//! - when the route's timeout passes, every attempt still out counts against its endpoint as a
//!   failure, and the request fails with `request_timeout`.
//!
//! Costs: attempts one after another run inline in the loop's future (no allocation per attempt);
//! only hedged attempts, which run side by side, are futures of their own.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::body::UpstreamBody;
use super::client::Outcome;
use super::error::ProxyError;
use super::replay::Reusable;
use crate::policy::breaker::{CircuitBreakers, Slot};
use crate::policy::retry::{RetryPolicy, Verdict};
use crate::state::cluster::ClusterStats;
use crate::timer;

/// One attempt's worth of work, as the loop sees it.
pub(crate) trait Upstream {
    /// An attempt under way: what it holds (its breaker slot, its in-flight count, its span) until
    /// it is settled.
    type Attempt: Send;

    /// Starts an attempt at `at` on an endpoint, avoiding `tried` where it can. Fails when there is
    /// no endpoint, or a breaker is open.
    fn start(&self, tried: &[SocketAddr], at: Instant) -> Result<(SocketAddr, Self::Attempt), ProxyError>;

    /// Sends the request with `body` to `endpoint` for `attempt`; completes with the response head.
    fn send<'s>(
        &'s self,
        endpoint: SocketAddr,
        attempt: &Self::Attempt,
        body: UpstreamBody,
    ) -> impl Future<Output = Result<Outcome, ProxyError>> + Send + use<'s, Self>;

    /// Records an outcome the client will not see as it is (the attempt is retried, or stands
    /// after nothing more may follow).
    fn record(&self, attempt: &mut Self::Attempt, result: &Result<Outcome, ProxyError>);
}

/// How the loop ended.
#[derive(Debug)]
pub(crate) enum Ended<A> {
    /// The outcome that stands, and its attempt, not yet recorded: the client's answer.
    Stands(Result<Outcome, ProxyError>, A),
    /// The last attempt's outcome, already recorded, after which no retry could follow.
    GaveUp(Result<Outcome, ProxyError>, A),
    /// No attempt could start, or the route's timeout passed with attempts out.
    Failed(ProxyError),
}

/// The loop's settings for one request.
pub(crate) struct Retrying<'a, U> {
    /// The step each attempt takes.
    pub(crate) upstream: &'a U,
    /// The cluster's breakers (its `max_retries`) and counters.
    pub(crate) breakers: &'a CircuitBreakers,
    /// See `breakers`.
    pub(crate) stats: &'a ClusterStats,
    /// The route's timeout and when it runs out.
    pub(crate) timeout: Option<(Duration, Instant)>,
    /// When the first attempt starts.
    pub(crate) started: Instant,
}

/// An attempt on its way when attempts run side by side.
struct Running<'a, A> {
    exchange: Pin<Box<dyn Future<Output = Result<Outcome, ProxyError>> + Send + 'a>>,
    attempt: A,
    /// Held while a retry is in flight (the `max_retries` breaker).
    _retry_slot: Option<Slot>,
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

// Lives on the stack for one turn of the loop and is matched at once: its size costs nothing.
#[allow(clippy::large_enum_variant)]
enum Event {
    Deadline,
    Done(usize, Result<Outcome, ProxyError>),
    Hedge,
}

impl<U: Upstream> Retrying<'_, U> {
    /// One attempt with `body`, within the route's timeout.
    pub(crate) async fn once(&self, body: UpstreamBody) -> Ended<U::Attempt> {
        let (endpoint, attempt) = match self.upstream.start(&[], self.started) {
            Ok(started) => started,
            Err(error) => return Ended::Failed(error),
        };
        let result = self.exchange(endpoint, &attempt, body, None).await;
        Ended::Stands(result, attempt)
    }

    /// Attempts one after another until one stands (no hedging).
    pub(crate) async fn sequential(&self, retry: &RetryPolicy, body: &Reusable) -> Ended<U::Attempt> {
        retry.budget.deposit(self.started.into_std());
        let mut tried = Tried::default();
        let mut started = 1_u32;
        let mut sent = self.started;
        let Some(mut next) = body.attempt() else {
            return Ended::Failed(ProxyError::BadRequest("the request body failed"));
        };
        let mut retry_slot = None;
        let mut previous: Option<(Result<Outcome, ProxyError>, U::Attempt)> = None;
        loop {
            let (endpoint, mut attempt) = match self.upstream.start(tried.as_slice(), sent) {
                Ok(picked) => picked,
                // No endpoint for a retry: the last failure is the answer.
                Err(error) => {
                    return previous.map_or(Ended::Failed(error), |(result, attempt)| Ended::GaveUp(result, attempt));
                }
            };
            drop(previous.take());
            tried.push(endpoint);
            let per_try = retry.per_try_timeout.map(|limit| (limit, sent + limit));
            let result = self.exchange(endpoint, &attempt, next, per_try).await;
            drop(retry_slot.take());
            let Verdict::Retry(retry_after) = verdict(retry, &result, false) else {
                return Ended::Stands(result, attempt);
            };
            self.upstream.record(&mut attempt, &result);
            let Some((body, slot, wait)) = self.after_failure(retry, body, started, retry_after) else {
                return Ended::GaveUp(result, attempt);
            };
            tokio::time::sleep(wait).await;
            sent = Instant::now();
            previous = Some((result, attempt));
            (next, retry_slot, started) = (body, slot, started + 1);
        }
    }

    /// Attempts with hedging, side by side, until one stands.
    pub(crate) async fn hedged(&self, retry: &RetryPolicy, body: &Reusable) -> Ended<U::Attempt> {
        retry.budget.deposit(self.started.into_std());
        let mut tried = Tried::default();
        let mut started = 1_u32;
        let mut running: Vec<Running<'_, U::Attempt>> = Vec::with_capacity(2);
        let Some(first) = body.attempt() else {
            return Ended::Failed(ProxyError::BadRequest("the request body failed"));
        };
        match self.launch(retry, first, &mut tried, None) {
            Ok(attempt) => running.push(attempt),
            Err(error) => return Ended::Failed(error),
        }
        let mut deadline = self.timeout.map(|(_, at)| timer::Deadline::at(at));
        let arm_hedge = |started: u32| {
            retry.hedge_delay.filter(|_| started <= retry.attempts).map(|d| timer::Deadline::at(Instant::now() + d))
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
                    let timed_out = Err(ProxyError::RequestTimeout(limit));
                    // Attempts still waiting count against their endpoints, as slow as the limit.
                    for mut running in running.drain(..) {
                        self.upstream.record(&mut running.attempt, &timed_out);
                    }
                    return Ended::Failed(ProxyError::RequestTimeout(limit));
                }
                Event::Hedge => {
                    hedge = None;
                    let Some((replay, slot)) = self.next_retry(retry, body, started) else { continue };
                    match self.launch(retry, replay, &mut tried, slot) {
                        Ok(attempt) => {
                            self.stats.policy.hedges.inc();
                            started += 1;
                            running.push(attempt);
                            hedge = arm_hedge(started);
                        }
                        Err(error) => tracing::debug!(%error, "no endpoint for a hedged attempt"),
                    }
                }
                Event::Done(index, result) => {
                    let Running { mut attempt, .. } = running.swap_remove(index);
                    let Verdict::Retry(retry_after) = verdict(retry, &result, !running.is_empty()) else {
                        return Ended::Stands(result, attempt);
                    };
                    self.upstream.record(&mut attempt, &result);
                    if !running.is_empty() {
                        continue;
                    }
                    let Some((replay, slot, wait)) = self.after_failure(retry, body, started, retry_after) else {
                        return Ended::GaveUp(result, attempt);
                    };
                    drop((result, attempt));
                    tokio::time::sleep(wait).await;
                    match self.launch(retry, replay, &mut tried, slot) {
                        Ok(attempt) => running.push(attempt),
                        Err(error) => return Ended::Failed(error),
                    }
                    started += 1;
                    hedge = arm_hedge(started);
                }
            }
        }
    }

    /// Sends `attempt` to `endpoint` with `body` and waits for its response head, within `per_try`
    /// (its length, and when it runs out) and the route's timeout. The exchange is polled where it
    /// was made (pinned in this future), and one timer serves both limits: wrapping it in a timeout
    /// per limit would copy the whole exchange (a kilobyte or more) into each wrapper.
    async fn exchange(
        &self,
        endpoint: SocketAddr,
        attempt: &U::Attempt,
        body: UpstreamBody,
        per_try: Option<(Duration, Instant)>,
    ) -> Result<Outcome, ProxyError> {
        // Whichever limit runs out first: (is it the per-try one, its length, when).
        let per_try = per_try.map(|(limit, at)| (true, limit, at));
        let route = self.timeout.map(|(limit, at)| (false, limit, at));
        let limit = match (per_try, route) {
            (Some(a), Some(b)) => Some(if a.2 < b.2 { a } else { b }),
            (a, b) => a.or(b),
        };
        let exchange = std::pin::pin!(self.upstream.send(endpoint, attempt, body));
        match (within(exchange, limit.map(|(_, _, at)| at)).await, limit) {
            (Some(result), _) => result,
            (None, Some((true, limit, _))) => {
                self.stats.policy.per_try_timeouts.inc();
                Err(ProxyError::PerTryTimeout(limit))
            }
            (None, Some((false, limit, _))) => Err(ProxyError::RequestTimeout(limit)),
            // `within` only gives up at a deadline.
            (None, None) => Err(ProxyError::RequestTimeout(Duration::ZERO)),
        }
    }

    /// Starts an attempt reading `body`, with the retry policy's per-try timeout, as a future of
    /// its own (hedged attempts run side by side; the route's timeout is the loop's).
    fn launch(
        &self,
        retry: &RetryPolicy,
        body: UpstreamBody,
        tried: &mut Tried,
        retry_slot: Option<Slot>,
    ) -> Result<Running<'_, U::Attempt>, ProxyError> {
        let now = Instant::now();
        let (endpoint, attempt) = self.upstream.start(tried.as_slice(), now)?;
        tried.push(endpoint);
        let sending = self.upstream.send(endpoint, &attempt, body);
        let per_try = retry.per_try_timeout;
        let stats = self.stats;
        let exchange = Box::pin(async move {
            let Some(limit) = per_try else { return sending.await };
            match within(std::pin::pin!(sending), Some(now + limit)).await {
                Some(result) => result,
                None => {
                    stats.policy.per_try_timeouts.inc();
                    Err(ProxyError::PerTryTimeout(limit))
                }
            }
        });
        Ok(Running { exchange, attempt, _retry_slot: retry_slot })
    }

    /// Whether the policy may send one more attempt after `started` attempts: the attempts, the
    /// body's replay record, the budget and the `max_retries` breaker must all allow it. Returns the
    /// body for it and the breaker slot it holds.
    fn next_retry(&self, retry: &RetryPolicy, body: &Reusable, started: u32) -> Option<(UpstreamBody, Option<Slot>)> {
        if started > retry.attempts {
            return None;
        }
        let replay = body.attempt()?;
        if !retry.budget.withdraw(std::time::Instant::now()) {
            self.stats.policy.retry_budget_exhausted.inc();
            return None;
        }
        let slot = self.breakers.retry(&self.stats.breakers).ok()?;
        self.stats.policy.retries.inc();
        Some((replay, slot))
    }

    /// After a failure the policy retries: the body and breaker slot for the next attempt and how
    /// long to wait first, or `None` when no retry may follow (see [`Retrying::next_retry`]) or its
    /// wait would outlast the route's timeout.
    fn after_failure(
        &self,
        retry: &RetryPolicy,
        body: &Reusable,
        started: u32,
        retry_after: Option<Duration>,
    ) -> Option<(UpstreamBody, Option<Slot>, Duration)> {
        let wait = retry.backoff(started).max(retry_after.unwrap_or_default());
        if self.timeout.is_some_and(|(_, at)| Instant::now() + wait >= at) {
            return None;
        }
        let (next, slot) = self.next_retry(retry, body, started)?;
        Some((next, slot, wait))
    }
}

/// What `retry` makes of an attempt's `result`. With `siblings` (hedged attempts still out), any
/// failure without a response waits for them rather than standing.
fn verdict(retry: &RetryPolicy, result: &Result<Outcome, ProxyError>, siblings: bool) -> Verdict {
    match result {
        Ok(Outcome::Response(response)) => {
            retry.retries_response(response.status().as_u16(), response.version(), response.headers())
        }
        Ok(Outcome::Switched(..)) => Verdict::Final,
        Err(error) if siblings || retry.retries_failure(error.failure()) => Verdict::Retry(None),
        Err(_) => Verdict::Final,
    }
}

/// Polls `exchange` to its end, or until `deadline`: `None` if the deadline came first.
async fn within<F: Future>(mut exchange: Pin<&mut F>, deadline: Option<Instant>) -> Option<F::Output> {
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

#[cfg(test)]
mod tests {
    //! The loop driven by a scripted endpoint on tokio's paused clock: every wait below is the
    //! loop's own timers, not the test's sleeps.

    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use http::Response;
    use remora_control_api::v1;

    use super::*;
    use crate::failure::FailureKind;
    use crate::http::body::ProxyBody;
    use crate::http::h1;
    use crate::policy::breaker::Breaker;
    use crate::state::cluster::ClusterStats;

    /// What one attempt on the scripted endpoint does.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// Answers with this status after this many milliseconds.
        Answer(u64, u16),
        /// Fails this way after this many milliseconds.
        Fail(u64, FailureKind),
        /// Never answers.
        Hang,
    }

    /// Endpoints 1, 2, 3 on 127.0.0.1 answering as `script` says, one step per attempt in the
    /// order attempts start; each attempt holds a `max_requests` slot, as the real one does.
    struct Scripted {
        script: Mutex<VecDeque<Step>>,
        /// Each attempt's endpoint port and start, in milliseconds from the test's start.
        started: Mutex<Vec<(u16, u64)>>,
        /// Each recorded outcome: the endpoint port and the status, or the failure's kind.
        recorded: Mutex<Vec<(u16, Result<u16, FailureKind>)>>,
        breakers: CircuitBreakers,
        stats: std::sync::Arc<ClusterStats>,
        origin: Instant,
    }

    impl Scripted {
        fn new(script: &[Step], breakers: v1::CircuitBreakers) -> Scripted {
            Scripted {
                script: Mutex::new(script.iter().copied().collect()),
                started: Mutex::default(),
                recorded: Mutex::default(),
                breakers: CircuitBreakers::compile(Some(&breakers)),
                stats: ClusterStats::detached("scripted"),
                origin: Instant::now(),
            }
        }

        fn elapsed(&self) -> u64 {
            self.origin.elapsed().as_millis() as u64
        }

        fn retrying(&self, timeout: Option<u64>) -> Retrying<'_, Scripted> {
            let started = Instant::now();
            Retrying {
                upstream: self,
                breakers: &self.breakers,
                stats: &self.stats,
                timeout: timeout.map(|ms| (Duration::from_millis(ms), started + Duration::from_millis(ms))),
                started,
            }
        }

        fn started(&self) -> Vec<(u16, u64)> {
            self.started.lock().unwrap().clone()
        }

        fn recorded(&self) -> Vec<(u16, Result<u16, FailureKind>)> {
            self.recorded.lock().unwrap().clone()
        }

        /// Slots the loop (or its attempts) still hold.
        fn held(&self) -> (i64, i64) {
            (self.stats.breakers.active_requests.get(), self.stats.breakers.active_retries.get())
        }
    }

    fn error(kind: FailureKind) -> ProxyError {
        match kind {
            FailureKind::Connect => {
                ProxyError::Connect(crate::connect::ConnectError::Timeout(([127, 0, 0, 1], 1).into()))
            }
            FailureKind::Reset => ProxyError::Http1(h1::Error::Closed),
            FailureKind::Protocol => ProxyError::Http1(h1::Error::Protocol("scripted")),
            other => panic!("no scripted error for {other:?}"),
        }
    }

    #[derive(Debug)]
    struct ScriptedAttempt {
        port: u16,
        step: Step,
        _slot: Option<Slot>,
    }

    impl Upstream for Scripted {
        type Attempt = ScriptedAttempt;

        fn start(&self, tried: &[SocketAddr], _at: Instant) -> Result<(SocketAddr, ScriptedAttempt), ProxyError> {
            let endpoints: Vec<SocketAddr> = (1..=3).map(|port| SocketAddr::from(([127, 0, 0, 1], port))).collect();
            let endpoint = endpoints.iter().find(|e| !tried.contains(e)).copied().unwrap_or(endpoints[0]);
            let slot = self
                .breakers
                .request(&self.stats.breakers)
                .map_err(|breaker| ProxyError::Overflow("scripted".into(), breaker))?;
            let step = self.script.lock().unwrap().pop_front().unwrap_or(Step::Hang);
            self.started.lock().unwrap().push((endpoint.port(), self.elapsed()));
            Ok((endpoint, ScriptedAttempt { port: endpoint.port(), step, _slot: slot }))
        }

        fn send<'s>(
            &'s self,
            _endpoint: SocketAddr,
            attempt: &ScriptedAttempt,
            _body: UpstreamBody,
        ) -> impl Future<Output = Result<Outcome, ProxyError>> + Send + use<'s> {
            let step = attempt.step;
            async move {
                match step {
                    Step::Answer(ms, status) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        let mut response = Response::new(ProxyBody::empty());
                        *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        if status == 503 {
                            response.headers_mut().insert("retry-after", "5".parse().unwrap());
                        }
                        Ok(Outcome::Response(response))
                    }
                    Step::Fail(ms, kind) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Err(error(kind))
                    }
                    Step::Hang => std::future::pending().await,
                }
            }
        }

        fn record(&self, attempt: &mut ScriptedAttempt, result: &Result<Outcome, ProxyError>) {
            let outcome = match result {
                Ok(Outcome::Response(response)) => Ok(response.status().as_u16()),
                Ok(Outcome::Switched(..)) => Ok(101),
                Err(error) => Err(error.failure().kind),
            };
            self.recorded.lock().unwrap().push((attempt.port, outcome));
        }
    }

    fn policy(json: serde_json::Value) -> RetryPolicy {
        RetryPolicy::compile(&serde_json::from_value::<v1::RetryPolicy>(json).unwrap()).unwrap()
    }

    fn status<A>(ended: &Ended<A>) -> Result<u16, String> {
        let result = match ended {
            Ended::Stands(result, _) | Ended::GaveUp(result, _) => result,
            Ended::Failed(error) => return Err(error.status_and_reason().1.to_owned()),
        };
        match result {
            Ok(Outcome::Response(response)) => Ok(response.status().as_u16()),
            Ok(Outcome::Switched(..)) => Ok(101),
            Err(error) => Err(error.status_and_reason().1.to_owned()),
        }
    }

    /// A hedged attempt starts on another endpoint when the first has not answered within the
    /// hedge delay; the first answer wins, and the loser is cancelled with its slot given back.
    #[tokio::test(start_paused = true)]
    async fn hedging_starts_a_sibling_after_the_delay_and_takes_the_first_answer() {
        let up = Scripted::new(&[Step::Answer(1000, 200), Step::Answer(10, 201)], v1::CircuitBreakers::default());
        let retry = policy(serde_json::json!({"attempts": 1, "hedge": {"delay": "0.05s"}}));
        let ended = up.retrying(None).hedged(&retry, &Reusable::Empty).await;
        assert_eq!(status(&ended), Ok(201));
        assert_eq!(up.elapsed(), 60, "the hedge's answer, 50 + 10 ms in");
        assert_eq!(up.started(), [(1, 0), (2, 50)]);
        assert_eq!(up.stats.policy.hedges.get(), 1);
        drop(ended);
        assert_eq!(up.held(), (0, 0), "the slow attempt was cancelled and gave its slot back");
    }

    /// Hedges stop at the policy's attempts; when the route's timeout passes with every attempt
    /// still out, each counts against its endpoint as timed out and the request fails.
    #[tokio::test(start_paused = true)]
    async fn hedges_stop_at_the_attempt_limit_and_the_route_timeout_ends_them_all() {
        let up = Scripted::new(&[], v1::CircuitBreakers { max_requests: 10, ..Default::default() });
        let retry = policy(serde_json::json!({"attempts": 2, "hedge": {"delay": "0.01s"}}));
        let ended = up.retrying(Some(100)).hedged(&retry, &Reusable::Empty).await;
        assert_eq!(status(&ended), Err("request_timeout".into()));
        assert_eq!(up.elapsed(), 100);
        assert_eq!(up.started(), [(1, 0), (2, 10), (3, 20)]);
        let timed_out = Err(FailureKind::RequestTimeout);
        let mut recorded = up.recorded();
        recorded.sort_by_key(|(port, _)| *port);
        assert_eq!(recorded, [(1, timed_out), (2, timed_out), (3, timed_out)]);
        assert_eq!(up.held(), (0, 0));
    }

    /// The per-try timeout ends one attempt and the retry goes elsewhere, while the route's
    /// timeout, longer, still has time.
    #[tokio::test(start_paused = true)]
    async fn a_per_try_timeout_retries_within_the_routes_timeout() {
        let up = Scripted::new(&[Step::Hang, Step::Answer(10, 200)], v1::CircuitBreakers::default());
        let retry = policy(
            serde_json::json!({"attempts": 2, "retry_on": ["reset"], "per_try_timeout": "0.1s", "backoff_base": "0.001s"}),
        );
        let ended = up.retrying(Some(1000)).sequential(&retry, &Reusable::Empty).await;
        assert_eq!(status(&ended), Ok(200));
        assert_eq!(up.recorded(), [(1, Err(FailureKind::PerTryTimeout))]);
        assert_eq!(up.started().iter().map(|(port, _)| *port).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(up.stats.policy.per_try_timeouts.get(), 1);
        assert_eq!(up.stats.policy.retries.get(), 1);
    }

    /// A route timeout shorter than the per-try timeout ends the attempt at the route's limit,
    /// exactly, and is the answer: the request's time is up, nothing is retried.
    #[tokio::test(start_paused = true)]
    async fn the_routes_timeout_ends_an_attempt_before_its_per_try_timeout() {
        let up = Scripted::new(&[Step::Hang, Step::Answer(1, 200)], v1::CircuitBreakers::default());
        let retry = policy(serde_json::json!({"attempts": 2, "retry_on": ["5xx"], "per_try_timeout": "0.5s"}));
        let ended = up.retrying(Some(200)).sequential(&retry, &Reusable::Empty).await;
        assert_eq!(status(&ended), Err("request_timeout".into()));
        assert_eq!(up.elapsed(), 200);
        assert_eq!(up.started().len(), 1);
        assert_eq!(up.stats.policy.per_try_timeouts.get(), 0);
        assert_eq!(up.stats.policy.retries.get(), 0);
    }

    /// A retry whose wait (here the endpoint's `Retry-After: 5`) would outlast the route's
    /// timeout is not sent: the last answer stands at once, and no retry is counted or spent.
    #[tokio::test(start_paused = true)]
    async fn a_backoff_that_would_outlast_the_routes_timeout_gives_up_with_the_last_answer() {
        let up = Scripted::new(&[Step::Answer(10, 503), Step::Answer(1, 200)], v1::CircuitBreakers::default());
        let retry = policy(serde_json::json!({"attempts": 3, "retry_on": ["5xx"], "backoff_max": "10s"}));
        let ended = up.retrying(Some(1000)).sequential(&retry, &Reusable::Empty).await;
        assert!(matches!(ended, Ended::GaveUp(..)), "{ended:?}");
        assert_eq!(status(&ended), Ok(503));
        assert_eq!(up.elapsed(), 10, "no wait for a retry that cannot happen");
        assert_eq!(up.recorded(), [(1, Ok(503))]);
        assert_eq!(up.stats.policy.retries.get(), 0);
        // Without the route's timeout, the retry waits the five seconds out.
        let up = Scripted::new(&[Step::Answer(10, 503), Step::Answer(1, 200)], v1::CircuitBreakers::default());
        let ended = up.retrying(None).sequential(&retry, &Reusable::Empty).await;
        assert_eq!(status(&ended), Ok(200));
        assert_eq!(up.started(), [(1, 0), (2, 5010)]);
    }

    /// Retries go to endpoints not tried yet; what is not retried (an invalid response) stands.
    #[tokio::test(start_paused = true)]
    async fn retries_go_to_endpoints_not_yet_tried_and_stop_at_what_the_policy_does_not_retry() {
        let script = [Step::Fail(1, FailureKind::Reset), Step::Fail(1, FailureKind::Connect), Step::Answer(1, 200)];
        let up = Scripted::new(&script, v1::CircuitBreakers::default());
        let retry = policy(serde_json::json!({"attempts": 3, "retry_on": ["reset", "connect-failure"]}));
        let ended = up.retrying(None).sequential(&retry, &Reusable::Empty).await;
        assert_eq!(status(&ended), Ok(200));
        assert_eq!(up.started().iter().map(|(port, _)| *port).collect::<Vec<_>>(), [1, 2, 3]);
        let up = Scripted::new(&[Step::Fail(1, FailureKind::Protocol)], v1::CircuitBreakers::default());
        let ended = up.retrying(None).sequential(&retry, &Reusable::Empty).await;
        assert!(matches!(ended, Ended::Stands(Err(ProxyError::Http1(h1::Error::Protocol(_))), _)), "{ended:?}");
        assert_eq!(up.started().len(), 1);
    }

    /// Every breaker slot comes back, whichever way the loop ends: a retry that succeeds, a retry
    /// the `max_retries` breaker refuses (the last answer then stands), the route's timeout in the
    /// middle of a retry, a hedge that wins.
    #[tokio::test(start_paused = true)]
    async fn breaker_slots_come_back_on_every_path() {
        let limits = v1::CircuitBreakers { max_requests: 5, max_retries: 1, ..Default::default() };
        let retry = policy(serde_json::json!({"attempts": 2, "retry_on": ["5xx"], "backoff_base": "0.001s"}));
        let outage = [Step::Answer(1, 500), Step::Answer(1, 500), Step::Answer(1, 500)];

        let up = Scripted::new(&[Step::Answer(1, 500), Step::Answer(1, 200)], limits);
        assert_eq!(status(&up.retrying(None).sequential(&retry, &Reusable::Empty).await), Ok(200));
        assert_eq!(up.held(), (0, 0));

        let up = Scripted::new(&outage, limits);
        let held = up.breakers.retry(&up.stats.breakers).unwrap();
        let ended = up.retrying(None).sequential(&retry, &Reusable::Empty).await;
        assert!(matches!(ended, Ended::GaveUp(..)), "the breaker refused the retry: {ended:?}");
        assert_eq!(up.stats.breakers.overflows(Breaker::Retries), 1);
        drop((ended, held));
        assert_eq!(up.held(), (0, 0));

        let up = Scripted::new(&[Step::Answer(1, 500), Step::Hang], limits);
        let ended = up.retrying(Some(50)).sequential(&retry, &Reusable::Empty).await;
        assert_eq!(status(&ended), Err("request_timeout".into()));
        drop(ended);
        assert_eq!(up.held(), (0, 0));

        let up = Scripted::new(&[Step::Hang, Step::Answer(1, 200)], limits);
        let hedge = policy(serde_json::json!({"attempts": 1, "hedge": {"delay": "0.01s"}}));
        assert_eq!(status(&up.retrying(None).hedged(&hedge, &Reusable::Empty).await), Ok(200));
        assert_eq!(up.held(), (0, 0));
    }
}
