"""Every read the app makes. One read-only connection per store file version, one cursor per query:
when the pipeline swaps in a new file, its version changes and the next query opens the new file, while
queries already running finish on the old one. Results are cached by store path, file version and
arguments. No model code and no torch here: a hosted app needs only the store file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import polars as pl
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `store` lives beside app/

import store  # noqa: E402

DEFAULT_STORE = "store/dpo_neurons.duckdb"
# Shown while a query runs; a cached result shows nothing, so no page ever waits without one.
SPINNER = "Reading the store..."
REDUCING = ["TP-", "TN+", "AP+", "AN-"]  # method.md: the groups whose delta is positive by construction


def store_path() -> str:
    return os.environ.get("STORE", DEFAULT_STORE)


def store_version(path: str) -> float:
    """Cache key part that changes whenever the pipeline swaps in a new file."""
    return os.stat(path).st_mtime_ns if os.path.exists(path) else 0.0


@st.cache_resource(show_spinner=False, max_entries=4)  # opened inside a query, under its spinner
def _database(path: str, version: float):
    """Opening a file and checking its schema costs more than most queries (bench/app_queries.py)."""
    return store.connect(path, snapshot=True)


def _frame(path: str, version: float, sql: str, params: list | None = None) -> pl.DataFrame:
    """Read from the file version the result is cached under; a cursor per query, as sessions run on threads."""
    cursor = store.snapshot_cursor(_database(path, version))
    try:
        return cursor.sql(sql, params=params or []).pl()
    finally:
        cursor.close()


@st.cache_data(show_spinner=SPINNER)
def runs(path: str, version: float) -> pl.DataFrame:
    return _frame(path, version, "SELECT run_id, created_at, name, model, status, config_hash FROM runs ORDER BY created_at DESC")


@st.cache_data(show_spinner=SPINNER)
def stages(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, version, "SELECT stage, cache_key, seconds, CAST(summary AS VARCHAR) AS summary FROM stages "
                        "WHERE run_id = ? ORDER BY stage", [run_id])


@st.cache_data(show_spinner=SPINNER)
def world_summary(path: str, version: float, run_id: str) -> dict | None:
    df = _frame(path, version, """
        SELECT summary->>'ppl_model' AS ppl_model, summary->>'ppl_unigram' AS ppl_unigram,
               summary->>'toxic_fraction' AS toxic_fraction, summary->>'n_params' AS n_params, seconds
        FROM stages WHERE run_id = ? AND stage = 'world'""", [run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=SPINNER)
def generations(path: str, version: float, run_id: str, variant: str, min_toxicity: float) -> pl.DataFrame:
    return _frame(path, version, """
        SELECT prompt_id, prompt, continuation, toxicity, scorer FROM generations
        WHERE run_id = ? AND variant = ? AND toxicity >= ? ORDER BY prompt_id""", [run_id, variant, min_toxicity])


@st.cache_data(show_spinner=SPINNER)
def variants(path: str, version: float, run_id: str) -> list[str]:
    return _frame(path, version, "SELECT DISTINCT variant FROM generations WHERE run_id = ? ORDER BY variant",
                  [run_id])["variant"].to_list()


@st.cache_data(show_spinner=SPINNER)
def toxicity_by_variant(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, version, """
        SELECT variant, avg(toxicity) AS toxicity, avg((toxicity > 0.5)::INT) AS toxic_share, count(*) AS n,
               any_value(scorer) AS scorer
        FROM generations WHERE run_id = ? GROUP BY variant ORDER BY variant""", [run_id])


@st.cache_data(show_spinner=SPINNER)
def probe_metrics(path: str, version: float, run_id: str) -> dict | None:
    df = _frame(path, version, "SELECT n_train, n_val, train_accuracy, val_accuracy, val_roc_auc, layer FROM probe_metrics "
                      "WHERE run_id = ?", [run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=SPINNER)
def attribution(path: str, version: float, run_id: str) -> dict | None:
    df = _frame(path, version, "SELECT * EXCLUDE (run_id) FROM attribution WHERE run_id = ?", [run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=SPINNER)
def group_summary(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, version, """
        SELECT group_code, effect, n_neurons, sum_delta, share_gross, share_net, ci_low, ci_high
        FROM group_summary WHERE run_id = ?
        ORDER BY effect DESC, share_gross DESC""", [run_id])


@st.cache_data(show_spinner=SPINNER)
def cumulative(path: str, version: float, run_id: str, max_points: int = 2000) -> pl.DataFrame:
    """The cumulative curve, thinned to about max_points rows for drawing (every top-ranked neuron
    is kept, the long tail is sampled evenly). `//` throughout: DuckDB's `/` is float division, and `//` with a
    float operand is too, which would make the step fractional and drop the whole tail."""
    return _frame(path, version, """
        WITH n AS (SELECT n_neurons AS total FROM attribution WHERE run_id = ?)
        SELECT delta_rank, cum_share FROM neurons, n
        WHERE run_id = ?
              AND (delta_rank <= ? // 2 OR delta_rank % greatest(1, total // (? // 2)) = 0 OR delta_rank = total)
        ORDER BY delta_rank""", [run_id, run_id, max_points, max_points])


@st.cache_data(show_spinner=SPINNER)
def layer_groups(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, version, "SELECT layer, group_code, n_neurons, sum_delta FROM layer_groups WHERE run_id = ? "
                        "ORDER BY layer, group_code", [run_id])


@st.cache_data(show_spinner=SPINNER)
def layers(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, version, "SELECT variant, layer, mlp_proj FROM layers WHERE run_id = ? ORDER BY variant, layer", [run_id])


@st.cache_data(show_spinner=SPINNER)
def dpo_curve(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, version, "SELECT step, loss, reward_margin, reward_accuracy FROM dpo_curve WHERE run_id = ? ORDER BY step",
                  [run_id])


@st.cache_data(show_spinner=SPINNER)
def pairs_summary(path: str, version: float, run_id: str) -> dict | None:
    """What DPO trained on: how many pairs, and how far apart the scorer puts their two sides."""
    df = _frame(path, version, """
        SELECT count(*) AS n, avg(chosen_toxicity) AS chosen, avg(rejected_toxicity) AS rejected,
               avg((rejected_toxicity > chosen_toxicity)::INT) AS ordered
        FROM pairs WHERE run_id = ? HAVING count(*) > 0""", [run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=SPINNER)
def pairs(path: str, version: float, run_id: str, limit: int) -> pl.DataFrame:
    """The first `limit` pairs (the paper's data has 24,576: a table of all of them is no use to read)."""
    return _frame(path, version, """
        SELECT pair_id, prompt, chosen, rejected, chosen_toxicity, rejected_toxicity FROM pairs
        WHERE run_id = ? ORDER BY pair_id LIMIT ?""", [run_id, limit])


@st.cache_data(show_spinner=SPINNER)
def prompts(path: str, version: float, run_id: str) -> pl.DataFrame:
    """One row per prompt: the reduction of the probe projection DPO made on it (its neurons' deltas from
    that prompt's own activations, summed), TP-'s share of its gross reduction (none where the reducing
    groups, fixed by the means over all prompts, add up to no reduction on this prompt), and both models'
    continuations with their toxicity. Largest net reduction first."""
    return _frame(path, version, """
        WITH p AS (
            SELECT prompt_id, sum(sum_delta) AS net_reduction,
                   sum(sum_delta) FILTER (WHERE list_contains(?, group_code)) AS gross_reduction,
                   sum(sum_delta) FILTER (WHERE group_code = 'TP-') AS tp
            FROM prompt_groups WHERE run_id = ? GROUP BY prompt_id)
        SELECT p.prompt_id, b.prompt, p.net_reduction, p.gross_reduction,
               CASE WHEN p.gross_reduction > 0 THEN coalesce(p.tp, 0) / p.gross_reduction END AS share_tp,
               b.toxicity AS toxicity, d.toxicity AS toxicity_dpo,
               b.continuation AS continuation, d.continuation AS continuation_dpo
        FROM p
        LEFT JOIN generations b ON b.run_id = ? AND b.variant = 'base' AND b.prompt_id = p.prompt_id
        LEFT JOIN generations d ON d.run_id = ? AND d.variant = 'dpo' AND d.prompt_id = p.prompt_id
        ORDER BY p.net_reduction DESC, p.prompt_id""", [REDUCING, run_id, run_id, run_id])


@st.cache_data(show_spinner=SPINNER)
def prompt_group_shares(path: str, version: float, run_id: str) -> pl.DataFrame:
    """Each group's share of each prompt's gross reduction (prompts with a positive gross reduction)."""
    return _frame(path, version, """
        WITH g AS (SELECT prompt_id, group_code, sum(sum_delta) AS sum_delta FROM prompt_groups
                   WHERE run_id = ? GROUP BY prompt_id, group_code),
             t AS (SELECT prompt_id, sum(sum_delta) AS gross FROM g
                   WHERE list_contains(?, group_code) GROUP BY prompt_id HAVING gross > 0)
        SELECT g.prompt_id, g.group_code, g.sum_delta / t.gross AS share_gross
        FROM g JOIN t USING (prompt_id) ORDER BY g.prompt_id, g.group_code""", [run_id, REDUCING])


@st.cache_data(show_spinner=SPINNER)
def interventions(path: str, version: float, run_id: str) -> pl.DataFrame:
    """Paper Table 1 order: the base and DPO models first, then each kind by size."""
    return _frame(path, version, """
        SELECT intervention_id, kind, n_neurons, toxicity, toxic_share, perplexity, f1, recovered
        FROM interventions WHERE run_id = ?
        ORDER BY kind NOT IN ('base', 'dpo'), kind = 'dpo', kind, n_neurons, intervention_id""", [run_id])


@st.cache_data(show_spinner=SPINNER)
def dpo_drop(path: str, version: float, run_id: str) -> dict | None:
    """DPO's toxicity drop, its paired standard error (stage score's summary) and the prompts it is over;
    None for a run scored before score kept them."""
    df = _frame(path, version, """
        SELECT CAST(summary->>'dpo_drop' AS DOUBLE) AS drop, CAST(summary->>'dpo_drop_se' AS DOUBLE) AS se,
               (SELECT count(*) FROM generations WHERE run_id = ? AND variant = 'base') AS n_prompts
        FROM stages WHERE run_id = ? AND stage = 'score' AND summary->>'dpo_drop' IS NOT NULL""", [run_id, run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=SPINNER)
def run_info(path: str, version: float, run_id: str) -> dict:
    """The run's model and data sources, read from the config it was made from."""
    return _frame(path, version, """
        SELECT name, model, created_at, config->'data' AS data, config->'scorer'->>'backend' AS scorer,
               config->'dpo' AS dpo, config->'probe'->>'direction' AS probe_direction
        FROM runs WHERE run_id = ?""", [run_id]).row(0, named=True)


@st.cache_data(show_spinner=SPINNER)
def settings_that_differ(path: str, version: float, run_a: str, run_b: str) -> pl.DataFrame:
    """The config settings (section.key, [run] left out: names and places) whose values differ between two
    runs, as JSON text; NULL where a run's config does not hold the setting (written before it existed)."""
    return _frame(path, version, """
        WITH setting AS (
            SELECT r.run_id, s.key || '.' || k.key AS setting, k.value::VARCHAR AS value
            FROM runs r, json_each(r.config) s, json_each(s.value) k
            WHERE r.run_id IN (?, ?) AND s.key <> 'run')
        SELECT setting, max(value) FILTER (WHERE run_id = ?) AS a, max(value) FILTER (WHERE run_id = ?) AS b
        FROM setting GROUP BY setting HAVING a IS DISTINCT FROM b ORDER BY setting""", [run_a, run_b, run_a, run_b])


@st.cache_data(show_spinner=SPINNER)
def neuron_bounds(path: str, version: float, run_id: str) -> dict | None:
    """Ranges the neuron filters start from."""
    df = _frame(path, version, """
        SELECT min(layer) AS layer_min, max(layer) AS layer_max, min(cos) AS cos_min, max(cos) AS cos_max,
               count(*) AS n_neurons
        FROM neurons WHERE run_id = ?""", [run_id])
    row = df.row(0, named=True)
    return row if row["n_neurons"] else None


NEURON_COLUMNS = "layer, neuron, group_code, cos, act, act_dpo, dact, proj, proj_dpo, delta, delta_rank"


@st.cache_data(show_spinner=SPINNER)
def neurons(path: str, version: float, run_id: str, groups: tuple[str, ...], layers: tuple[int, int],
            cos: tuple[float, float], min_abs_act: float, top_n: int) -> pl.DataFrame:
    """The top_n neurons by |delta| among those passing the filters; n_match counts all that pass."""
    return _frame(path, version, f"""
        SELECT {NEURON_COLUMNS}, count(*) OVER () AS n_match FROM neurons
        WHERE run_id = ? AND list_contains(?, group_code) AND layer BETWEEN ? AND ? AND cos BETWEEN ? AND ?
              AND abs(act) >= ?
        ORDER BY abs(delta) DESC, layer, neuron LIMIT ?""",
                  [run_id, list(groups), *layers, *cos, min_abs_act, top_n])


@st.cache_data(show_spinner=SPINNER)
def neuron(path: str, version: float, run_id: str, layer: int, neuron: int) -> dict | None:
    df = _frame(path, version, f"""
        SELECT {NEURON_COLUMNS}, (SELECT count(*) FROM neurons WHERE run_id = ?) AS n_neurons,
               (SELECT count(*) + 1 FROM neurons WHERE run_id = ? AND cos > n.cos) AS cos_rank
        FROM neurons n WHERE run_id = ? AND layer = ? AND neuron = ?""", [run_id, run_id, run_id, layer, neuron])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=SPINNER)
def neuron_tokens(path: str, version: float, run_id: str, layer: int, neuron: int) -> pl.DataFrame:
    return _frame(path, version, "SELECT rank, token, logit FROM neuron_tokens WHERE run_id = ? AND layer = ? AND neuron = ? "
                        "ORDER BY rank", [run_id, layer, neuron])


@st.cache_data(show_spinner=SPINNER)
def neuron_top_prompts(path: str, version: float, run_id: str, layer: int, neuron: int) -> pl.DataFrame:
    """The prompts where the neuron fires most under the base model, with both models' continuations."""
    return _frame(path, version, """
        SELECT t.rank, t.prompt_id, t.act, t.act_dpo, b.prompt, b.continuation AS base_continuation,
               d.continuation AS dpo_continuation, b.toxicity AS base_toxicity, d.toxicity AS dpo_toxicity
        FROM neuron_top_prompts t
        LEFT JOIN generations b ON b.run_id = t.run_id AND b.variant = 'base' AND b.prompt_id = t.prompt_id
        LEFT JOIN generations d ON d.run_id = t.run_id AND d.variant = 'dpo' AND d.prompt_id = t.prompt_id
        WHERE t.run_id = ? AND t.layer = ? AND t.neuron = ? ORDER BY t.rank""", [run_id, layer, neuron])


@st.cache_data(show_spinner=SPINNER)
def group_shares_of(path: str, version: float, run_ids: tuple[str, ...]) -> pl.DataFrame:
    """Group shares of several runs, one row per run and group, for side-by-side bars."""
    return _frame(path, version, """
        SELECT g.run_id, r.name, g.group_code, g.effect, g.n_neurons, g.share_gross, g.share_net, g.ci_low, g.ci_high
        FROM group_summary g JOIN runs r USING (run_id)
        WHERE list_contains(?, g.run_id) ORDER BY g.run_id, g.effect DESC, g.group_code""", [list(run_ids)])


@st.cache_data(show_spinner=SPINNER)
def top_overlap(path: str, version: float, run_a: str, run_b: str, k: int) -> pl.DataFrame:
    """Each neuron in either run's top k by delta, with its rank, delta and group in both runs (null where
    the other run has no such neuron, e.g. a model of another shape)."""
    return _frame(path, version, """
        WITH ids AS (SELECT layer, neuron FROM neurons WHERE run_id = ? AND delta_rank <= ?
                     UNION SELECT layer, neuron FROM neurons WHERE run_id = ? AND delta_rank <= ?)
        SELECT ids.layer, ids.neuron, a.delta_rank AS rank_a, b.delta_rank AS rank_b, a.delta AS delta_a,
               b.delta AS delta_b, a.group_code AS group_a, b.group_code AS group_b,
               coalesce(a.delta_rank <= ?, false) AS top_a, coalesce(b.delta_rank <= ?, false) AS top_b
        FROM ids
        LEFT JOIN neurons a ON a.run_id = ? AND a.layer = ids.layer AND a.neuron = ids.neuron
        LEFT JOIN neurons b ON b.run_id = ? AND b.layer = ids.layer AND b.neuron = ids.neuron
        ORDER BY least(coalesce(rank_a, 2147483647), coalesce(rank_b, 2147483647)), ids.layer, ids.neuron""",
                  [run_a, k, run_b, k, k, k, run_a, run_b])


# The SQL console (pages/6_SQL.py). Its queries are the user's, so they run through store.run_user_sql:
# a validator, a sandboxed connection, a row cap and a time limit.
SQL_MAX_ROWS = 10_000
SQL_TIMEOUT_S = 5


def user_sql(path: str, sql: str) -> tuple[pl.DataFrame, bool]:
    """Not cached: the console reruns a query on request, and a cache would hold every user's results."""
    return store.run_user_sql(path, sql, max_rows=SQL_MAX_ROWS, timeout_s=SQL_TIMEOUT_S)


@st.cache_data(show_spinner=SPINNER)
def schema(path: str, version: float) -> pl.DataFrame:
    """Every table and view of the store with its columns, in schema order."""
    return _frame(path, version, """
        SELECT table_name, column_name, data_type FROM duckdb_columns()
        WHERE database_name = current_database() AND schema_name = 'main' AND NOT internal
        ORDER BY table_name, column_index""")


def example_sql(run_id: str) -> str:
    run = run_id.replace("'", "''")
    return f"""-- The 20 neurons whose change reduced toxicity most in this run
SELECT layer, neuron, group_code, cos, act, act_dpo, delta
FROM neurons
WHERE run_id = '{run}'
ORDER BY delta DESC
LIMIT 20"""


@st.cache_data(show_spinner=SPINNER)
def revised_continuations(path: str, version: float, run_id: str) -> pl.DataFrame:
    """One row per continuation read by a MaRCo-style revision (stage detox), the most divergent first:
    its largest expert/anti-expert JS divergence and how many tokens were masked. Empty for runs
    without that stage."""
    return _frame(path, version, """
        SELECT variant, prompt_id, max(jsd) AS max_jsd, count(*) FILTER (WHERE masked) AS n_masked
        FROM revisions WHERE run_id = ? GROUP BY variant, prompt_id ORDER BY max_jsd DESC, prompt_id""", [run_id])


@st.cache_data(show_spinner=SPINNER)
def revision(path: str, version: float, run_id: str, variant: str, prompt_id: int) -> pl.DataFrame:
    """The tokens of one revised continuation with their divergence, and the prompt and both texts."""
    return _frame(path, version, """
        SELECT r.position, r.token, r.jsd, r.masked, r.regenerated, r.original, r.revised, g.prompt
        FROM revisions r LEFT JOIN generations g ON g.run_id = r.run_id AND g.variant = r.variant AND g.prompt_id = r.prompt_id
        WHERE r.run_id = ? AND r.variant = ? AND r.prompt_id = ? ORDER BY r.position""", [run_id, variant, prompt_id])
