"""The SQL console: good queries return the right rows, every way out of the sandbox is refused with a
clear message by each wall on its own, a runaway query is stopped, and the store never changes."""

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

import store

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "app" / "pages" / "6_SQL.py")
N_NEURONS = 40
RUNAWAY = "SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range + b.range = 7"


def planted_neurons(seed: int) -> pl.DataFrame:
    """Neurons whose delta is a known permutation, so a query's answer can be computed here independently."""
    import random

    r = random.Random(seed)
    delta = [round(r.uniform(-1, 1), 6) for _ in range(N_NEURONS)]
    rank = {d: i + 1 for i, d in enumerate(sorted(delta, reverse=True))}
    groups = ["TP-", "AP+", "TN+", "AN-", "TP+"]
    return pl.DataFrame({
        "layer": [i // 10 for i in range(N_NEURONS)], "neuron": [i % 10 for i in range(N_NEURONS)],
        "cos": [r.uniform(-1, 1) for _ in range(N_NEURONS)], "act": [r.uniform(-1, 1) for _ in range(N_NEURONS)],
        "act_dpo": [r.uniform(-1, 1) for _ in range(N_NEURONS)], "proj": [0.0] * N_NEURONS,
        "proj_dpo": [0.0] * N_NEURONS, "delta": delta, "dact": [0.0] * N_NEURONS,
        "group_code": [groups[i % len(groups)] for i in range(N_NEURONS)], "delta_rank": [rank[d] for d in delta],
        "cum_share": [sum(e for e in delta if e >= d) / sum(delta) for d in delta]})


@pytest.fixture
def small_store(tmp_path):
    """A store of two runs written by the store's own writer: (path, {run_id: its neurons frame})."""
    path = tmp_path / "store" / "s.duckdb"
    frames = {}
    for seed in (1, 2):
        frame = planted_neurons(seed)
        run_id = store.write_run(path, run={"name": f"seed{seed}", "model": "m", "config": {}, "config_hash": f"h{seed}",
                                            "packages": {}}, stages=[], tables={"neurons": frame})
        frames[run_id] = frame
    return path, frames


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(path, sql, max_rows=1000, timeout_s=10.0):
    return store.run_user_sql(path, sql, max_rows=max_rows, timeout_s=timeout_s)


def test_good_queries_return_the_planted_rows(small_store):
    path, frames = small_store
    run_id, frame = next(iter(frames.items()))
    top = frame.sort("delta", descending=True).head(5)
    got, truncated = run(path, f"SELECT layer, neuron, delta FROM neurons WHERE run_id = '{run_id}' "
                               "ORDER BY delta DESC LIMIT 5")
    assert got.to_dicts() == top.select("layer", "neuron", "delta").to_dicts() and not truncated

    got, _ = run(path, "WITH g AS (SELECT run_id, group_code, sum(delta) AS s FROM neurons GROUP BY ALL) "
                       f"FROM g SELECT group_code, s WHERE run_id = '{run_id}' ORDER BY group_code;")
    want = frame.group_by("group_code").agg(pl.col("delta").sum().alias("s")).sort("group_code")
    assert got["group_code"].to_list() == want["group_code"].to_list()
    assert got["s"].to_list() == pytest.approx(want["s"].to_list())

    assert run(path, "FROM runs SELECT count(*) AS n")[0]["n"].item() == len(frames)
    assert set(run(path, "TABLE runs")[0]["run_id"]) == set(frames)
    assert run(path, "VALUES (1, 'a'), (2, 'b')")[0].height == 2
    assert "neurons" in run(path, "SHOW TABLES")[0]["name"].to_list()
    assert run(path, "DESCRIBE neurons")[0]["column_name"].to_list() == ["run_id", *frame.columns]
    assert run(path, "SUMMARIZE neurons")[0].height == len(frame.columns) + 1
    assert run(path, "SELECT * FROM range(7)")[0].height == 7
    pivot, _ = run(path, f"FROM neurons PIVOT (count(*) FOR group_code IN ('TP-', 'AP+')) WHERE run_id = '{run_id}'")
    assert pivot["TP-"].sum() == frame.filter(pl.col("group_code") == "TP-").height
    assert "neurons" in run(path, "SELECT table_name FROM duckdb_columns() WHERE column_name = 'delta'")[0]["table_name"]
    for view in ("duckdb_tables", "information_schema.columns", "sqlite_master", "pg_catalog.pg_tables"):
        assert run(path, f"SELECT count(*) AS n FROM {view}")[0]["n"].item() > 0, view  # the catalog's own views


def test_the_store_readmes_example_queries_run_in_the_console(small_store):
    path, _ = small_store
    text = (ROOT / "store" / "README.md").read_text().split("## Example queries", 1)[1]
    block = text.split("```sql", 1)[1].split("```", 1)[0]
    examples = [s.query for s in duckdb.extract_statements(block)]
    assert len(examples) >= 5
    for query in examples:
        run(path, query)


def test_truncation_is_reported_never_hidden(small_store):
    path, frames = small_store
    total = sum(f.height for f in frames.values())
    got, truncated = run(path, "SELECT * FROM neurons", max_rows=total - 1)
    assert got.height == total - 1 and truncated
    got, truncated = run(path, "SELECT * FROM neurons", max_rows=total)
    assert got.height == total and not truncated


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An empty folder that queries try to write into; it must stay empty."""
    out = tmp_path / "out"
    out.mkdir()
    return out


def refusals(tmp: Path) -> list[tuple[str, str]]:
    """(query, a word its refusal must name). Files the queries would write live under tmp."""
    return [
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
        ("SELECT * FROM neurons n JOIN read_csv_auto('x.csv') c USING (layer)", "read_csv_auto"),
        ("SELECT * FROM read_parquet('x.parquet')", "read_parquet"),
        ("SELECT * FROM (SELECT * FROM read_text('/etc/hostname'))", "read_text"),
        ("SELECT content FROM read_blob('/etc/hostname')", "read_blob"),
        ("SELECT * FROM read_json_auto('x.json')", "read_json_auto"),
        ("FROM glob('/*')", "glob"),
        ("SELECT * FROM neurons WHERE layer IN (SELECT 1 FROM glob('*'))", "glob"),
        ("SELECT * FROM parquet_scan('x.parquet')", "parquet_scan"),
        ("FROM sniff_csv('/etc/passwd')", "sniff_csv"),
        ("FROM read_duckdb('other.duckdb')", "read_duckdb"),
        ("SELECT * FROM '/etc/passwd.csv'", "/etc/passwd.csv"),
        ('FROM "x.parquet"', "x.parquet"),
        ("DESCRIBE SELECT * FROM read_csv('x.csv')", "read_csv"),
        ("SELECT * FROM query('SELECT * FROM read_csv(''x.csv'')')", "query"),
        ("FROM checkpoint()", "checkpoint"),
        ("SELECT path FROM duckdb_databases", "duckdb_databases"),
        ("SELECT * FROM system.main.pragma_database_list", "pragma_database_list"),
        ("SELECT name, setting FROM pg_catalog.pg_settings", "pg_settings"),
        ("SELECT * FROM neurons WHERE EXISTS (FROM DuckDB_Logs)", "duckdb_logs"),
        ("SELECT current_setting('allowed_paths')", "current_setting"),
        (f"ATTACH '{tmp / 'new.duckdb'}' AS other", "ATTACH"),
        ("DETACH store", "ATTACH"),
        (f"COPY neurons TO '{tmp / 'leak.csv'}'", "COPY"),
        (f"COPY (SELECT * FROM runs) TO '{tmp / 'leak.parquet'}' (FORMAT parquet)", "COPY"),
        (f"EXPORT DATABASE '{tmp / 'exported'}'", "EXPORT"),
        ("INSTALL httpfs", "INSTALL"),
        ("LOAD httpfs", "LOAD"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("CREATE TEMP TABLE t AS SELECT 1", "CREATE"),
        ("CREATE MACRO m() AS 1", "CREATE"),
        ("INSERT INTO runs SELECT * FROM runs", "INSERT"),
        ("UPDATE neurons SET delta = 0", "UPDATE"),
        ("DELETE FROM neurons", "DELETE"),
        ("DROP TABLE neurons", "DROP"),
        ("ALTER TABLE neurons RENAME TO n", "ALTER"),
        ("SET enable_external_access = true", "SET"),
        ("RESET lock_configuration", "SET"),
        ("SET lock_configuration = false", "SET"),
        ("PRAGMA enable_profiling", "PRAGMA"),
        ("CALL pragma_version()", "CALL"),
        ("CHECKPOINT", "CHECKPOINT"),
        ("USE memory", "USE"),
        ("EXPLAIN ANALYZE SELECT 1", "EXPLAIN"),
        ("BEGIN TRANSACTION", "TRANSACTION"),
        (f"IMPORT DATABASE '{tmp / 'exported'}'", "IMPORT DATABASE"),
        ("UPDATE EXTENSIONS", "only a query"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("PIVOT neurons ON group_code", "PIVOT"),
        ("SELECT 1; DROP TABLE neurons", "one statement"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("   ", "empty"),
    ]


def test_every_refusal_is_one_clear_line_and_the_store_is_unchanged(small_store, out_dir):
    path, _ = small_store
    before = digest(path)
    for query, word in refusals(out_dir):
        with pytest.raises(store.SqlRefused) as first_wall:
            store.check_sql(query)
        with pytest.raises(store.SqlRefused) as refused:
            run(path, query)
        message = str(refused.value)
        assert message == str(first_wall.value)
        assert word.lower() in message.lower(), (query, message)
        assert "\n" not in message and len(message) < 300, message
    assert digest(path) == before
    assert not list(out_dir.iterdir()), "a refused query wrote a file"


FILES_OFF, LOCKED, READ_ONLY = "disabled by configuration", "configuration has been locked", "attached in read-only mode"
ESCAPES = [  # what the first wall stops, sent straight to the sandboxed connection, and the wall that stops it
    ("SELECT * FROM read_csv('{csv}')", FILES_OFF), ("SELECT * FROM read_text('/etc/hostname')", FILES_OFF),
    ("FROM glob('/*')", FILES_OFF), ("SELECT * FROM '{csv}'", FILES_OFF), ("ATTACH '{tmp}/new.duckdb' AS other", FILES_OFF),
    ("COPY neurons TO '{tmp}/leak.csv'", FILES_OFF), ("EXPORT DATABASE '{tmp}/exported'", FILES_OFF),
    ("INSTALL httpfs", FILES_OFF), ("LOAD httpfs", "disabled through configuration"), ("CREATE TABLE t AS SELECT 1", READ_ONLY),
    ("DELETE FROM neurons", READ_ONLY), ("DROP TABLE neurons", READ_ONLY), ("SET enable_external_access = true", LOCKED),
    ("SET lock_configuration = false", LOCKED), ("RESET enable_external_access", LOCKED),
    ("SET memory_limit = '100GB'", LOCKED), ("PRAGMA enable_profiling", LOCKED),
]


@pytest.mark.parametrize("query, wall", ESCAPES)
def test_the_sandbox_alone_refuses_what_the_validator_refuses(small_store, out_dir, tmp_path, query, wall):
    """Each refused for the sandbox's reason, not another: a file that is there, and no network needed to fail,
    so that these fail if a setting of the sandbox is lost."""
    path, _ = small_store
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    before = digest(path)
    con = store.connect(path, sandbox=True)
    try:
        with pytest.raises(duckdb.Error, match=wall):
            con.execute(query.format(tmp=out_dir, csv=tmp_path / "x.csv"))
    finally:
        con.close()
    assert digest(path) == before
    assert not list(out_dir.iterdir())


def test_sandbox_settings_hold(small_store):
    path, _ = small_store
    con = store.connect(path, sandbox=True)
    try:
        setting = lambda name: con.execute("SELECT current_setting(?)", [name]).fetchone()[0]  # noqa: E731
        assert setting("enable_external_access") is False and setting("lock_configuration") is True
        assert setting("autoload_known_extensions") is False and setting("autoinstall_known_extensions") is False
        assert setting("threads") == store.SANDBOX_THREADS
        reference = duckdb.connect(config={"memory_limit": store.SANDBOX_MEMORY_LIMIT})
        assert setting("memory_limit") == reference.execute("SELECT current_setting('memory_limit')").fetchone()[0]
        reference.close()
    finally:
        con.close()


def test_sandbox_works_beside_a_plain_reader_of_the_same_file(small_store):
    """DuckDB refuses a second configuration for a file already open in the process; the sandbox attaches it."""
    path, frames = small_store
    plain = store.connect(path)
    try:
        got, _ = run(path, "SELECT count(*) AS n FROM neurons")
        assert got["n"].item() == sum(f.height for f in frames.values())
        assert plain.execute("SELECT count(*) FROM runs").fetchone()[0] == len(frames)
    finally:
        plain.close()


def descendants() -> set[int]:
    """Live processes below this one (the console's dispatchers and their workers), from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        if fields[0] != "Z":
            parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def test_runaway_query_is_stopped_with_a_clear_message(small_store):
    path, _ = small_store
    run(path, "SELECT 1 AS x")  # the dispatcher is up
    before, threads, processes = digest(path), threading.active_count(), descendants()
    start = time.monotonic()
    with pytest.raises(store.SqlRefused, match=r"longer than the console's 0.5 s"):
        run(path, RUNAWAY, timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert threading.active_count() == threads and descendants() == processes  # the worker has ended
    assert digest(path) == before
    assert run(path, "SELECT 1 AS x")[0]["x"].item() == 1


def test_a_query_over_the_memory_limit_is_refused_not_spilled(small_store):
    path, _ = small_store
    store_dir = sorted(path.parent.iterdir())
    # A 1.2 GB string: more than the sandbox's memory, and nothing may spill to a temporary folder.
    with pytest.raises(store.SqlRefused, match=store.SANDBOX_MEMORY_LIMIT):
        run(path, "SELECT length(string_agg(repeat('x', 1000000), '')) FROM range(1200)")
    assert sorted(path.parent.iterdir()) == store_dir


@pytest.mark.parametrize("query", ["SELECT len(range(0, 150000000)) AS n", "SELECT length(repeat('ab', 600000000)) AS n"])
def test_a_single_value_larger_than_the_memory_limit_is_refused_and_nothing_keeps_building_it(small_store, query):
    """DuckDB's memory limit does not count a list or string built in one value, and interrupt() does not stop its
    construction: on a thread these ran on, to 7.6 GB, after the console had answered. A worker process is capped
    and killed."""
    path, _ = small_store
    run(path, "SELECT 1 AS x")
    threads, processes = threading.active_count(), descendants()
    with pytest.raises(store.SqlRefused, match=f"more than the console's {store.SANDBOX_MEMORY_LIMIT} of memory"):
        run(path, query, timeout_s=5.0)
    assert threading.active_count() == threads and descendants() == processes
    assert run(path, "SELECT 1 AS x")[0]["x"].item() == 1


def test_a_dispatcher_killed_from_outside_is_replaced(small_store):
    """An out-of-memory killer or an operator may end the console's processes; the app stays usable."""
    path, _ = small_store
    run(path, "SELECT 1 AS x")
    for pid in descendants():
        os.kill(pid, signal.SIGKILL)
    answers = []
    for _ in range(store.console.SANDBOX_QUERIES + 1):
        try:
            answers.append(run(path, "SELECT 1 AS x")[0]["x"].item())
        except store.SqlRefused as e:
            answers.append(str(e))
    assert answers[-1] == 1 and set(answers[:-1]) <= {1, "the console's worker process ended before it answered; run the "
                                                          "query again"}


def test_queries_beyond_the_consoles_slots_are_refused_until_one_ends(small_store):
    """Every visitor of a hosted app shares one process: at most SANDBOX_QUERIES queries (and their memory) at once."""
    path, _ = small_store
    outcomes = []
    running = [threading.Thread(target=lambda: outcomes.append(pytest.raises(store.SqlRefused, run, path, RUNAWAY,
                                                                               timeout_s=3.0)))
               for _ in range(store.console.SANDBOX_QUERIES)]
    for t in running:
        t.start()
    time.sleep(1.0)
    with pytest.raises(store.SqlRefused, match=f"running {store.console.SANDBOX_QUERIES} queries already"):
        run(path, "SELECT 1 AS x")
    for t in running:
        t.join()
    assert len(outcomes) == store.console.SANDBOX_QUERIES and all("longer than" in str(o.value) for o in outcomes)
    assert run(path, "SELECT 1 AS x")[0]["x"].item() == 1


@pytest.mark.parametrize("query", ["SELEC * FROM neurons", "SELECT * FROM no_such_table", "SELECT nope FROM runs"])
def test_bad_sql_gets_duckdbs_own_first_line(small_store, query):
    path, _ = small_store
    con = store.connect(path, read_only=True)
    try:
        with pytest.raises(duckdb.Error) as plain:
            con.execute(query)
    finally:
        con.close()
    with pytest.raises(store.SqlRefused) as refused:
        run(path, query)
    assert str(plain.value).splitlines()[0] in str(refused.value)


# The page, through Streamlit's AppTest.

@pytest.fixture
def page_store(small_store, monkeypatch):
    path, frames = small_store
    monkeypatch.setenv("STORE", str(path))
    monkeypatch.syspath_prepend(str(ROOT / "app"))  # as `streamlit run app/Home.py` does for its pages
    return path, frames


def open_sql_page(run_id: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["run_id"] = run_id
    return at.run()


def result(at: AppTest) -> pl.DataFrame | None:
    frames = [d.value for d in at.dataframe if "column_name" not in d.value.columns]
    return pl.from_pandas(frames[0]) if frames else None


def test_page_runs_the_example_then_a_typed_query(page_store):
    path, frames = page_store
    run_id, frame = list(frames.items())[1]
    at = open_sql_page(run_id)
    assert not at.exception and result(at) is None
    assert run_id in at.text_area[0].value
    at.button[0].click().run()
    shown = result(at)
    best = frame.sort("delta", descending=True)
    assert shown["delta"].to_list()[:3] == best["delta"].to_list()[:3]

    at.text_area[0].input(f"SELECT neuron, delta FROM neurons WHERE run_id = '{run_id}' AND group_code = 'TP-' "
                          "ORDER BY neuron, delta").run()
    at.button[0].click().run()
    want = frame.filter(pl.col("group_code") == "TP-").sort("neuron", "delta")
    assert not at.exception and not at.error
    assert result(at).to_dicts() == want.select("neuron", "delta").to_dicts()


def test_page_shows_a_refusal_and_writes_nothing(page_store, out_dir):
    path, frames = page_store
    before = digest(path)
    at = open_sql_page(next(iter(frames)))
    target = out_dir / "leak.csv"
    at.text_area[0].input(f"COPY neurons TO '{target}'").run()
    at.button[0].click().run()
    assert not at.exception
    assert "COPY" in at.error[0].value and result(at) is None
    assert not target.exists() and digest(path) == before


def test_page_says_when_the_result_is_truncated(page_store):
    import queries

    path, frames = page_store
    at = open_sql_page(next(iter(frames)))
    at.text_area[0].input(f"SELECT * FROM range({queries.SQL_MAX_ROWS + 5})").run()
    at.button[0].click().run()
    assert result(at).height == queries.SQL_MAX_ROWS
    assert any(f"{queries.SQL_MAX_ROWS:,}" in w.value for w in at.warning)


def test_page_lists_the_schema(page_store):
    path, frames = page_store
    at = open_sql_page(next(iter(frames)))
    schema = next(pl.from_pandas(d.value) for d in at.dataframe if "column_name" in d.value.columns)
    con = store.connect(path)
    try:
        columns = {r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() "
                                             "WHERE table_name = 'neurons'").fetchall()}
    finally:
        con.close()
    assert set(schema.filter(pl.col("table_name") == "neurons")["column_name"]) == columns


def test_page_offers_csv_of_a_result_with_list_and_struct_columns(page_store):
    path, frames = page_store
    at = open_sql_page(next(iter(frames)))
    at.text_area[0].input("SELECT range(3) AS r, {'a': 1, 'b': [1, 2]} AS s, 7 AS i").run()
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert result(at)["i"].to_list() == [7]


def test_a_result_over_the_byte_cap_is_refused_before_it_reaches_the_app(small_store):
    path, _ = small_store
    rows = store.SANDBOX_RESULT_BYTES // 1_000_000 + 20  # 1 MB strings: well inside DuckDB's memory limit each
    with pytest.raises(store.SqlRefused, match=f"larger than the console's {store.SANDBOX_RESULT_BYTES // 10**6} MB"):
        run(path, f"SELECT repeat('x', 1000000) AS s FROM range({rows})")
    assert run(path, "SELECT repeat('x', 1000000) AS s FROM range(3)")[0]["s"].str.len_bytes().to_list() == [10**6] * 3
