//! The knobs, each a type whose constructor is its rule: a value outside it never exists.
//! Deserializing one (YAML, JSON, a database row read back) goes through the same constructor.

use serde::{Deserialize, Deserializer, Serialize};

use crate::{shown, OutOfRange, GREEDY_BELOW, MAX_TEMPERATURE, MAX_TOKENS_LIMIT};

/// Declares a knob: a newtype over `$inner` whose only way in is `new`, checking `$ok` (with
/// the rule `$rule` in its error), serialized as the bare number.
macro_rules! knob {
    ($(#[$meta:meta])* $name:ident($inner:ty), rule = $rule:expr, ok = $ok:expr, read = $read:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
        #[serde(transparent)]
        pub struct $name($inner);

        impl $name {
            /// The rule a value must meet, as messages and the OpenAPI description say it.
            pub const RULE: &'static str = $rule;

            /// The knob, if `value` meets its rule.
            pub fn new(value: $inner) -> Result<Self, OutOfRange> {
                let ok: fn($inner) -> bool = $ok;
                if ok(value) {
                    Ok(Self(value))
                } else {
                    Err(OutOfRange {
                        value: shown(f64::from(value)),
                        rule: $rule,
                    })
                }
            }

            pub fn get(self) -> $inner {
                self.0
            }
        }

        impl TryFrom<$inner> for $name {
            type Error = OutOfRange;
            fn try_from(value: $inner) -> Result<Self, OutOfRange> {
                Self::new(value)
            }
        }

        impl From<$name> for $inner {
            fn from(k: $name) -> $inner {
                k.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let value = $read(d)?;
                Self::new(value).map_err(serde::de::Error::custom)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

fn read_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    f64::deserialize(d)
}

fn read_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    crate::integral::u32(d)
}

knob! {
    /// The sampling temperature: logits are divided by it. 0 (anything below
    /// [`GREEDY_BELOW`]) is greedy.
    Temperature(f64),
    rule = "in [0, 100] (0 is greedy)",
    ok = |t| (0.0..=MAX_TEMPERATURE).contains(&t),
    read = read_f64
}

knob! {
    /// The temperature of teacher-forced scoring, `log_softmax(logits / T)`. It has no greedy
    /// case: a smaller `T` would overflow `logits / T` to infinity and the logprobs to NaN.
    ScoreTemperature(f64),
    rule = "in [1e-5, 100] (the sampling temperature; 1 for raw logprobs)",
    ok = |t| (GREEDY_BELOW..=MAX_TEMPERATURE).contains(&t),
    read = read_f64
}

knob! {
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to this; 1 keeps
    /// every token.
    TopP(f64),
    rule = "in (0, 1] (1 keeps every token)",
    ok = |p| p > 0.0 && p <= 1.0,
    read = read_f64
}

knob! {
    /// The most new tokens of one completion.
    MaxTokens(u32),
    rule = "in 1..=131072 (a server also holds it to its model's context)",
    ok = |n| (1..=MAX_TOKENS_LIMIT).contains(&n),
    read = read_u32
}

impl MaxTokens {
    /// A constant number of tokens (a compile error when used in a `const` outside the rule).
    pub const fn of(n: u32) -> Self {
        assert!(
            n >= 1 && n <= MAX_TOKENS_LIMIT,
            "max_tokens out of 1..=131072"
        );
        Self(n)
    }
}

impl Temperature {
    /// A constant temperature (a compile error when used in a `const` outside the rule).
    pub const fn of(t: f64) -> Self {
        assert!(
            t >= 0.0 && t <= MAX_TEMPERATURE,
            "temperature out of [0, 100]"
        );
        Self(t)
    }

    pub const GREEDY: Self = Self(0.0);
    pub const ONE: Self = Self(1.0);

    /// Below [`GREEDY_BELOW`]: the most likely token, no sampling.
    pub fn is_greedy(self) -> bool {
        self.0 < GREEDY_BELOW
    }
}

impl ScoreTemperature {
    pub const ONE: Self = Self(1.0);
}

impl TryFrom<Temperature> for ScoreTemperature {
    type Error = OutOfRange;
    /// The sampling temperature that rollouts are scored at (refused when greedy).
    fn try_from(t: Temperature) -> Result<Self, OutOfRange> {
        Self::new(t.get())
    }
}

impl TopP {
    pub const ALL: Self = Self(1.0);

    /// Whether nucleus truncation is off.
    pub fn keeps_all(self) -> bool {
        self.0 >= 1.0
    }
}

impl From<MaxTokens> for usize {
    fn from(m: MaxTokens) -> usize {
        m.0 as usize
    }
}

/// The knobs of one sampling phase or request. Each is valid by its type, and they have no rule
/// between them, so any combination is a valid one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knobs {
    pub temperature: Temperature,
    pub top_p: TopP,
    /// Keep only the `top_k` most likely tokens; 0: no top-k truncation.
    pub top_k: u32,
    pub max_tokens: MaxTokens,
}

impl Knobs {
    /// Plain sampling (temperature 1, no truncation) of up to `max_tokens`.
    pub const fn plain(max_tokens: MaxTokens) -> Self {
        Self {
            temperature: Temperature::ONE,
            top_p: TopP::ALL,
            top_k: 0,
            max_tokens,
        }
    }
}

impl std::fmt::Display for Knobs {
    /// `temperature 0.7, top_p 1, top_k 0, max_tokens 256`, as messages show them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "temperature {}, top_p {}, top_k {}, max_tokens {}",
            self.temperature, self.top_p, self.top_k, self.max_tokens
        )
    }
}

/// What one sample was drawn with: the knobs and its seed (what a rollout records).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampledWith {
    pub knobs: Knobs,
    pub seed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_names_its_value() {
        assert!(Temperature::new(0.0).is_ok_and(Temperature::is_greedy));
        assert!(Temperature::new(MAX_TEMPERATURE).is_ok());
        assert!(TopP::new(0.5).is_ok() && MaxTokens::new(MAX_TOKENS_LIMIT).is_ok());
        let cases: [(Result<(), OutOfRange>, &str); 8] = [
            (
                Temperature::new(-0.5).map(drop),
                "is -0.5; it must be in [0, 100]",
            ),
            (Temperature::new(f64::NAN).map(drop), "is NaN"),
            (Temperature::new(f64::INFINITY).map(drop), "is inf"),
            (Temperature::new(100.5).map(drop), "is 100.5"),
            (TopP::new(0.0).map(drop), "is 0; it must be in (0, 1]"),
            (TopP::new(1.5).map(drop), "is 1.5"),
            (
                MaxTokens::new(0).map(drop),
                "is 0; it must be in 1..=131072",
            ),
            (MaxTokens::new(MAX_TOKENS_LIMIT + 1).map(drop), "is 131073"),
        ];
        for (r, want) in cases {
            let e = r.expect_err(want).to_string();
            assert!(e.starts_with(want), "{e} (wanted {want})");
        }
        assert_eq!(
            MAX_TOKENS_LIMIT, 131_072,
            "the rule's text names this number"
        );
        assert_eq!(MAX_TEMPERATURE, 100.0, "the rules' texts name this number");
        let e = TopP::new(0.0).unwrap_err().named("sampling.train.top_p");
        assert!(
            e.starts_with("`sampling.train.top_p` is 0; it must be"),
            "{e}"
        );
    }

    #[test]
    fn scoring_temperature_has_a_finite_range() {
        for t in [GREEDY_BELOW, 0.7, 1.0, MAX_TEMPERATURE] {
            assert!(ScoreTemperature::new(t).is_ok(), "{t}");
        }
        // 5e-324 is what a fuzzer found: 1/T is infinite and every logprob NaN.
        for t in [5e-324, 0.0, -1.0, 1e-6, 100.5, f64::NAN, f64::INFINITY] {
            let e = ScoreTemperature::new(t)
                .expect_err("out of range")
                .to_string();
            assert!(e.starts_with("is ") && e.contains("in [1e-5, 100]"), "{e}");
        }
        assert!(ScoreTemperature::try_from(Temperature::GREEDY).is_err());
        assert_eq!(GREEDY_BELOW, 1e-5, "the rule's text names this number");
    }

    #[test]
    fn deserializing_is_the_same_check() {
        let k: Knobs = serde_json::from_str(
            r#"{"temperature": 0.7, "top_p": 1, "top_k": 5, "max_tokens": 16.0}"#,
        )
        .unwrap();
        assert_eq!(
            (k.temperature.get(), k.top_k, k.max_tokens.get()),
            (0.7, 5, 16)
        );
        assert_eq!(
            serde_json::to_value(k).unwrap(),
            serde_json::json!({"temperature": 0.7, "top_p": 1.0, "top_k": 5, "max_tokens": 16})
        );
        let bad = r#"{"temperature": -1, "top_p": 1, "top_k": 0, "max_tokens": 8}"#;
        let e = serde_json::from_str::<Knobs>(bad).unwrap_err().to_string();
        assert!(e.starts_with("is -1; it must be in [0, 100]"), "{e}");
        let e = serde_json::from_str::<MaxTokens>("8.5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("8.5") && e.contains("integer"), "{e}");
    }
}
