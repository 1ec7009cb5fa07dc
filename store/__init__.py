"""The DuckDB store: its schema and every write.

A run is written by copy-and-swap: the current file is copied, the run is inserted into the copy in
one transaction, and the copy atomically replaces the file. A reader therefore sees the old file or
the new one, never half a run, and a write that fails anywhere leaves the file byte-for-byte as it
was. A lock file serialises writers so that two concurrent runs cannot drop each other's rows.

Imports only duckdb and polars: the app and any hosted copy of it use this package without torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

SCHEMA_VERSION = 2  # 2: neurons.cum_share
SCHEMA_SQL = (Path(__file__).parent / "schema.sql").read_text()


class StoreError(RuntimeError):
    """A store file that cannot be read or written; the message names the file and the fix."""


def _schema_version(con) -> int | None:
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if "schema_version" not in tables:
        return None if tables else 0
    return con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]


def _check_version(con, path: Path) -> None:
    version = _schema_version(con)
    if version is None:
        raise StoreError(f"{path} is a DuckDB file but not a dpo-neurons store (no schema_version table); "
                         "point STORE or [run] store at a store file, or at a new path")
    if version not in (0, SCHEMA_VERSION):
        raise StoreError(f"{path} has store schema version {version}, this code reads version {SCHEMA_VERSION}; "
                         "write new runs to a new store file, or use the dpo-neurons release that wrote it")


# The sandbox of the SQL console (store/console.py): what one user query may use at most.
SANDBOX_MEMORY_LIMIT = "1GB"
SANDBOX_THREADS = 2


def _sandboxed(path: Path) -> duckdb.DuckDBPyConnection:
    # An in-memory database that attaches the store read-only, rather than duckdb.connect(path, config=...):
    # DuckDB keeps one instance per file in a process and refuses to open it again with another configuration,
    # so that way a sandboxed query would fail whenever a page's plain read of the same file is open.
    con = duckdb.connect(":memory:", config={"autoload_known_extensions": False,
                                             "autoinstall_known_extensions": False,
                                             "allow_community_extensions": False})
    try:
        con.execute("ATTACH ? AS store (READ_ONLY)", [str(path)])
        con.execute("USE store")
        # Order matters: temp_directory cannot change once external access is off, and nothing can once the
        # configuration is locked. An empty temp_directory means no spilling: a query that outgrows the memory
        # limit fails instead of writing temporary files.
        for setting in ("temp_directory = ''", f"memory_limit = '{SANDBOX_MEMORY_LIMIT}'",
                        f"threads = {SANDBOX_THREADS}", "enable_progress_bar = false",
                        "enable_external_access = false", "lock_configuration = true"):
            con.execute(f"SET {setting}")
    except BaseException:
        con.close()
        raise
    return con


def connect(path: str | Path, read_only: bool = True, sandbox: bool = False) -> duckdb.DuckDBPyConnection:
    """Open an existing store, refusing files that are missing, corrupt or of another schema version.

    sandbox=True (always read-only) is the connection for untrusted SQL: no file or network access, no
    extension loading, capped memory and threads, and a locked configuration that SET/PRAGMA cannot undo."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"store {path} not found; run the pipeline first (make pipeline) or set STORE to a store file")
    try:
        con = _sandboxed(path) if sandbox else duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0]
        raise StoreError(f"store {path} cannot be opened ({first}); it is corrupt or not a DuckDB file: "
                         "restore it or point STORE at another file") from None
    try:
        _check_version(con, path)
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def _writer_lock(path: Path):
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def write_run(path: str | Path, *, run: dict, stages: list[dict], tables: dict[str, pl.DataFrame]) -> str:
    """Write one run atomically and return its run_id.

    run: name, model, config (dict), config_hash, packages (dict). stages: one dict per stage with
    stage, cache_key, seconds, summary (dict). tables: table name -> frame of that table's columns
    without run_id.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id()
    with _writer_lock(path):
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            if path.exists():
                connect(path).close()
                shutil.copyfile(path, tmp)
            con = duckdb.connect(str(tmp))
            try:
                _insert(con, run_id, run, stages, tables)
            finally:
                con.close()
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent)
        except duckdb.Error as e:
            raise StoreError(f"writing run to {path} failed ({str(e).splitlines()[0]}); the store is unchanged") from e
        finally:
            tmp.unlink(missing_ok=True)
    return run_id


def find_run(path: str | Path, config_hash: str) -> str | None:
    """The newest complete run made from exactly this config and these stage results, if any."""
    if not Path(path).exists():
        return None
    con = connect(path)
    try:
        if _schema_version(con) == 0:
            return None
        rows = con.execute("SELECT run_id FROM runs WHERE config_hash = ? AND status = 'complete' "
                           "ORDER BY created_at DESC LIMIT 1", [config_hash]).fetchall()
    finally:
        con.close()
    return rows[0][0] if rows else None


def _insert(con, run_id: str, run: dict, stages: list[dict], tables: dict[str, pl.DataFrame]) -> None:
    con.execute("BEGIN TRANSACTION")
    con.execute(SCHEMA_SQL)
    if not con.execute("SELECT version FROM schema_version").fetchall():
        con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
    con.execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 'complete')",
        [run_id, datetime.now(timezone.utc).replace(tzinfo=None), run["name"], run["model"],
         json.dumps(run["config"]), run["config_hash"], json.dumps(run["packages"])],
    )
    for s in stages:
        con.execute("INSERT INTO stages VALUES (?, ?, ?, ?, ?)",
                    [run_id, s["stage"], s["cache_key"], s["seconds"], json.dumps(s["summary"])])
    known = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    for name, frame in tables.items():
        if name not in known or name in ("runs", "stages", "schema_version"):
            raise StoreError(f"no table {name!r} in store/schema.sql; add it there (and to store/README.md) first")
        con.register("incoming", frame.to_arrow())
        con.execute(f'INSERT INTO "{name}" BY NAME SELECT ? AS run_id, * FROM incoming', [run_id])
        con.unregister("incoming")
    con.execute("COMMIT")
    con.execute("CHECKPOINT")


from store.console import SqlRefused, check_sql, run_user_sql  # noqa: E402,F401  (console needs connect above)
