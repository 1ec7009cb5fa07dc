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

CREATE TABLE IF NOT EXISTS probe_metrics (
    run_id        VARCHAR PRIMARY KEY,
    n_train       INTEGER NOT NULL,
    n_val         INTEGER NOT NULL,
    train_accuracy DOUBLE NOT NULL,
    val_accuracy  DOUBLE NOT NULL,
    val_roc_auc   DOUBLE NOT NULL,
    layer         INTEGER NOT NULL,
    w_norm        DOUBLE NOT NULL,
    direction     DOUBLE[] NOT NULL
);

CREATE TABLE IF NOT EXISTS pairs (
    run_id            VARCHAR NOT NULL,
    pair_id           INTEGER NOT NULL,
    prompt            VARCHAR NOT NULL,
    chosen            VARCHAR NOT NULL,
    rejected          VARCHAR NOT NULL,
    chosen_toxicity   DOUBLE NOT NULL,
    rejected_toxicity DOUBLE NOT NULL,
    PRIMARY KEY (run_id, pair_id)
);

CREATE TABLE IF NOT EXISTS dpo_curve (
    run_id          VARCHAR NOT NULL,
    step            INTEGER NOT NULL,
    loss            DOUBLE NOT NULL,
    reward_margin   DOUBLE,
    reward_accuracy DOUBLE,
    chosen_reward   DOUBLE,
    rejected_reward DOUBLE,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE IF NOT EXISTS layers (
    run_id    VARCHAR NOT NULL,
    variant   VARCHAR NOT NULL,
    layer     INTEGER NOT NULL,
    mlp_proj  DOUBLE NOT NULL,
    PRIMARY KEY (run_id, variant, layer)
);

CREATE TABLE IF NOT EXISTS neurons (
    run_id     VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    neuron     INTEGER NOT NULL,
    cos        DOUBLE NOT NULL,
    act        DOUBLE NOT NULL,
    act_dpo    DOUBLE NOT NULL,
    proj       DOUBLE NOT NULL,
    proj_dpo   DOUBLE NOT NULL,
    delta      DOUBLE NOT NULL,
    dact       DOUBLE NOT NULL,
    group_code VARCHAR NOT NULL,
    delta_rank INTEGER NOT NULL,
    cum_share  DOUBLE NOT NULL,
    PRIMARY KEY (run_id, layer, neuron)
);

CREATE TABLE IF NOT EXISTS group_summary (
    run_id      VARCHAR NOT NULL,
    group_code  VARCHAR NOT NULL,
    effect      VARCHAR NOT NULL,
    n_neurons   INTEGER NOT NULL,
    sum_delta   DOUBLE NOT NULL,
    share_gross DOUBLE NOT NULL,
    share_net   DOUBLE NOT NULL,
    ci_low      DOUBLE NOT NULL,
    ci_high     DOUBLE NOT NULL,
    PRIMARY KEY (run_id, group_code)
);

CREATE TABLE IF NOT EXISTS layer_groups (
    run_id     VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    group_code VARCHAR NOT NULL,
    n_neurons  INTEGER NOT NULL,
    sum_delta  DOUBLE NOT NULL,
    PRIMARY KEY (run_id, layer, group_code)
);

CREATE TABLE IF NOT EXISTS attribution (
    run_id          VARCHAR PRIMARY KEY,
    net_reduction   DOUBLE NOT NULL,
    gross_reduction DOUBLE NOT NULL,
    n_neurons       INTEGER NOT NULL,
    n_for_50        INTEGER NOT NULL,
    n_for_75        INTEGER NOT NULL,
    n_for_99        INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS neuron_tokens (
    run_id   VARCHAR NOT NULL,
    layer    INTEGER NOT NULL,
    neuron   INTEGER NOT NULL,
    rank     INTEGER NOT NULL,
    token    VARCHAR NOT NULL,
    logit    DOUBLE NOT NULL,
    PRIMARY KEY (run_id, layer, neuron, rank)
);

CREATE TABLE IF NOT EXISTS neuron_top_prompts (
    run_id     VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    neuron     INTEGER NOT NULL,
    rank       INTEGER NOT NULL,
    prompt_id  INTEGER NOT NULL,
    act        DOUBLE NOT NULL,
    act_dpo    DOUBLE NOT NULL,
    PRIMARY KEY (run_id, layer, neuron, rank)
);

CREATE TABLE IF NOT EXISTS prompt_groups (
    run_id     VARCHAR NOT NULL,
    prompt_id  INTEGER NOT NULL,
    layer      INTEGER NOT NULL,
    group_code VARCHAR NOT NULL,
    sum_delta  DOUBLE NOT NULL,
    PRIMARY KEY (run_id, prompt_id, layer, group_code)
);

CREATE TABLE IF NOT EXISTS interventions (
    run_id          VARCHAR NOT NULL,
    intervention_id VARCHAR NOT NULL,
    kind            VARCHAR NOT NULL,
    params          JSON NOT NULL,
    n_neurons       INTEGER NOT NULL,
    toxicity        DOUBLE NOT NULL,
    toxic_share     DOUBLE NOT NULL,
    perplexity      DOUBLE NOT NULL,
    f1              DOUBLE NOT NULL,
    recovered       DOUBLE,
    PRIMARY KEY (run_id, intervention_id)
);

-- MaRCo-style revision (stage detox): one row per token of each base continuation it read.
CREATE TABLE IF NOT EXISTS revisions (
    run_id      VARCHAR NOT NULL,
    variant     VARCHAR NOT NULL,
    prompt_id   INTEGER NOT NULL,
    position    INTEGER NOT NULL,
    token       VARCHAR NOT NULL,
    jsd         DOUBLE NOT NULL,
    masked      BOOLEAN NOT NULL,
    regenerated BOOLEAN NOT NULL,
    original    VARCHAR NOT NULL,
    revised     VARCHAR NOT NULL,
    PRIMARY KEY (run_id, variant, prompt_id, position)
);

-- The cumulative contribution curve: neurons by delta_rank, running share of the net reduction.
CREATE VIEW IF NOT EXISTS cumulative AS
SELECT run_id, delta_rank, layer, neuron, delta, cum_share FROM neurons;
