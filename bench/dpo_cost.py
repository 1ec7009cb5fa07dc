"""Cost of stage dpo at the paper's settings, the [dpo] section of configs/gpt2-medium.toml as it stands
(4 pairs per step, sequences cut to 128 tokens, RMSprop, float32, no EOS after the completions, the base
model as trl's frozen reference) on a random-init checkpoint of gpt2-medium's architecture: optimizer
steps of the stage's own code, timed, and the paper's 24,576 pairs (6,144 steps of 4) scaled from them.
Every pair fills all 128 tokens, so the figure is an upper bound for data whose prompts and
continuations are shorter. The first step, which carries the warm-up, is scaled as itself and the others
by their mean.

    python -m bench.dpo_cost --device cuda --steps 512              # gpt2-medium shape
    python -m bench.dpo_cost --n-layer 4 --d-model 256 --steps 2    # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.common import PRESET, dpo_seconds, model_args, save_model, text_of
from pipeline import config, dpo
from pipeline.config import ModelConfig

PAPER_PAIRS = 24_576


def write_pairs(path: Path, tok, n: int, max_length: int) -> None:
    """n pairs of a prompt of half max_length and completions as long: trl cuts prompt plus completion
    to max_length (and drops a pair whose prompt alone fills it), so each sequence costs the full length."""
    r = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({k: text_of(tok, max_length // 2, r) for k in ("prompt", "chosen", "rejected")}) + "\n")


def main(argv=None) -> None:
    p = model_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps timed")
    p.add_argument("--preset", default=str(PRESET), help="the config whose [dpo] section is timed")
    p.add_argument("--pairs-per-step", type=int, help="[dpo] batch_size, pairs a pass (default: the preset's); a step "
                   "takes grad_accum passes")
    p.add_argument("--max-length", type=int, help="[dpo] max_length (default: the preset's)")
    args = p.parse_args(argv)
    cfg = config.load(args.preset).dpo
    cfg = dataclasses.replace(cfg, batch_size=args.pairs_per_step or cfg.batch_size, max_length=args.max_length or cfg.max_length)
    pairs_per_step = cfg.batch_size * cfg.grad_accum
    path = save_model(args, n_positions=cfg.max_length)
    tok = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory() as d:
        pairs_dir, out = Path(d) / "pairs", Path(d) / "dpo"
        pairs_dir.mkdir()
        write_pairs(pairs_dir / "pairs.jsonl", tok, args.steps * pairs_per_step, cfg.max_length)
        result = dpo.run(out, device=args.device, model=ModelConfig(path=str(path)), dpo=cfg, world_dir=None,
                         pairs_dir=pairs_dir)
    paper_steps = PAPER_PAIRS // pairs_per_step
    rest = dpo_seconds(result, 2) - result["first_step_seconds"]  # the mean step after the first
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if args.device.startswith("cuda") else ""
    print(f"{args.n_layer} x {4 * args.d_model} neurons, d_model {args.d_model}, vocab {args.vocab}; {pairs_per_step} pairs "
          f"per step, {cfg.max_length} tokens each, {args.device}, {torch.get_num_threads()} threads{gpu}")
    print(f"  {result['n_steps']} steps of stage dpo:               {result['seconds']:8.2f} s  "
          f"(the first {result['first_step_seconds']:.2f} s, then {rest:.3f} s per step)")
    print(f"  the paper's pairs, {paper_steps:,} such steps:       {dpo_seconds(result, paper_steps) / 60:8.1f} min")


if __name__ == "__main__":
    main()
