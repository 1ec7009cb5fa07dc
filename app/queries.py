"""Every read the app makes. Connections are read-only and opened per query, so the pipeline can
swap in a new store file at any time; results are cached by store path, file version and arguments.
No model code and no torch here: a hosted app needs only the store file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import polars as pl
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `store` lives beside app/

import store  # noqa: E402

DEFAULT_STORE = "store/dpo_neurons.duckdb"


def store_path() -> str:
    return os.environ.get("STORE", DEFAULT_STORE)


def store_version(path: str) -> float:
    """Cache key part that changes whenever the pipeline swaps in a new file."""
    return os.stat(path).st_mtime_ns if os.path.exists(path) else 0.0


def _frame(path: str, sql: str, params: list | None = None) -> pl.DataFrame:
    con = store.connect(path, read_only=True)
    try:
        return con.sql(sql, params=params or []).pl()
    finally:
        con.close()


@st.cache_data(show_spinner=False)
def runs(path: str, version: float) -> pl.DataFrame:
    return _frame(path, "SELECT run_id, created_at, name, model, status, config_hash FROM runs ORDER BY created_at DESC")


@st.cache_data(show_spinner=False)
def stages(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, "SELECT stage, cache_key, seconds, CAST(summary AS VARCHAR) AS summary FROM stages "
                        "WHERE run_id = ? ORDER BY stage", [run_id])


@st.cache_data(show_spinner=False)
def world_summary(path: str, version: float, run_id: str) -> dict | None:
    df = _frame(path, """
        SELECT summary->>'ppl_model' AS ppl_model, summary->>'ppl_unigram' AS ppl_unigram,
               summary->>'toxic_fraction' AS toxic_fraction, summary->>'n_params' AS n_params,
               summary->>'sample_toxicity' AS sample_toxicity, summary->>'scorer' AS scorer, seconds
        FROM stages WHERE run_id = ? AND stage = 'world'""", [run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=False)
def generations(path: str, version: float, run_id: str, variant: str, min_toxicity: float) -> pl.DataFrame:
    return _frame(path, """
        SELECT prompt_id, prompt, continuation, toxicity, scorer FROM generations
        WHERE run_id = ? AND variant = ? AND toxicity >= ? ORDER BY prompt_id""", [run_id, variant, min_toxicity])


@st.cache_data(show_spinner=False)
def variants(path: str, version: float, run_id: str) -> list[str]:
    return _frame(path, "SELECT DISTINCT variant FROM generations WHERE run_id = ? ORDER BY variant",
                  [run_id])["variant"].to_list()


@st.cache_data(show_spinner=False)
def toxicity_by_variant(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, """
        SELECT variant, avg(toxicity) AS toxicity, avg((toxicity > 0.5)::INT) AS toxic_share, count(*) AS n,
               any_value(scorer) AS scorer
        FROM generations WHERE run_id = ? GROUP BY variant ORDER BY variant""", [run_id])


@st.cache_data(show_spinner=False)
def probe_metrics(path: str, version: float, run_id: str) -> dict | None:
    df = _frame(path, "SELECT n_train, n_val, train_accuracy, val_accuracy, val_roc_auc, layer FROM probe_metrics "
                      "WHERE run_id = ?", [run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=False)
def attribution(path: str, version: float, run_id: str) -> dict | None:
    df = _frame(path, "SELECT * EXCLUDE (run_id) FROM attribution WHERE run_id = ?", [run_id])
    return df.row(0, named=True) if df.height else None


@st.cache_data(show_spinner=False)
def group_summary(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, """
        SELECT group_code, effect, n_neurons, sum_delta, share_gross, share_net, ci_low, ci_high
        FROM group_summary WHERE run_id = ?
        ORDER BY effect DESC, share_gross DESC""", [run_id])


@st.cache_data(show_spinner=False)
def cumulative(path: str, version: float, run_id: str, max_points: int = 2000) -> pl.DataFrame:
    """The cumulative curve, thinned to about max_points rows for drawing (every top-ranked neuron
    is kept, the long tail is sampled evenly)."""
    return _frame(path, """
        WITH c AS (SELECT delta_rank, cum_share FROM cumulative WHERE run_id = ?),
             n AS (SELECT count(*) AS total FROM c)
        SELECT delta_rank, cum_share FROM c, n
        WHERE delta_rank <= ? / 2 OR delta_rank % greatest(1, total // (? / 2)) = 0 OR delta_rank = total
        ORDER BY delta_rank""", [run_id, max_points, max_points])


@st.cache_data(show_spinner=False)
def layer_groups(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, "SELECT layer, group_code, n_neurons, sum_delta FROM layer_groups WHERE run_id = ? "
                        "ORDER BY layer, group_code", [run_id])


@st.cache_data(show_spinner=False)
def layers(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, "SELECT variant, layer, mlp_proj FROM layers WHERE run_id = ? ORDER BY variant, layer", [run_id])


@st.cache_data(show_spinner=False)
def dpo_curve(path: str, version: float, run_id: str) -> pl.DataFrame:
    return _frame(path, "SELECT step, loss, reward_margin, reward_accuracy FROM dpo_curve WHERE run_id = ? ORDER BY step",
                  [run_id])


@st.cache_data(show_spinner=False)
def interventions(path: str, version: float, run_id: str) -> pl.DataFrame:
    """Paper Table 1 order: the base and DPO models first, then each kind by size."""
    return _frame(path, """
        SELECT intervention_id, kind, n_neurons, toxicity, toxic_share, perplexity, f1, recovered
        FROM interventions WHERE run_id = ?
        ORDER BY kind NOT IN ('base', 'dpo'), kind = 'dpo', kind, n_neurons, intervention_id""", [run_id])
