//! Supervision of a child service (rollout-server, ref-scorer): spawn it from the same build, read
//! the address it prints (`listening on http://ADDR`), wait for `/health`, restart it when it has
//! died, stop it with SIGTERM (then SIGKILL) at the end. Children are started with
//! `--exit-with-parent`, so a killed orchestrator leaves no orphan behind.
//!
//! A service the config names by URL (`services.*.endpoint(s)`) is used as is: nothing is
//! spawned, and it is never restarted or stopped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use rl_http::client::{RetryPolicy, ServiceClient};
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

/// A service: a supervised child, or an endpoint someone else runs.
#[derive(Debug)]
pub struct Service {
    name: &'static str,
    spec: Option<ChildSpec>,
    state: Mutex<State>,
    api_key: Option<String>,
    request_timeout: Duration,
    startup_timeout: Duration,
}

#[derive(Debug)]
struct State {
    child: Option<Child>,
    url: String,
    restarts: u32,
}

impl Service {
    /// Uses a service that is already running at `url`.
    pub async fn external(
        name: &'static str,
        url: &str,
        api_key: Option<String>,
        request_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let s = Self {
            name,
            spec: None,
            state: Mutex::new(State {
                child: None,
                url: url.trim_end_matches('/').to_string(),
                restarts: 0,
            }),
            api_key,
            request_timeout,
            startup_timeout: Duration::from_secs(10),
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
        request_timeout: Duration,
        startup_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (child, url) = start(&spec, startup_timeout).await?;
        let s = Self {
            name: spec.name,
            spec: Some(spec),
            state: Mutex::new(State {
                child: Some(child),
                url,
                restarts: 0,
            }),
            api_key,
            request_timeout,
            startup_timeout,
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

    /// A client for the service's current address. 503s and refused connections are retried for
    /// a short while; longer outages come back to the caller, which checks the child.
    pub async fn client(&self) -> anyhow::Result<ServiceClient> {
        Ok(ServiceClient::new(
            &self.url().await,
            self.api_key.clone(),
            self.request_timeout,
        )?
        .with_retry(RetryPolicy {
            max_attempts: 1000,
            max_wait: Duration::from_secs(5),
            max_delay: Duration::from_secs(2),
        }))
    }

    async fn wait_healthy(&self, url: &str) -> anyhow::Result<()> {
        let client = ServiceClient::new(url, self.api_key.clone(), Duration::from_secs(5))?
            .with_retry(RetryPolicy {
                max_attempts: 10_000,
                max_wait: self.startup_timeout,
                max_delay: Duration::from_millis(200),
            });
        client
            .health()
            .await
            .with_context(|| format!("{} at {url} did not become healthy", self.name))?;
        Ok(())
    }

    /// Restarts the child if it has exited; returns whether it did. An external service is
    /// never restarted.
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
        drop(st);
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
        .arg("--exit-with-parent")
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
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}
