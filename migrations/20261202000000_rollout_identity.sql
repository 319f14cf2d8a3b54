-- Each rollout carries what made it: the policy version that sampled it (the integer iteration
-- whose checkpoint the rollout server served; NULL for the base model) and the sampling
-- parameters it was drawn with (temperature, top_p, top_k, max_tokens, and its own seed). The
-- learner reads the temperature and the version from here, and a resume that changes the
-- sampling parameters applies them only to iterations not begun yet, so an iteration never
-- mixes two.
--
-- Rows written before this migration: the version is read once from the adapter name they
-- recorded (`iter_N`); their sampling parameters were not recorded and stay NULL (the learner
-- takes the run config's for them).
ALTER TABLE rollouts ADD COLUMN policy_version INTEGER CHECK (policy_version IS NULL OR policy_version >= 0);
ALTER TABLE rollouts ADD COLUMN temperature REAL CHECK (temperature IS NULL OR (temperature >= 0 AND temperature <= 100));
ALTER TABLE rollouts ADD COLUMN top_p REAL CHECK (top_p IS NULL OR (top_p > 0 AND top_p <= 1));
ALTER TABLE rollouts ADD COLUMN top_k INTEGER CHECK (top_k IS NULL OR top_k >= 0);
ALTER TABLE rollouts ADD COLUMN max_tokens INTEGER CHECK (max_tokens IS NULL OR max_tokens >= 1);
-- The seed this rollout was sampled with (its group's seed + its attempt), as a signed 64-bit
-- integer (the bits of the u64).
ALTER TABLE rollouts ADD COLUMN seed INTEGER;
-- The knobs an iteration samples its training rollouts with (JSON of `sampling::Knobs`), fixed
-- when its sampling first begins: a resume whose config changed `sampling.train` keeps these for
-- the iterations already begun and applies the new ones from the next iteration on, so that no
-- iteration mixes two. NULL for iterations begun before this was recorded (fixed at their next
-- resume).
ALTER TABLE iterations ADD COLUMN sampling TEXT CHECK (sampling IS NULL OR json_valid(sampling));

UPDATE rollouts SET policy_version = CAST(substr(adapter, 6) AS INTEGER)
    WHERE adapter GLOB 'iter_[0-9]*' AND adapter NOT GLOB 'iter_*[^0-9]*';

