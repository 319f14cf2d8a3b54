//! Supervision of a child service (rollout-server, ref-scorer): spawn it from the same build, read
//! the address it prints (`listening on http://ADDR`), wait for `/health`, restart it when it has
//! died or hangs, stop it with SIGTERM (then SIGKILL) at the end. Children are started with
//! `--parent-pid` (the kernel's parent-death signal), so a killed orchestrator, even SIGKILLed,
//! leaves no orphan behind.
//!
//! Every request goes through [`Service::call`], the one place a failed request is sent again:
//! it has a deadline derived from its size; a service that died, answered 5xx or missed the
//! deadline is restarted (a hung one killed first) and the request re-sent, at most
//! `max_attempts` times in all. A restarted rollout server gets its adapter back before the
//! request is re-sent. Adapters travel as bytes with the sha256 the run recorded (`PUT
//! /v1/adapters/{name}`), so a server on another machine needs no shared file system.
//!
//! A service the config names by URL (`services.*.endpoint(s)`) is used as is: nothing is
//! spawned, and it is never restarted or stopped (its requests are still re-sent).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use learner::checkpoint;
use rl_http::client::{ClientError, RetryPolicy, ServiceClient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// How to start a child service.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// A checkpoint's adapter as a service is told to serve it: its name (`iter_N`), its folder
/// here, and the sha256 of its weights the run recorded (the server checks the bytes against it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    pub name: String,
    pub dir: PathBuf,
    pub sha256: String,
}

/// A service: a supervised child, or an endpoint someone else runs.
#[derive(Debug)]
pub struct Service {
    name: &'static str,
    spec: Option<ChildSpec>,
    state: Mutex<State>,
    api_key: Option<String>,
    startup_timeout: Duration,
    max_attempts: u32,
}

#[derive(Debug)]
struct State {
    child: Option<Child>,
    url: String,
    restarts: u32,
    /// The adapter this service was told to serve (`Some(None)`: the base model; `None`: not
    /// told yet), put back after a restart.
    adapter: Option<Option<Adapter>>,
}

impl Service {
    /// Uses a service that is already running at `url`.
    pub async fn external(
        name: &'static str,
        url: &str,
        api_key: Option<String>,
        max_attempts: u32,
    ) -> anyhow::Result<Self> {
        let s = Self {
            name,
            spec: None,
            state: Mutex::new(State {
                child: None,
                url: url.trim_end_matches('/').to_string(),
                restarts: 0,
                adapter: None,
            }),
            api_key,
            startup_timeout: Duration::from_secs(10),
            max_attempts: max_attempts.max(1),
        };
        s.wait_healthy(&s.url().await).await.with_context(|| {
            format!("the configured {name} endpoint {url} does not answer /health")
        })?;
        Ok(s)
    }

    /// Starts a child and waits until it is healthy.
    pub async fn spawn(
        spec: ChildSpec,
        api_key: Option<String>,
        startup_timeout: Duration,
        max_attempts: u32,
    ) -> anyhow::Result<Self> {
        let (child, url) = start(&spec, startup_timeout).await?;
        let s = Self {
            name: spec.name,
            spec: Some(spec),
            state: Mutex::new(State {
                child: Some(child),
                url,
                restarts: 0,
                adapter: None,
            }),
            api_key,
            startup_timeout,
            max_attempts: max_attempts.max(1),
        };
        s.wait_healthy(&s.url().await).await?;
        Ok(s)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub async fn url(&self) -> String {
        self.state.lock().await.url.clone()
    }

    pub async fn restarts(&self) -> u32 {
        self.state.lock().await.restarts
    }

    /// A client for the service's current address whose requests end at `deadline`. It waits
    /// out 503s (busy, with `Retry-After`) for a while; every other failure comes back at once,
    /// to [`Service::call`].
    pub async fn client(&self, deadline: Duration) -> anyhow::Result<ServiceClient> {
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

    /// Sends a request (`f` with a client) within `deadline`. A refusal (4xx) comes back at
    /// once: the request itself is wrong. Any other failure (the service died, answered 5xx,
    /// missed the deadline, could not be reached) restarts the service when this run started
    /// it, a hung one killed first, and sends the request again, `max_attempts` sends at most.
    pub async fn call<T, F, Fut>(&self, what: &str, deadline: Duration, f: F) -> anyhow::Result<T>
    where
        F: Fn(ServiceClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut last = None;
        for attempt in 1..=self.max_attempts {
            // A dead child is noticed here, before its requests time out.
            self.ensure_running().await?;
            // Which child this send reaches: a deadline missed on it must not kill a successor
            // that another request already started.
            let generation = self.restarts().await;
            match f(self.client(deadline).await?).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_refusal() => {
                    return Err(anyhow::Error::new(e).context(what.to_string()))
                }
                Err(e) => {
                    tracing::warn!(
                        "{what}: {} failed (send {attempt} of {}): {e}",
                        self.name,
                        self.max_attempts
                    );
                    if e.is_timeout() {
                        self.kill_hung(generation).await;
                    }
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

    /// Makes the service serve `adapter` (`None`: the base model), and again after every
    /// restart. A no-op when it already does. Sent through [`Service::call`].
    pub async fn serve_adapter(&self, adapter: Option<&Adapter>) -> anyhow::Result<()> {
        let wanted = adapter.cloned();
        {
            let mut st = self.state.lock().await;
            if st.adapter.as_ref() == Some(&wanted) {
                drop(st);
                self.ensure_running().await?;
                return Ok(());
            }
            // Recorded first: a restart in between puts back this one, not the previous.
            st.adapter = Some(wanted.clone());
        }
        let shown = adapter.map_or("the base model", |a| a.name.as_str());
        let swapped = self
            .call(&format!("serving {shown}"), self.startup_timeout, |cl| {
                let wanted = wanted.clone();
                async move { swap(&cl, wanted.as_ref()).await }
            })
            .await;
        match swapped {
            Ok(ms) => {
                tracing::info!("{} now serves {shown} (swap {ms:.1} ms)", self.name);
                Ok(())
            }
            Err(e) => {
                // Unknown now: the next call sends it again.
                self.state.lock().await.adapter = None;
                Err(e)
            }
        }
    }

    /// SIGKILLs our child after it missed a deadline (a hung server keeps its port and accepts
    /// connections), unless it was already replaced since `generation`; the next
    /// [`Service::ensure_running`] starts a new one.
    async fn kill_hung(&self, generation: u32) {
        if self.spec.is_none() {
            return;
        }
        let mut st = self.state.lock().await;
        if st.restarts != generation {
            return;
        }
        if let Some(child) = st.child.as_mut() {
            tracing::warn!(
                "{} (pid {:?}) missed its deadline; killing it",
                self.name,
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
            .with_context(|| format!("{} at {url} did not become healthy", self.name))?;
        Ok(())
    }

    /// Restarts the child if it has exited (healthy and serving its adapter again before this
    /// returns); returns whether it did. An external service is never restarted.
    pub async fn ensure_running(&self) -> anyhow::Result<bool> {
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
        tracing::warn!("{} exited ({status}); restarting it", self.name);
        let (child, url) = start(spec, self.startup_timeout).await?;
        st.child = Some(child);
        st.url = url.clone();
        st.restarts += 1;
        // Still holding the state: no request reaches the new server before it is healthy and
        // serves the adapter again (it starts on the base model).
        self.wait_healthy(&url).await?;
        if let Some(Some(adapter)) = &st.adapter {
            let client = ServiceClient::new(&url, self.api_key.clone(), self.startup_timeout)?;
            swap(&client, Some(adapter)).await.with_context(|| {
                format!("{}: putting back the adapter {}", self.name, adapter.name)
            })?;
        }
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
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
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

async fn start(spec: &ChildSpec, timeout: Duration) -> anyhow::Result<(Child, String)> {
    if !spec.program.exists() {
        bail!(
            "{} is not built at {}; build the workspace (cargo build --release) so that orchestrate finds it beside itself",
            spec.name,
            spec.program.display()
        );
    }
    let mut child = Command::new(&spec.program)
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
            .with_context(|| format!("{} printed {line:?} instead of its address", spec.name))?,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await.ok();
            bail!(
                "{} exited before listening ({}); its error is above",
                spec.name,
                status.map_or("unknown status".into(), |s| s.to_string())
            )
        }
        Err(_) => bail!("{} did not start listening within {:?}", spec.name, timeout),
    };
    tracing::info!(
        "{} started (pid {}), listening on {url}",
        spec.name,
        child.id().map_or_else(|| "?".into(), |p| p.to_string())
    );
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}
