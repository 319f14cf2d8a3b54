//! The shipped configs load and validate; broken configs fail with a message naming the key and
//! where it was written; overrides are applied and validated the same way; the resolved config
//! written back reads back equal.

use std::path::PathBuf;

use rl_core::config::{Config, Dtype, LossType};
use rl_core::prompts::PromptStyle;
use rl_core::rewards::RewardKind;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn shipped_configs_load() {
    let cpu = Config::load(&configs_dir().join("rl_gsm8k.yaml"), &[]).expect("cpu config");
    let c = &cpu.config;
    assert_eq!(c.model.device, rl_core::config::Device::Cpu);
    assert_eq!(c.model.dtype, Dtype::Bf16);
    assert!(c.model.path.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(c.prompt.style, PromptStyle::Boxed);
    assert_eq!(c.rewards.get(&RewardKind::Tapeagents), Some(&1.0));
    assert!(
        c.attempts >= 4,
        "DESIGN section 8: >= 4 attempts so mixed groups occur"
    );
    // Every key of the CPU file equals the built-in default: omitted keys behave the same.
    assert_eq!(&Config::default(), c);

    let gpu = Config::load(&configs_dir().join("rl_gsm8k_llama1b.yaml"), &[]).expect("gpu config");
    let g = &gpu.config;
    assert_eq!((g.attempts, g.sampling.train.temperature.get()), (8, 1.0));
    assert_eq!(
        (g.learner.lr, g.learner.beta, g.learner.epsilon_low),
        (2e-6, 0.01, 0.2)
    );
    assert_eq!(g.sampling.train.max_tokens.get(), 3072);
    assert_eq!(g.test_every_n_iterations, 1);
    assert_eq!(
        (g.model.device, g.model.dtype),
        (rl_core::config::Device::Cuda(0), Dtype::Bf16)
    );
    assert!(g.model.path.contains("Llama-3.2-1B-Instruct"));
}

#[test]
fn overrides_apply_and_written_config_reads_back() {
    let path = configs_dir().join("rl_gsm8k.yaml");
    let loaded = Config::load(
        &path,
        &s(&[
            "learner.lr=2e-5",
            "attempts=6",
            "lora.targets=[q_proj, v_proj]",
            "learner.loss_type=dapo",
            "data.test_limit=null",
            "prompt.system=Be brief.",
        ]),
    )
    .expect("overrides");
    let c = &loaded.config;
    assert_eq!(c.learner.lr, 2e-5);
    assert_eq!(c.attempts, 6);
    assert_eq!(c.lora.targets, ["q_proj", "v_proj"]);
    assert_eq!(c.learner.loss_type, LossType::Dapo);
    assert_eq!(c.data.test_limit, None);
    assert_eq!(c.prompt.system.as_deref(), Some("Be brief."));
    let text = c.to_yaml().expect("write");
    let back = Config::from_yaml(&text, "config.yaml", &[]).expect("read back");
    assert_eq!(&back.config, c, "{text}");
}

#[test]
fn omitted_keys_take_the_whole_configs_defaults() {
    // A section given in part keeps the other keys of that section at the config's defaults
    // (the test phase stays greedy, training keeps its temperature), not at the section type's.
    let c = Config::from_yaml(
        "sampling:\n  test:\n    max_tokens: 512\n",
        "part.yaml",
        &s(&["sampling.train.max_tokens=8"]),
    )
    .expect("partial sections")
    .config;
    let d = Config::default();
    assert_eq!(c.sampling.test.max_tokens.get(), 512);
    assert_eq!(c.sampling.test.temperature, d.sampling.test.temperature);
    assert_eq!(c.sampling.test.temperature.get(), 0.0);
    assert_eq!(c.sampling.train.max_tokens.get(), 8);
    assert_eq!(c.sampling.train.temperature, d.sampling.train.temperature);
    assert_eq!(c.prompt.system, d.prompt.system);
    // `rewards` is one value: the file's list replaces the default list.
    let c = Config::from_yaml("rewards:\n  correctness: 1.0\n", "r.yaml", &[])
        .expect("rewards")
        .config;
    assert_eq!(c.rewards.len(), 1);
    assert_eq!(c.rewards.get(&RewardKind::Correctness), Some(&1.0));
    // null still means null where the key allows it.
    let c = Config::from_yaml("data:\n  test_limit: null\n", "n.yaml", &[])
        .expect("null")
        .config;
    assert_eq!(c.data.test_limit, None);
}

#[test]
fn broken_configs_fail_with_their_message() {
    let base = std::fs::read_to_string(configs_dir().join("rl_gsm8k.yaml")).expect("read");
    // (description, yaml, overrides, expected fragments of the message)
    let cases: Vec<(&str, String, Vec<String>, Vec<&str>)> = vec![
        (
            "unknown top-level key",
            "seed: 1\nattemps: 4\n".into(),
            vec![],
            vec![
                "test.yaml:2",
                "`attemps`",
                "unknown key `attemps`",
                "expected one of",
            ],
        ),
        (
            "unknown nested key",
            "learner:\n  lr: 1e-5\n  lrr: 2\n".into(),
            vec![],
            vec!["test.yaml:3", "`learner.lrr`", "unknown key"],
        ),
        (
            "wrong type",
            "attempts: four\n".into(),
            vec![],
            vec!["test.yaml:1", "`attempts`", "invalid type: string \"four\""],
        ),
        (
            "float for an integer",
            "learner:\n  micro_batch: 2.5\n".into(),
            vec![],
            vec!["test.yaml:2", "`learner.micro_batch`", "invalid type"],
        ),
        (
            "negative lr",
            "learner:\n  lr: -1e-5\n".into(),
            vec![],
            vec!["test.yaml:2", "`learner.lr`", "must be > 0"],
        ),
        (
            "attempts 1",
            "\n\nattempts: 1\n".into(),
            vec![],
            vec!["test.yaml:3", "`attempts`", "at least 2"],
        ),
        (
            "top_p 0",
            "sampling:\n  train:\n    top_p: 0\n".into(),
            vec![],
            vec!["test.yaml:3", "`sampling.train.top_p`", "(0, 1]"],
        ),
        (
            "top_p above 1",
            "sampling:\n  test:\n    top_p: 1.5\n".into(),
            vec![],
            vec!["`sampling.test.top_p`", "(0, 1]"],
        ),
        (
            "negative temperature",
            "sampling:\n  test:\n    temperature: -0.5\n".into(),
            vec![],
            vec!["test.yaml:3", "`sampling.test.temperature`", "in [0, 100]"],
        ),
        (
            "greedy training",
            "sampling:\n  train:\n    temperature: 0\n".into(),
            vec![],
            vec!["`sampling.train.temperature`", "greedy training"],
        ),
        (
            "a training temperature that scoring overflows",
            "sampling:\n  train:\n    temperature: 5.0e-324\n".into(),
            vec![],
            vec![
                "`sampling.train.temperature`",
                "in [1e-5, 100]",
                "scores the rollouts",
            ],
        ),
        (
            "no rate floor",
            "services:\n  min_tokens_per_s: 0\n".into(),
            vec![],
            vec!["`services.min_tokens_per_s`", "rate > 0"],
        ),
        (
            "no attempt",
            "services:\n  max_attempts: 0\n".into(),
            vec![],
            vec!["`services.max_attempts`", "at least 1"],
        ),
        (
            "the removed request_timeout_s",
            "services:\n  request_timeout_s: 1800\n".into(),
            vec![],
            vec!["request_timeout_s"],
        ),
        (
            "max_tokens 0",
            "sampling:\n  train:\n    max_tokens: 0\n".into(),
            vec![],
            vec!["`sampling.train.max_tokens`", "1..="],
        ),
        (
            "unknown style",
            "prompt:\n  style: latex\n".into(),
            vec![],
            vec![
                "test.yaml:2",
                "`prompt.style`",
                "unknown value `latex`",
                "boxed",
            ],
        ),
        (
            "unknown reward",
            "rewards:\n  tapeagents: 1\n  vibes: 2\n".into(),
            vec![],
            vec!["test.yaml:3", "`rewards.vibes`", "unknown value `vibes`"],
        ),
        (
            "tag reward with boxed style",
            "rewards:\n  tapeagents: 1\n  strict_format: 1\n".into(),
            vec![],
            vec!["test.yaml:3", "`rewards.strict_format`", "tag style"],
        ),
        (
            "all weights zero",
            "rewards:\n  tapeagents: 0\n".into(),
            vec![],
            vec!["`rewards`", "constant"],
        ),
        (
            "no rewards",
            "rewards: {}\n".into(),
            vec![],
            vec!["`rewards`", "at least one"],
        ),
        (
            "bad lora target",
            "lora:\n  targets:\n    - q_proj\n    - qkv\n".into(),
            vec![],
            vec!["test.yaml:4", "`lora.targets[1]`", "`qkv`", "gate_proj"],
        ),
        (
            "duplicate lora target",
            "lora:\n  targets: [q_proj, q_proj]\n".into(),
            vec![],
            vec!["`lora.targets[1]`", "twice"],
        ),
        (
            "lora rank 0",
            "lora:\n  r: 0\n".into(),
            vec![],
            vec!["`lora.r`", "at least 1"],
        ),
        (
            "dropout 1",
            "lora:\n  dropout: 1.0\n".into(),
            vec![],
            vec!["`lora.dropout`", "[0, 1)"],
        ),
        (
            "epsilon_low 1",
            "learner:\n  epsilon_low: 1\n".into(),
            vec![],
            vec!["`learner.epsilon_low`", "(0, 1)"],
        ),
        (
            "bad accumulation",
            "learner:\n  grad_accumulation: 3\n".into(),
            vec![],
            vec!["`learner.grad_accumulation`", "= 24 completions", "= 32"],
        ),
        (
            "unknown loss",
            "learner:\n  loss_type: ppo\n".into(),
            vec![],
            vec!["`learner.loss_type`", "unknown value `ppo`", "dr_grpo"],
        ),
        (
            "bad device",
            "model:\n  device: gpu\n".into(),
            vec![],
            vec!["test.yaml:2", "`model.device`", "cpu, cuda or cuda:N"],
        ),
        (
            "bad dtype",
            "model:\n  dtype: fp8\n".into(),
            vec![],
            vec!["`model.dtype`", "unknown value `fp8`"],
        ),
        (
            "same ports",
            "services:\n  rollout:\n    port: 8000\n  ref_scorer:\n    port: 8000\n".into(),
            vec![],
            vec!["test.yaml:5", "`services.ref_scorer.port`", "own port"],
        ),
        (
            "port out of range",
            "services:\n  rollout:\n    port: 70000\n".into(),
            vec![],
            vec!["`services.rollout.port`", "70000"],
        ),
        (
            "bad endpoint",
            "services:\n  rollout:\n    endpoints: [localhost:8000]\n".into(),
            vec![],
            vec!["`services.rollout.endpoints[0]`", "not a URL"],
        ),
        (
            "bad ref-scorer endpoint",
            "services:\n  ref_scorer:\n    endpoints: [\"ftp://x\"]\n".into(),
            vec![],
            vec!["`services.ref_scorer.endpoints[0]`", "not a URL"],
        ),
        (
            "no server at all",
            "services:\n  rollout:\n    replicas: 0\n".into(),
            vec![],
            vec!["`services.rollout.replicas`", "at least one server"],
        ),
        (
            "replica ports meet",
            "services:\n  rollout:\n    port: 8000\n    replicas: 3\n  ref_scorer:\n    port: 8002\n".into(),
            vec![],
            vec!["`services.ref_scorer.port`", "8002..8002", "8000..8002", "port + i"],
        ),
        (
            "replica ports past 65535",
            "services:\n  rollout:\n    port: 65535\n    replicas: 2\n".into(),
            vec![],
            vec!["`services.rollout.port`", "past port 65535"],
        ),
        (
            "empty replica device",
            "services:\n  rollout:\n    devices: [cpu, \"\"]\n".into(),
            vec![],
            vec!["`services.rollout.devices[1]`", "is empty"],
        ),
        (
            "importance cap below 1",
            "learner:\n  tis_cap: 0.5\n".into(),
            vec![],
            vec!["`learner.tis_cap`", ">= 1", "null turns"],
        ),
        (
            "negative lag",
            "async:\n  max_lag: -1\n".into(),
            vec![],
            vec!["`async.max_lag`"],
        ),
        (
            "duplicate key",
            "seed: 1\nseed: 2\n".into(),
            vec![],
            vec!["test.yaml:2", "YAML syntax"],
        ),
        (
            "syntax error",
            "seed: [1, 2\n".into(),
            vec![],
            vec!["test.yaml:", "YAML syntax"],
        ),
        (
            "not a mapping",
            "- 1\n- 2\n".into(),
            vec![],
            vec!["(top level)", "mapping"],
        ),
        (
            "override: out of range",
            base.clone(),
            s(&["learner.lr=0"]),
            vec!["override `learner.lr=0`", "`learner.lr`", "must be > 0"],
        ),
        (
            "override: unknown key",
            base.clone(),
            s(&["learner.rate=1"]),
            vec!["override `learner.rate=1`", "`learner.rate`", "unknown key"],
        ),
        (
            "override: wrong type",
            base.clone(),
            s(&["attempts=many"]),
            vec!["override `attempts=many`", "invalid type"],
        ),
        (
            "override: no value",
            base.clone(),
            s(&["seed="]),
            vec!["override `seed=`", "no value"],
        ),
        (
            "override: no =",
            base.clone(),
            s(&["seed"]),
            vec!["override `seed`", "key=value"],
        ),
        (
            "override: into a value",
            base.clone(),
            s(&["seed.x=1"]),
            vec!["override `seed.x=1`", "`seed` is a value"],
        ),
        (
            "override: bad yaml",
            base.clone(),
            s(&["lora.targets=[q_proj"]),
            vec!["override `lora.targets=[q_proj`", "not valid YAML"],
        ),
        (
            "override: tag reward on boxed",
            base,
            s(&["rewards.xml_count=1"]),
            vec!["override `rewards.xml_count=1`", "tag style"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, yaml, overrides, fragments) in &cases {
        match Config::from_yaml(yaml, "test.yaml", overrides) {
            Ok(_) => failures.push(format!("{what}: loaded")),
            Err(e) => {
                let msg = e.to_string();
                if let Some(f) = fragments.iter().find(|f| !msg.contains(**f)) {
                    failures.push(format!("{what}: `{msg}` lacks `{f}`"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn missing_files_are_named_with_their_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "model:\n  path: {}/nope.gguf\ndata:\n  train: {}/train.jsonl\n",
        dir.path().display(),
        dir.path().display()
    );
    let loaded = Config::from_yaml(&yaml, "run.yaml", &[]).expect("valid shape");
    let e = loaded.check_files().expect_err("missing model").to_string();
    assert!(
        e.contains("run.yaml:2") && e.contains("`model.path`") && e.contains("fetch-assets"),
        "{e}"
    );
    std::fs::write(dir.path().join("nope.gguf"), b"x").expect("write");
    let e = loaded.check_files().expect_err("missing data").to_string();
    assert!(
        e.contains("run.yaml:4") && e.contains("`data.train`"),
        "{e}"
    );
}

#[test]
fn a_request_deadline_grows_with_its_tokens_and_the_requests_in_flight() {
    let s = rl_core::config::ServicesConfig::default();
    assert_eq!((s.deadline_base_s, s.min_tokens_per_s), (60, 2.0));
    let secs = |tokens, in_flight| s.deadline(tokens, in_flight).as_secs_f64();
    assert_eq!(secs(0, 1), 60.0, "the base alone");
    assert_eq!(secs(100, 1), 110.0, "base + 100 tokens at 2 tokens/s");
    assert_eq!(secs(100, 4), 260.0, "four such requests share the server");
    assert_eq!(secs(100, 0), 110.0, "nothing in flight counts as one");
    // A huge request gets a huge deadline, not an overflow.
    assert!(secs(u64::MAX, u32::MAX) > 1e9);
}

#[test]
fn replicas_default_to_one_unless_endpoints_are_given_and_the_lag_picks_the_adapter() {
    let load = |yaml: &str| {
        Config::from_yaml(yaml, "test.yaml", &[])
            .expect(yaml)
            .config
    };
    let c = load("seed: 1\n");
    assert_eq!(
        (
            c.services.rollout.local_replicas(),
            c.services.ref_scorer.local_replicas()
        ),
        (1, 1)
    );
    let c = load("services:\n  rollout:\n    endpoints: [\"http://a:1\"]\n  ref_scorer:\n    endpoints: [\"http://b:2\"]\n");
    assert_eq!(
        (
            c.services.rollout.local_replicas(),
            c.services.ref_scorer.local_replicas()
        ),
        (0, 0)
    );
    let c = load("services:\n  rollout:\n    replicas: 2\n    endpoints: [\"http://a:1\"]\n");
    assert_eq!(c.services.rollout.local_replicas(), 2);
    // Iteration N samples with the checkpoint of N - 1 - max_lag (None: the base model).
    let lag = |k: u32| {
        let c = load(&format!("async:\n  max_lag: {k}\n"));
        (0..4)
            .map(|n| c.overlap.sampling_adapter(n))
            .collect::<Vec<_>>()
    };
    assert_eq!(lag(0), [None, Some(0), Some(1), Some(2)]);
    assert_eq!(lag(1), [None, None, Some(0), Some(1)]);
    assert_eq!(lag(2), [None, None, None, Some(0)]);
}
