"""The SQL console: run one untrusted query against a store, safely enough for a public hosted app.

Two walls. The first, check_sql, reads the query with DuckDB's own parser and lets through only a single
query (SELECT, WITH, FROM, VALUES, TABLE, SHOW, DESCRIBE, SUMMARIZE) whose table functions are on an
allow-list and which names no file. The second is the connection itself (connect(path, sandbox=True)):
read-only, no file or network access, no extension loading, capped memory and threads, configuration
locked. run_user_sql runs the query in a worker process of its own, whose address space is capped and which is
killed at the time limit, at most SANDBOX_QUERIES at once, and adds a row cap that reports truncation.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from store import SANDBOX_MEMORY_LIMIT, SANDBOX_RESULT_BYTES, connect


class SqlRefused(ValueError):
    """A query the console will not run, or could not: the message (one line) says why and what to do."""


QUERY_FORMS = "SELECT, WITH, FROM, VALUES, TABLE, SHOW, DESCRIBE or SUMMARIZE"
ELSEWHERE = "open the store file in your own DuckDB client for that (see the README's SQL console section)"

_T = duckdb.StatementType
_REFUSED_STATEMENTS = {
    _T.ATTACH: "ATTACH and DETACH are refused: the console reads this store only",
    _T.DETACH: "ATTACH and DETACH are refused: the console reads this store only",
    _T.COPY: "COPY is refused: the console neither reads nor writes files; download the result as CSV instead",
    _T.COPY_DATABASE: "COPY is refused: the console neither reads nor writes files",
    _T.EXPORT: "EXPORT/IMPORT DATABASE is refused: the console neither reads nor writes files",
    _T.LOAD: "INSTALL and LOAD are refused: the console runs with the extensions it has",
    _T.EXTENSION: "INSTALL and LOAD are refused: the console runs with the extensions it has",
    _T.SET: "SET, RESET and USE are refused: the console's settings are fixed",
    _T.VARIABLE_SET: "SET VARIABLE is refused: the console's settings are fixed",
    _T.PRAGMA: "PRAGMA (and IMPORT DATABASE, which DuckDB runs as one) is refused: the console's settings "
               "are fixed and it reads no files; for table information query duckdb_columns() or DESCRIBE a table",
    _T.CALL: "CALL and CHECKPOINT are refused; call a table function with SELECT * FROM f(...) instead",
    _T.MULTI: "this runs as several statements (as PIVOT does without an IN list); the console runs one query: "
              "name PIVOT's values, as in FROM t PIVOT (sum(x) FOR col IN ('a', 'b'))",
    # EXPLAIN ANALYZE executes the statement it explains, so EXPLAIN would be a way around this check.
    _T.EXPLAIN: f"EXPLAIN is refused (EXPLAIN ANALYZE runs its statement unchecked); {ELSEWHERE}",
}
_WRITES = (_T.CREATE, _T.INSERT, _T.UPDATE, _T.DELETE, _T.DROP, _T.ALTER, _T.MERGE_INTO, _T.CREATE_FUNC,
           _T.VACUUM, _T.ANALYZE, _T.TRANSACTION)

# Table functions a query may call: generators and the catalog's own description of the store. Everything
# else is refused, since DuckDB's table functions include file readers, SQL-from-a-string runners
# (query, json_execute_serialized_sql) and state changers (checkpoint, enable_logging).
TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "duckdb_tables", "duckdb_views", "duckdb_columns", "duckdb_schemas", "duckdb_types", "duckdb_functions",
    "duckdb_keywords", "duckdb_constraints", "duckdb_indexes", "pragma_table_info", "pragma_show",
    "pragma_version", "pg_timezone_names", "icu_calendar_names",
})
_SQL_RUNNERS = frozenset({"query", "query_table", "json_execute_serialized_sql"})
# DuckDB's system views that a query may read: the catalog's description of the store. Refused: the rest
# (duckdb_databases, pragma_database_list and pg_settings show the server's paths and settings, duckdb_logs
# its log) and any view a later DuckDB adds. current_setting() would show the same settings.
SYSTEM_VIEWS = frozenset({
    "duckdb_columns", "duckdb_constraints", "duckdb_indexes", "duckdb_schemas", "duckdb_tables", "duckdb_types",
    "duckdb_views", "sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema",
    "character_sets", "check_constraints", "columns", "constraint_column_usage", "constraint_table_usage",
    "key_column_usage", "referential_constraints", "schemata", "table_constraints", "tables", "views",
    "pg_am", "pg_attrdef", "pg_attribute", "pg_class", "pg_collation", "pg_constraint", "pg_database", "pg_depend",
    "pg_description", "pg_enum", "pg_index", "pg_indexes", "pg_namespace", "pg_proc", "pg_sequence",
    "pg_sequences", "pg_tables", "pg_tablespace", "pg_type", "pg_views",
})
_SETTING_READERS = frozenset({"current_setting"})


def _reads_files(name: str) -> bool:
    return (name.startswith(("read_", "parquet_", "iceberg", "delta_", "sqlite_", "postgres_", "mysql_", "st_read"))
            or "scan" in name or name in ("glob", "sniff_csv"))


def _looks_like_a_file(name: str) -> bool:
    # A quoted name such as 'f.csv' in FROM is a replacement scan: DuckDB reads the file of that name.
    return any(c in name for c in "./\\:*")


def _nodes(tree):
    """Every dict in a parsed statement's JSON, depth first."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_tree(parser: duckdb.DuckDBPyConnection, query: str) -> None:
    tree = json.loads(parser.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    if tree.get("error"):
        raise SqlRefused(f"only a query ({QUERY_FORMS}) can run here ({tree.get('error_message', '')})")
    system_views = {r[0] for r in parser.execute("SELECT view_name FROM duckdb_views() WHERE internal").fetchall()}
    for node in _nodes(tree):
        if node.get("type") in ("BASE_TABLE", "SHOW_REF") and _looks_like_a_file(node.get("table_name", "")):
            raise SqlRefused(f"FROM '{node['table_name']}' reads a file, and the console reads only the store's "
                             f"tables; {ELSEWHERE}")
        name = node.get("table_name", "").lower()
        if node.get("type") == "BASE_TABLE" and name in system_views - SYSTEM_VIEWS:
            raise SqlRefused(f"the system view {name} shows the server's files or settings, not the store; for the "
                             "store's schema query duckdb_tables or duckdb_columns")
        if node.get("class") == "FUNCTION" and node.get("function_name", "").lower() in _SETTING_READERS:
            raise SqlRefused(f"{node['function_name']}() shows the server's settings, not the store; {ELSEWHERE}")
        if node.get("type") == "TABLE_FUNCTION":
            name = node["function"]["function_name"].lower()
            if name in TABLE_FUNCTIONS:
                continue
            if _reads_files(name):
                raise SqlRefused(f"{name}() reads files, and the console reads only the store's tables; {ELSEWHERE}")
            if name in _SQL_RUNNERS:
                raise SqlRefused(f"{name}() runs SQL given as a string, which the console cannot check; "
                                 "write that SQL directly")
            raise SqlRefused(f"table function {name}() is not allowed in the console; it allows generators such "
                             "as range() and unnest() and the catalog's duckdb_tables(), duckdb_columns(), ...")


def check_sql(sql: str) -> str:
    """The one query in sql, or SqlRefused naming why it may not run (the console's first wall)."""
    if not sql.strip():
        raise SqlRefused(f"the query is empty; write one {QUERY_FORMS} statement")
    parser = duckdb.connect(":memory:")
    try:
        try:
            statements = parser.extract_statements(sql)
            kinds = [s.type for s in statements]
        except duckdb.Error as e:
            raise SqlRefused(f"DuckDB cannot parse the query: {_first_line(e)}") from None
        except ValueError:  # a statement type the Python client has no name for (e.g. UPDATE EXTENSIONS)
            raise SqlRefused(f"only a query ({QUERY_FORMS}) can run here") from None
        if len(statements) != 1:
            raise SqlRefused(f"the console runs one statement at a time and this has {len(statements)}; "
                             "remove all but one")
        kind = kinds[0]
        if kind in _REFUSED_STATEMENTS:
            raise SqlRefused(_REFUSED_STATEMENTS[kind])
        if kind in _WRITES:
            raise SqlRefused(f"{kind.name} is refused: the store is read-only here; only a query ({QUERY_FORMS}) "
                             "can run")
        if kind != _T.SELECT:
            raise SqlRefused(f"only a query ({QUERY_FORMS}) can run here, not a statement of type {kind.name}")
        _check_tree(parser, statements[0].query)
        return statements[0].query
    finally:
        parser.close()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# Each query runs in a process of its own: DuckDB's memory limit does not cover every allocation (SELECT len(range(0,
# 150000000)) builds a 1.2 GB list in one value, and repeat() a string as large), and interrupt() does not stop their
# construction, so a thread kept running and growing after the console had given up on it. A process is killed at
# the time limit, and its address space is capped. It is forked from a dispatcher, a process per slot started once,
# which costs a fork per query where starting Python and DuckDB would cost 0.3 s. The dispatcher runs DuckDB only
# to warm it, closed before the first fork, so no DuckDB thread or lock is live when it forks; its only other
# threads are pyarrow's and polars' idle pools, which the worker does not use.
# Above what the worker has mapped once the store is open: DuckDB's memory limit, the result twice (batches and
# their serialized stream), and room for what DuckDB allocates beside its buffer manager.
_HEADROOM = 2 * SANDBOX_RESULT_BYTES + 768 * 2**20
# Queries running at once in this process (every visitor of a hosted app shares it): each may use the limit above.
SANDBOX_QUERIES = 2
_SLOTS: queue.LifoQueue = queue.LifoQueue()  # idle dispatchers, the last used on top; None for one not started yet
for _ in range(SANDBOX_QUERIES):
    _SLOTS.put(None)


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def _memory_bytes(limit: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([KMGT]?B)", limit.strip().upper()).groups()
    return int(number) * 1024 ** "BKMGT".index(unit[0])


def _work(send, path: str, query: str, max_rows: int) -> None:
    """In the worker process: run the query, send ("frame", "") and its Arrow stream, or (kind of failure, first line)."""
    try:
        con = connect(path, sandbox=True)
        cap = _mapped_bytes() + _memory_bytes(SANDBOX_MEMORY_LIMIT) + _HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        # Streamed in small batches and stopped at the byte cap: 10,000 rows of 10 MB strings would otherwise all
        # reach the app's memory, far past DuckDB's own limit, which does not cover the result.
        reader = con.sql(query).limit(max_rows + 1).to_arrow_reader(64)
        batches, size = [], 0
        for batch in reader:
            size += batch.nbytes
            if size > SANDBOX_RESULT_BYTES:
                send.send(("too_large", ""))
                return
            batches.append(batch)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, reader.schema) as stream:
            for batch in batches:
                stream.write_batch(batch)
        send.send(("frame", ""))
        send.send_bytes(sink.getvalue())
    except (duckdb.OutOfMemoryException, MemoryError) as e:
        send.send(("memory", _first_line(e)))
    except duckdb.Error as e:
        send.send(("duckdb", _first_line(e)))
    except Exception as e:
        send.send(("other", _first_line(e)))


def _dispatch(requests) -> None:
    """The dispatcher's loop: for each (path, query, max_rows, timeout_s), fork a worker, wait for its answer at most
    timeout_s, kill it, and pass on ("frame", "") and the stream, (kind of failure, first line) or ("timeout", "")."""
    # DuckDB's first database in a process costs 20 ms more than later ones; closed, it leaves no thread behind
    duckdb.connect(":memory:", config={"threads": 1}).close()
    while True:
        try:
            path, query, max_rows, timeout_s = requests.recv()
        except EOFError:  # the app has ended
            return
        receive, send = multiprocessing.Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:
            receive.close()
            try:
                _work(send, path, query, max_rows)
            finally:
                os._exit(0)
        send.close()  # the worker holds the other copy: its exit ends the pipe
        answer, stream = ("timeout", ""), None
        if receive.poll(timeout_s):
            try:
                answer = receive.recv()
                stream = receive.recv_bytes() if answer[0] == "frame" else None
            except EOFError:  # killed before it answered: by the address-space cap, past what DuckDB counts
                answer = ("memory", "")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        receive.close()
        requests.send(answer)
        if stream is not None:
            requests.send_bytes(stream)


def _start_dispatcher() -> tuple[subprocess.Popen, multiprocessing.connection.Connection]:
    """A dispatcher process and the app's end of its pipe. Started as a plain `python -c`, not by multiprocessing's
    spawn, which would import the caller's main script again in it (Streamlit's, or a script with no main guard)."""
    app_end, dispatcher_end = multiprocessing.Pipe()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            "from multiprocessing.connection import Connection; from store.console import _dispatch; "
            "_dispatch(Connection(int(sys.argv[1])))")
    process = subprocess.Popen([sys.executable, "-c", code, str(dispatcher_end.fileno())],
                               pass_fds=[dispatcher_end.fileno()], stdin=subprocess.DEVNULL)
    dispatcher_end.close()
    return process, app_end


def _ask(dispatcher, request: tuple, timeout_s: float) -> tuple[tuple[str, str], bytes | None]:
    _, conn = dispatcher
    conn.send(request)
    if not conn.poll(timeout_s + 10):  # the dispatcher answers at timeout_s itself; a stuck one is replaced
        raise EOFError
    answer = conn.recv()
    return answer, conn.recv_bytes() if answer[0] == "frame" else None


def run_user_sql(path, sql: str, max_rows: int, timeout_s: float) -> tuple[pl.DataFrame, bool]:
    """Run one untrusted query; return its first max_rows rows and whether there were more.

    Raises SqlRefused for a refused query, bad SQL, a query over timeout_s seconds or over the memory limit, and
    when SANDBOX_QUERIES others are running."""
    query = check_sql(sql)
    try:
        dispatcher = _SLOTS.get_nowait()
    except queue.Empty:
        raise SqlRefused(f"the console is running {SANDBOX_QUERIES} queries already; run this one again in a few "
                         "seconds") from None
    try:
        dispatcher = dispatcher or _start_dispatcher()
        (kind, message), stream = _ask(dispatcher, (str(path), query, max_rows, timeout_s), timeout_s)
    except (EOFError, OSError):  # the dispatcher died (killed from outside, say) or did not start: another next time
        if dispatcher:
            dispatcher[0].kill()
            dispatcher[0].wait()
        dispatcher = None
        kind, message = "ended", ""
    finally:
        _SLOTS.put(dispatcher)
    if kind == "too_large":
        raise SqlRefused(f"the result is larger than the console's {SANDBOX_RESULT_BYTES // 10**6} MB; select fewer "
                         "or shorter columns, aggregate or add a LIMIT")
    if kind == "timeout":
        raise SqlRefused(f"the query ran longer than the console's {timeout_s:g} s and was stopped; "
                         "filter by run_id, aggregate or add a LIMIT")
    if kind == "memory":
        raise SqlRefused(f"the query needs more than the console's {SANDBOX_MEMORY_LIMIT} of memory; "
                         "filter by run_id, aggregate or add a LIMIT")
    if kind == "duckdb":
        raise SqlRefused(f"DuckDB could not run the query: {message}")
    if kind == "ended":
        raise SqlRefused("the console's worker process ended before it answered; run the query again")
    if kind == "other":
        raise SqlRefused(f"the result cannot be shown ({message}); CAST unusual columns to VARCHAR")
    try:
        frame = pl.from_arrow(pa.ipc.open_stream(stream).read_all())
    except Exception as e:
        raise SqlRefused(f"the result cannot be shown ({_first_line(e)}); CAST unusual columns to VARCHAR") from None
    return frame.head(max_rows), frame.height > max_rows
