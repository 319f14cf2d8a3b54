//! `sampling`: the rules of the sampling knobs, in one function ([`Knobs::check`]) that every
//! place a knob enters calls: the run config (`rl-core`), the rollout server's routes and the
//! engine (`model`). A leaf crate, so that the engine and the domain share it without depending
//! on each other (DESIGN.md: rl-core never depends on model).
//!
//! It must never depend on anything of this workspace, and never accept a value the engine
//! cannot honour: a knob the engine reads has its rule here.

/// Most alternatives per step an HTTP client may ask for (`top_logprobs`, OpenAI's limit; the
/// engine itself accepts up to the vocabulary).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Most alternatives per token in legacy completions (`logprobs`, OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// Largest `max_tokens` accepted anywhere (a typo guard well above any model's context; a server
/// also holds it to its model's context).
pub const MAX_TOKENS_LIMIT: u64 = 131_072;

/// Temperatures below this are greedy (1/T would overflow f32; vLLM treats them so too).
pub const GREEDY_BELOW: f64 = 1e-5;

/// Largest temperature accepted, for sampling and scoring (far above any useful value; a typo
/// guard, and it keeps `logits / T` from underflowing every logit to one value).
pub const MAX_TEMPERATURE: f64 = 100.0;

/// The temperature of teacher-forced scoring (`log_softmax(logits / T)`): in
/// [`GREEDY_BELOW`, `MAX_TEMPERATURE`]. Scoring has no greedy case: a smaller `T` would overflow
/// `logits / T` to infinity and the logprobs to NaN.
pub fn check_score_temperature(temperature: f64) -> Result<(), Invalid> {
    if !(GREEDY_BELOW..=MAX_TEMPERATURE).contains(&temperature) {
        return Err(Invalid {
            field: "temperature",
            value: shown(temperature),
            rule: "in [1e-5, 100] (the sampling temperature; 1 for raw logprobs)",
        });
    }
    Ok(())
}

/// A float as a message shows it: `1e300` and `5e-324` rather than hundreds of digits.
fn shown(x: f64) -> String {
    if x.is_finite() && x != 0.0 && (x.abs() >= 1e16 || x.abs() < 1e-4) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// The knobs every sampler takes that have a rule (`top_k` has none: any value, 0 for no
/// truncation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    /// 0 is greedy.
    pub temperature: f64,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f64,
    pub max_tokens: u64,
}

/// A knob outside its rule: `` `field` is value; it must be rule ``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` is {value}; it must be {rule}")]
pub struct Invalid {
    /// The knob's name (`temperature`, `top_p`, `max_tokens`); a caller with a longer path
    /// (`sampling.train.top_p`) puts its prefix in front.
    pub field: &'static str,
    pub value: String,
    pub rule: &'static str,
}

impl Knobs {
    /// The one check of the knobs; the error names the first bad one.
    pub fn check(&self) -> Result<(), Invalid> {
        let bad = |field, value: String, rule| Err(Invalid { field, value, rule });
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return bad(
                "temperature",
                shown(self.temperature),
                "in [0, 100] (0 is greedy)",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                shown(self.top_p),
                "in (0, 1] (1 keeps every token)",
            );
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_TOKENS_LIMIT {
            return bad(
                "max_tokens",
                self.max_tokens.to_string(),
                "in 1..=131072 (a server also holds it to its model's context)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(temperature: f64, top_p: f64, max_tokens: u64) -> Knobs {
        Knobs {
            temperature,
            top_p,
            max_tokens,
        }
    }

    #[test]
    fn each_rule_names_its_knob() {
        assert_eq!(knobs(0.0, 1.0, 1).check(), Ok(()));
        assert_eq!(knobs(0.7, 0.5, MAX_TOKENS_LIMIT).check(), Ok(()));
        let cases = [
            (
                knobs(-0.5, 1.0, 8),
                "`temperature` is -0.5; it must be in [0, 100]",
            ),
            (knobs(f64::NAN, 1.0, 8), "`temperature` is NaN"),
            (knobs(f64::INFINITY, 1.0, 8), "`temperature` is inf"),
            (knobs(100.5, 1.0, 8), "`temperature` is 100.5"),
            (knobs(1.0, 0.0, 8), "`top_p` is 0; it must be in (0, 1]"),
            (knobs(1.0, 1.5, 8), "`top_p` is 1.5"),
            (
                knobs(1.0, 1.0, 0),
                "`max_tokens` is 0; it must be in 1..=131072",
            ),
            (
                knobs(1.0, 1.0, MAX_TOKENS_LIMIT + 1),
                "`max_tokens` is 131073",
            ),
        ];
        for (k, want) in cases {
            let e = k.check().expect_err(want).to_string();
            assert!(e.starts_with(want), "{e} (wanted {want})");
        }
        assert_eq!(
            MAX_TOKENS_LIMIT, 131_072,
            "the rule's text names this number"
        );
        assert_eq!(knobs(MAX_TEMPERATURE, 1.0, 1).check(), Ok(()));
        assert_eq!(MAX_TEMPERATURE, 100.0, "the rules' texts name this number");
    }

    #[test]
    fn scoring_temperature_has_a_finite_range() {
        for t in [GREEDY_BELOW, 0.7, 1.0, MAX_TEMPERATURE] {
            assert_eq!(check_score_temperature(t), Ok(()), "{t}");
        }
        // 5e-324 is what a fuzzer found: 1/T is infinite and every logprob NaN.
        for t in [5e-324, 0.0, -1.0, 1e-6, 100.5, f64::NAN, f64::INFINITY] {
            let e = check_score_temperature(t)
                .expect_err("out of range")
                .to_string();
            assert!(e.starts_with("`temperature` is "), "{e}");
            assert!(e.contains("in [1e-5, 100]"), "{e}");
        }
        assert_eq!(GREEDY_BELOW, 1e-5, "the rule's text names this number");
    }
}
