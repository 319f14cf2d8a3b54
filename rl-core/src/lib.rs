//! `rl-core`: the domain every part shares: GSM8K tasks ([`tasks`]), prompt styles
//! ([`prompts`]), rewards ([`rewards`]), the run config ([`config`]), the wire formats
//! ([`wire`]), the run's numbers each defined once ([`stats`]), and durable files ([`files`]:
//! atomic writes, sha256).
//!
//! It must never depend on the model engine, on HTTP or on SQL (the store is `rl-store`, the HTTP
//! kit `rl-http`; the arrows point one way), and never silently drop or reorder a record: every
//! malformed line, key or row is an error naming it.

pub mod config;
pub mod files;
pub mod numbers;
pub mod prompts;
pub mod rewards;
pub mod stats;
pub mod tasks;
pub mod wire;
pub mod yaml;

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use strum::IntoEnumIterator;

    /// Each enum's string (strum's `snake_case`) is the one serde reads and writes.
    fn same_names<T: IntoEnumIterator + Serialize + Into<&'static str> + Copy>() {
        for v in T::iter() {
            let name: &'static str = v.into();
            assert_eq!(serde_json::to_value(v).ok(), Some(serde_json::json!(name)));
        }
    }

    #[test]
    fn enum_names_are_serdes() {
        same_names::<crate::rewards::RewardKind>();
        same_names::<crate::rewards::AnswerStatus>();
        same_names::<crate::prompts::PromptStyle>();
        same_names::<crate::config::Dtype>();
        same_names::<crate::wire::FinishReason>();
        same_names::<crate::config::AnswerFormat>();
        same_names::<crate::config::ImportanceLevel>();
    }
}
