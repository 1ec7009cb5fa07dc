"""The SQL console: run one untrusted query against a store, safely enough for a public hosted app.

Two walls. The first, check_sql, reads the query with DuckDB's own parser and lets through only a single
query (SELECT, WITH, FROM, VALUES, TABLE, SHOW, DESCRIBE, SUMMARIZE) whose table functions are on an
allow-list and which names no file. The second is the connection itself (connect(path, sandbox=True)):
read-only, no file or network access, no extension loading, capped memory and threads, configuration
locked. run_user_sql adds a row cap that reports truncation and a time limit that interrupts the query.
"""

from __future__ import annotations

import json
import threading

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


def run_user_sql(path, sql: str, max_rows: int, timeout_s: float) -> tuple[pl.DataFrame, bool]:
    """Run one untrusted query; return its first max_rows rows and whether there were more.

    Raises SqlRefused for a refused query, bad SQL, a query over timeout_s seconds or over the memory limit."""
    query = check_sql(sql)
    con = connect(path, sandbox=True)
    outcome: dict = {}

    def work():
        # The worker owns the connection: it closes it, so a timed-out query never races a close.
        try:
            # Streamed in small batches and stopped at the byte cap: 10,000 rows of 10 MB strings would otherwise
            # all land in the app's memory, far past DuckDB's own limit, which does not cover the result.
            reader = con.sql(query).limit(max_rows + 1).to_arrow_reader(64)
            batches, size = [], 0
            for batch in reader:
                size += batch.nbytes
                if size > SANDBOX_RESULT_BYTES:
                    outcome["too_large"] = True
                    return
                batches.append(batch)
            outcome["frame"] = pl.from_arrow(pa.Table.from_batches(batches, schema=reader.schema))
        except Exception as e:
            outcome["error"] = e
        finally:
            con.close()

    worker = threading.Thread(target=work, name="sql-console", daemon=True)
    worker.start()
    worker.join(timeout_s)
    timed_out = worker.is_alive()
    if timed_out:
        try:
            con.interrupt()
        except duckdb.ConnectionException:  # it finished between the join and the interrupt
            pass
        worker.join(timeout_s)  # a grace period: DuckDB stops at its next interrupt check
    error = outcome.get("error")
    if outcome.get("too_large"):
        raise SqlRefused(f"the result is larger than the console's {SANDBOX_RESULT_BYTES // 10**6} MB; select fewer "
                         "or shorter columns, aggregate or add a LIMIT")
    if timed_out or isinstance(error, duckdb.InterruptException):
        raise SqlRefused(f"the query ran longer than the console's {timeout_s:g} s and was stopped; "
                         "filter by run_id, aggregate or add a LIMIT")
    if isinstance(error, duckdb.OutOfMemoryException):
        raise SqlRefused(f"the query needs more than the console's {SANDBOX_MEMORY_LIMIT} of memory; "
                         "filter by run_id, aggregate or add a LIMIT")
    if isinstance(error, duckdb.Error):
        raise SqlRefused(f"DuckDB could not run the query: {_first_line(error)}")
    if error is not None:
        raise SqlRefused(f"the result cannot be shown ({_first_line(error)}); CAST unusual columns to VARCHAR")
    frame = outcome["frame"]
    return frame.head(max_rows), frame.height > max_rows
