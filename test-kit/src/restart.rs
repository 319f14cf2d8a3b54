//! What an engine fault must look like from outside a service, checked the same way for both
//! (the services' fault tests): the request the engine failed under is answered 500 with a
//! message that tells the client to send it again, `/health` turns 503 and says
//! [`EXITING_TO_BE_RESTARTED`] ([`rl_http::server::Liveness::check`]), and the process then ends
//! by itself with a non-zero status, so that its supervisor starts a new one. Each broken promise
//! comes back as an `Err` naming it, for the test to assert on.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use rl_http::server::EXITING_TO_BE_RESTARTED;

/// How long a failed service may take to exit (its linger is a few seconds).
pub const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// A request that makes the service's engine fail (a failpoint), and what its 500 must say.
#[derive(Debug, Clone)]
pub struct Fault<'a> {
    /// The route, such as `/v1/score`.
    pub path: &'a str,
    /// The JSON body posted there.
    pub body: Value,
    /// Words the 500's `error.message` must hold.
    pub message_has: &'a [&'a str],
}

/// Checks the whole fault sequence on the service `child` listening at `url`: healthy first,
/// then the failing request (500), then `/health` (503), then the exit. Returns the exit status.
pub async fn check_engine_fault(
    url: &str,
    child: &mut Child,
    fault: Fault<'_>,
) -> Result<ExitStatus, String> {
    let http = reqwest::Client::new();
    let health = || http.get(format!("{url}/health")).send();
    let send = |e: reqwest::Error| format!("request failed: {e}");

    let before = health().await.map_err(send)?.status().as_u16();
    if before != 200 {
        return Err(format!(
            "/health answered {before} before the fault, not 200"
        ));
    }

    let r = http
        .post(format!("{url}{}", fault.path))
        .json(&fault.body)
        .send()
        .await
        .map_err(send)?;
    let (status, v) = (r.status().as_u16(), r.json::<Value>().await.map_err(send)?);
    let message = v["error"]["message"].as_str().unwrap_or("");
    if status != 500 {
        return Err(format!(
            "the failing request got {status}, not 500 (an engine fault is the server's error): {v}"
        ));
    }
    if let Some(missing) = fault.message_has.iter().find(|w| !message.contains(**w)) {
        return Err(format!("the 500's message lacks {missing:?}: {v}"));
    }

    let r = health().await.map_err(send)?;
    let (status, v) = (r.status().as_u16(), r.json::<Value>().await.map_err(send)?);
    let said = v["error"]["message"].as_str().unwrap_or("");
    if status != 503 || !said.contains(EXITING_TO_BE_RESTARTED) {
        return Err(format!(
            "/health after the fault answered {status}, not 503 saying {EXITING_TO_BE_RESTARTED:?}: {v}"
        ));
    }

    let t = Instant::now();
    loop {
        match child.try_wait() {
            Err(e) => return Err(format!("could not wait for the service: {e}")),
            Ok(Some(s)) if s.success() => {
                return Err(format!(
                    "the service exited successfully ({s}); its supervisor would not restart it"
                ))
            }
            Ok(Some(s)) => return Ok(s),
            Ok(None) if t.elapsed() > EXIT_WITHIN => {
                return Err(format!("still running {EXIT_WITHIN:?} after the fault"))
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
