//! A pool: the replicas of one service used as one. [`Pool::call`] is the one place a request
//! is sent again (see the supervisor's documentation).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use rl_http::client::{ClientError, ServiceClient};

use super::service::{SendError, Service};
use super::Adapter;

/// A pool member: the service and what dispatch knows of it.
#[derive(Debug)]
struct Member {
    service: Service,
    /// Requests sent to it and not answered yet.
    in_flight: AtomicUsize,
    /// Consecutive failed sends.
    failures: AtomicU32,
    /// An external member that failed is left alone until then (a growing backoff).
    avoid_until: std::sync::Mutex<Option<Instant>>,
}

impl Member {
    fn avoided_until(&self) -> Option<Instant> {
        let until = *self.avoid_until.lock().unwrap_or_else(|p| p.into_inner());
        until.filter(|t| *t > Instant::now())
    }

    fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.service.is_local() {
            let backoff = Duration::from_secs(1 << (n - 1).min(6)).min(MAX_BACKOFF);
            *self.avoid_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + backoff);
        }
    }
}

/// The longest an external member that keeps failing is left alone between two sends.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The longest one wait for a busy member (a larger `Retry-After` is capped to this).
const MAX_BUSY_WAIT: Duration = Duration::from_secs(2);

/// Counts a request in flight on a member while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The replicas of one service, used as one (see the module's documentation).
#[derive(Debug)]
pub struct Pool {
    name: &'static str,
    members: Vec<Member>,
    max_attempts: u32,
}

impl Pool {
    /// A pool of `services` (at least one), sending one request `max_attempts` times at most.
    pub fn new(
        name: &'static str,
        services: Vec<Service>,
        max_attempts: u32,
    ) -> anyhow::Result<Self> {
        if services.is_empty() {
            bail!("{name}: no servers to use; start one (replicas) or list its endpoints");
        }
        Ok(Self {
            name,
            members: services
                .into_iter()
                .map(|service| Member {
                    service,
                    in_flight: AtomicUsize::new(0),
                    failures: AtomicU32::new(0),
                    avoid_until: std::sync::Mutex::new(None),
                })
                .collect(),
            max_attempts: max_attempts.max(1),
        })
    }

    /// The label a pool of `n` gives its member `i`: the name, numbered when there are several.
    pub fn label(name: &str, i: usize, n: usize) -> String {
        if n > 1 {
            format!("{name} {}/{n}", i + 1)
        } else {
            name.to_string()
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The process id of member `i`'s child (for tests and failpoints).
    pub async fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.service.pid().await
    }

    /// The member the next send goes to: one not tried yet for this request before one that
    /// was, one not backing off before one that is, then the fewest requests in flight, then
    /// the lowest number.
    fn pick(&self, tried: &[bool]) -> usize {
        (0..self.members.len())
            .min_by_key(|&i| {
                let m = &self.members[i];
                (
                    tried[i],
                    m.avoided_until().is_some(),
                    m.in_flight.load(Ordering::SeqCst),
                    i,
                )
            })
            .unwrap_or(0)
    }

    /// Sends a request (`f` with a client) within `deadline` to the least-loaded member. A
    /// refusal (4xx) comes back at once: the request itself is wrong. Any other failure
    /// sends it again, to another member when there is one (see the module's documentation).
    pub async fn call<T, F, Fut>(&self, what: &str, deadline: Duration, f: F) -> anyhow::Result<T>
    where
        F: Fn(ServiceClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        self.call_on(None, what, deadline, &f).await
    }

    /// [`Pool::call`], on member `only` when given.
    async fn call_on<T, F, Fut>(
        &self,
        only: Option<usize>,
        what: &str,
        deadline: Duration,
        f: &F,
    ) -> anyhow::Result<T>
    where
        F: Fn(ServiceClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut tried = vec![false; self.members.len()];
        let mut last = None;
        let mut sends = 1;
        // Until when busy answers are waited out (from the first one).
        let mut busy_until: Option<Instant> = None;
        while sends <= self.max_attempts {
            let i = only.unwrap_or_else(|| self.pick(&tried));
            let m = &self.members[i];
            if let Some(until) = m.avoided_until() {
                tokio::time::sleep_until(until.into()).await;
            }
            let sent = {
                let _counted = InFlight::new(&m.in_flight);
                m.service.send(deadline, f).await
            };
            match sent {
                Ok(v) => {
                    m.failures.store(0, Ordering::SeqCst);
                    return Ok(v);
                }
                Err(SendError::Busy(e)) if busy_until.is_none_or(|t| Instant::now() < t) => {
                    // Busy is not broken: wait as asked, then send again (to the least-loaded
                    // member), without counting a failed send, for up to the request's deadline
                    // in all.
                    let end = *busy_until.get_or_insert(Instant::now() + deadline);
                    let asked = e.busy_for().unwrap_or(Duration::from_secs(1));
                    let left = end.saturating_duration_since(Instant::now());
                    tracing::debug!("{what}: {} is busy: {e}", m.service.label);
                    tokio::time::sleep(asked.min(MAX_BUSY_WAIT).min(left)).await;
                    continue;
                }
                Err(SendError::Busy(e)) => {
                    tracing::warn!(
                        "{what}: {} stayed busy past the deadline (send {sends} of {})",
                        m.service.label,
                        self.max_attempts
                    );
                    sends += 1;
                    busy_until = None;
                    tried[i] = true;
                    last = Some(e);
                }
                Err(SendError::Refused(e)) => {
                    return Err(anyhow::Error::new(e).context(what.to_string()))
                }
                Err(SendError::Fatal(e)) => return Err(e.context(what.to_string())),
                Err(SendError::Failed(e)) => {
                    tracing::warn!(
                        "{what}: {} failed (send {sends} of {}): {e}",
                        m.service.label,
                        self.max_attempts
                    );
                    sends += 1;
                    tried[i] = true;
                    m.failed();
                    last = Some(e);
                }
            }
        }
        Err(anyhow::anyhow!(
            "{what}: {} failed {} times in a row (services.max_attempts); last: {}",
            self.name,
            self.max_attempts,
            last.map_or(String::new(), |e| e.to_string())
        ))
    }

    /// Makes every member serve `adapter` (`None`: the base model), and again after every
    /// restart; a no-op for a member that already does. A member that cannot take it now gets
    /// it before its next request; it is an error only when no member can.
    pub async fn serve_adapter(&self, adapter: Option<&Adapter>) -> anyhow::Result<()> {
        for m in &self.members {
            m.service.want(adapter.cloned()).await;
        }
        let shown = adapter.map_or("the base model", |a| a.name.as_str());
        let what = format!("serving {shown}");
        let noop = |_: ServiceClient| async { Ok::<(), ClientError>(()) };
        let sends = (0..self.members.len()).map(|i| {
            let deadline = self.members[i].service.startup_timeout;
            self.call_on(Some(i), &what, deadline, &noop)
        });
        let results = futures::future::join_all(sends).await;
        if results.iter().any(Result::is_ok) {
            for (m, r) in self.members.iter().zip(results) {
                if let Err(e) = r {
                    tracing::warn!(
                        "{}: {e:#}; it gets {shown} before its next request",
                        m.service.label
                    );
                }
            }
            return Ok(());
        }
        results
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    /// Stops every member this run started.
    pub async fn stop(&self) {
        futures::future::join_all(self.members.iter().map(|m| m.service.stop())).await;
    }
}
