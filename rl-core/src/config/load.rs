//! Reading a config: YAML text (with the line of every key kept for messages), dotted
//! `key=value` overrides as Hydra takes them, the defaults laid under what the user wrote, and
//! the typed [`Config`] with its checks; and writing it back as YAML.

use std::path::Path;

use super::{Config, ConfigError};
use crate::yaml::{self, Document, Origin};

/// Lays `user` over `base`: mappings merge key by key (recursively), anything else replaces.
/// `rewards` is a value (kind -> weight), not a section: the user's list replaces the default one.
fn merge_onto(base: &mut serde_json::Value, user: &serde_json::Value) {
    match (base, user) {
        (serde_json::Value::Object(b), serde_json::Value::Object(u)) => {
            for (k, v) in u {
                match b.get_mut(k) {
                    Some(slot) if k != "rewards" => merge_onto(slot, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, u) => *b = u.clone(),
    }
}

/// A config with the origin of each of its keys, for messages about values found wrong later
/// (a missing model file, a port in use).
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    source: String,
    doc: Document,
}

impl Config {
    /// Reads a config file and applies `key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedConfig, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: shown.clone(),
            message: format!("cannot read the config file ({e})"),
        })?;
        Self::from_yaml(&text, &shown, overrides)
    }

    /// Parses config text (`source` names it in messages) and applies `key=value` overrides.
    pub fn from_yaml(
        text: &str,
        source: &str,
        overrides: &[String],
    ) -> Result<LoadedConfig, ConfigError> {
        let mut doc = Document::parse(text).map_err(|e| ConfigError::Syntax {
            path: source.to_string(),
            line: e.line,
            message: e.message,
        })?;
        if !doc.value.is_object() {
            return Err(ConfigError::Key {
                at: format!("{source}:1"),
                key: "(top level)".into(),
                message: "a config is a mapping of keys (like `seed: 42`)".into(),
            });
        }
        for text in overrides {
            apply_override(&mut doc, text)?;
        }
        let loaded = LoadedConfig {
            config: Config::default(),
            source: source.to_string(),
            doc,
        };
        // Keys left out take the defaults of the whole config, not of their section's type: a
        // file that sets only `sampling.test.max_tokens` keeps the test phase greedy.
        let mut merged = serde_json::to_value(Config::default()).map_err(|e| ConfigError::Key {
            at: source.to_string(),
            key: "(defaults)".into(),
            message: e.to_string(),
        })?;
        merge_onto(&mut merged, &loaded.doc.value);
        let config: Config = serde_path_to_error::deserialize(&merged).map_err(|e| {
            let message = explain_serde(e.inner().to_string());
            let mut key = e.path().to_string();
            // An unknown map key (a reward kind) shows as `rewards.?`: name it.
            if let Some(parent) = key.strip_suffix(".?") {
                if let Some(name) = message.split('`').nth(1) {
                    key = format!("{parent}.{name}");
                }
            }
            loaded.error(&key, message)
        })?;
        let loaded = LoadedConfig { config, ..loaded };
        if let Err((key, message)) = loaded.config.validate() {
            return Err(loaded.error(&key, message));
        }
        Ok(loaded)
    }

    /// The config as YAML (what `config.yaml` of a run holds).
    pub fn to_yaml(&self) -> Result<String, String> {
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        yaml::to_yaml_string(&value)
    }
}

impl LoadedConfig {
    /// An error about `key`, placed at the line (or override) that set it.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let at = match self.doc.origin_of(key) {
            Some(Origin::Line(l)) => format!("{}:{l}", self.source),
            Some(Origin::Override(o)) => format!("override `{o}`"),
            None => format!("{} (default value)", self.source),
        };
        ConfigError::Key {
            at,
            key: if key.is_empty() {
                "(top level)".into()
            } else {
                key.to_string()
            },
            message: message.into(),
        }
    }

    /// Checks that the files the run reads exist (model, train and test data), before any work.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        if !c.model.path.starts_with("hf:") && !Path::new(&c.model.path).exists() {
            return Err(self.error(
                "model.path",
                format!("`{}` does not exist; run scripts/fetch-assets or point model.path at a .gguf file or model folder", c.model.path),
            ));
        }
        for (key, path) in [("data.train", &c.data.train), ("data.test", &c.data.test)] {
            if !path.is_file() {
                return Err(self.error(
                    key,
                    format!("`{}` does not exist; run scripts/fetch-assets or point {key} at a .jsonl or .parquet dataset", path.display()),
                ));
            }
        }
        Ok(())
    }
}

fn apply_override(doc: &mut Document, text: &str) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Key {
        at: format!("override `{text}`"),
        key: text
            .split_once('=')
            .map_or(text, |(k, _)| k)
            .trim()
            .to_string(),
        message,
    };
    let Some((key, value)) = text.split_once('=') else {
        return Err(bad(
            "an override is `key=value`, e.g. `learner.lr=1e-5`".into()
        ));
    };
    let key = key.trim();
    let valid_key = !key.is_empty()
        && key
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if !valid_key {
        return Err(bad("the key must be dotted words, e.g. `learner.lr`".into()));
    }
    if value.trim().is_empty() {
        return Err(bad("has no value; write `key=null` to unset a value".into()));
    }
    let value =
        yaml::parse_value(value).map_err(|m| bad(format!("the value is not valid YAML: {m}")))?;
    doc.set(key, value, Origin::Override(text.to_string()))
        .map_err(bad)
}

/// Rewrites serde's messages into the config's words.
fn explain_serde(message: String) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return format!("unknown value {rest}");
    }
    message
}
