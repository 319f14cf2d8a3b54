//! The checks of a parsed config: ranges, and the relations between keys (a reward a prompt
//! style cannot give, LoRA targets, the learner's batch arithmetic, service ports). Each failure
//! is `(key, message)`; [`super::LoadedConfig::error`] adds where the key was written.

use super::{Config, LORA_TARGETS};

impl Config {
    /// Checks ranges and the relations between keys: `Err((key, message))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        fn err<T>(key: &str, message: impl Into<String>) -> Result<T, (String, String)> {
            Err((key.to_string(), message.into()))
        }
        if self.output_dir.as_os_str().is_empty() {
            return err(
                "output_dir",
                "must name the run directory (e.g. runs/rl_gsm8k)",
            );
        }
        if self.max_iterations == 0 {
            return err("max_iterations", "must be at least 1");
        }
        if self.attempts < 2 {
            return err(
                "attempts",
                format!(
                    "must be at least 2 (got {}): GRPO compares the attempts of a group",
                    self.attempts
                ),
            );
        }
        if self.problems_per_iteration == 0 {
            return err("problems_per_iteration", "must be at least 1");
        }
        if self.model.path.trim().is_empty() {
            return err(
                "model.path",
                "must name a .gguf file or a Hugging Face folder",
            );
        }
        if self.data.test_limit == Some(0) {
            return err(
                "data.test_limit",
                "must be at least 1, or null for the whole test split",
            );
        }
        for (key, path) in [
            ("data.train", &self.data.train),
            ("data.test", &self.data.test),
        ] {
            if crate::tasks::FileKind::of(path).is_none() {
                return err(
                    key,
                    format!(
                        "`{}`: name a .jsonl (or .json lines) or .parquet file; the extension says how to read it",
                        path.display()
                    ),
                );
            }
        }
        for (key, name) in [
            ("data.fields.question", &self.data.fields.question),
            ("data.fields.answer", &self.data.fields.answer),
        ] {
            if name.trim().is_empty() {
                return err(key, "is empty; name the field (column) that holds it");
            }
        }
        self.validate_rewards()?;
        // The knobs are valid by their types; training also scores at its temperature.
        if let Err(e) = sampling::ScoreTemperature::try_from(self.sampling.train.temperature) {
            return err(
                "sampling.train.temperature",
                format!(
                    "{e}: the reference model scores the rollouts at it, and greedy training \
                     rollouts make every group identical (no GRPO signal)"
                ),
            );
        }
        self.validate_lora()?;
        self.validate_learner()?;
        self.validate_services()
    }

    fn validate_rewards(&self) -> Result<(), (String, String)> {
        if self.rewards.is_empty() {
            return Err((
                "rewards".into(),
                "needs at least one reward kind with a weight (e.g. `tapeagents: 1.0`)".into(),
            ));
        }
        for (kind, w) in &self.rewards {
            let key = format!("rewards.{}", kind.name());
            if !w.is_finite() {
                return Err((key, format!("weight must be a finite number (got {w})")));
            }
            if kind.needs_tags() && self.prompt.style.tags().is_none() {
                return Err((
                    key,
                    format!(
                        "rewards tags, but prompt.style is `{}`; use a tag style (reasoning_answer, thinking_answer, working_out) or remove it",
                        self.prompt.style.name()
                    ),
                ));
            }
        }
        if self.rewards.values().all(|w| *w == 0.0) {
            return Err((
                "rewards".into(),
                "every weight is 0: the reward would be constant".into(),
            ));
        }
        Ok(())
    }

    fn validate_lora(&self) -> Result<(), (String, String)> {
        let l = &self.lora;
        let key = |k: &str| format!("lora.{k}");
        if l.r == 0 {
            return Err((key("r"), "must be at least 1".into()));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return Err((key("alpha"), format!("must be > 0 (got {})", l.alpha)));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err((
                key("dropout"),
                format!("must be in [0, 1) (got {})", l.dropout),
            ));
        }
        if l.targets.is_empty() {
            return Err((
                key("targets"),
                format!("needs at least one of {}", LORA_TARGETS.join(", ")),
            ));
        }
        for (i, t) in l.targets.iter().enumerate() {
            if !LORA_TARGETS.contains(&t.as_str()) {
                return Err((
                    format!("lora.targets[{i}]"),
                    format!(
                        "`{t}` is not a module LoRA can target; use {}",
                        LORA_TARGETS.join(", ")
                    ),
                ));
            }
            if l.targets[..i].contains(t) {
                return Err((
                    format!("lora.targets[{i}]"),
                    format!("`{t}` is listed twice"),
                ));
            }
        }
        Ok(())
    }

    fn validate_learner(&self) -> Result<(), (String, String)> {
        let l = &self.learner;
        let key = |k: &str| format!("learner.{k}");
        let positive = |k: &str, v: f64| -> Result<(), (String, String)> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((key(k), format!("must be > 0 (got {v})")))
            }
        };
        positive("lr", l.lr)?;
        if !(l.weight_decay.is_finite() && l.weight_decay >= 0.0) {
            return Err((
                key("weight_decay"),
                format!("must be >= 0 (got {})", l.weight_decay),
            ));
        }
        if let Some(g) = l.max_grad_norm {
            positive("max_grad_norm", g)?;
        }
        if let Some(c) = l.tis_cap {
            if !(c.is_finite() && c >= 1.0) {
                return Err((
                    key("tis_cap"),
                    format!("must be >= 1 (got {c}); TRL uses 2, null turns truncated importance sampling off"),
                ));
            }
        }
        if !(l.beta.is_finite() && l.beta >= 0.0) {
            return Err((
                key("beta"),
                format!("must be >= 0 (got {}); 0 disables the KL term", l.beta),
            ));
        }
        if !(l.epsilon_low > 0.0 && l.epsilon_low < 1.0) {
            return Err((
                key("epsilon_low"),
                format!("must be in (0, 1) (got {})", l.epsilon_low),
            ));
        }
        positive("epsilon_high", l.epsilon_high)?;
        if l.micro_batch == 0 {
            return Err((key("micro_batch"), "must be at least 1".into()));
        }
        if l.steps_per_iteration == 0 {
            return Err((key("steps_per_iteration"), "must be at least 1".into()));
        }
        let per_iter = self.completions_per_iteration();
        if l.steps_per_iteration > per_iter {
            return Err((
                key("steps_per_iteration"),
                format!(
                    "{} steps but an iteration has only {per_iter} completions (problems_per_iteration x attempts)",
                    l.steps_per_iteration
                ),
            ));
        }
        if let Some(acc) = l.grad_accumulation {
            if acc == 0 {
                return Err((
                    key("grad_accumulation"),
                    "must be at least 1, or null to derive it".into(),
                ));
            }
            let used = l.steps_per_iteration * acc * l.micro_batch;
            if used != per_iter {
                return Err((
                    key("grad_accumulation"),
                    format!(
                        "steps_per_iteration ({}) x grad_accumulation ({acc}) x micro_batch ({}) = {used} completions, \
                         but an iteration has problems_per_iteration ({}) x attempts ({}) = {per_iter}; \
                         set grad_accumulation to null to derive it",
                        l.steps_per_iteration, l.micro_batch, self.problems_per_iteration, self.attempts
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_services(&self) -> Result<(), (String, String)> {
        let s = &self.services;
        if s.host.trim().is_empty() {
            return Err((
                "services.host".into(),
                "must be an address like 127.0.0.1".into(),
            ));
        }
        if s.key().is_some_and(|k| k.trim().is_empty()) {
            return Err((
                "services.api_key".into(),
                "is empty; use null for no key".into(),
            ));
        }
        let url_ok = |u: &str| {
            u.strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty())
        };
        for (service, list, example) in [
            ("rollout", &s.rollout.endpoints, "8000"),
            ("ref_scorer", &s.ref_scorer.endpoints, "8001"),
        ] {
            for (i, e) in list.iter().enumerate() {
                if !url_ok(e) {
                    return Err((
                        format!("services.{service}.endpoints[{i}]"),
                        format!("`{e}` is not a URL like http://127.0.0.1:{example} (plain HTTP: the services are meant for a trusted network)"),
                    ));
                }
            }
        }
        for (service, local, endpoints) in [
            (
                "rollout",
                s.rollout.local_replicas(),
                s.rollout.endpoints.len(),
            ),
            (
                "ref_scorer",
                s.ref_scorer.local_replicas(),
                s.ref_scorer.endpoints.len(),
            ),
        ] {
            if local == 0 && endpoints == 0 {
                return Err((
                    format!("services.{service}.replicas"),
                    "is 0 and no endpoints are given: the run needs at least one server (set replicas to 1 or more, or list endpoints)".into(),
                ));
            }
        }
        if s.rollout.max_batch == 0 {
            return Err((
                "services.rollout.max_batch".into(),
                "must be at least 1".into(),
            ));
        }
        if s.rollout.max_queue == 0 {
            return Err((
                "services.rollout.max_queue".into(),
                "must be at least 1".into(),
            ));
        }
        // Replica `i` listens on `port + i`: the two services' port ranges must not meet.
        let range = |port: u16, n: u32| (u32::from(port), u32::from(port) + n.max(1));
        let (r, f) = (
            range(s.rollout.port, s.rollout.local_replicas()),
            range(s.ref_scorer.port, s.ref_scorer.local_replicas()),
        );
        for (key, (lo, hi)) in [("rollout", r), ("ref_scorer", f)] {
            if lo != 0 && hi - 1 > u32::from(u16::MAX) {
                return Err((
                    format!("services.{key}.port"),
                    format!("{lo} + its replicas runs past port 65535; choose a lower port (or 0 for any free ones)"),
                ));
            }
        }
        if r.0 != 0 && f.0 != 0 && r.0 < f.1 && f.0 < r.1 {
            return Err((
                "services.ref_scorer.port".into(),
                format!(
                    "the ref-scorers' ports {}..{} meet the rollout servers' {}..{} (replica i listens on port + i); give each service its own ports (or 0 for any free ones)",
                    f.0, f.1 - 1, r.0, r.1 - 1
                ),
            ));
        }
        for (k, v) in [
            ("startup_timeout_s", s.startup_timeout_s),
            ("deadline_base_s", s.deadline_base_s),
        ] {
            if v == 0 {
                return Err((format!("services.{k}"), "must be at least 1 second".into()));
            }
        }
        if !(s.min_tokens_per_s.is_finite() && s.min_tokens_per_s > 0.0) {
            return Err((
                "services.min_tokens_per_s".into(),
                format!(
                    "is {}; it must be a rate > 0 (tokens per second below which a service is taken as hung)",
                    s.min_tokens_per_s
                ),
            ));
        }
        if s.max_attempts == 0 {
            return Err((
                "services.max_attempts".into(),
                "must be at least 1 (1: never re-send a request)".into(),
            ));
        }
        Ok(())
    }
}
