"""The store: atomic runs, clear errors for bad files, many runs side by side."""

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

import store


def a_run(name="r"):
    return {"name": name, "model": "m", "config": {"x": 1}, "config_hash": "h-" + name, "packages": {"duckdb": "x"}}


def gens(n, toxic=0.5):
    return pl.DataFrame({"variant": ["base"] * n, "prompt_id": list(range(n)), "prompt": ["p"] * n,
                         "continuation": ["c"] * n, "toxicity": [toxic] * n, "scorer": ["s==1"] * n})


def rows(path):
    con = store.connect(path)
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("runs", "stages", "generations")}
    finally:
        con.close()


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


STAGE = [{"stage": "world", "cache_key": "k", "seconds": 1.0, "summary": {"ppl_model": 3.0}}]


def test_runs_coexist_and_are_keyed_by_run_id(tmp_path):
    path = tmp_path / "s.duckdb"
    r1 = store.write_run(path, run=a_run("one"), stages=STAGE, tables={"generations": gens(3)})
    r2 = store.write_run(path, run=a_run("two"), stages=STAGE, tables={"generations": gens(5)})
    con = store.connect(path)
    counts = dict(con.execute("SELECT run_id, count(*) FROM generations GROUP BY run_id").fetchall())
    assert counts == {r1: 3, r2: 5}
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(store.SCHEMA_VERSION,)]
    assert store.find_run(path, "h-two") == r2 and store.find_run(path, "h-none") is None


@pytest.mark.parametrize("breaker", ["bad_table", "bad_column", "raise_midway"])
def test_failed_write_leaves_store_byte_for_byte(tmp_path, monkeypatch, breaker):
    path = tmp_path / "s.duckdb"
    store.write_run(path, run=a_run("one"), stages=STAGE, tables={"generations": gens(3)})
    before_bytes, before_rows = digest(path), rows(path)
    tables = {"generations": gens(4)}
    if breaker == "bad_table":
        tables["no_such_table"] = gens(1)
    elif breaker == "bad_column":
        tables["generations"] = gens(4).rename({"toxicity": "toxicty"})
    else:
        real = store._insert

        def insert_then_fail(con, *args):
            real(con, *args)
            raise RuntimeError("disk full")

        monkeypatch.setattr(store, "_insert", insert_then_fail)
    with pytest.raises((store.StoreError, RuntimeError)):
        store.write_run(path, run=a_run("two"), stages=STAGE, tables=tables)
    assert digest(path) == before_bytes
    assert rows(path) == before_rows
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


KILLED_WRITER = """
import os, signal, sys
import polars as pl
import store
class DieAtCheckpoint:  # the run is committed into the temp file's WAL, never checkpointed
    def __init__(self, con):
        self.con = con
    def execute(self, sql, *args):
        if sql == "CHECKPOINT":
            os.kill(os.getpid(), signal.SIGKILL)
        return self.con.execute(sql, *args)
    def __getattr__(self, name):
        return getattr(self.con, name)
real = store._insert
store._insert = lambda con, *args: real(DieAtCheckpoint(con), *args)
store.write_run(sys.argv[1], run={"name": "killed", "model": "m", "config": {}, "config_hash": "k", "packages": {}},
                stages=[], tables={"generations": pl.DataFrame({"variant": ["base"], "prompt_id": [0], "prompt": ["p"],
                "continuation": ["c"], "toxicity": [0.5], "scorer": ["s==1"]})})
"""


def test_a_killed_writers_leftovers_never_reach_a_later_run(tmp_path, monkeypatch):
    path = tmp_path / "s.duckdb"
    store.write_run(path, run=a_run("one"), stages=STAGE, tables={"generations": gens(3)})
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=Path(store.__file__).parents[1],
                             stderr=subprocess.PIPE)
    assert child.wait() == -9, child.stderr.read().decode()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "the killed writer left nothing to trip over"
    monkeypatch.setattr(os, "getpid", lambda: child.pid)  # a container's writer is PID 1 every time
    store.write_run(path, run=a_run("two"), stages=STAGE, tables={"generations": gens(5)})
    assert sorted(r[2] for r in rows(path)["runs"]) == ["one", "two"]


def test_reader_sees_old_or_new_run_set_never_half(tmp_path):
    path = tmp_path / "s.duckdb"
    store.write_run(path, run=a_run("zero"), stages=STAGE, tables={"generations": gens(50)})
    seen, errors, done = set(), [], threading.Event()

    def read():
        while not done.is_set():
            try:
                con = store.connect(path)
                n_runs, n_gens = con.execute(
                    "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM generations)").fetchall()[0]
                con.close()
                seen.add((n_runs, n_gens))
            except Exception as e:  # noqa: BLE001 (any failure is what the test looks for)
                errors.append(e)

    t = threading.Thread(target=read)
    t.start()
    for k in range(2, 7):
        store.write_run(path, run=a_run(f"r{k}"), stages=STAGE, tables={"generations": gens(50)})
        deadline = time.monotonic() + 60
        while (k, 50 * k) not in seen and not errors and time.monotonic() < deadline:  # the reader runs between writes
            time.sleep(0.01)
    done.set()
    t.join()
    assert not errors
    assert seen == {(k, 50 * k) for k in range(1, 7)}


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(store.StoreError, match="not found.*make pipeline"):
        store.connect(tmp_path / "nope.duckdb")


@pytest.mark.parametrize("content", [b"", b"garbage" * 1000])
def test_corrupt_store_is_a_clear_error_and_is_not_overwritten(tmp_path, content):
    path = tmp_path / "s.duckdb"
    path.write_bytes(content)
    with pytest.raises(store.StoreError, match="cannot be opened") as e:
        store.connect(path)
    assert "\n" not in str(e.value)
    with pytest.raises(store.StoreError):
        store.write_run(path, run=a_run(), stages=STAGE, tables={})
    assert path.read_bytes() == content


@pytest.mark.parametrize("keep, error", [
    (lambda n: n // 10, "cannot be opened"),  # DuckDB's own metadata is gone
    (lambda n: n - 4096, "truncated"),  # opens and lists its tables; reading the last block would fail later
    (lambda n: n - 300_000, "truncated"),
])
def test_truncated_store_is_refused_when_opened(tmp_path, keep, error):
    path = tmp_path / "s.duckdb"
    store.write_run(path, run=a_run(), stages=STAGE, tables={"generations": gens(20_000)})
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    for how in ({}, {"snapshot": True}):  # the console's sandbox opens per query, after the app's open checked
        with pytest.raises(store.StoreError, match=error) as e:
            store.connect(path, **how)
        assert "\n" not in str(e.value)
    with pytest.raises(store.StoreError):
        store.write_run(path, run=a_run("b"), stages=STAGE, tables={})
    assert path.read_bytes() == data[:keep(len(data))]


def test_a_store_cut_inside_its_data_is_refused_though_its_free_blocks_would_cover_the_cut(tmp_path):
    """A second run leaves free blocks below the highest block of table data: cut just that block off and
    the file still holds as many blocks as are in use, yet a read fails."""
    path = tmp_path / "s.duckdb"
    for name in ("a", "b"):
        store.write_run(path, run=a_run(name), stages=STAGE, tables={"generations": gens(20_000)})
    with duckdb.connect(str(path), read_only=True) as con:
        block_size, total, free = con.execute("SELECT block_size, total_blocks, free_blocks FROM pragma_database_size() "
                                              "WHERE database_name = current_database()").fetchall()[0]
        highest, table = max((con.execute(f"SELECT max(block_id) FROM pragma_storage_info('{t}')").fetchall()[0][0] or 0, t)
                             for t in store._tables(con))
    assert highest + 1 > total - free  # the layout this test is about
    cut = path.read_bytes()[:store.FILE_HEADERS + highest * block_size]
    path.write_bytes(cut)
    with duckdb.connect(str(path), read_only=True) as con, pytest.raises(duckdb.IOException):
        con.execute(f"SELECT * FROM {table}").fetchall()  # the file really is broken
    for how in ({}, {"snapshot": True}):
        with pytest.raises(store.StoreError, match="truncated"):
            store.connect(path, **how)
    assert path.read_bytes() == cut


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "s.duckdb"
    store.write_run(path, run=a_run(), stages=STAGE, tables={})
    con = duckdb.connect(str(path))
    con.execute("UPDATE schema_version SET version = 99")
    con.close()
    with pytest.raises(store.StoreError, match="schema version 99"):
        store.connect(path)


def test_foreign_duckdb_file_is_refused(tmp_path):
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t (x INT)")
    con.close()
    with pytest.raises(store.StoreError, match="not a dpo-neurons store"):
        store.connect(path)


def test_schema_readme_documents_every_column():
    from pathlib import Path

    root = Path(store.__file__).parent
    readme = (root / "README.md").read_text()
    con = duckdb.connect()
    con.execute(store.SCHEMA_SQL)
    for table, column in con.execute("SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal").fetchall():
        assert f"`{table}`" in readme, f"store/README.md does not document table {table}"
        assert f"`{column}`" in readme, f"store/README.md does not document {table}.{column}"


def test_an_empty_duckdb_file_is_no_store_to_read_but_one_to_write(tmp_path):
    path = tmp_path / "s.duckdb"
    duckdb.connect(str(path)).close()  # what `duckdb s.duckdb` without -readonly leaves behind
    with pytest.raises(store.StoreError, match="holds no runs yet") as e:
        store.connect(path)
    assert "\n" not in str(e.value)
    with pytest.raises(store.StoreError, match="holds no runs yet"):
        store.export_run(path, "any", tmp_path / "share.duckdb")
    run_id = store.write_run(path, run=a_run(), stages=STAGE, tables={"generations": gens(2)})
    assert rows(path)["runs"][0][0] == run_id
