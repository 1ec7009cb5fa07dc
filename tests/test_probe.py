"""The toxicity probe: recovers a planted direction, reads the right residual, separates the world."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from pipeline import probe
from pipeline.config import ConfigError, DataConfig, ModelConfig, ProbeConfig
from pipeline.data import DataError
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


@pytest.mark.parametrize("bos", ["transformerlens", "tokenizer"])
def test_mean_residual_matches_a_plain_hf_forward(tiny_gpt2, bos):
    """Independent of the bridge: hook the HF model's last block output, average the text's tokens; after
    BOS as TransformerLens gives it, or ([model] bos = tokenizer) the tokenizer's ids alone, none on GPT-2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["The soup was warm and the bread was fresh.", "Hello there.", "We will book the train at the station tomorrow."]
    bridge = load_bridge(str(tiny_gpt2), "cpu")
    unembedded = []
    bridge.unembed.register_forward_hook(lambda *_: unembedded.append(1))
    got = probe.mean_residual(bridge, texts, batch_size=2, max_tokens=64, bos=bos)
    assert not unembedded  # the forward ends at the last block: no logits

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    captured = {}
    hf.transformer.h[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    first = 1 if bos == "transformerlens" else 0
    for text, row in zip(texts, got):
        ids = torch.tensor([[tok.eos_token_id] * first + tok(text)["input_ids"]])  # BOS or not, then the text
        with torch.no_grad():
            hf(ids)
        want = captured["x"][0, first:].mean(0).numpy()
        assert np.allclose(row, want, atol=1e-4), np.abs(row - want).max()


def planted_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 600)
    return rng.normal(size=(600, 16)) + np.outer(y, np.eye(16)[3]) * 1.5, y


def test_a_given_direction_is_measured_on_the_split_fit_uses():
    """x . w ranks texts as the fitted logit does (a positive scale and a constant apart), so a fitted w given
    back as the direction has the fit's own validation ROC-AUC; a w pointing away from toxicity is refused."""
    x, y = planted_features()
    w, fitted = probe.fit(x, y, ProbeConfig())
    measured = probe.measure(x, y, w, ProbeConfig())
    assert measured["val_roc_auc"] == pytest.approx(fitted["val_roc_auc"], abs=1e-12)
    assert (measured["n_train"], measured["n_val"]) == (fitted["n_train"], fitted["n_val"])
    assert measured["train_accuracy"] >= fitted["train_accuracy"] - 0.01 and measured["val_accuracy"] > 0.7
    other_seed = probe.measure(x, y, w, ProbeConfig(seed=1))
    assert other_seed["val_roc_auc"] != measured["val_roc_auc"]  # the split follows [probe] seed, as fit's does
    with pytest.raises(ConfigError, match=r"points away from toxicity; save its negative"):
        probe.measure(x, y, -w, ProbeConfig())


def test_the_probe_stage_takes_a_saved_direction_instead_of_fitting(tiny_gpt2, tmp_path, monkeypatch):
    """Lee et al.'s probe.pt is a torch tensor of d_model numbers: saved like it, it becomes the stage's w.npy
    (here the fitted w, scaled: the same ranking, another vector); a vector of another size or a missing file
    is a one-line error, before the texts' forward passes (hours on a real model)."""
    d_model = AutoConfig.from_pretrained(tiny_gpt2).n_embd
    csv = tmp_path / "probe.csv"
    csv.write_text("comment_text,toxic\n" + "".join(f"text number {i} {'idiot ' * (i % 2)},{i % 2}\n" for i in range(40)))
    data, model = DataConfig(probe=str(csv)), ModelConfig(path=str(tiny_gpt2))
    fitted_dir, given_dir = tmp_path / "fitted", tmp_path / "given"
    fitted_dir.mkdir(), given_dir.mkdir()
    fitted = probe.run(fitted_dir, device="cpu", model=model, data=data, probe=ProbeConfig(max_examples=40))
    w = np.load(fitted_dir / "w.npy")
    torch.save(torch.tensor(3 * w), tmp_path / "probe.pt")
    given = probe.run(given_dir, device="cpu", model=model, data=data,
                      probe=ProbeConfig(max_examples=40, direction=str(tmp_path / "probe.pt")))
    assert np.array_equal(np.load(given_dir / "w.npy"), 3 * w)
    assert given["val_roc_auc"] == pytest.approx(fitted["val_roc_auc"], abs=1e-9)
    torch.save(torch.zeros(d_model + 1), tmp_path / "wide.pt")
    monkeypatch.setattr(probe, "mean_residual", lambda *a, **k: pytest.fail("features computed before the file was read"))
    for path, message in [(tmp_path / "wide.pt", f"holds {d_model + 1} numbers; it needs the {d_model} numbers"),
                          (tmp_path / "none.pt", "not found")]:
        with pytest.raises(DataError, match=message) as e:
            probe.run(given_dir, device="cpu", model=model, data=data, probe=ProbeConfig(max_examples=40, direction=str(path)))
        assert "\n" not in str(e.value)


def test_a_probe_fitted_to_features_all_alike_is_refused(tiny_gpt2, tmp_path):
    """With max_tokens = 1 every GPT-2 text is its BOS alone: the fitted w is 0, which record would turn into NaN
    projections and blame on DPO."""
    csv = tmp_path / "probe.csv"
    csv.write_text("comment_text,toxic\n" + "".join(f"text number {i} {'idiot ' * (i % 2)},{i % 2}\n" for i in range(40)))
    data, model = DataConfig(probe=str(csv)), ModelConfig(path=str(tiny_gpt2))
    with pytest.raises(DataError, match=r"fitted w = 0.*max_tokens = 1.*raise max_tokens") as e:
        probe.run(tmp_path, device="cpu", model=model, data=data, probe=ProbeConfig(max_examples=40, max_tokens=1))
    assert "\n" not in str(e.value)
    assert probe.run(tmp_path, device="cpu", model=model, data=data, probe=ProbeConfig(max_examples=40, max_tokens=2))["w_norm"] > 0
