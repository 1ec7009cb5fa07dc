"""Sharing one run: `python -m pipeline export` writes a single-run store (or Parquet files) that the
app, the Python client and the DuckDB command line client open."""

import errno
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

import store
from pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
DUCKDB_CLI = Path(sys.executable).parent / "duckdb"  # duckdb-cli, pinned in requirements-dev.txt


@pytest.fixture
def two_runs(tiny_run, tmp_path):
    """A copy of the tiny world's store plus a second run with 7 generations of its own."""
    cfg, run_id = tiny_run
    src = tmp_path / "full.duckdb"
    shutil.copyfile(cfg.run.store, src)
    frame = pl.DataFrame({"variant": ["base"] * 7, "prompt_id": list(range(7)), "prompt": ["p"] * 7,
                          "continuation": ["c"] * 7, "toxicity": [0.9] * 7, "scorer": ["s==1"] * 7})
    other = store.write_run(src, run={"name": "other", "model": "m2", "config": {}, "config_hash": "h2", "packages": {}},
                            stages=[], tables={"generations": frame})
    return src, run_id, other


def counts(path, run_id=None):
    """Rows per table (of one run, if given) through the Python client, read-only."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        where = "" if run_id is None else " WHERE run_id = ?"
        return {t: con.execute(f'SELECT count(*) FROM "{t}"' + ("" if t == "schema_version" else where),
                               [] if t == "schema_version" or run_id is None else [run_id]).fetchall()[0][0]
                for t in tables}
    finally:
        con.close()


def test_export_holds_exactly_one_run_with_all_its_rows(two_runs, tmp_path, capsys):
    src, run_id, other = two_runs
    out = tmp_path / "share.duckdb"
    assert main(["export", "--run", run_id, "--store", str(src), "--out", str(out)]) == 0
    assert run_id in capsys.readouterr().out
    assert counts(out) == counts(src, run_id)
    assert counts(out)["neurons"] > 0 and counts(out)["interventions"] > 0
    con = store.connect(out)  # the schema version check passes: same version as the source
    assert con.execute("SELECT run_id FROM runs").fetchall() == [(run_id,)]
    assert con.execute("SELECT count(*) FROM generations WHERE toxicity = 0.9 AND prompt = 'p'").fetchall() == [(0,)]
    assert out.stat().st_size < src.stat().st_size


def test_exported_store_opens_in_the_app(two_runs, tmp_path, monkeypatch):
    src, run_id, _ = two_runs
    out = store.export_run(src, run_id, tmp_path / "share.duckdb")
    monkeypatch.setenv("STORE", str(out))
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=60).run()
    assert not at.exception
    assert at.sidebar.selectbox[0].value == run_id and len(at.sidebar.selectbox[0].options) == 1


def test_exported_store_opens_in_the_duckdb_cli(two_runs, tmp_path):
    src, run_id, _ = two_runs
    out = store.export_run(src, run_id, tmp_path / "share.duckdb")
    query = ("SELECT count(*) AS n, sum(delta_rank) AS s FROM neurons; "
             "SELECT config->>'$.run.name' AS name FROM runs; SELECT max(cum_share) > 0.99 AS top FROM cumulative;")
    res = subprocess.run([str(DUCKDB_CLI), "-readonly", "-csv", str(out), "-c", query],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    n = counts(out)["neurons"]
    assert res.stdout.split() == ["n,s", f"{n},{n * (n + 1) // 2}", "name", "tiny", "top", "true"]


def test_full_store_opens_in_the_duckdb_cli(two_runs):
    src, run_id, other = two_runs
    res = subprocess.run([str(DUCKDB_CLI), "-readonly", "-csv", "-noheader", str(src), "-c",
                          "SELECT run_id FROM runs ORDER BY run_id"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == sorted([run_id, other])


def test_parquet_export_writes_one_file_per_table(two_runs, tmp_path, capsys):
    src, run_id, _ = two_runs
    out = tmp_path / "parquet"
    assert main(["export", "--run", run_id, "--store", str(src), "--parquet", str(out)]) == 0
    expected = counts(src, run_id)
    assert {p.stem for p in out.glob("*.parquet")} == set(expected)
    for table, n in expected.items():
        frame = pl.read_parquet(out / f"{table}.parquet")
        assert frame.height == n, table
        if table != "schema_version":
            assert frame["run_id"].unique().to_list() in ([run_id], [])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_existing_target_needs_force(two_runs, tmp_path, capsys):
    src, run_id, other = two_runs
    out = tmp_path / "share.duckdb"
    store.export_run(src, other, out)
    before = digest(out)
    assert main(["export", "--run", run_id, "--store", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--force" in err and "\n" not in err
    assert digest(out) == before
    assert main(["export", "--run", run_id, "--store", str(src), "--out", str(out), "--force"]) == 0
    assert counts(out) == counts(src, run_id)


def test_force_never_replaces_a_folder_with_other_files(two_runs, tmp_path, capsys):
    src, run_id, _ = two_runs
    before = digest(src)
    assert main(["export", "--run", run_id, "--store", str(src), "--parquet", str(src.parent), "--force"]) == 2
    assert "other files than Parquet" in capsys.readouterr().err
    assert src.exists() and digest(src) == before
    out = tmp_path / "parquet"
    for _ in range(2):  # a folder of an earlier export is replaced
        assert main(["export", "--run", run_id, "--store", str(src), "--parquet", str(out), "--force"]) == 0
    assert {p.suffix for p in out.iterdir()} == {".parquet"}


def test_unknown_run_names_the_runs_there(two_runs, tmp_path, capsys):
    src, run_id, other = two_runs
    assert main(["export", "--run", "nope", "--store", str(src), "--out", str(tmp_path / "x.duckdb")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no run 'nope'" in err and other in err and run_id in err and "\n" not in err
    assert not (tmp_path / "x.duckdb").exists()


def test_parquet_force_keeps_the_earlier_export_when_the_new_one_cannot_move_in(two_runs, tmp_path, monkeypatch):
    src, run_id, other = two_runs
    out = tmp_path / "parquet"
    store.export_parquet(src, other, out)
    before = {p.name: digest(p) for p in out.iterdir()}
    real = Path.rename

    def rename(self, target):  # the new export fails to move in; setting the old one aside and back works
        if Path(target) == out and pl.read_parquet(self / "runs.parquet")["run_id"].to_list() == [run_id]:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(store.StoreError, match="unchanged"):
        store.export_parquet(src, run_id, out, force=True)
    assert {p.name: digest(p) for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_out_that_is_the_source_says_so_even_without_force(two_runs, capsys):
    src, run_id, _ = two_runs
    assert main(["export", "--run", run_id, "--store", str(src), "--out", str(src)]) == 2
    assert "is the source store itself" in capsys.readouterr().err


def test_out_in_no_folder_or_that_is_a_folder_is_one_line(two_runs, tmp_path, capsys):
    src, run_id, _ = two_runs
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder").mkdir()
    for out, message in [(tmp_path / "a-file" / "e.duckdb", "its folder cannot be made"),
                         (tmp_path / "folder", "is a folder; give a file path")]:
        assert main(["export", "--run", run_id, "--store", str(src), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
