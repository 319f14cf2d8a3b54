-- Wall-clock seconds spent in each phase of an iteration, recorded in the transaction that moves
-- the iteration to its next phase. For a phase interrupted by a crash and finished after a resume,
-- only the attempt that finished it is counted (the crashed attempt's time is not known).
CREATE TABLE phase_seconds (
    run_id      INTEGER NOT NULL,
    iteration   INTEGER NOT NULL,
    phase       TEXT NOT NULL CHECK (phase IN ('sampling', 'scoring_ref', 'training', 'evaluating')),
    seconds     REAL NOT NULL CHECK (seconds >= 0),
    PRIMARY KEY (run_id, iteration, phase),
    FOREIGN KEY (run_id, iteration) REFERENCES iterations (run_id, iteration)
);
