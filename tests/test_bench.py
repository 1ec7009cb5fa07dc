"""The query benchmark must time every query the app has, on data where each one returns rows; the
model benchmarks run on a tiny shape, record's sums equal the reference approach's, and the pipeline's
timer puts each call's seconds, scaled, on the stage that made it."""

from __future__ import annotations

import re
import types

import polars as pl
import pytest
import torch

from bench import app_queries, dpo_cost, dpo_memory, pipeline_cost, record_cost, record_memory
from pipeline import intervene


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
    peaks = re.findall(r"(\d+) prompts: RSS +(\d+) MiB loaded, peak +(\d+) MiB recording, \+ *(-?\d+) MiB.*recorded in (\S+) s",
                       capsys.readouterr().out)
    assert [n for n, *_ in peaks] == ["2", "4"] and all(int(loaded) > 100 for _, loaded, *_ in peaks)  # torch alone takes more
    # the peak was reset after loading: recording's own, at least what was resident then
    assert all(int(peak) >= int(loaded) and abs(int(peak) - int(loaded) - int(grew)) <= 1 for _, loaded, peak, grew, _ in peaks)
    assert all(float(s) > 0 for *_, s in peaks)


def test_dpo_memory_runs_each_way_with_the_same_pairs_per_step(capsys, monkeypatch):
    every = dpo_memory.ways(4)
    assert list(every) == ["4 pairs a pass", "1 x 4 accumulated", "4 a pass, checkpointed", "1 x 4, checkpointed"]
    assert all(w.get("batch_size") * w.get("grad_accum", 1) == 4 for w in every.values())
    # the first and the last way: a child process each (torch and trl imported afresh) is most of the time
    monkeypatch.setattr(dpo_memory, "ways", lambda n: {k: every[k] for k in ("4 pairs a pass", "1 x 4, checkpointed")})
    dpo_memory.main([*TINY, "--steps", "2", "--pairs-per-step", "4", "--max-length", "16"])
    rows = re.findall(r"^  (.+?) +peak RSS +(\d+) MiB \((\S+)x\); +(\S+) s per step \((\S+)x\), (\d+) steps$",
                      capsys.readouterr().out, re.M)
    assert [name for name, *_ in rows] == ["4 pairs a pass", "1 x 4, checkpointed"]
    assert all(steps == "2" for *_, steps in rows)  # each way took the same 2 optimizer steps of 4 pairs
    assert all(int(mib) > 100 and float(s) > 0 for _, mib, _, s, _, _ in rows) and rows[0][2] == rows[0][4] == "1.00"


def test_dpo_cost_times_the_steps_it_asked_for(capsys):
    dpo_cost.main([*TINY, "--steps", "3", "--pairs-per-step", "2", "--max-length", "16"])
    steps, total, first, rest, paper = re.search(
        r"(\d+) steps of stage dpo: +(\S+) s +\(the first (\S+) s, then (\S+) s per step\)\n.*?(\S+) min",
        capsys.readouterr().out).groups()
    assert int(steps) == 3 and 0 < float(first) <= float(total)
    assert float(rest) == pytest.approx((float(total) - float(first)) / 2, abs=0.01)
    paper_steps = dpo_cost.PAPER_PAIRS // 2
    assert float(paper) * 60 == pytest.approx(float(first) + float(rest) * (paper_steps - 1), abs=0.05 * 60 + 0.001 * paper_steps)


def test_dpo_scaling_counts_the_first_steps_warm_up_once():
    """A planted warm-up of 10 s in the first of 5 steps of 1 s: 100 steps take 10 + 99 s, not 100 x 14 / 5."""
    from bench.common import dpo_seconds

    assert dpo_seconds({"seconds": 14.0, "first_step_seconds": 10.0, "n_steps": 5}, 100) == pytest.approx(109.0)
    assert dpo_seconds({"seconds": 3.0, "first_step_seconds": 3.0, "n_steps": 1}, 100) == pytest.approx(300.0)


def test_pipeline_timer_scales_each_call_on_the_stage_that_made_it(monkeypatch):
    """On a clock and a GPU allocator that the calls themselves advance: each call's seconds, times its own
    factor, go to the stage running when it was made, and each stage keeps its own GPU peak."""
    clock, peak = [0.0], [0.0]  # seconds; MiB since the last reset
    monkeypatch.setattr(pipeline_cost, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak[0] * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.__setitem__(0, 0.0))

    def step(seconds, n, mib=0.0):
        clock[0] += seconds
        peak[0] = max(peak[0], mib)

    work = types.SimpleNamespace(step=step)
    timer = pipeline_cost.Timer("cuda")
    timer.wrap(work, "step", lambda stage, seconds, n: ("steps", 10 / n) if stage == "record" else ("other", 1.0))
    peak[0] = 999.0  # allocated before the run: no stage's
    timer.log("[record] running (abc)")
    work.step(5.0, 2, mib=100.0)
    work.step(5.0, 5, mib=300.0)
    timer.log("[record] done in 10.0s")  # until the next running line, the runner's own work: the table's "store"
    work.step(2.0, 1, mib=50.0)
    timer.log("[score] running (def)")
    work.step(3.0, 1, mib=20.0)
    timer.switch("")
    assert timer.parts("record") == ["steps"] and timer.parts("score") == timer.parts("store") == ["other"]
    assert (timer.measured["record", "steps"], timer.measured["store", "other"], timer.measured["score", "other"]) == (10, 2, 3)
    assert timer.scaled["record", "steps"] == 5 * 5 + 5 * 2 and timer.scaled["score", "other"] == 3
    assert timer.gpu_peak == {"record": 300.0, "store": 50.0, "score": 20.0}
    timer.unwrap()
    assert work.step is step


def test_pipeline_cost_runs_the_preset_into_a_store_and_scales_every_stage(capsys, monkeypatch):
    generate = intervene.generate
    # F1's prefixes then take several batches, each a call of generate; the scale is the run's passages, not a call's
    monkeypatch.setattr(intervene, "LOGITS_PER_BATCH", 3 * 80 * 300)  # 3 prefixes of up to 80 tokens, TINY's vocab
    pipeline_cost.main([*TINY, "--prompts", "4", "--pairs", "16", "--probe-texts", "16", "--heldout-tokens", "1024",
                        "--batch", "4"])
    assert intervene.generate is generate  # the stages' functions are unwrapped again for whatever runs next
    out = capsys.readouterr().out
    assert re.search(r"512 neurons and \d+ generations in the store", out)
    rows = {name: tuple(map(float, rest)) for name, *rest in
            re.findall(r"^  (\w+) +(\S+) s +(\S+) s +(\S+) min$", out, re.M)}
    assert list(rows) == ["probe", "pairs", "dpo", "record", "attribute", "intervene", "score", "store", "all"]
    for name, (measured, grows, paper_min) in rows.items():
        assert grows <= measured + 0.1 and paper_min * 60 >= measured - 0.4, name  # the paper has more of everything
    assert rows["intervene"][1] > 0 and rows["record"][1] > 0 and rows["dpo"][1] > 0
    parts = re.findall(r"^    (\S.*?) +(\S+) s +(\S+) min$", out, re.M)
    assert {p for p, *_ in parts} >= {"forward passes", "optimizer steps", "generations", "F1 continuations", "perplexity", "scorer"}
    (f1_measured, f1_paper_min), = [tuple(map(float, r)) for p, *r in parts if p == "F1 continuations"]
    n_f1 = int(re.search(r"\((\d+) F1 passages\)", out).group(1))
    factor = pipeline_cost.PAPER["f1 passages"] / n_f1
    assert f1_measured > 0 and abs(f1_paper_min * 60 - f1_measured * factor) <= 0.05 * factor + 0.3
    assert rows["store"][0] >= -0.05  # the rest of the run: the stages' own seconds do not overlap or exceed it
