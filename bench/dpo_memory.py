"""Peak memory and time of stage dpo per optimizer step of the same pairs, taken whole, accumulated over
smaller passes ([dpo] grad_accum) and with gradient checkpointing ([dpo] gradient_checkpointing). Each
way runs in a fresh process that reports its own peak resident set size (ru_maxrss) and, on a GPU, the
peak of torch's allocations, side by side in one run: what fits a smaller card or a CPU's memory, and
what it costs in time. Pairs as in bench.dpo_cost: every one fills max_length.

    python -m bench.dpo_memory --device cuda --steps 64                # gpt2-medium shape, 4 pairs a step
    python -m bench.dpo_memory --n-layer 4 --d-model 256 --steps 2     # quick

The time a step is the mean of the steps after the first, which carries the warm-up (a few seconds on a
GPU, where at 16 steps it made the ways' ratios mislead); with --steps 1, the first's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.common import child_numbers, dpo_seconds, model_args, save_model
from bench.dpo_cost import write_pairs


def ways(pairs_per_step: int) -> dict[str, dict]:
    """[dpo] settings of each way, the same pairs per optimizer step."""
    accum = 4 if pairs_per_step % 4 == 0 else 2 if pairs_per_step % 2 == 0 else 1
    small = {"batch_size": pairs_per_step // accum, "grad_accum": accum}
    return {f"{pairs_per_step} pairs a pass": {"batch_size": pairs_per_step},
            f"{pairs_per_step // accum} x {accum} accumulated": small,
            f"{pairs_per_step} a pass, checkpointed": {"batch_size": pairs_per_step, "gradient_checkpointing": True},
            f"{pairs_per_step // accum} x {accum}, checkpointed": small | {"gradient_checkpointing": True}}


def child(args) -> None:
    from pipeline import dpo
    from pipeline.config import DPOStageConfig, ModelConfig

    cfg = DPOStageConfig(beta=0.1, lr=1e-5, optimizer="rmsprop", max_length=args.max_length, **json.loads(args.child))
    with tempfile.TemporaryDirectory() as d:
        result = dpo.run(Path(d) / "dpo", device=args.device, model=ModelConfig(path=args.model), dpo=cfg, world_dir=None,
                         pairs_dir=Path(args.pairs))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    print(rss, gpu, dpo_seconds(result, 2) - result["first_step_seconds"], result["n_steps"])


def main(argv=None) -> None:
    p = model_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per way")
    p.add_argument("--pairs-per-step", type=int, default=4, help="pairs per optimizer step (paper: 4)")
    p.add_argument("--max-length", type=int, default=128, help="[dpo] max_length")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    model = save_model(args, n_positions=args.max_length)
    base = list(argv if argv is not None else sys.argv[1:])
    peaks = {}
    with tempfile.TemporaryDirectory() as pairs:
        write_pairs(Path(pairs) / "pairs.jsonl", AutoTokenizer.from_pretrained(model), args.steps * args.pairs_per_step,
                    args.max_length)
        for name, settings in ways(args.pairs_per_step).items():
            peaks[name] = child_numbers("bench.dpo_memory", [*base, "--child", json.dumps(settings), "--model", str(model),
                                                             "--pairs", pairs])  # RSS, GPU, s/step, steps
    print(f"{args.n_layer} x {4 * args.d_model} neurons, d_model {args.d_model}, vocab {args.vocab}; {args.pairs_per_step} "
          f"pairs per optimizer step, {args.max_length} tokens each, {args.steps} steps per way, {args.device}, "
          f"{torch.get_num_threads()} threads")
    first = next(iter(peaks.values()))
    for name, (rss, gpu, per_step, steps) in peaks.items():
        on_gpu = f"; GPU peak {gpu:8.0f} MiB ({gpu / first[1]:.2f}x)" if args.device.startswith("cuda") else ""
        print(f"  {name:<28} peak RSS {rss:8.0f} MiB ({rss / first[0]:.2f}x){on_gpu}; {per_step:7.2f} s per step "
              f"({per_step / first[2]:.2f}x), {steps:.0f} steps")


if __name__ == "__main__":
    main()
