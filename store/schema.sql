-- The store's schema: the one place that defines tables. Documented column by column in
-- store/README.md. Every table after `runs` is keyed by run_id; many runs coexist in one file.
-- Statements are idempotent so that opening an older file of the same version is harmless.

CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    run_id      VARCHAR PRIMARY KEY,
    created_at  TIMESTAMP NOT NULL,
    name        VARCHAR NOT NULL,
    model       VARCHAR NOT NULL,
    config      JSON NOT NULL,
    config_hash VARCHAR NOT NULL,
    packages    JSON NOT NULL,
    status      VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS stages (
    run_id      VARCHAR NOT NULL,
    stage       VARCHAR NOT NULL,
    cache_key   VARCHAR NOT NULL,
    seconds     DOUBLE NOT NULL,
    summary     JSON NOT NULL,
    PRIMARY KEY (run_id, stage)
);

CREATE TABLE IF NOT EXISTS generations (
    run_id       VARCHAR NOT NULL,
    variant      VARCHAR NOT NULL,
    prompt_id    INTEGER NOT NULL,
    prompt       VARCHAR NOT NULL,
    continuation VARCHAR NOT NULL,
    toxicity     DOUBLE NOT NULL,
    scorer       VARCHAR NOT NULL,
    PRIMARY KEY (run_id, variant, prompt_id)
);
