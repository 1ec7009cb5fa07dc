"""The toxicity probe: recovers a planted direction, reads the right residual, separates the world."""

import numpy as np
import torch

from pipeline import probe
from pipeline.config import ProbeConfig
from pipeline.models import load_bridge


def test_fit_recovers_a_planted_direction():
    rng = np.random.default_rng(0)
    d = 48
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    y = rng.integers(0, 2, 2000)
    x = rng.normal(size=(2000, d)) * rng.uniform(0.5, 3.0, d) + np.outer(y, u) * 2.0 + 5.0
    w, metrics = probe.fit(x, y, ProbeConfig())
    assert metrics["val_accuracy"] > 0.75 and metrics["val_roc_auc"] > 0.8
    # The fit sees anisotropic noise, so compare in the whitened space where u is the Bayes direction.
    scale = x[y == 0].std(0)
    cos = (w * scale) @ (u / scale) / np.linalg.norm(w * scale) / np.linalg.norm(u / scale)
    assert cos > 0.9
    _, shuffled = probe.fit(x, rng.permutation(y), ProbeConfig())
    assert shuffled["val_roc_auc"] < 0.65
    # [probe] l2 is sklearn's C, the inverse strength: a small C shrinks w, and the direction survives
    shrunk, _ = probe.fit(x, y, ProbeConfig(l2=1e-3))
    assert np.linalg.norm(shrunk) < 0.5 * np.linalg.norm(w)
    assert shrunk @ w / np.linalg.norm(shrunk) / np.linalg.norm(w) > 0.9


def test_a_rare_class_lands_on_both_sides_of_the_split():
    """Two toxic texts of ten, half held out: a plain random split puts both on one side for many seeds,
    leaving nothing to fit or no ROC-AUC; every seed must give a probe with both."""
    x = np.arange(10.0)[:, None] * np.array([[1.0, -0.5]])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    for seed in range(20):
        _, metrics = probe.fit(x, y, ProbeConfig(val_fraction=0.5, seed=seed))
        assert np.isfinite(metrics["val_roc_auc"]) and metrics["n_train"] + metrics["n_val"] == 10, seed


def test_mean_residual_matches_a_plain_hf_forward(tiny_gpt2):
    """Independent of the bridge: hook the HF model's last block output, average the text's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["The soup was warm and the bread was fresh.", "Hello there.", "We will book the train at the station tomorrow."]
    bridge = load_bridge(str(tiny_gpt2), "cpu")
    got = probe.mean_residual(bridge, texts, batch_size=3, max_tokens=64)

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    captured = {}
    hf.transformer.h[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    for text, row in zip(texts, got):
        ids = torch.tensor([[tok.eos_token_id] + tok(text)["input_ids"]])  # BOS, then the text
        with torch.no_grad():
            hf(ids)
        want = captured["x"][0, 1:].mean(0).numpy()
        assert np.allclose(row, want, atol=1e-4), np.abs(row - want).max()
