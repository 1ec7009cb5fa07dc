"""Stage `pairs`: the preference pairs DPO trains on, every text scored by the toxicity scorer.

Pairs come from a file (the paper's pairwise toxic / non-toxic data; the demo world's pairs.jsonl) or,
with [data] pairs = 'self', from the base model itself, best-of-K: K sampled continuations of each
challenge prompt, the least toxic as chosen and the most toxic as rejected, kept when the scorer
separates them by at least [pairs] margin. Loaded pairs are scored too, so that the store always
holds the toxicity gap of the data DPO saw.

Output: pairs.jsonl with prompt, chosen, rejected, chosen_toxicity, rejected_toxicity.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import polars as pl
import torch
from tqdm import tqdm

from pipeline import data as datasets
from pipeline import models, scoring
from pipeline.config import DataConfig, ModelConfig, PairsConfig, ScorerConfig


@torch.no_grad()
def sample_continuations(model, tok, prompts: list[str], cfg: PairsConfig, device: str,
                         batch_size: int = 16, bos: str = "transformerlens") -> list[list[str]]:
    """K sampled continuations per prompt, seeded; prompts start with BOS as in greedy generation ([model] bos)."""
    from transformers import set_seed

    set_seed(cfg.seed)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    out, prefix = [], models.bos_prefix(tok, model.config, bos)
    n_ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch"):
        enc = tok([prefix + p for p in prompts[i:i + batch_size]], return_tensors="pt", padding=True).to(device)
        if n_ctx and enc["input_ids"].shape[1] + cfg.new_tokens > n_ctx:
            raise datasets.DataError(f"a prompt of [data] prompts has {enc['input_ids'].shape[1]} tokens; with [pairs] "
                                     f"new_tokens = {cfg.new_tokens} the context of {n_ctx} holds at most "
                                     f"{n_ctx - cfg.new_tokens}; lower new_tokens or shorten it")
        # top_k=0 and top_p=1: plain temperature sampling, whatever the checkpoint's generation_config says
        gen = model.generate(**enc, max_new_tokens=cfg.new_tokens, do_sample=True, temperature=cfg.temperature,
                             top_k=0, top_p=1.0, num_return_sequences=cfg.k, pad_token_id=tok.eos_token_id)
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [texts[j:j + cfg.k] for j in range(0, len(texts), cfg.k)]  # generate groups the K samples by prompt
    return out


def best_of_k(prompts: list[str], samples: list[list[str]], scorer: scoring.Scorer, margin: float) -> list[dict]:
    """(least toxic, most toxic) sample per prompt, kept when their toxicity differs by >= margin."""
    # An empty continuation is trivially non-toxic: as chosen it would teach DPO to stop, not to be polite
    samples = [[s for s in group if s.strip()] for group in samples]
    flat = [s for group in samples for s in group]
    scores = iter(scorer.score(flat))
    rows = []
    for prompt, group in zip(prompts, samples):
        scored = sorted(zip((next(scores) for _ in group), group))
        if len(scored) >= 2 and scored[-1][0] - scored[0][0] >= margin:
            (lo, chosen), (hi, rejected) = scored[0], scored[-1]
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "chosen_toxicity": lo, "rejected_toxicity": hi})
    return rows


def run(out: Path, *, device: str, model: ModelConfig, data: DataConfig, pairs: PairsConfig,
        scorer: ScorerConfig, world_dir: Path | None) -> dict:
    sc = scoring.get_scorer(scorer, device)
    summary: dict = {"source": data.pairs}
    if data.pairs == "self":
        prompts = datasets.load_prompts(datasets.resolve("prompts", data.prompts, world_dir),
                                        data.challenging_only, data.max_prompts)
        path = datasets.model_path(model.path, world_dir)
        lm, tok = models.load_hf(path, device, model.dtype)
        lm.eval()
        rows = best_of_k(prompts, sample_continuations(lm, tok, prompts, pairs, device, bos=model.bos), sc, pairs.margin)
        if not rows:
            raise datasets.DataError(f"no self-generated pair out of {len(prompts)} prompts has a toxicity gap >= "
                                     f"{pairs.margin}; lower [pairs] margin or raise [pairs] k or temperature")
        summary |= {"n_prompts": len(prompts), "n_kept": len(rows)}
        rows = rows[:pairs.max_pairs]
    else:
        rows = datasets.load_pairs(datasets.resolve("pairs", data.pairs, world_dir), pairs.max_pairs)
        tox = sc.score([r["chosen"] for r in rows] + [r["rejected"] for r in rows])
        for r, c, t in zip(rows, tox[:len(rows)], tox[len(rows):]):
            r |= {"chosen_toxicity": c, "rejected_toxicity": t}

    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    gaps = [r["rejected_toxicity"] - r["chosen_toxicity"] for r in rows]
    return summary | {
        "n_pairs": len(rows),
        "gap_mean": round(statistics.fmean(gaps), 4),
        "gap_median": round(statistics.median(gaps), 4),
        "scorer": scoring.label(sc),
    }


def tables(out: Path) -> dict[str, pl.DataFrame]:
    frame = pl.read_ndjson(out / "pairs.jsonl").with_row_index("pair_id").with_columns(pl.col("pair_id").cast(pl.Int32))
    return {"pairs": frame.select("pair_id", "prompt", "chosen", "rejected", "chosen_toxicity", "rejected_toxicity")}
