"""The Interventions page's detox part, driven through Streamlit's AppTest on the tiny world's store."""

import shutil
from pathlib import Path

import duckdb
import pytest

import store
from tests.test_app import chart_rows, open_page

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "app" / "pages" / "4_Interventions.py")


@pytest.fixture
def tiny_store_env(tiny_run, tmp_path, monkeypatch):
    cfg, run_id = tiny_run
    path = tmp_path / "s.duckdb"
    shutil.copyfile(cfg.run.store, path)
    monkeypatch.setenv("STORE", str(path))
    monkeypatch.syspath_prepend(str(ROOT / "app"))  # as `streamlit run app/Home.py` does for its pages
    return cfg, run_id, path


def stored(path, sql: str, params: list) -> list[tuple]:
    con = store.connect(path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_detox_rows_are_listed_with_the_interventions(tiny_store_env):
    cfg, run_id, _ = tiny_store_env
    at = open_page(PAGE, run_id)
    assert not at.exception
    ids = at.dataframe[0].value["intervention_id"].tolist()
    assert ids[:2] == ["base", "dpo"]
    assert {f"poe_{a:g}" for a in cfg.detox.alpha} | {"marco"} <= set(ids)


def test_divergence_view_follows_the_chosen_continuation(tiny_store_env):
    cfg, run_id, path = tiny_store_env
    at = open_page(PAGE, run_id)
    picker = at.main.selectbox[1]
    most = stored(path, "SELECT prompt_id FROM revisions WHERE run_id = ? ORDER BY jsd DESC, prompt_id LIMIT 1", [run_id])[0][0]
    assert picker.value == ("marco", most)  # the most divergent continuation comes first
    for choice in (picker.options[0], picker.options[-1]):
        pid = int(choice.split()[1])
        at.main.selectbox[1].set_value(("marco", pid)).run()
        assert not at.exception
        want = stored(path, "SELECT jsd, revised FROM revisions WHERE run_id = ? AND prompt_id = ? ORDER BY position",
                      [run_id, pid])
        assert chart_rows(at, -1, "jsd") == pytest.approx([j for j, _ in want])
        assert len(want) == cfg.record.new_tokens
        assert want[0][1] in at.markdown[-1].value


def test_a_run_without_revisions_says_so(tiny_store_env):
    _, run_id, path = tiny_store_env
    con = duckdb.connect(str(path))
    con.execute("DELETE FROM revisions WHERE run_id = ?", [run_id])
    con.close()
    at = open_page(PAGE, run_id)
    assert not at.exception
    assert any("No revisions in this run" in c.value for c in at.caption)
