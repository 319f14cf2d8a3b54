//! One supervised service: a child this run started (restarted when it dies or hangs) or an
//! endpoint someone else runs, with one HTTP client for its current address.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use learner::checkpoint;
use rl_core::config::ApiKey;
use rl_http::client::{ClientError, RetryPolicy, ServiceClient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::{Adapter, ChildSpec};

/// One service process: a supervised child, or an endpoint someone else runs.
#[derive(Debug)]
pub struct Service {
    /// For logs: the service's name, with its replica number in a pool of several.
    pub(super) label: String,
    spec: Option<ChildSpec>,
    /// Held briefly (never across a start or a request), so that reading the address, the pid
    /// or the wanted adapter never waits for a restart.
    state: Mutex<State>,
    /// Held while a child is being restarted: concurrent sends wait for the one restart
    /// instead of starting several, and no request reaches a child before it is healthy.
    restarting: Mutex<()>,
    /// Held while an adapter is being swapped in, so that concurrent sends swap it once.
    swapping: Mutex<()>,
    api_key: Option<ApiKey>,
    pub(super) startup_timeout: Duration,
}

#[derive(Debug)]
struct State {
    child: Option<Child>,
    /// The client of the current address (one connection pool per process; a restarted child
    /// gets a new one).
    client: ServiceClient,
    restarts: u32,
    /// The adapter this service must serve (`Some(None)`: the base model; `None`: whatever it
    /// serves, never told).
    wanted: Option<Option<Adapter>>,
    /// Whether the process now running is known to serve `wanted`.
    served: bool,
}

/// Why one send failed.
#[derive(Debug)]
pub(super) enum SendError {
    /// The request itself is wrong (4xx): sending it again would not help.
    Refused(ClientError),
    /// The service is busy (503): send it again after a while, not a failure.
    Busy(ClientError),
    /// The service failed (died, 5xx, missed the deadline, unreachable): send it again.
    Failed(ClientError),
    /// A service this run started cannot be started again.
    Fatal(anyhow::Error),
}

impl From<ClientError> for SendError {
    fn from(e: ClientError) -> Self {
        if e.is_refusal() {
            SendError::Refused(e)
        } else if e.busy_for().is_some() {
            SendError::Busy(e)
        } else {
            SendError::Failed(e)
        }
    }
}

impl Service {
    fn new(
        label: String,
        spec: Option<ChildSpec>,
        child: Option<Child>,
        url: &str,
        api_key: Option<ApiKey>,
        startup_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            label,
            spec,
            state: Mutex::new(State {
                child,
                client: client_of(url, api_key.as_ref())?,
                restarts: 0,
                wanted: None,
                served: false,
            }),
            restarting: Mutex::new(()),
            swapping: Mutex::new(()),
            api_key,
            startup_timeout,
        })
    }

    /// Uses a service that is already running at `url`.
    pub async fn external(
        label: String,
        url: &str,
        api_key: Option<ApiKey>,
    ) -> anyhow::Result<Self> {
        let url = url.trim_end_matches('/');
        let s = Self::new(label, None, None, url, api_key, Duration::from_secs(10))?;
        s.wait_healthy(&s.client().await).await.with_context(|| {
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
        api_key: Option<ApiKey>,
        startup_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (child, url) = start(&label, &spec, startup_timeout).await?;
        let s = Self::new(
            label,
            Some(spec),
            Some(child),
            &url,
            api_key,
            startup_timeout,
        )?;
        s.wait_healthy(&s.client().await).await?;
        Ok(s)
    }

    /// The client of the current address (a clone: the same connections).
    async fn client(&self) -> ServiceClient {
        self.state.lock().await.client.clone()
    }

    pub async fn url(&self) -> String {
        self.client().await.base().to_string()
    }

    async fn restarts(&self) -> u32 {
        self.state.lock().await.restarts
    }

    /// Whether this run started the service (and so restarts it).
    pub(super) fn is_local(&self) -> bool {
        self.spec.is_some()
    }

    /// Records the adapter to serve (`None`: the base model); it is swapped in by the next send.
    pub(super) async fn want(&self, adapter: Option<Adapter>) {
        let mut st = self.state.lock().await;
        if st.wanted.as_ref() != Some(&adapter) {
            st.wanted = Some(adapter);
            st.served = false;
        }
    }

    /// One send of a request (`f` with the client, whose one attempt ends at `deadline`):
    /// restarts the child first if it has exited, swaps in the wanted adapter if it is not known
    /// to serve it, and SIGKILLs a child that misses the deadline (the next send starts a new
    /// one).
    pub(super) async fn send<T, F, Fut>(&self, deadline: Duration, f: &F) -> Result<T, SendError>
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
            let client = self.client().await.with_timeout(deadline);
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
        let client = self.client().await.with_timeout(self.startup_timeout);
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

    /// Polls `/health` through `client` until it answers, for up to the startup timeout.
    async fn wait_healthy(&self, client: &ServiceClient) -> anyhow::Result<()> {
        let polling = client
            .clone()
            .with_timeout(Duration::from_secs(5))
            .with_retry(RetryPolicy {
                max_attempts: 10_000,
                max_wait: self.startup_timeout,
                max_delay: Duration::from_millis(200),
                retry_unreachable: true,
            });
        polling.health().await.with_context(|| {
            format!("{} at {} did not become healthy", self.label, client.base())
        })?;
        Ok(())
    }

    /// Restarts the child if it has exited (healthy before this returns; its adapter is swapped
    /// in by the next send); returns whether it did. An external service is never restarted.
    /// The state is not held meanwhile; concurrent sends wait on `restarting` for this one.
    async fn ensure_running(&self) -> anyhow::Result<bool> {
        let Some(spec) = &self.spec else {
            return Ok(false);
        };
        let _one_restart = self.restarting.lock().await;
        let exited = {
            let mut st = self.state.lock().await;
            match st.child.as_mut() {
                Some(c) => c.try_wait()?.map(|s| s.to_string()),
                None => Some("not started".into()),
            }
        };
        let Some(status) = exited else {
            return Ok(false);
        };
        tracing::warn!("{} exited ({status}); restarting it", self.label);
        let (child, url) = start(&self.label, spec, self.startup_timeout).await?;
        let client = client_of(&url, self.api_key.as_ref())?;
        // A child that never becomes healthy is dropped here (and killed with it).
        self.wait_healthy(&client).await?;
        let mut st = self.state.lock().await;
        st.child = Some(child);
        st.client = client;
        st.restarts += 1;
        st.served = false;
        Ok(true)
    }

    /// The child's process id (for tests and logs).
    pub async fn pid(&self) -> Option<u32> {
        self.state.lock().await.child.as_ref().and_then(Child::id)
    }

    /// SIGTERM, up to 10 s for a clean exit, then SIGKILL (after any restart under way).
    pub async fn stop(&self) {
        let _no_restart = self.restarting.lock().await;
        let Some(mut child) = self.state.lock().await.child.take() else {
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

/// The one client of a service at `url`: one attempt per request (the pool retries), with the
/// key when there is one. Each send sets its own deadline on a clone.
fn client_of(url: &str, key: Option<&ApiKey>) -> anyhow::Result<ServiceClient> {
    let key = match key {
        Some(ApiKey::Given(k)) => Some(k.clone()),
        _ => None,
    };
    Ok(ServiceClient::new(url, key, Duration::from_secs(60))?.with_retry(RetryPolicy::ONCE))
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
    if let Some((var, ApiKey::Given(key))) = &spec.key {
        cmd.env(var, key);
    }
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
