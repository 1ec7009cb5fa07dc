"""Peak memory of stage record's generate-and-record against the number of prompts: each size runs in
a fresh process that reports its own peak resident set size (ru_maxrss), on a GPU the peak of torch's
allocations there, and the time recording took (the model's loading not included), side by side in one run.

    python -m bench.record_memory                                      # gpt2-medium shape, 100/400/1200 x 20
    python -m bench.record_memory --n-layer 4 --d-model 256 --sizes 20 80 240   # quick
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import child_numbers, model_args, prompts, save_model


def child(args) -> None:
    from pipeline import models, record

    bridge = models.load_bridge(args.model, args.device)
    rows = prompts(args.child, args)
    texts = [bridge.tokenizer.decode(r) for r in rows]  # re-tokenized by record: longer, hence 4x room in the context
    w = np.random.default_rng(0).normal(size=args.d_model).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        record.generate_and_record(bridge, texts, w / np.linalg.norm(w), args.new_tokens, args.batch, "record",
                                   Path(d) / "record_")
        seconds = time.perf_counter() - t0  # the sums come back to the CPU at the end, so the GPU's work is done
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, gpu, seconds)  # MiB (Linux reports ru_maxrss in KiB)


def main(argv=None) -> None:
    p = model_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1200], help="numbers of prompts")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    model = save_model(args)
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    peaks = {}
    for n in args.sizes:
        peaks[n] = child_numbers("bench.record_memory", [*base, "--child", str(n), "--model", str(model)])  # RSS, GPU, s
    print(f"{args.n_layer} x {4 * args.d_model} neurons, d_model {args.d_model}; T = {args.new_tokens}, batch {args.batch}, "
          f"{args.device}")
    first = peaks[args.sizes[0]]
    for n, (rss, gpu, seconds) in peaks.items():
        on_gpu = f"; GPU peak {gpu:8.0f} MiB  ({gpu / first[1]:.2f}x)" if args.device.startswith("cuda") else ""
        print(f"  {n:>6} prompts: peak RSS {rss:8.0f} MiB  ({rss / first[0]:.2f}x the smallest){on_gpu}; recorded in {seconds:.2f} s")


if __name__ == "__main__":
    main()
