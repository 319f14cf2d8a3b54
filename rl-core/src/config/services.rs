//! The `services` and `async` sections: where the rollout servers and ref-scorers run (local
//! replicas the run starts, endpoints someone else runs), their bearer key ([`ApiKey`], never
//! written back), how a request's deadline is set, and how far sampling may run ahead of
//! training.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Device;

/// How many local replicas a service gets: `replicas` when given, else one when no endpoint is.
fn local_replicas(replicas: Option<u32>, endpoints: &[String]) -> u32 {
    replicas.unwrap_or(u32::from(endpoints.is_empty()))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutServiceConfig {
    /// Port of the first rollout server the orchestrator starts; replica `i` listens on
    /// `port + i` (0: any free ports).
    pub port: u16,
    /// Rollout servers the orchestrator starts (`null`: one, or none when `endpoints` are given).
    pub replicas: Option<u32>,
    /// Devices of the started replicas, replica `i` on `devices[i % len]` (empty: `model.device`).
    pub devices: Vec<Device>,
    /// Already running rollout servers to use too (`http://host:port`).
    pub endpoints: Vec<String>,
    pub max_batch: u32,
    pub max_queue: u32,
}

impl RolloutServiceConfig {
    /// The rollout servers this run starts itself.
    pub fn local_replicas(&self) -> u32 {
        local_replicas(self.replicas, &self.endpoints)
    }
}

impl Default for RolloutServiceConfig {
    fn default() -> Self {
        Self {
            port: 0,
            replicas: None,
            devices: Vec::new(),
            endpoints: Vec::new(),
            max_batch: 32,
            max_queue: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefServiceConfig {
    /// Port of the first ref-scorer the orchestrator starts; replica `i` listens on `port + i`
    /// (0: any free ports).
    pub port: u16,
    /// Ref-scorers the orchestrator starts (`null`: one, or none when `endpoints` are given).
    pub replicas: Option<u32>,
    /// Already running ref-scorers to use too (`http://host:port`).
    pub endpoints: Vec<String>,
}

impl RefServiceConfig {
    /// The ref-scorers this run starts itself.
    pub fn local_replicas(&self) -> u32 {
        local_replicas(self.replicas, &self.endpoints)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub host: String,
    /// Bearer key the services require (`null`: none). Also taken from `ORCHESTRATE_API_KEY`
    /// (see [`ApiKey`]).
    pub api_key: Option<ApiKey>,
    pub rollout: RolloutServiceConfig,
    pub ref_scorer: RefServiceConfig,
    /// Seconds to wait for a started service's `/health`.
    pub startup_timeout_s: u32,
    /// The fixed part of every request's deadline, in seconds (connecting, queueing, prefill).
    pub deadline_base_s: u32,
    /// The rate floor: a service producing fewer tokens per second than this, over the requests
    /// the run has in flight, is taken as hung. See [`ServicesConfig::deadline`].
    pub min_tokens_per_s: f64,
    /// Times one request is sent at most; between two, a service that died or missed the
    /// deadline is restarted (when this run started it).
    pub max_attempts: u32,
}

impl ServicesConfig {
    /// The key itself, when one is given (a saved config's [`ApiKey::Redacted`] gives none).
    pub fn key(&self) -> Option<&str> {
        match &self.api_key {
            Some(ApiKey::Given(k)) => Some(k),
            _ => None,
        }
    }

    /// The deadline of a request for `tokens` tokens (prompt plus `n` x `max_tokens`, or the
    /// sequences scored) while `in_flight` such requests share the service:
    /// `deadline_base_s + tokens x in_flight / min_tokens_per_s`. A request not answered by
    /// then is abandoned and its service taken as hung.
    pub fn deadline(&self, tokens: u64, in_flight: u32) -> std::time::Duration {
        let work = tokens as f64 * f64::from(in_flight.max(1)) / self.min_tokens_per_s;
        std::time::Duration::from_secs(u64::from(self.deadline_base_s))
            + std::time::Duration::try_from_secs_f64(work).unwrap_or(std::time::Duration::MAX / 4)
    }
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            api_key: None,
            rollout: RolloutServiceConfig::default(),
            ref_scorer: RefServiceConfig::default(),
            startup_timeout_s: 120,
            deadline_base_s: 60,
            min_tokens_per_s: 2.0,
            max_attempts: 4,
        }
    }
}

/// Sampling overlapped with training.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsyncConfig {
    /// How many policy versions sampling may run behind (0: the synchronous loop). With `k`,
    /// iteration `N` is sampled with the checkpoint of iteration `N - 1 - k` (the base model
    /// before the first), so sampling `N` runs while the learner trains `N - 1 .. N - k`.
    pub max_lag: u32,
}

impl AsyncConfig {
    /// The checkpoint iteration `iteration` is sampled with (`None`: the base model).
    pub fn sampling_adapter(&self, iteration: u32) -> Option<u32> {
        iteration.checked_sub(1 + self.max_lag)
    }
}

/// What a saved config holds in place of the key.
pub const REDACTED: &str = "<redacted>";

/// The environment variable a key can also come from (so that it need not be in a file, and
/// how a saved config, whose key is [`REDACTED`], gets it back on resume).
pub const API_KEY_ENV: &str = "ORCHESTRATE_API_KEY";

/// The services' bearer key. It is read, never written: a config serialized (`config.yaml` of a
/// run, the database's snapshot) holds [`REDACTED`] in its place, `Debug` shows nothing, and the
/// services get it through their environment, not their command line (`ps` shows that).
#[derive(Clone, PartialEq, Eq)]
pub enum ApiKey {
    Given(String),
    /// Read back from a saved config: the run had a key, which was not saved; it comes from
    /// [`API_KEY_ENV`] again.
    Redacted,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for ApiKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let key = String::deserialize(d)?;
        Ok(if key == REDACTED {
            ApiKey::Redacted
        } else {
            ApiKey::Given(key)
        })
    }
}

impl ServicesConfig {
    /// Settles the key: one given in the config stays; otherwise `from_env` (the value of
    /// [`API_KEY_ENV`], if set) is taken. A saved config's redacted key with nothing in the
    /// environment is an error saying how to resume.
    pub fn settle_key(&mut self, from_env: Option<String>) -> Result<(), String> {
        let from_env = from_env.filter(|k| !k.is_empty());
        match (&self.api_key, from_env) {
            (Some(ApiKey::Given(_)), _) | (None, None) => Ok(()),
            (_, Some(k)) => {
                self.api_key = Some(ApiKey::Given(k));
                Ok(())
            }
            (Some(ApiKey::Redacted), None) => Err(format!(
                "services.api_key: this run's services take a key, which is never saved with the run; set {API_KEY_ENV} to it to resume"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_read_but_never_written() {
        let mut s: ServicesConfig =
            serde_json::from_value(serde_json::json!({"api_key": "s3cret"})).unwrap();
        assert_eq!(s.key(), Some("s3cret"));
        let saved = serde_json::to_string(&s).unwrap();
        assert!(
            !saved.contains("s3cret") && saved.contains(REDACTED),
            "{saved}"
        );
        assert!(!format!("{s:?}").contains("s3cret"));
        // Read back, the saved config has a key it cannot show: the environment gives it.
        let mut back: ServicesConfig = serde_json::from_str(&saved).unwrap();
        assert_eq!(
            (back.api_key.clone(), back.key()),
            (Some(ApiKey::Redacted), None)
        );
        let e = back.clone().settle_key(None).unwrap_err();
        assert!(e.contains(API_KEY_ENV), "{e}");
        back.settle_key(Some("s3cret".into())).unwrap();
        assert_eq!(back.key(), Some("s3cret"));
        // A key in the config wins over the environment; no key and none there stays none.
        s.settle_key(Some("other".into())).unwrap();
        assert_eq!(s.key(), Some("s3cret"));
        let mut none = ServicesConfig::default();
        none.settle_key(Some(String::new())).unwrap();
        assert_eq!(none.key(), None);
    }
}
