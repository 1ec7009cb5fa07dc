"""The app's first page, driven through Streamlit's AppTest on a real store."""

import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

import store
from tests.conftest import TINY_WORLD

ROOT = Path(__file__).resolve().parents[1]
HOME = str(ROOT / "app" / "Home.py")


@pytest.fixture
def two_run_store(tiny_run, tmp_path, monkeypatch):
    """The tiny world's store plus a second run whose generations all score 0.9."""
    cfg, run_id = tiny_run
    path = tmp_path / "s.duckdb"
    shutil.copyfile(cfg.run.store, path)
    frame = pl.DataFrame({"variant": ["base"] * 3, "prompt_id": [0, 1, 2], "prompt": ["a", "b", "c"],
                          "continuation": ["x", "y", "z"], "toxicity": [0.9] * 3, "scorer": ["s==1"] * 3})
    other = store.write_run(path, run={"name": "second", "model": "m2", "config": {}, "config_hash": "h2",
                                       "packages": {}}, stages=[], tables={"generations": frame})
    monkeypatch.setenv("STORE", str(path))
    return run_id, other


def test_home_lists_runs_and_samples(two_run_store):
    first, second = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert not at.exception
    shown_runs = at.dataframe[0].value["run_id"].tolist()
    assert set(shown_runs) == {first, second}
    assert at.sidebar.selectbox[0].value == second  # newest first
    assert at.dataframe[-1].value.shape[0] == 3


def test_picking_a_run_shows_its_model_and_samples(two_run_store):
    first, _ = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.sidebar.selectbox[0].set_value(first).run()
    assert not at.exception
    assert any("demo world" in m.value for m in at.markdown)
    assert [m.label for m in at.metric][:2] == ["Held-out perplexity", "Unigram perplexity"]
    assert at.dataframe[-1].value.shape[0] == TINY_WORLD["n_prompts"]


def test_toxicity_filter_changes_the_table(two_run_store):
    first, _ = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.sidebar.selectbox[0].set_value(first).run()
    n_all = at.dataframe[-1].value.shape[0]
    at.slider[0].set_value(0.5).run()
    shown = at.dataframe[-1].value
    assert shown.shape[0] < n_all and (shown["toxicity"] >= 0.5).all()


def test_missing_store_shows_an_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("STORE", str(tmp_path / "none.duckdb"))
    at = AppTest.from_file(HOME, default_timeout=30).run()
    assert not at.exception
    assert "make pipeline" in at.error[0].value


def test_app_never_imports_torch(two_run_store):
    """A hosted app has the store file alone: rendering the page must not pull in model code."""
    code = ("import sys; from streamlit.testing.v1 import AppTest; "
            f"at = AppTest.from_file({HOME!r}, default_timeout=60).run(); assert not at.exception; "
            "bad = [m for m in ('torch', 'transformers', 'pipeline') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
