"""Peak memory of stage record's generate-and-record against the number of prompts: each size runs in
a fresh process that loads the model, resets its peaks, records, and reports the resident set size
after loading, the peak while recording (VmHWM, reset through /proc/self/clear_refs) and their
difference, on a GPU the peak of torch's allocations while recording (reset after loading), and the
time recording took, side by side in one run. The load's own peak would otherwise hide growth below it.

    python -m bench.record_memory                                      # gpt2-medium shape, 100/400/1200 x 20
    python -m bench.record_memory --n-layer 4 --d-model 256 --sizes 20 80 240   # quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import child_numbers, model_args, prompts, save_model


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its peak), in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(args) -> None:
    import gc

    from pipeline import models, record

    bridge = models.load_bridge(args.model, args.device)
    rows = prompts(args.child, args)
    texts = [bridge.tokenizer.decode(r) for r in rows]  # re-tokenized by record: longer, hence 4x room in the context
    w = np.random.default_rng(0).normal(size=args.d_model).astype(np.float32)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux): the peak from here on is recording's
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded = status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        record.generate_and_record(bridge, texts, w / np.linalg.norm(w), args.new_tokens, args.batch, "record",
                                   Path(d) / "record_")
        seconds = time.perf_counter() - t0  # the sums come back to the CPU at the end, so the GPU's work is done
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else 0.0
    print(loaded, status_mib("VmHWM"), gpu, seconds)


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
        peaks[n] = child_numbers("bench.record_memory", [*base, "--child", str(n), "--model", str(model)])
    print(f"{args.n_layer} x {4 * args.d_model} neurons, d_model {args.d_model}; T = {args.new_tokens}, batch {args.batch}, "
          f"{args.device}")
    first = peaks[args.sizes[0]]
    for n, (loaded, peak, gpu, seconds) in peaks.items():
        on_gpu = f"; GPU peak {gpu:8.0f} MiB  ({gpu / first[2]:.2f}x)" if args.device.startswith("cuda") else ""
        print(f"  {n:>6} prompts: RSS {loaded:8.0f} MiB loaded, peak {peak:8.0f} MiB recording, +{peak - loaded:6.0f} MiB "
              f"({peak / first[1]:.2f}x the smallest's peak){on_gpu}; recorded in {seconds:.2f} s")


if __name__ == "__main__":
    main()
