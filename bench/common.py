"""Shared by the benchmarks: a random-init GPT-2 of a chosen shape (gpt2-medium's by default), saved
like any checkpoint and loaded by path, and random prompts of one length."""

from __future__ import annotations

import argparse
import atexit
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PRESET = Path(__file__).resolve().parent.parent / "configs" / "gpt2-medium.toml"  # the paper's setup


def model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--n-layer", type=int, default=24, help="blocks (gpt2-medium: 24)")
    p.add_argument("--d-model", type=int, default=1024, help="residual width; the MLP is 4x (gpt2-medium: 1024)")
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size (gpt2: 50257)")
    p.add_argument("--prompt-len", type=int, default=12, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=20, help="T")
    p.add_argument("--batch", type=int, default=8, help="prompts per batch")
    p.add_argument("--device", default="cpu")
    return p


def save_model(args, n_positions: int | None = None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline import corpus, world

    path = Path(tempfile.mkdtemp(prefix="bench-")) / "model"
    atexit.register(shutil.rmtree, path.parent, ignore_errors=True)  # a gpt2-medium-sized checkpoint is 1.4 GB
    r = random.Random(0)
    tok = world.train_tokenizer([corpus.neutral_sentence(r) for _ in range(200)], 300)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=n_positions or 4 * args.prompt_len + args.new_tokens, n_embd=args.d_model,
                               n_layer=args.n_layer, n_head=args.n_head, bos_token_id=tok.eos_token_id,
                               eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts(n: int, args, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.integers(1, 300, args.prompt_len)) for _ in range(n)]


def text_of(tok, n_tokens: int, r: random.Random) -> str:
    """Sentences of the demo corpus, joined and cut to n_tokens."""
    from pipeline import corpus

    text = corpus.neutral_sentence(r)
    while len(tok(text)["input_ids"]) < n_tokens:
        text += " " + corpus.neutral_sentence(r)
    return tok.decode(tok(text)["input_ids"][:n_tokens])


def dpo_seconds(summary: dict, steps: int) -> float:
    """Seconds of `steps` optimizer steps, scaled from a dpo stage summary: its first step as timed, which carries
    the warm-up, and every other at the mean of the rest (at the first's, if it timed one step only)."""
    first, n = summary["first_step_seconds"], summary["n_steps"]
    rest = (summary["seconds"] - first) / (n - 1) if n > 1 else first
    return first + rest * (steps - 1)


def child_numbers(module: str, args: list[str]) -> list[float]:
    """Run `python -m module *args` in a fresh process (its own peak RSS) and read the numbers its last line prints."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]
