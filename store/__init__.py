"""The DuckDB store: its schema and every write.

A run is written by copy-and-swap: the current file is copied, the run is inserted into the copy in
one transaction, and the copy atomically replaces the file. A reader therefore sees the old file or
the new one, never half a run, and a write that fails anywhere leaves the file byte-for-byte as it
was. A lock file serialises writers so that two concurrent runs cannot drop each other's rows.

New files are written in DuckDB's v1.5.0 storage format (STORAGE_VERSION), which the Python
client of requirements.txt and the DuckDB CLI 1.5 (`duckdb-cli` on PyPI) both read; a file keeps the
format it was created in. `export_run` and `export_parquet` copy one run out for sharing.

Imports only duckdb and polars: the app and any hosted copy of it use this package without torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

SCHEMA_VERSION = 2  # 2: neurons.cum_share
# Oldest storage format that the DuckDB CLI from PyPI (duckdb-cli 1.5) reads; DuckDB 2.0's default is newer.
STORAGE_VERSION = "v1.5.0"
SCHEMA_SQL = (Path(__file__).parent / "schema.sql").read_text()


class StoreError(RuntimeError):
    """A store file that cannot be read or written; the message names the file and the fix."""


def _schema_version(con) -> int | None:
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if "schema_version" not in tables:
        return None if tables else 0
    return con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]


def _check_version(con, path: Path, empty_ok: bool) -> None:
    version = _schema_version(con)
    if version == 0 and not empty_ok:
        raise StoreError(f"{path} is an empty DuckDB file that holds no runs yet; run the pipeline into it "
                         "(make pipeline) or point STORE at a store file")
    if version is None:
        raise StoreError(f"{path} is a DuckDB file but not a dpo-neurons store (no schema_version table); "
                         "point STORE or [run] store at a store file, or at a new path")
    if version not in (0, SCHEMA_VERSION):
        # No migration: version 2 added neurons.cum_share, which only rerunning `attribute` fills in honestly.
        if version < SCHEMA_VERSION:
            raise StoreError(f"{path} was written by an older dpo-neurons (store schema version {version}, this code "
                             f"reads {SCHEMA_VERSION}); rerun the pipeline into a new store file, or open it with "
                             "the release that wrote it")
        raise StoreError(f"{path} was written by a newer dpo-neurons (store schema version {version}, this code "
                         f"reads {SCHEMA_VERSION}); update this checkout, or write new runs to a new store file")


# DuckDB's file starts with three 4 KiB headers, then its blocks; a file shorter than that was cut off.
FILE_HEADERS = 3 * 4096


def _check_length(path: Path) -> None:
    """A store cut off while copied opens and lists its tables, then fails on the first read of a missing
    block; refuse it when it is opened instead. The file must hold every block in use and the highest
    block a table's data lives in (free blocks can sit below it, and at its end they may be gone).
    Checked on a private attach of the file held open here, so the size read is that file's even when
    the pipeline swaps in a new one meanwhile (a connection of the caller's might be another file's:
    duckdb.connect shares an instance per path in a process)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        con = _attached(path)
        try:
            if os.stat(path).st_ino != st.st_ino:
                return  # swapped while attaching: the pipeline renames in only a finished file
            block_size, total, free = con.execute("SELECT block_size, total_blocks, free_blocks FROM "
                                                  "pragma_database_size() WHERE database_name = 'store'").fetchall()[0]
            blocks = total - free
            if tables := _tables(con):
                union = " UNION ALL ".join(f"SELECT max(block_id) AS b FROM pragma_storage_info('{t}')" for t in tables)
                blocks = max(blocks, (con.execute(f"SELECT max(b) FROM ({union})").fetchall()[0][0] or 0) + 1)
        finally:
            con.close()
    need = FILE_HEADERS + blocks * block_size
    if st.st_size < need:
        raise StoreError(f"store {path} is truncated ({st.st_size:,} bytes, its blocks need at least {need:,}): it was "
                         "cut off while copied or written; copy it again or rerun the pipeline into a new file")


# The sandbox of the SQL console (store/console.py): what one user query may use at most.
SANDBOX_MEMORY_LIMIT = "1GB"
SANDBOX_THREADS = 2
SANDBOX_RESULT_BYTES = 100_000_000  # the memory limit is DuckDB's own; this caps what reaches Python


def _attached(path: Path, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory database of its own that attaches the store read-only. duckdb.connect(path) instead
    shares one instance per path in a process: it refuses another configuration, and while any connection
    to it is open, a new one keeps reading the file the path named when the first was opened.
    Python variables never stand in for tables: a name the store lacks is an error, not a scan of
    whatever the calling module happens to hold under that name."""
    con = duckdb.connect(":memory:", config={"python_enable_replacements": False, **(config or {})})
    try:
        con.execute("ATTACH ? AS store (READ_ONLY)", [str(path)])
        con.execute("USE store")
    except BaseException:
        con.close()
        raise
    return con


def snapshot_cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of a snapshot connection, for one query on one thread. A cursor starts in the in-memory
    database, so it is pointed at the store again."""
    cursor = con.cursor()
    cursor.execute("USE store")
    return cursor


def _sandboxed(path: Path) -> duckdb.DuckDBPyConnection:
    con = _attached(path, {"autoload_known_extensions": False, "autoinstall_known_extensions": False,
                           "allow_community_extensions": False})
    try:
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


def connect(path: str | Path, read_only: bool = True, sandbox: bool = False, snapshot: bool = False,
            empty_ok: bool = False) -> duckdb.DuckDBPyConnection:
    """Open an existing store, refusing files that are missing, corrupt or of another schema version, and
    empty DuckDB files unless empty_ok (a writer may fill one; a reader finds no tables in it).

    snapshot=True (read-only) is a connection that keeps reading the file as it was when opened, even after
    the pipeline swaps in a new one, and that a later snapshot of the same path does not share: what the app
    holds open across queries. sandbox=True (read-only) is the connection for untrusted SQL: no file or
    network access, no extension loading, capped memory and threads, and a locked configuration that
    SET/PRAGMA cannot undo."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"store {path} not found; run the pipeline first (make pipeline) or set STORE to a store file")
    try:
        if sandbox:
            con = _sandboxed(path)
        elif snapshot:
            con = _attached(path)
        else:
            con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0]
        if "Could not set lock" in first:  # a notebook's duckdb.connect(path) opens read-write and locks the file
            holder = re.search(r"\(PID (\d+)\)", first)
            raise StoreError(f"store {path} is open for writing in another process{f' (PID {holder[1]})' if holder else ''}; "
                             "close that connection, or open the file with read_only=True there") from None
        raise StoreError(f"store {path} cannot be opened ({first}); it is corrupt or not a DuckDB file: "
                         "restore it or point STORE at another file") from None
    try:
        _check_version(con, path, empty_ok)
        if not sandbox:  # the console opens the file per query, after the app's own open checked it
            _check_length(path)
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
    make_folder_for(path, "store")
    run_id = new_run_id()
    with _writer_lock(path):
        tmp = _tmp_name(path)
        try:
            if path.exists():
                connect(path, empty_ok=True).close()
                shutil.copyfile(path, tmp)
            con = _create(tmp)
            try:
                _insert(con, run_id, run, stages, tables)
            finally:
                con.close()
            _swap_in(tmp, path)
        except (duckdb.Error, OSError) as e:
            raise _write_error(path, e) from e
        finally:
            _discard(tmp)
    return run_id


def _tmp_name(path: Path) -> Path:
    """A name of this attempt's own: a writer killed mid-way leaves a file (and WAL) that a later writer
    with the same pid, PID 1 in every container, would otherwise reopen and replay."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _discard(tmp: Path) -> None:
    tmp.unlink(missing_ok=True)
    tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)


def _create(path: Path) -> duckdb.DuckDBPyConnection:
    """A writable connection; a new file gets STORAGE_VERSION, an existing one keeps its format."""
    return duckdb.connect(str(path), config={"storage_compatibility_version": STORAGE_VERSION})


def _swap_in(tmp: Path, path: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _write_error(path: Path, e: Exception) -> StoreError:
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)
    why = "the disk is full; free space and rerun" if full else (str(e).strip().splitlines() or [type(e).__name__])[0]
    return StoreError(f"writing {path} failed ({why}); the previous file is unchanged")


def find_run(path: str | Path, config_hash: str) -> str | None:
    """The newest complete run made from exactly this config and these stage results, if any."""
    if not Path(path).exists():
        return None
    con = connect(path, empty_ok=True)
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


def _tables(con) -> list[str]:
    """The schema's tables in schema.sql order (views such as `cumulative` are derived, not copied)."""
    return [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                                      "ORDER BY table_oid").fetchall()]


def _check_run(src: Path, run_id: str) -> None:
    con = connect(src)
    try:
        found = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
        newest = con.execute("SELECT run_id FROM runs ORDER BY created_at DESC LIMIT 3").fetchall()
    finally:
        con.close()
    if not found:
        hint = ", ".join(r[0] for r in newest) or "none: run the pipeline first"
        raise StoreError(f"no run {run_id!r} in {src}; its newest runs are {hint}")


def make_folder_for(path: Path, what: str) -> None:
    """The folder a store file `path` goes into, made if missing; a path that cannot take a file is refused (the
    pipeline calls this before its first stage, not after hours of work)."""
    if path.is_dir():
        raise StoreError(f"{what} {path} is a folder; give a file path, e.g. {path / 'dpo_neurons.duckdb'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{what} {path}: its folder cannot be made ({e.strerror or e}); choose a writable path") from None
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"{what} {path}: its folder is not writable; choose a writable path")


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise StoreError(f"{out} already exists; pass --force to replace it, or choose another path")


def export_run(src: str | Path, run_id: str, out: str | Path, force: bool = False) -> Path:
    """Write a new store file holding only `run_id`: every table filtered to the run, same schema version,
    so the app and any DuckDB client open it like the full store. The file appears whole or not at all."""
    src, out = Path(src), Path(out)
    _check_run(src, run_id)
    if out.resolve() == src.resolve():
        raise StoreError(f"--out {out} is the source store itself; choose another path")
    _check_target(out, force)
    make_folder_for(out, "--out")
    tmp = _tmp_name(out)
    try:
        con = _create(tmp)
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute(SCHEMA_SQL)
            con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
            con.execute("ATTACH ? AS src (READ_ONLY)", [str(src)])
            for table in _tables(con):
                if table != "schema_version":
                    con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM src."{table}" WHERE run_id = ?', [run_id])
            con.execute("COMMIT")
            con.execute("DETACH src")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        _swap_in(tmp, out)
    except (duckdb.Error, OSError) as e:
        raise _write_error(out, e) from e
    finally:
        _discard(tmp)
    return out


def export_parquet(src: str | Path, run_id: str, out_dir: str | Path, force: bool = False) -> list[Path]:
    """One Parquet file per table (`<table>.parquet`), filtered to `run_id`, for tools without DuckDB.
    The folder is written beside its final place and renamed into it whole."""
    src, out_dir = Path(src), Path(out_dir).resolve()
    _check_run(src, run_id)
    _check_target(out_dir, force)
    # --force replaces a folder of earlier Parquet exports, never a folder that holds anything else
    if out_dir.exists() and (not out_dir.is_dir() or any(p.suffix != ".parquet" for p in out_dir.iterdir())):
        raise StoreError(f"--parquet {out_dir} holds other files than Parquet; choose a new or empty folder")
    tmp, old = _tmp_name(out_dir), _tmp_name(out_dir)
    try:
        tmp.mkdir(parents=True)
        con = connect(src)
        try:
            for table in _tables(con):
                rows = "SELECT * FROM schema_version" if table == "schema_version" else \
                    f'SELECT * FROM "{table}" WHERE run_id = ?'
                con.sql(rows, params=[] if table == "schema_version" else [run_id]).write_parquet(
                    str(tmp / f"{table}.parquet"))
        finally:
            con.close()
        if out_dir.exists():  # set aside, not deleted, until the new folder is in place
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            if old.exists():
                old.rename(out_dir)
            raise
    except (duckdb.Error, OSError) as e:
        raise _write_error(out_dir, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return sorted(out_dir.glob("*.parquet"))


from store.console import SqlRefused, check_sql, run_user_sql  # noqa: E402,F401  (console needs connect above)
