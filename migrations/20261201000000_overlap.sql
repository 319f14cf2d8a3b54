-- Sampling that overlaps training (`async.max_lag`) and truncated importance sampling.
--
-- Per learner step: how far the sampler's logprobs are from the learner's at the iteration's
-- starting adapter (mean and max absolute difference over the step's tokens, before any update),
-- and the fraction of tokens whose importance weight `exp(old - sampler)` was cut to
-- `learner.tis_cap` (NULL when TIS is off). Rows written before this migration say NULL.
ALTER TABLE train_metrics ADD COLUMN sampler_mismatch_mean REAL;
ALTER TABLE train_metrics ADD COLUMN sampler_mismatch_max REAL;
ALTER TABLE train_metrics ADD COLUMN tis_clip_fraction REAL;

-- Wall-clock seconds the learner (waiting for an iteration's scored rollouts) and the samplers
-- (waiting for the checkpoint an iteration is sampled with) sat idle, per iteration; added up
-- across resumes.
CREATE TABLE idle_seconds (
    run_id      INTEGER NOT NULL,
    iteration   INTEGER NOT NULL,
    side        TEXT NOT NULL CHECK (side IN ('learner', 'samplers')),
    seconds     REAL NOT NULL CHECK (seconds >= 0),
    PRIMARY KEY (run_id, iteration, side),
    FOREIGN KEY (run_id, iteration) REFERENCES iterations (run_id, iteration)
);
