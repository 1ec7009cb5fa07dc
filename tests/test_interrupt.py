"""Ctrl-C in the middle of a stage, then a rerun: the interrupted command exits 130 with a one-line
note, the store is byte-for-byte as before, every finished stage stays cached, and the rerun runs only
the interrupted stage and writes a complete run."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import store
from pipeline import config, runner

ROOT = Path(__file__).resolve().parents[1]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_toml(path: Path, cfg: config.Config) -> Path:
    lines = []
    for name, body in cfg.to_dict().items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in body.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_sigint_mid_stage_then_rerun_resumes_with_nothing_lost(tiny_run, tmp_path):
    cfg, prior_run = tiny_run
    cache, path = tmp_path / "cache", tmp_path / "store.duckdb"
    shutil.copytree(cfg.run.cache_dir, cache)
    shutil.copyfile(cfg.run.store, path)
    cfg = config.from_dict(cfg.to_dict() | {"run": cfg.to_dict()["run"] | {"cache_dir": str(cache), "store": str(path)}})
    keys = runner.cache_keys(cfg)
    shutil.rmtree(runner.stage_dir(cfg, "intervene", keys["intervene"]))  # the last stage has to run again
    toml = write_toml(tmp_path / "tiny.toml", cfg)
    before = digest(path)

    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(toml)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line.strip())
                if line.startswith("[intervene] running"):
                    break
            time.sleep(3)  # well inside the stage: it takes tens of seconds on the tiny world
            assert proc.poll() is None, "the stage finished before it could be interrupted"
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    last = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
    assert code == 130, last
    assert last.startswith("interrupted:") and "rerun to resume" in last
    assert [line for line in lines if "cached" in line][:5] == [
        f"[{s}] cached ({keys[s]}), nothing to do" for s in ("world", "probe", "pairs", "dpo", "record")]
    assert digest(path) == before
    states = {r["stage"]: r["state"] for r in runner.status(cfg)}
    assert states.pop("intervene") == "to run" and set(states.values()) == {"cached"}

    log = []
    new_run = runner.run(cfg, log=log.append)
    assert [m for m in log if "running" in m] == [f"[intervene] running ({keys['intervene']})"]
    con = store.connect(path)
    try:
        runs = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
        per_run = dict(con.execute("SELECT run_id, count(*) FROM interventions GROUP BY run_id").fetchall())
    finally:
        con.close()
    assert runs == sorted([prior_run, new_run]) and per_run[new_run] == per_run[prior_run] > 0


@pytest.mark.slow
def test_libraries_are_imported_before_the_first_stage_starts(tiny_run, tmp_path):
    """A Ctrl-C inside pyarrow's import (which the bridge pulls in through datasets) ends the process by the
    signal, not with exit 130; so the imports come before any stage, and a stage's first seconds are its
    own. Checked in a fresh process where every stage before intervene is cached, as in the test above."""
    cfg, _ = tiny_run
    cache = tmp_path / "cache"
    shutil.copytree(cfg.run.cache_dir, cache)
    cfg = config.from_dict(cfg.to_dict() | {"run": cfg.to_dict()["run"] | {"cache_dir": str(cache)}})
    shutil.rmtree(runner.stage_dir(cfg, "intervene", runner.cache_keys(cfg)["intervene"]))
    toml = write_toml(tmp_path / "tiny.toml", cfg)
    # the process ends once the stage has started: the stage itself is not what is checked
    script = ("import os, sys\nfrom pipeline import config, runner\n"
              "def log(m):\n    print(m, 'transformer_lens.model_bridge' in sys.modules, flush=True)\n"
              "    if m.startswith('[intervene] running'):\n        os._exit(0)\n"
              "runner.run(config.load(sys.argv[1]), only='intervene', log=log)")
    out = subprocess.run([sys.executable, "-c", script, str(toml)], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"}).stdout
    assert [line for line in out.splitlines() if line.startswith("[intervene] running")][0].endswith(" True"), out
