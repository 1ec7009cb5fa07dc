"""Publishing without downtime: while the pipeline writes new runs into the store, a separate process
running the app's own queries never fails and always sees a whole run set, the old one or the new."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

import store

ROOT = Path(__file__).resolve().parents[1]
N_RUNS = 6

# The app's read path exactly: app/queries.py, outside Streamlit (its caches fall back to memory).
READER = """
import json, os, sys, time
sys.path[:0] = [{app!r}]
import queries
path, ready, last = os.environ["STORE"], sys.argv[1], int(sys.argv[2])
seen, errors, n = [], [], 0
deadline = time.time() + 300
open(ready, "w").close()
while time.time() < deadline:
    try:
        runs = queries.runs(path, queries.store_version(path))
        newest = runs.row(0, named=True)
        tox = queries.toxicity_by_variant(path, queries.store_version(path), newest["run_id"])
        view = [sorted(runs["name"].to_list()), newest["name"], int(tox["n"][0]) if tox.height else 0]
        if view not in seen:
            seen.append(view)
    except Exception as e:
        errors.append(repr(e))
    n += 1
    if seen and len(seen[-1][0]) == last:
        break
print(json.dumps({{"seen": seen, "errors": errors[:5], "queries": n}}))
"""


def run_rows(k: int) -> pl.DataFrame:
    """Run k holds 5,000 * k generations: a reader that saw run k without all its rows would notice."""
    n = 5_000 * k
    return pl.DataFrame({"variant": ["base"] * n, "prompt_id": list(range(n)), "prompt": ["p"] * n,
                         "continuation": ["c"] * n, "toxicity": [0.5] * n, "scorer": ["s==1"] * n})


def write(path: Path, k: int) -> None:
    store.write_run(path, run={"name": f"r{k}", "model": "m", "config": {}, "config_hash": f"h{k}", "packages": {}},
                    stages=[], tables={"generations": run_rows(k)})


def test_app_queries_in_another_process_never_fail_while_runs_are_written(tmp_path):
    path = tmp_path / "s.duckdb"
    write(path, 1)
    ready = tmp_path / "ready"
    reader = subprocess.Popen([sys.executable, "-c", READER.format(app=str(ROOT / "app")), str(ready), str(N_RUNS)],
                              env=os.environ | {"STORE": str(path)}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        while not ready.exists():
            assert reader.poll() is None, "reader died before starting"
            time.sleep(0.05)
        time.sleep(1.0)  # the reader is inside its loop, querying the one-run file
        for k in range(2, N_RUNS + 1):
            write(path, k)
        out, _ = reader.communicate(timeout=300)
    finally:
        reader.kill()
    result = json.loads(out)
    assert result["errors"] == []
    seen = result["seen"]
    for names, newest, n_generations in seen:  # a whole run set: r1..rk, the newest with all its rows
        k = len(names)
        assert names == sorted(f"r{i}" for i in range(1, k + 1)) and newest == f"r{k}"
        assert n_generations == 5_000 * k
    assert seen[0][0] == ["r1"] and len(seen[-1][0]) == N_RUNS
    assert len(seen) >= 3, f"the reader saw too few run sets to show it ran during the writes: {seen}"
