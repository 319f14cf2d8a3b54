//! Supervision of the services (rollout servers, ref-scorers): spawn each child from the same
//! build, read the address it prints (`listening on http://ADDR`), wait for `/health`, restart it
//! when it has died or hangs, stop it with SIGTERM (then SIGKILL) at the end. Children are
//! started with `--parent-pid` (the kernel's parent-death signal), so a killed orchestrator, even
//! SIGKILLed, leaves no orphan behind.
//!
//! A [`Pool`] is the replicas of one service used as one, and [`Pool::call`] is the one place a
//! failed request is sent again: each send goes to the least-loaded member (fewest requests in
//! flight), with a deadline derived from the request's size. A member that died, answered 5xx or
//! missed the deadline is restarted when this run started it (a hung one killed first), or left
//! alone for a growing backoff when it is someone else's (`services.*.endpoints`), and the
//! request goes to another member, `max_attempts` sends at most. Rollout servers serve the
//! adapter the pool was told to serve; a member that is not known to serve it (just restarted,
//! or a swap that failed) gets it before its next request. Adapters travel as bytes with the
//! sha256 the run recorded (`PUT /v1/adapters/{name}`), so a server on another machine needs no
//! shared file system.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use learner::checkpoint;
use rl_http::client::{ClientError, RetryPolicy, ServiceClient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// How to start a child service.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Its compute threads (`RAYON_NUM_THREADS`; `None`: all cores), unless the user set
    /// `RAYON_NUM_THREADS` for the whole run.
    pub threads: Option<usize>,
}

/// A checkpoint's adapter as a service is told to serve it: its name (`iter_N`), its folder
/// here, and the sha256 of its weights the run recorded (the server checks the bytes against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    pub sha256: String,
}

/// One service process: a supervised child, or an endpoint someone else runs.
#[derive(Debug)]
pub struct Service {
    /// For logs: the service's name, with its replica number in a pool of several.
    label: String,
    spec: Option<ChildSpec>,
    state: Mutex<State>,
    /// Held while an adapter is being swapped in, so that concurrent sends swap it once.
    swapping: Mutex<()>,
    api_key: Option<String>,
    startup_timeout: Duration,
}

#[derive(Debug)]
struct State {
    child: Option<Child>,
    url: String,
    restarts: u32,
    /// The adapter this service must serve (`Some(None)`: the base model; `None`: whatever it
    /// serves, never told).
    wanted: Option<Option<Adapter>>,
    /// Whether the process now running is known to serve `wanted`.
    served: bool,
}

/// Why one send failed.
#[derive(Debug)]
enum SendError {
    /// The request itself is wrong (4xx): sending it again would not help.
    Refused(ClientError),
    /// The service failed (died, 5xx, missed the deadline, unreachable): send it again.
    Failed(ClientError),
    /// A service this run started cannot be started again.
    Fatal(anyhow::Error),
}

impl From<ClientError> for SendError {
    fn from(e: ClientError) -> Self {
        if e.is_refusal() {
            SendError::Refused(e)
        } else {
            SendError::Failed(e)
        }
    }
}

impl Service {
    fn new(label: String, spec: Option<ChildSpec>, child: Option<Child>, url: String) -> Self {
        Self {
            label,
            spec,
            state: Mutex::new(State {
                child,
                url,
                restarts: 0,
                wanted: None,
                served: false,
            }),
            swapping: Mutex::new(()),
            api_key: None,
            startup_timeout: Duration::from_secs(10),
        }
    }

    /// Uses a service that is already running at `url`.
    pub async fn external(
        label: String,
        url: &str,
        api_key: Option<String>,
    ) -> anyhow::Result<Self> {
        let s = Self {
            api_key,
            ..Self::new(label, None, None, url.trim_end_matches('/').to_string())
        };
        s.wait_healthy(&s.url().await).await.with_context(|| {
            format!(
                "the configured {} endpoint {url} does not answer /health",
                s.label
            )
        })?;
        Ok(s)
    }

    /// Starts a child and waits until it is healthy.
    pub async fn spawn(
        label: String,
        spec: ChildSpec,
        api_key: Option<String>,
        startup_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (child, url) = start(&label, &spec, startup_timeout).await?;
        let s = Self {
            api_key,
            startup_timeout,
            ..Self::new(label, Some(spec), Some(child), url)
        };
        s.wait_healthy(&s.url().await).await?;
        Ok(s)
    }

    pub async fn url(&self) -> String {
        self.state.lock().await.url.clone()
    }

    async fn restarts(&self) -> u32 {
        self.state.lock().await.restarts
    }

    /// Whether this run started the service (and so restarts it).
    fn is_local(&self) -> bool {
        self.spec.is_some()
    }

    /// A client for the service's current address whose requests end at `deadline`. It waits
    /// out 503s (busy, with `Retry-After`) for a while; every other failure comes back at once,
    /// to [`Pool::call`].
    async fn client(&self, deadline: Duration) -> anyhow::Result<ServiceClient> {
        Ok(
            ServiceClient::new(&self.url().await, self.api_key.clone(), deadline)?.with_retry(
                RetryPolicy {
                    max_attempts: 1000,
                    max_wait: Duration::from_secs(300),
                    max_delay: Duration::from_secs(2),
                    retry_unreachable: false,
                },
            ),
        )
    }

    /// Records the adapter to serve (`None`: the base model); it is swapped in by the next send.
    async fn want(&self, adapter: Option<Adapter>) {
        let mut st = self.state.lock().await;
        if st.wanted.as_ref() != Some(&adapter) {
            st.wanted = Some(adapter);
            st.served = false;
        }
    }

    /// One send of a request (`f` with a client) within `deadline`: restarts the child first if
    /// it has exited, swaps in the wanted adapter if it is not known to serve it, and SIGKILLs
    /// a child that misses the deadline (the next send starts a new one).
    async fn send<T, F, Fut>(&self, deadline: Duration, f: &F) -> Result<T, SendError>
    where
        F: Fn(ServiceClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        // A dead child is noticed here, before its requests time out.
        self.ensure_running().await.map_err(SendError::Fatal)?;
        // Which child this send reaches: a deadline missed on it must not kill a successor
        // that another request already started.
        let generation = self.restarts().await;
        let result = async {
            self.ensure_serving(generation).await?;
            let client = self.client(deadline).await.map_err(SendError::Fatal)?;
            f(client).await.map_err(SendError::from)
        }
        .await;
        if let Err(SendError::Failed(e)) = &result {
            if e.is_timeout() {
                self.kill_hung(generation).await;
            }
        }
        result
    }

    /// Swaps in the wanted adapter unless the child of `generation` is known to serve it.
    async fn ensure_serving(&self, generation: u32) -> Result<(), SendError> {
        let _one_at_a_time = self.swapping.lock().await;
        let wanted = {
            let st = self.state.lock().await;
            match &st.wanted {
                Some(w) if !st.served => w.clone(),
                _ => return Ok(()),
            }
        };
        let client = ServiceClient::new(
            &self.url().await,
            self.api_key.clone(),
            self.startup_timeout,
        )
        .map_err(|e| SendError::Fatal(e.into()))?;
        let ms = swap(&client, wanted.as_ref()).await?;
        let mut st = self.state.lock().await;
        // Known only for the child it was sent to, and only if nobody wants another since.
        if st.restarts == generation && st.wanted.as_ref() == Some(&wanted) {
            st.served = true;
        }
        let shown = wanted
            .as_ref()
            .map_or("the base model", |a| a.name.as_str());
        tracing::info!("{} now serves {shown} (swap {ms:.1} ms)", self.label);
        Ok(())
    }

    /// SIGKILLs our child after it missed a deadline (a hung server keeps its port and accepts
    /// connections), unless it was already replaced since `generation`; the next
    /// [`Service::ensure_running`] starts a new one.
    async fn kill_hung(&self, generation: u32) {
        if !self.is_local() {
            return;
        }
        let mut st = self.state.lock().await;
        if st.restarts != generation {
            return;
        }
        if let Some(child) = st.child.as_mut() {
            tracing::warn!(
                "{} (pid {:?}) missed its deadline; killing it",
                self.label,
                child.id()
            );
            let _ = child.kill().await;
        }
    }

    async fn wait_healthy(&self, url: &str) -> anyhow::Result<()> {
        let client = ServiceClient::new(url, self.api_key.clone(), Duration::from_secs(5))?
            .with_retry(RetryPolicy {
                max_attempts: 10_000,
                max_wait: self.startup_timeout,
                max_delay: Duration::from_millis(200),
                retry_unreachable: true,
            });
        client
            .health()
            .await
            .with_context(|| format!("{} at {url} did not become healthy", self.label))?;
        Ok(())
    }

    /// Restarts the child if it has exited (healthy before this returns; its adapter is swapped
    /// in by the next send); returns whether it did. An external service is never restarted.
    async fn ensure_running(&self) -> anyhow::Result<bool> {
        let Some(spec) = &self.spec else {
            return Ok(false);
        };
        let mut st = self.state.lock().await;
        let exited = match st.child.as_mut() {
            Some(c) => c.try_wait()?.map(|s| s.to_string()),
            None => Some("not started".into()),
        };
        let Some(status) = exited else {
            return Ok(false);
        };
        tracing::warn!("{} exited ({status}); restarting it", self.label);
        let (child, url) = start(&self.label, spec, self.startup_timeout).await?;
        st.child = Some(child);
        st.url = url.clone();
        st.restarts += 1;
        st.served = false;
        // Still holding the state: no request reaches the new server before it is healthy.
        self.wait_healthy(&url).await?;
        Ok(true)
    }

    /// The child's process id (for tests and logs).
    pub async fn pid(&self) -> Option<u32> {
        self.state.lock().await.child.as_ref().and_then(Child::id)
    }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL.
    pub async fn stop(&self) {
        let mut st = self.state.lock().await;
        let Some(mut child) = st.child.take() else {
            return;
        };
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = child.kill().await;
    }
}

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
        for attempt in 1..=self.max_attempts {
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
                Err(SendError::Refused(e)) => {
                    return Err(anyhow::Error::new(e).context(what.to_string()))
                }
                Err(SendError::Fatal(e)) => return Err(e.context(what.to_string())),
                Err(SendError::Failed(e)) => {
                    tracing::warn!(
                        "{what}: {} failed (send {attempt} of {}): {e}",
                        m.service.label,
                        self.max_attempts
                    );
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

/// Sends `adapter` as bytes and has it served (`None`: back to the base model); the swap time
/// in ms.
async fn swap(client: &ServiceClient, adapter: Option<&Adapter>) -> Result<f64, ClientError> {
    let Some(a) = adapter else {
        return client.unload_adapter().await.map(|r| r.swap_ms);
    };
    let unreadable = |file: &str, e: String| ClientError::Transport {
        method: "PUT",
        url: format!("{}/v1/adapters/{}", client.base(), a.name),
        message: format!("reading {}: {e}", a.dir.join(file).display()),
    };
    let (config_file, weights_file) = (checkpoint::ADAPTER_CONFIG_FILE, checkpoint::ADAPTER_FILE);
    let config = tokio::fs::read(a.dir.join(config_file))
        .await
        .map_err(|e| unreadable(config_file, e.to_string()))?;
    let config =
        serde_json::from_slice(&config).map_err(|e| unreadable(config_file, e.to_string()))?;
    let weights = tokio::fs::read(a.dir.join(weights_file))
        .await
        .map_err(|e| unreadable(weights_file, e.to_string()))?;
    client
        .upload_adapter(&a.name, config, &weights, &a.sha256)
        .await
        .map(|r| r.swap_ms)
}

/// Starts `spec` (`label` names it in messages) and reads the address it listens on.
async fn start(
    label: &str,
    spec: &ChildSpec,
    timeout: Duration,
) -> anyhow::Result<(Child, String)> {
    if !spec.program.exists() {
        bail!(
            "{} is not built at {}; build the workspace (cargo build --release) so that orchestrate finds it beside itself",
            label,
            spec.program.display()
        );
    }
    let mut cmd = Command::new(&spec.program);
    if let Some(n) = spec.threads {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", n.to_string());
        }
    }
    let mut child = cmd
        .args(&spec.args)
        .args(["--parent-pid", &std::process::id().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", spec.program.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(timeout, lines.next_line()).await;
    let url = match first {
        Ok(Ok(Some(line))) => line
            .trim()
            .strip_prefix("listening on ")
            .map(str::to_string)
            .with_context(|| format!("{} printed {line:?} instead of its address", label))?,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await.ok();
            bail!(
                "{} exited before listening ({}); its error is above",
                label,
                status.map_or("unknown status".into(), |s| s.to_string())
            )
        }
        Err(_) => bail!("{} did not start listening within {:?}", label, timeout),
    };
    tracing::info!(
        "{} started (pid {}), listening on {url}",
        label,
        child.id().map_or_else(|| "?".into(), |p| p.to_string())
    );
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}
