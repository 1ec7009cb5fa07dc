"""Stage `score`: the toxicity of every continuation the run generated, by the independent scorer.

record, intervene and detox generate; this stage scores what they wrote, so a [scorer] change reruns
this stage and the pairs (scored where they are made), and no generation, wherever the pairs come from
a file, the hub or the demo world (self-generated pairs are picked by their scores, so there everything
after them reruns). Each reads
    continuations.parquet   {variant, prompt_id, prompt, continuation}: record's base and dpo,
                            then one variant per intervention row of intervene and detox
    interventions.parquet   intervene's and detox's rows, every measure but those below
and this stage adds, with the scorer's name==version:
    generations.toxicity        the scorer's probability that one continuation is toxic
    interventions.toxicity      the mean over a row's continuations (base and dpo: record's)
    interventions.toxic_share   the share of those above 0.5
    interventions.recovered     (tox_base - tox) / (tox_base - tox_dpo), the share of DPO's drop; NULL
                                when that drop is within two standard errors of zero (the paired
                                per-prompt differences'), where the ratio would only scale noise
Each distinct text is scored once.

Outputs: generations.parquet and interventions.parquet, whole.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from pipeline import scoring
from pipeline.config import ScorerConfig

GENERATIONS = {"variant": pl.String, "prompt_id": pl.Int64, "prompt": pl.String, "continuation": pl.String,
               "toxicity": pl.Float64, "scorer": pl.String}
INTERVENTIONS = {"intervention_id": pl.String, "kind": pl.String, "params": pl.String, "n_neurons": pl.Int64, "toxicity": pl.Float64,
                 "toxic_share": pl.Float64, "perplexity": pl.Float64, "f1": pl.Float64, "recovered": pl.Float64}


def run(out: Path, *, device: str, scorer: ScorerConfig, record_dir: Path, intervene_dir: Path,
        detox_dir: Path | None) -> dict:
    dirs = [Path(d) for d in (record_dir, intervene_dir, detox_dir) if d is not None]
    continuations = pl.concat([pl.read_parquet(d / "continuations.parquet") for d in dirs])
    texts = continuations["continuation"].unique(maintain_order=True)
    sc = scoring.get_scorer(scorer, device)
    tox = dict(zip(texts.to_list(), sc.score(texts.to_list())))
    generations = continuations.with_columns(toxicity=pl.col("continuation").replace_strict(tox, return_dtype=pl.Float64),
                                             scorer=pl.lit(scoring.label(sc)))
    by_variant = generations.group_by("variant").agg(toxicity=pl.col("toxicity").mean(),
                                                     toxic_share=(pl.col("toxicity") > 0.5).mean())
    rows = pl.concat([pl.read_parquet(d / "interventions.parquet") for d in dirs[1:]])
    rows = rows.join(by_variant.rename({"variant": "intervention_id"}), on="intervention_id", how="left", maintain_order="left")
    missing = rows.filter(pl.col("toxicity").is_null())["intervention_id"].to_list()
    if missing:
        raise RuntimeError(f"intervention rows without continuations: {missing}")
    end = dict(by_variant.select("variant", "toxicity").iter_rows())
    tox_base, tox_dpo = end["base"], end["dpo"]
    drop_se = dpo_drop_se(generations)
    drop = tox_base - tox_dpo
    # Divided in Python: polars divides a column by a scalar through its reciprocal, which gave DPO's own
    # row 0.9999999999999999 where method.md defines it as 1.
    recovered = [(tox_base - t) / drop if abs(drop) > 2 * drop_se else None for t in rows["toxicity"]]
    rows = rows.with_columns(recovered=pl.Series(recovered, dtype=pl.Float64))
    generations.select(list(GENERATIONS)).cast(GENERATIONS).write_parquet(out / "generations.parquet")
    rows.select(list(INTERVENTIONS)).cast(INTERVENTIONS).write_parquet(out / "interventions.parquet")
    share = dict(by_variant.select("variant", "toxic_share").iter_rows())
    return {"scorer": scoring.label(sc), "n_texts": continuations.height, "n_distinct": len(texts),
            "toxicity": {r["intervention_id"]: round(r["toxicity"], 4) for r in rows.iter_rows(named=True)},
            "toxic_share_base": round(share["base"], 4), "toxic_share_dpo": round(share["dpo"], 4),
            "dpo_drop": round(tox_base - tox_dpo, 4), "dpo_drop_se": round(drop_se, 4) if math.isfinite(drop_se) else None}


def dpo_drop_se(generations: pl.DataFrame) -> float:
    """The standard error of DPO's toxicity drop tox_base - tox_dpo, the mean over the prompts of the
    base continuation's toxicity minus the DPO one's: both models continue the same prompts, so the
    differences pair up and the prompts' own spread cancels. Infinite with one prompt, whose single
    difference says nothing about the noise."""
    base, dpo = (generations.filter(pl.col("variant") == v).select("prompt_id", pl.col("toxicity").alias(v))
                 for v in ("base", "dpo"))
    d = base.join(dpo, on="prompt_id").select(pl.col("base") - pl.col("dpo")).to_series()  # (n_prompts,)
    return float(d.std() / math.sqrt(d.len())) if d.len() > 1 else math.inf


def tables(out: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(out / f"{name}.parquet") for name in ("generations", "interventions")}
