"""The query benchmark must time every query the app has, on data where each one returns rows."""

from __future__ import annotations

import polars as pl

from bench import app_queries


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
