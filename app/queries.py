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
