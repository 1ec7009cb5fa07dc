"""The query benchmark must time every query the app has, on data where each one returns rows; the
record benchmarks run on a tiny shape, and record's sums equal the reference approach's."""

from __future__ import annotations

import re

import polars as pl

from bench import app_queries, dpo_cost, record_cost, record_memory


def test_bench_times_every_app_query_on_data_it_returns(tmp_path):
    path = tmp_path / "bench.duckdb"
    run_a, run_b = app_queries.write_store(path, n_layers=3, d_mlp=64)
    calls = app_queries.app_calls(str(path), run_a, run_b, n_layers=3)
    cached = {name for name, obj in vars(app_queries.queries).items()
              if hasattr(obj, "clear") and hasattr(obj, "__wrapped__") and not name.startswith("_")}
    timed = {app_queries.uncached(fn).__name__ for fn, *_ in calls.values()}
    assert cached | {"user_sql"} == timed
    for name, (fn, *args) in calls.items():
        result = app_queries.uncached(fn)(*args)
        if isinstance(result, tuple):  # user_sql: (frame, truncated)
            result = result[0]
        assert (result.height if isinstance(result, pl.DataFrame) else len(result)) > 0, name
    assert set(app_queries.time_calls(calls, repeats=1)) == set(calls)


TINY = ["--n-layer", "2", "--d-model", "64", "--n-head", "2", "--vocab", "300", "--new-tokens", "4"]


def test_record_cost_compares_methods_that_sum_the_same_activations(capsys):
    record_cost.main([*TINY, "--prompts", "3", "--batch", "2", "--repeat", "1"])
    out = capsys.readouterr().out
    diff, largest = map(float, re.search(r"max \|difference\| (\S+) \(largest sum (\S+)\)", out).groups())
    assert largest > 0 and diff < 1e-4 * largest
    for line in ("record / generate alone, same machinery", "of which the extra pass and the bridge calling 4 hooks",
                 "reference / record", "no one-pass method beats it by"):
        assert line in out


def test_record_memory_reports_a_peak_per_size(capsys):
    record_memory.main([*TINY, "--sizes", "2", "4"])
    peaks = re.findall(r"(\d+) prompts: peak RSS +(\d+) MiB.*recorded in (\S+) s", capsys.readouterr().out)
    assert [n for n, *_ in peaks] == ["2", "4"] and all(int(mib) > 100 for _, mib, _ in peaks)  # torch alone takes more
    assert all(float(s) > 0 for *_, s in peaks)


def test_dpo_cost_times_the_steps_it_asked_for(capsys):
    dpo_cost.main([*TINY, "--steps", "2", "--pairs-per-step", "2", "--max-length", "16"])
    steps, total, per_step, paper = re.search(r"(\d+) steps of stage dpo: +(\S+) s +\((\S+) s per step\)\n.*?(\S+) min",
                                              capsys.readouterr().out).groups()
    assert int(steps) == 2 and float(total) > 0
    assert abs(float(paper) * 60 - float(per_step) * dpo_cost.PAPER_STEPS) <= 0.01 * dpo_cost.PAPER_STEPS
