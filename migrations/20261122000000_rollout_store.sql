-- The rollout database of one run (DESIGN.md section 5). Token ids and logprobs are JSON arrays
-- (readable with plain sqlite3: json_array_length, json_each); times are UTC ISO-8601 text.

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- The resolved config, as YAML (config.yaml of the run dir holds the same text).
    config_yaml TEXT NOT NULL,
    -- What must not change between a run and its resume.
    model       TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    attempts    INTEGER NOT NULL CHECK (attempts >= 1)
);

CREATE TABLE iterations (
    run_id      INTEGER NOT NULL REFERENCES runs (id),
    iteration   INTEGER NOT NULL CHECK (iteration >= 0),
    phase       TEXT NOT NULL CHECK (phase IN ('sampling', 'scoring_ref', 'training', 'evaluating', 'done')),
    attempts    INTEGER NOT NULL CHECK (attempts >= 1),
    started_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, iteration)
);

-- The problems of an iteration: one group of `attempts` rollouts each.
CREATE TABLE tasks (
    run_id        INTEGER NOT NULL,
    iteration     INTEGER NOT NULL,
    group_index   INTEGER NOT NULL CHECK (group_index >= 0),
    problem_index INTEGER NOT NULL CHECK (problem_index >= 0),
    question      TEXT NOT NULL,
    gold          TEXT NOT NULL,
    -- The seed the group is sampled with (derived from the run seed, iteration and problem).
    seed          INTEGER NOT NULL,
    PRIMARY KEY (run_id, iteration, group_index),
    FOREIGN KEY (run_id, iteration) REFERENCES iterations (run_id, iteration)
);

CREATE TABLE rollouts (
    run_id         INTEGER NOT NULL,
    iteration      INTEGER NOT NULL,
    group_index    INTEGER NOT NULL,
    attempt        INTEGER NOT NULL CHECK (attempt >= 0),
    prompt_ids     TEXT NOT NULL CHECK (json_valid(prompt_ids)),
    completion_ids TEXT NOT NULL CHECK (json_valid(completion_ids)),
    -- Sampler logprobs, one per completion token.
    logprobs       TEXT NOT NULL CHECK (json_valid(logprobs)),
    -- Reference-model logprobs; NULL until the ref-scorer has annotated the group.
    ref_logprobs   TEXT CHECK (ref_logprobs IS NULL OR json_valid(ref_logprobs)),
    finish_reason  TEXT NOT NULL CHECK (finish_reason IN ('stop', 'length')),
    text           TEXT NOT NULL,
    reward         REAL NOT NULL,
    -- Each reward component's own value, e.g. {"tapeagents": -1.0}.
    reward_components TEXT NOT NULL CHECK (json_valid(reward_components)),
    answer_status  TEXT NOT NULL CHECK (answer_status IN ('correct', 'wrong', 'unparsable', 'no_answer')),
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, iteration, group_index, attempt),
    FOREIGN KEY (run_id, iteration, group_index) REFERENCES tasks (run_id, iteration, group_index),
    CHECK (json_array_length(logprobs) = json_array_length(completion_ids)),
    CHECK (ref_logprobs IS NULL OR json_array_length(ref_logprobs) = json_array_length(completion_ids))
);

CREATE TABLE checkpoints (
    run_id      INTEGER NOT NULL,
    iteration   INTEGER NOT NULL,
    path        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, iteration),
    FOREIGN KEY (run_id, iteration) REFERENCES iterations (run_id, iteration)
);

-- Greedy evaluation, one row per test problem (so an interrupted eval resumes where it stopped).
CREATE TABLE eval_results (
    run_id        INTEGER NOT NULL,
    iteration     INTEGER NOT NULL,
    split         TEXT NOT NULL,
    problem_index INTEGER NOT NULL,
    text          TEXT NOT NULL,
    answer        TEXT,
    answer_status TEXT NOT NULL CHECK (answer_status IN ('correct', 'wrong', 'unparsable', 'no_answer')),
    finish_reason TEXT NOT NULL CHECK (finish_reason IN ('stop', 'length')),
    solved        INTEGER NOT NULL CHECK (solved IN (0, 1)),
    formatted     INTEGER NOT NULL CHECK (formatted IN (0, 1)),
    num_tokens    INTEGER NOT NULL,
    PRIMARY KEY (run_id, iteration, split, problem_index),
    FOREIGN KEY (run_id, iteration) REFERENCES iterations (run_id, iteration)
);

-- The summary of an evaluation, written once every problem has a result.
CREATE TABLE evals (
    run_id       INTEGER NOT NULL,
    iteration    INTEGER NOT NULL,
    split        TEXT NOT NULL,
    n            INTEGER NOT NULL,
    accuracy     REAL NOT NULL,
    format_rate  REAL NOT NULL,
    mean_tokens  REAL NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, iteration, split),
    FOREIGN KEY (run_id, iteration) REFERENCES iterations (run_id, iteration)
);

-- One row per optimizer step of the learner.
CREATE TABLE train_metrics (
    run_id            INTEGER NOT NULL,
    iteration         INTEGER NOT NULL,
    step              INTEGER NOT NULL,
    loss              REAL NOT NULL,
    mean_kl           REAL NOT NULL,
    clip_fraction     REAL NOT NULL,
    grad_norm         REAL NOT NULL,
    lr                REAL NOT NULL,
    reward_mean       REAL NOT NULL,
    reward_std        REAL NOT NULL,
    zero_std_fraction REAL NOT NULL,
    completion_len    REAL NOT NULL,
    tokens_per_s      REAL NOT NULL,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, iteration, step),
    FOREIGN KEY (run_id, iteration) REFERENCES iterations (run_id, iteration)
);
