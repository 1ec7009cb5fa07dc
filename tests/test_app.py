"""The app's first page, driven through Streamlit's AppTest on a real store."""

import os
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


ATTRIBUTION = str(ROOT / "app" / "pages" / "1_Attribution.py")


@pytest.fixture
def app_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "app"))  # as `streamlit run app/Home.py` does for its pages


def open_page(page: str, run_id: str) -> AppTest:
    """A page as it renders with run_id picked in the sidebar."""
    at = AppTest.from_file(page, default_timeout=60)
    at.session_state["run_id"] = run_id
    return at.run()


def test_attribution_page_shows_groups_with_intervals(two_run_store, app_on_path):
    first, _ = two_run_store
    at = open_page(ATTRIBUTION, first)
    assert not at.exception
    headline = at.markdown[0].value
    assert "of the reduction comes from dampened toxic neurons (TP-)" in headline
    groups = at.dataframe[0].value
    assert set(groups["group_code"]) == {"TP-", "TN+", "AP+", "AN-", "TP+", "TN-", "AP-", "AN+"}
    assert (groups["ci_low"] <= groups["ci_high"]).all()
    con = store.connect(os.environ["STORE"])
    tp = con.execute("SELECT share_gross FROM group_summary WHERE run_id = ? AND group_code = 'TP-'", [first]).fetchall()[0][0]
    assert f"{tp:.1%}" in headline
    assert len(at.get("vega_lite_chart")) >= 4


def test_attribution_page_without_attribution_says_so(two_run_store, app_on_path):
    _, second = two_run_store
    at = open_page(ATTRIBUTION, second)
    assert not at.exception
    assert "no attribution" in at.info[0].value


def test_interventions_page_table_and_layer_choice(two_run_store, app_on_path):
    first, second = two_run_store
    at = open_page(str(ROOT / "app" / "pages" / "4_Interventions.py"), first)
    assert not at.exception
    table = at.dataframe[0].value
    assert table["intervention_id"].tolist()[:2] == ["base", "dpo"]
    assert table["recovered"].tolist()[:2] == [0.0, 1.0]

    def layer_variants():
        """The variants in the last chart's data, read back from its Arrow payload."""
        import pyarrow as pa

        chart = at.get("vega_lite_chart")[-1].proto
        payloads = [d.data.data for d in chart.datasets] + ([chart.data.data] if chart.data.data else [])
        return {v for p in payloads for v in pa.ipc.open_stream(p).read_all().column("variant").to_pylist()}

    picker = at.main.selectbox[0]
    other = picker.options[-1]
    picker.set_value(other).run()
    assert layer_variants() == {"base", "dpo", other}
    at.session_state["run_id"] = second
    at.run()
    assert "no interventions" in at.info[0].value
