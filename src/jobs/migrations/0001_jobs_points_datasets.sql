-- The job store's first schema: jobs, their training curves, uploaded datasets.
-- IF NOT EXISTS: stores made before migrations were versioned already hold these
-- tables, and take this migration as applied.

CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    stage BIGINT NOT NULL,
    tag TEXT NOT NULL,
    spec TEXT NOT NULL,
    step BIGINT NOT NULL DEFAULT 0,
    total_steps BIGINT NOT NULL,
    loss DOUBLE PRECISION,
    best_loss DOUBLE PRECISION,
    eval TEXT,
    error TEXT,
    attempts BIGINT NOT NULL DEFAULT 0,
    resumed_from_step BIGINT NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    published_version BIGINT,
    checkpoint_step BIGINT,
    checkpoint BYTEA,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    run_started_at BIGINT,
    run_start_step BIGINT
);

CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created_at);

-- The training curve: one point per heartbeat, and one at every evaluation.
CREATE TABLE IF NOT EXISTS job_points (
    job_id TEXT NOT NULL,
    step BIGINT NOT NULL,
    loss DOUBLE PRECISION,
    eval_loss DOUBLE PRECISION,
    at BIGINT NOT NULL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    name TEXT,
    records BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
