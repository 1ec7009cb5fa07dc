"""Times every query the app issues on synthetic runs of gpt2-medium size and Llama-8B size.

    python -m bench.app_queries              # both sizes, median of 7 runs per query
    python -m bench.app_queries --sizes gpt2-medium --repeats 3

Each query runs exactly as the app runs it (a cursor on the app's snapshot connection of the store
file), minus the Streamlit result cache, which would hide the cost after the first call. The store holds two runs of the
size, so the run filter and the compare page have real work. Prints the median per query and its
ratio to the target (100 ms at gpt2-medium size, 250 ms at Llama-8B size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))

import queries  # noqa: E402
import store  # noqa: E402
from pipeline.attribute import GROUPS, REDUCING, group_codes  # noqa: E402

# (layers, d_mlp, target in ms): 24 x 4096 = 98,304 and 32 x 14,336 = 458,752 neurons.
SIZES = {"gpt2-medium": (24, 4096, 100.0), "llama-8b": (32, 14336, 250.0)}
N_PROMPTS, T = 1200, 20
N_VARIANTS = 16  # base, dpo and the interventions' generations
N_LENS, N_TOKENS, N_TOP_PROMPTS = 200, 10, 10
N_PAIRS = 24_576  # the paper's pairwise data


def synthetic_tables(n_layers: int, d_mlp: int, seed: int) -> dict[str, pl.DataFrame]:
    """Every table the app reads, at the given model size, with the value ranges a real run has."""
    rng = np.random.default_rng(seed)
    n = n_layers * d_mlp
    layer, neuron = np.divmod(np.arange(n), d_mlp)
    cos = rng.uniform(-0.3, 0.3, n)
    act = rng.normal(0.0, 0.1, n)
    act_dpo = act - rng.normal(0.0, 0.02, n)
    proj, proj_dpo = act * cos, act_dpo * cos
    delta, dact = proj - proj_dpo, act - act_dpo
    codes = group_codes(cos, act, dact)
    rank = np.empty(n, dtype=np.int64)
    order = np.argsort(-delta, kind="stable")
    rank[order] = np.arange(1, n + 1)
    cum_share = np.empty(n)
    cum_share[order] = np.cumsum(delta[order]) / delta.sum()
    neurons = pl.DataFrame({"layer": layer, "neuron": neuron, "cos": cos, "act": act, "act_dpo": act_dpo, "proj": proj,
                            "proj_dpo": proj_dpo, "delta": delta, "dact": dact, "group_code": codes,
                            "delta_rank": rank,
                            "cum_share": cum_share})
    sums = {g: float(delta[codes == g].sum()) for g in GROUPS}
    gross = sum(sums[g] for g in REDUCING)
    group_summary = pl.DataFrame({
        "group_code": list(GROUPS), "effect": ["reduces" if g in REDUCING else "increases" for g in GROUPS],
        "n_neurons": [int((codes == g).sum()) for g in GROUPS], "sum_delta": [sums[g] for g in GROUPS],
        "share_gross": [sums[g] / gross for g in GROUPS], "share_net": [sums[g] / delta.sum() for g in GROUPS],
        "ci_low": [sums[g] / gross - 0.01 for g in GROUPS], "ci_high": [sums[g] / gross + 0.01 for g in GROUPS]})
    layer_groups = (neurons.group_by("layer", "group_code")
                    .agg(n_neurons=pl.len(), sum_delta=pl.col("delta").sum()))
    variants = ["base", "dpo"] + [f"ablate_top_{k}" for k in range(N_VARIANTS - 2)]
    generations = pl.DataFrame({
        "variant": np.repeat(variants, N_PROMPTS), "prompt_id": np.tile(np.arange(N_PROMPTS), len(variants)),
        "prompt": [f"prompt {i} " * 4 for i in range(N_PROMPTS)] * len(variants),
        "continuation": [" word" * T] * (N_PROMPTS * len(variants)),
        "toxicity": rng.uniform(0, 1, N_PROMPTS * len(variants)), "scorer": "bench==1"})
    top = order[:N_LENS]
    n_lens = top.size
    neuron_tokens = pl.DataFrame({
        "layer": np.repeat(layer[top], N_TOKENS), "neuron": np.repeat(neuron[top], N_TOKENS),
        "rank": np.tile(np.arange(1, N_TOKENS + 1), n_lens), "token": " tok", "logit": rng.normal(size=n_lens * N_TOKENS)})
    neuron_top_prompts = pl.DataFrame({
        "layer": np.repeat(layer[top], N_TOP_PROMPTS), "neuron": np.repeat(neuron[top], N_TOP_PROMPTS),
        "rank": np.tile(np.arange(1, N_TOP_PROMPTS + 1), n_lens),
        "prompt_id": rng.integers(0, N_PROMPTS, n_lens * N_TOP_PROMPTS),
        "act": rng.uniform(0, 1, n_lens * N_TOP_PROMPTS), "act_dpo": rng.uniform(0, 1, n_lens * N_TOP_PROMPTS)})
    prompt_groups = pl.DataFrame({
        "prompt_id": np.repeat(np.arange(N_PROMPTS), n_layers * len(GROUPS)),
        "layer": np.tile(np.repeat(np.arange(n_layers), len(GROUPS)), N_PROMPTS),
        "group_code": np.tile(list(GROUPS), N_PROMPTS * n_layers),
        "sum_delta": rng.normal(size=N_PROMPTS * n_layers * len(GROUPS))})
    layers = pl.DataFrame({"variant": np.repeat(variants, n_layers), "layer": np.tile(np.arange(n_layers), len(variants)),
                           "mlp_proj": rng.normal(size=n_layers * len(variants))})
    interventions = pl.DataFrame({
        "intervention_id": variants, "kind": ["base", "dpo"] + ["ablate_top"] * (N_VARIANTS - 2),
        "params": ["{}"] * N_VARIANTS, "n_neurons": [0, 0] + [20 * (k + 1) for k in range(N_VARIANTS - 2)],
        "toxicity": rng.uniform(0, 1, N_VARIANTS), "toxic_share": rng.uniform(0, 1, N_VARIANTS),
        "perplexity": rng.uniform(20, 30, N_VARIANTS), "f1": rng.uniform(0.1, 0.2, N_VARIANTS),
        "recovered": rng.uniform(0, 1, N_VARIANTS)})
    n_tok = N_PROMPTS * T
    jsd = rng.uniform(0, 1, n_tok)
    revisions = pl.DataFrame({
        "variant": "base", "prompt_id": np.repeat(np.arange(N_PROMPTS), T), "position": np.tile(np.arange(T), N_PROMPTS),
        "token": " word", "jsd": jsd, "masked": jsd > 0.5, "regenerated": jsd > 0.5, "original": " word" * T,
        "revised": " other" * T})
    cum = cum_share[order]
    attribution = pl.DataFrame({
        "net_reduction": [float(delta.sum())], "gross_reduction": [gross], "n_neurons": [n],
        **{f"n_for_{p}": [int(np.searchsorted(cum, p / 100) + 1)] for p in (50, 75, 99)}})
    return {
        "neurons": neurons, "group_summary": group_summary, "layer_groups": layer_groups, "generations": generations,
        "neuron_tokens": neuron_tokens, "neuron_top_prompts": neuron_top_prompts, "prompt_groups": prompt_groups,
        "layers": layers, "interventions": interventions, "attribution": attribution, "revisions": revisions,
        "probe_metrics": pl.DataFrame({"n_train": [5000], "n_val": [1000], "train_accuracy": [0.95],
                                       "val_accuracy": [0.94], "val_roc_auc": [0.97], "layer": [n_layers - 1],
                                       "w_norm": [1.0], "direction": [rng.normal(size=64).tolist()]}),
        "dpo_curve": pl.DataFrame({"step": np.arange(300), "loss": rng.uniform(0, 1, 300),
                                   "reward_margin": rng.normal(size=300), "reward_accuracy": rng.uniform(0, 1, 300)}),
        "pairs": pl.DataFrame({"pair_id": np.arange(N_PAIRS), "prompt": [f"prompt {i} " * 4 for i in range(N_PAIRS)],
                               "chosen": " word" * T, "rejected": " other" * T,
                               "chosen_toxicity": rng.uniform(0, 0.5, N_PAIRS),
                               "rejected_toxicity": rng.uniform(0.3, 1, N_PAIRS)}),
    }


def write_store(path: Path, n_layers: int, d_mlp: int) -> tuple[str, str]:
    ids = []
    for seed in (0, 1):  # two betas: Compare runs lists the setting they differ in
        config = {"data": {"prompts": "bench"}, "scorer": {"backend": "bench"}, "dpo": {"beta": 0.1 * (1 + seed)}}
        run = {"name": f"bench-{seed}", "model": f"synthetic {n_layers}x{d_mlp}", "config": config,
               "config_hash": f"bench-{seed}", "packages": {}}
        stages = [{"stage": "world", "cache_key": "k", "seconds": 1.0, "summary": {"scorer": "bench"}},
                  {"stage": "score", "cache_key": "k", "seconds": 1.0, "summary": {"dpo_drop": 0.2, "dpo_drop_se": 0.01}}]
        ids.append(store.write_run(path, run=run, stages=stages, tables=synthetic_tables(n_layers, d_mlp, seed)))
    return ids[0], ids[1]


def app_calls(path: str, run_a: str, run_b: str, n_layers: int) -> dict[str, tuple]:
    """Every query in app/queries.py with the arguments its page passes: (function, *args). Cached
    queries are called through __wrapped__ to bypass the cache."""
    v = queries.store_version(path)
    all_groups, full_cos = tuple(GROUPS), (-1.0, 1.0)
    top = uncached(queries.neurons)(path, v, run_a, all_groups, (0, n_layers - 1), full_cos, 0.0, 1)
    layer, neuron = top["layer"][0], top["neuron"][0]
    return {
        "runs": (queries.runs, path, v),
        "stages": (queries.stages, path, v, run_a),
        "world_summary": (queries.world_summary, path, v, run_a),
        "run_info": (queries.run_info, path, v, run_a),
        "probe_metrics": (queries.probe_metrics, path, v, run_a),
        "toxicity_by_variant": (queries.toxicity_by_variant, path, v, run_a),
        "attribution": (queries.attribution, path, v, run_a),
        "group_summary": (queries.group_summary, path, v, run_a),
        "cumulative": (queries.cumulative, path, v, run_a),
        "dpo_curve": (queries.dpo_curve, path, v, run_a),
        "pairs_summary": (queries.pairs_summary, path, v, run_a),
        "pairs (first 500)": (queries.pairs, path, v, run_a, 500),
        "variants": (queries.variants, path, v, run_a),
        "generations": (queries.generations, path, v, run_a, "base", 0.0),
        "neuron_bounds": (queries.neuron_bounds, path, v, run_a),
        "neurons (all groups, top 1000)": (queries.neurons, path, v, run_a, all_groups, (0, n_layers - 1),
                                           full_cos, 0.0, 1000),
        "neurons (TP-, layers, cos, |act|)": (queries.neurons, path, v, run_a, ("TP-",), (n_layers // 2, n_layers - 1),
                                              (0.05, 1.0), 0.01, 1000),
        "layers": (queries.layers, path, v, run_a),
        "layer_groups": (queries.layer_groups, path, v, run_a),
        "neuron": (queries.neuron, path, v, run_a, layer, neuron),
        "neuron_tokens": (queries.neuron_tokens, path, v, run_a, layer, neuron),
        "neuron_top_prompts": (queries.neuron_top_prompts, path, v, run_a, layer, neuron),
        "interventions": (queries.interventions, path, v, run_a),
        "dpo_drop": (queries.dpo_drop, path, v, run_a),
        "prompts": (queries.prompts, path, v, run_a),
        "prompt_group_shares": (queries.prompt_group_shares, path, v, run_a),
        "group_shares_of": (queries.group_shares_of, path, v, (run_a, run_b)),
        "top_overlap (k=100)": (queries.top_overlap, path, v, run_a, run_b, 100),
        "settings_that_differ": (queries.settings_that_differ, path, v, run_a, run_b),
        "revised_continuations": (queries.revised_continuations, path, v, run_a),
        "revision": (queries.revision, path, v, run_a, "base", 0),
        "schema": (queries.schema, path, v),
        "user_sql (the SQL page's example)": (queries.user_sql, path, queries.example_sql(run_a)),
    }


def uncached(fn):
    return getattr(fn, "__wrapped__", fn)


def time_calls(calls: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Median milliseconds per query; the first call of each is a warm-up (OS file cache)."""
    out = {}
    for name, (fn, *args) in calls.items():
        uncached(fn)(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            uncached(fn)(*args)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    console = Console()
    results, over = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n_layers, d_mlp, _ = SIZES[size]
            path = str(Path(tmp) / f"{size}.duckdb")
            with console.status(f"writing two synthetic {size} runs ({n_layers * d_mlp:,} neurons each)"):
                run_a, run_b = write_store(Path(path), n_layers, d_mlp)
            with console.status(f"timing {size} queries"):
                results[size] = time_calls(app_calls(path, run_a, run_b, n_layers), args.repeats)
    table = Table(title=f"App queries, median of {args.repeats} runs (ms) and ratio to the target")
    table.add_column("query")
    for size in args.sizes:
        table.add_column(f"{size} ({SIZES[size][0] * SIZES[size][1]:,} neurons)", justify="right")
    for name in results[args.sizes[0]]:
        cells = []
        for size in args.sizes:
            ms, target = results[size][name], SIZES[size][2]
            over += ms > target
            cells.append(f"{ms:7.1f}  {ms / target:4.2f}x{' OVER' if ms > target else ''}")
        table.add_row(name, *cells)
    console.print(table)
    for size in args.sizes:
        worst = max(results[size], key=results[size].get)
        console.print(f"{size}: slowest {worst} {results[size][worst]:.1f} ms, target {SIZES[size][2]:.0f} ms")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
