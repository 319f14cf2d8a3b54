-- The policy version that sampled each rollout: the name of the adapter the rollout server served
-- (`iter_N`), NULL for the base model. Rows written before this migration say NULL too.
ALTER TABLE rollouts ADD COLUMN adapter TEXT;
