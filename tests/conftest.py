"""Shared fixtures. The tiny demo world is trained once per session (about a minute) and every test
that needs a model or a store reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config, runner

TINY_WORLD = {
    "n_sentences": 20_000,
    "train_steps": 150,
    "n_probe": 200,
    "n_prompts": 40,
    "n_pairs": 100,
    "n_heldout": 300,
    "n_samples": 24,
}


def tiny_config(tmp: Path, **world) -> config.Config:
    return config.from_dict({
        "run": {"name": "tiny", "cache_dir": str(tmp / "cache"), "store": str(tmp / "store.duckdb"), "device": "cpu"},
        "model": {"path": "world"},
        "world": TINY_WORLD | world,
    }, source="tiny.toml")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, run_id) of one pipeline run on the tiny world; its cache and store are shared."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(tmp)
    run_id = runner.run(cfg, log=lambda *_: None)
    return cfg, run_id


@pytest.fixture(scope="session")
def tiny_world_dir(tiny_run) -> Path:
    cfg, _ = tiny_run
    key = runner.cache_keys(cfg)["world"]
    return runner.stage_dir(cfg, "world", key)
