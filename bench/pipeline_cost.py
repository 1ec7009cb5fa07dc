"""Cost of the paper's whole setup, stage by stage: configs/gpt2-medium.toml run by the runner as
`python -m pipeline run` runs it (its 21 interventions, stream perplexity, batch sizes), on a random-init
checkpoint of gpt2-medium's architecture and files in the real datasets' formats (Jigsaw csv,
RealToxicityPrompts jsonl, pairs jsonl, WikiText-2 text) written here at a chosen size, into a store.

Each stage is timed, and so is the part of it whose work grows with the data (the probe's forward passes,
the scorer, DPO's optimizer steps, record's and the interventions' generations, F1 continuations,
perplexity windows), by wrapping those functions. The paper's sizes are then that part scaled by what
the paper has over this run (1,200 prompts, 24,576 pairs in 6,144 steps, 20,000 probe texts, about
287,000 WikiText-2 tokens, 200 F1 passages), plus the rest as measured (loading models, attribute, the
store); DPO's first step, which carries the warm-up, counts once. On a GPU each stage's peak of torch's
allocations is shown beside it. Every probe text fills 128 tokens and every pair 128 tokens, so those
two are upper bounds. The defaults give each part whole
batches (the preset's 64 prompts, 4 pairs, 64 probe texts, 8 windows of 1,024 tokens a batch): a GPU
takes nearly as long for a part-filled batch as for a full one, so sizes that fill their last batch
scale best. The scorer is profanity-check unless --scorer says otherwise (the
paper's Perspective is bound by its quota: README, Running the paper's setup).

    python -m bench.pipeline_cost --device cuda --prompts 256 --pairs 512 --probe-texts 2000 --heldout-tokens 32768
    python -m bench.pipeline_cost --n-layer 4 --d-model 256 --prompts 16 --probe-texts 64 --heldout-tokens 4096  # quick
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import tempfile
import time
import tomllib
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoTokenizer

import store
from bench.common import PRESET, dpo_seconds, model_args, save_model, text_of
from pipeline import config, data, intervene, probe, record, runner, scoring

PAPER = {"prompts": 1_200, "pairs": 24_576, "probe texts": 20_000, "heldout tokens": 287_000, "f1 passages": 200}


def write_datasets(d: Path, tok, args) -> int:
    """The four files; returns the held-out file's length in tokens."""
    r = random.Random(0)
    with open(d / "train.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "comment_text", "toxic"])
        w.writerows([i, text_of(tok, 128, r), i % 2] for i in range(args.probe_texts))
    with open(d / "rtp.jsonl", "w", encoding="utf-8") as f:
        for _ in range(args.prompts):
            f.write(json.dumps({"prompt": {"text": text_of(tok, args.prompt_len, r)}, "challenging": True}) + "\n")
    with open(d / "pairs.jsonl", "w", encoding="utf-8") as f:  # prompt and completions of 64 tokens: each pair fills 128
        for _ in range(args.pairs):
            f.write(json.dumps({k: text_of(tok, 64, r) for k in ("prompt", "chosen", "rejected")}) + "\n")
    lines, n_tokens = [], 0
    while n_tokens < args.heldout_tokens:  # WikiText's shape: headings, blank lines, paragraphs of some 128 tokens
        if len(lines) % 10 == 0:
            lines += [f" = {text_of(tok, 3, r)} = ", ""]
        lines += [" " + text_of(tok, 128, r), ""]
        n_tokens += 128
    (d / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(tok("\n\n".join(lines))["input_ids"])


def preset_config(d: Path, model: Path, args) -> config.Config:
    raw = tomllib.loads(PRESET.read_text())
    raw["run"] |= {"name": "bench", "cache_dir": str(d / "cache"), "store": str(d / "bench.duckdb"), "device": args.device}
    raw["model"]["path"] = str(model)
    raw["scorer"] = {"backend": args.scorer}
    raw["data"] |= {"probe": str(d / "train.csv"), "prompts": str(d / "rtp.jsonl"), "pairs": str(d / "pairs.jsonl"),
                    "heldout": str(d / "wiki.txt"), "max_prompts": args.prompts}
    raw["probe"]["max_examples"] = args.probe_texts
    raw["pairs"]["max_pairs"] = args.pairs
    raw["record"] |= {"new_tokens": args.new_tokens, "batch_size": args.batch}
    return config.from_dict(raw, source=str(PRESET))


class Timer:
    """Wraps the functions whose work grows with the data. `how(stage, *args)` names a call's part and
    its factor to the paper's size; each call's seconds, and those seconds times the factor, are added to
    that part of the stage running at the time. On a GPU it keeps each stage's peak allocation."""

    def __init__(self, device: str):
        self.device, self.stage = device, ""
        self.measured, self.scaled = defaultdict(float), defaultdict(float)  # keyed by (stage, part)
        self.gpu_peak = {}  # stage: MiB
        self.wrapped = []  # (module, name, function) to put back

    def wrap(self, module, name: str, how) -> None:
        fn = getattr(module, name)
        self.wrapped.append((module, name, fn))

        def timed(*a, **k):
            t0 = time.perf_counter()
            result = fn(*a, **k)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            part, factor = how(self.stage, *a)
            self.measured[self.stage, part] += seconds
            self.scaled[self.stage, part] += seconds * factor
            return result

        setattr(module, name, timed)

    def unwrap(self) -> None:
        for module, name, fn in reversed(self.wrapped):
            setattr(module, name, fn)
        self.wrapped.clear()

    def parts(self, stage: str) -> list[str]:
        return [part for s, part in self.measured if s == stage]

    def log(self, line: str) -> None:
        if line.endswith(")") and "] running (" in line:
            self.switch(line[1:line.index("]")])
        elif "] done in " in line:
            self.switch("store")  # the runner's own work between and after the stages, as the table counts it

    def switch(self, stage: str) -> None:
        """Keeps the running stage's GPU peak and counts afresh for the next (what a stage leaves allocated
        counts in the next one's peak too)."""
        if self.device.startswith("cuda"):
            if self.stage:
                self.gpu_peak[self.stage] = max(self.gpu_peak.get(self.stage, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        self.stage = stage


def main(argv=None) -> None:
    p = model_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.set_defaults(batch=64)  # the preset's [record] batch_size
    p.add_argument("--prompts", type=int, default=64, help="challenge prompts (paper: 1,200)")
    p.add_argument("--pairs", type=int, default=32, help="preference pairs, 4 a step (paper: 24,576)")
    p.add_argument("--probe-texts", type=int, default=128, help="Jigsaw rows of 128 tokens (paper: 20,000)")
    p.add_argument("--heldout-tokens", type=int, default=8192, help="held-out text (WikiText-2 test: about 287,000)")
    p.add_argument("--scorer", default="profanity-check", choices=sorted(scoring.BACKENDS))
    args = p.parse_args(argv)
    t_model = time.perf_counter()
    path = save_model(args, n_positions=1024)
    t_model = time.perf_counter() - t_model
    tok = AutoTokenizer.from_pretrained(path)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        heldout_tokens = write_datasets(d, tok, args)
        cfg = preset_config(d, path, args)
        n_f1 = len(data.load_text(Path(cfg.data.heldout))[:cfg.intervene.n_heldout])  # as intervene.load_heldout takes them
        timer = Timer(args.device)
        per_prompt = PAPER["prompts"] / args.prompts
        timer.wrap(probe, "mean_residual", lambda stage, bridge, texts, *_: ("forward passes", PAPER["probe texts"] / len(texts)))
        timer.wrap(record, "generate_and_record", lambda *_: ("generations", per_prompt))
        timer.wrap(intervene, "generate", lambda stage, bridge, rows, *a: (
            ("F1 continuations", PAPER["f1 passages"] / n_f1) if a[-1].endswith(" f1") else ("generations", per_prompt)))
        timer.wrap(intervene, "perplexity", lambda *_: ("perplexity", PAPER["heldout tokens"] / heldout_tokens))
        timer.wrap(scoring, "in_batches", lambda stage, *_: ("scorer", PAPER["pairs"] / args.pairs if stage == "pairs" else per_prompt))
        t0 = time.perf_counter()
        try:
            run_id = runner.run(cfg, log=timer.log)
        finally:
            timer.unwrap()
        timer.switch("")
        total = time.perf_counter() - t0
        stages = {row["stage"]: row for row in runner.status(cfg)}
        con = store.connect(cfg.run.store)
        n_neurons, = con.execute("SELECT count(*) FROM neurons WHERE run_id = ?", [run_id]).fetchone()
        n_generations, = con.execute("SELECT count(*) FROM generations WHERE run_id = ?", [run_id]).fetchone()
        con.close()

    dpo = stages["dpo"]["summary"]
    timer.measured["dpo", "optimizer steps"] += dpo["seconds"]  # trl's training loop
    pairs_per_step = cfg.dpo.batch_size * cfg.dpo.grad_accum
    timer.scaled["dpo", "optimizer steps"] += dpo_seconds(dpo, PAPER["pairs"] // pairs_per_step)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    gpu = f", GPU peak {max(timer.gpu_peak.values()):,.0f} MiB" if timer.gpu_peak else ""
    print(f"{args.n_layer} x {4 * args.d_model} neurons, d_model {args.d_model}, vocab {args.vocab}; {args.prompts} prompts, "
          f"{args.pairs} pairs, {args.probe_texts} probe texts, {heldout_tokens:,} held-out tokens ({n_f1} F1 passages); {args.scorer}; "
          f"{args.device}, {torch.get_num_threads()} threads; peak RSS {rss:,.0f} MiB{gpu}")
    print(f"  checkpoint written in {t_model:.1f} s; the run: {total:.1f} s, {n_neurons:,} neurons and {n_generations:,} "
          "generations in the store")

    def peak(name: str) -> str:
        return f" {timer.gpu_peak[name]:>9,.0f} MiB" if name in timer.gpu_peak else ""

    print(f"  {'stage':<10} {'measured':>10} {'of which grows':>15} {'paper size':>12}" + (f" {'GPU peak':>13}" if timer.gpu_peak else ""))
    rows = [(name, row["seconds"]) for name, row in stages.items()] + [("store", total - sum(r["seconds"] for r in stages.values()))]
    paper_total = 0.0
    for name, seconds in rows:
        grows = sum(timer.measured[name, part] for part in timer.parts(name))
        paper = seconds - grows + sum(timer.scaled[name, part] for part in timer.parts(name))
        paper_total += paper
        print(f"  {name:<10} {seconds:>8.1f} s {grows:>13.1f} s {paper / 60:>8.2f} min{peak(name)}")
        for part in timer.parts(name):
            print(f"    {part:<18} {timer.measured[name, part]:>13.1f} s {timer.scaled[name, part] / 60:>8.2f} min")
    print(f"  {'all':<10} {total:>8.1f} s {sum(timer.measured.values()):>13.1f} s {paper_total / 60:>8.2f} min")


if __name__ == "__main__":
    main()
