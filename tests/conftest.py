"""Shared fixtures. The tiny demo world is trained once per session (about a minute) and every test
that needs a model or a store reads it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline import config, runner

TINY_WORLD = {
    "n_sentences": 20_000,
    "train_steps": 150,
    "n_probe": 200,
    "n_prompts": 40,
    "n_pairs": 100,
    "n_heldout": 300,
    "n_samples": 24,
}


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest leaves its page as sys.modules["__main__"]; a process spawned later (record's
    shards) would run that page on start-up and die, so every test gets the real one back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


def tiny_config(tmp: Path, **world) -> config.Config:
    return config.from_dict({
        "run": {"name": "tiny", "cache_dir": str(tmp / "cache"), "store": str(tmp / "store.duckdb"), "device": "cpu"},
        "model": {"path": "world"},
        "world": TINY_WORLD | world,
        "probe": {"max_examples": 200},
        "dpo": {"epochs": 2.0},
        "record": {"batch_size": 20},
        "attribute": {"n_bootstrap": 100, "n_logit_lens": 50, "n_top_prompt_neurons": 20},
        "intervene": {"ablate_top": [20], "ablate_top_positive": [20], "patch_groups": ["TP-", "TP- TN+ AP+ AN-"],
                      "patch_top": [10, 100], "n_heldout": 40, "f1_tokens": 8},
        # a few large steps make the experts differ visibly; alpha 0 is the base model (a check in test_detox)
        "experts": {"max_examples": 200, "steps": 8, "lr": 1e-3, "batch_size": 16},
        "detox": {"alpha": [0.0, 2.0], "threshold": 0.2, "marco_alpha": 2.0},
    }, source="tiny.toml")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, run_id) of one pipeline run on the tiny world; its cache and store are shared."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(tmp)
    run_id = runner.run(cfg, log=lambda *_: None)
    return cfg, run_id


@pytest.fixture(scope="session")
def tiny_world_dir(tiny_run) -> Path:
    cfg, _ = tiny_run
    key = runner.cache_keys(cfg)["world"]
    return runner.stage_dir(cfg, "world", key)


def save_tiny_gpt2(path: Path, n_layer: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """A random-init GPT-2 with a small BPE tokenizer, saved like any HF checkpoint."""
    import random

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline import corpus, world

    r = random.Random(seed)
    tok = world.train_tokenizer([corpus.neutral_sentence(r) for _ in range(300)], 400)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=d_model, n_layer=n_layer, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "model")


PLANTED_TOXIC, PLANTED_ANTI = [3, 10, 17], [5, 12, 20]


def save_planted_pair(tmp: Path) -> Path:
    """A tiny base model and a 'DPO' copy (tmp/dpo/model) differing only in the MLP input biases of six
    last-layer neurons: three toxic-aligned ones switched off (TP-), three anti-toxic ones switched
    further on (AP+); the probe direction (tmp/probe/w.npy) is built from their value vectors.
    Returns the base model's path."""
    import shutil

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    base = save_tiny_gpt2(tmp / "base", n_layer=2, d_model=32, seed=3)
    m = AutoModelForCausalLM.from_pretrained(base)
    mlp = m.transformer.h[-1].mlp
    V = mlp.c_proj.weight.detach().numpy().astype(np.float64)  # (d_mlp, d_model)
    w = V[PLANTED_TOXIC].sum(0) - V[PLANTED_ANTI].sum(0)
    with torch.no_grad():
        mlp.c_fc.bias[PLANTED_TOXIC] = 3.0
        mlp.c_fc.bias[PLANTED_ANTI] = 0.5
    m.save_pretrained(base)
    with torch.no_grad():
        mlp.c_fc.bias[PLANTED_TOXIC] = -3.0
        mlp.c_fc.bias[PLANTED_ANTI] = 3.5
    (tmp / "dpo").mkdir()
    m.save_pretrained(tmp / "dpo" / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, tmp / "dpo" / "model")
    (tmp / "probe").mkdir()
    np.save(tmp / "probe" / "w.npy", w.astype(np.float32))
    return base


DETOXIFY_NEUTRAL = "the a cat dog sat ran on under tree house table happily quietly today".split()
DETOXIFY_TOXIC = "idiot moron stupid loser".split()


def detoxify_sentence(rng, toxic: bool) -> str:
    words = list(rng.choice(DETOXIFY_NEUTRAL, size=int(rng.integers(4, 9))))
    if toxic:
        words[int(rng.integers(len(words)))] = str(rng.choice(DETOXIFY_TOXIC))
    return " ".join(words)


def save_detoxify_checkpoint(tmp: Path, seed: int = 0) -> Path:
    """A checkpoint in Detoxify's own format (config + state_dict) of a tiny BERT trained here to call a
    sentence toxic exactly when it holds one of DETOXIFY_TOXIC. "toxic" is the second of its classes and the
    first one, "severe_toxic", is trained to say the opposite, so a scorer reading the wrong column fails.
    Its config and tokenizer are written to tmp/bert and named there, so loading it needs no download."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    bert = tmp / "bert"
    bert.mkdir(parents=True)
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                              *DETOXIFY_NEUTRAL, *DETOXIFY_TOXIC]) + "\n")
    tok = BertTokenizer(str(bert / "vocab.txt"))
    tok.save_pretrained(bert)
    classes = ["severe_toxic", "toxic", "obscene", "threat", "insult", "identity_hate"]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=len(classes),
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.save_pretrained(bert)
    rng = np.random.default_rng(seed)
    labels = rng.random(256) < 0.5
    batch = tok([detoxify_sentence(rng, bool(t)) for t in labels], return_tensors="pt", padding=True)
    y = torch.tensor(labels, dtype=torch.float32)
    target = torch.stack([1 - y, y, *[torch.zeros_like(y)] * 4], 1)  # (n, classes)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp / "toxic-bert-tiny.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": str(bert), "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": len(classes)}},
                           "dataset": {"args": {"classes": classes}}},
                "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def detoxify_checkpoint(tmp_path_factory) -> Path:
    return save_detoxify_checkpoint(tmp_path_factory.mktemp("detoxify"))
