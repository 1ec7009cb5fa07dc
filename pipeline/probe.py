"""Stage `probe`: a linear toxicity probe w on the mean last-layer residual (method.md).

Logistic regression, toxic (1) vs non-toxic (0), on the mean over a text's tokens of
`blocks.{L-1}.hook_resid_post`. Only the direction matters downstream: w_hat = w / |w|, in the
residual stream's own coordinates (features are standardised for the fit, and w mapped back).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from pipeline import data as datasets
from pipeline.config import DataConfig, ModelConfig, ProbeConfig
from pipeline.models import load_bridge, release_memory


def text_tokens(bridge, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and the 0/1 mask of each text's own tokens. Texts are tokenized as generation
    tokenizes prompts (to_tokens: BOS exactly where TransformerLens prepends one, though the bridge's
    tokenizer adds one on GPT-NeoX too), so w is fit in the context record reads it in; cut to max_tokens
    and right-padded, as causal attention leaves the real positions untouched by padding after them."""
    rows = [bridge.to_tokens(t, move_to_device=False, truncate=False)[0][:max_tokens] for t in texts]
    ids = torch.full((len(rows), max(len(r) for r in rows)), bridge.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(ids.shape)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    if bridge.cfg.default_prepend_bos:
        mask[:, 0] = 0
    return ids, mask


@torch.no_grad()
def mean_residual(bridge, texts: list[str], batch_size: int, max_tokens: int) -> np.ndarray:
    """(N, d_model) mean of the last block's output over each text's own tokens (BOS and padding excluded)."""
    layer = bridge.cfg.n_layers - 1
    feats = []
    for i in tqdm(range(0, len(texts), batch_size), desc="probe features", unit="batch"):
        ids, mask = text_tokens(bridge, texts[i:i + batch_size], max_tokens)
        ids, mask = ids.to(bridge.cfg.device), mask.to(bridge.cfg.device)
        captured = {}

        def grab(resid, hook):
            captured["resid"] = resid  # (B, T, d_model)

        bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", grab)])
        resid = captured["resid"].float()
        feats.append(((resid * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).cpu())
    return torch.cat(feats).numpy()


def fit(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, dict]:
    """Train/validation split, fit, metrics; returns w in residual coordinates."""
    order = np.random.default_rng(cfg.seed).permutation(len(y))
    n_val = max(1, int(len(y) * cfg.val_fraction))
    val, train = order[:n_val], order[n_val:]
    if len(np.unique(y[val])) < 2 or len(np.unique(y[train])) < 2:
        # A rare class fell all on one side (nothing to fit, or no ROC-AUC): split each class alike instead.
        # Only then, so that a usual split, and every result downstream of it, stays what it was.
        parts = [order[y[order] == c] for c in np.unique(y)]
        cut = [min(len(p) - 1, max(1, round(len(p) * cfg.val_fraction))) for p in parts]
        val = np.concatenate([p[:k] for p, k in zip(parts, cut)])
        train = np.concatenate([p[k:] for p, k in zip(parts, cut)])
    mu, sigma = x[train].mean(0), x[train].std(0) + 1e-6
    clf = LogisticRegression(C=cfg.l2, max_iter=5000).fit((x[train] - mu) / sigma, y[train])
    w = clf.coef_[0] / sigma  # x . w = standardised logit up to a constant
    val_scores = clf.decision_function((x[val] - mu) / sigma)
    metrics = {
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "train_accuracy": float(clf.score((x[train] - mu) / sigma, y[train])),
        "val_accuracy": float(((val_scores > 0) == y[val]).mean()),
        "val_roc_auc": float(roc_auc_score(y[val], val_scores)),
    }
    return w.astype(np.float32), metrics


def run(out: Path, *, device: str, model: ModelConfig, data: DataConfig, probe: ProbeConfig,
        world_dir: Path | None = None) -> dict:
    texts, labels = datasets.load_probe(datasets.resolve("probe", data.probe, world_dir), probe.max_examples, probe.seed)
    bridge = load_bridge(datasets.model_path(model.path, world_dir), device, model.dtype)
    x = mean_residual(bridge, texts, probe.batch_size, probe.max_tokens)
    layer = bridge.cfg.n_layers - 1
    del bridge
    release_memory()
    w, metrics = fit(x, np.array(labels), probe)
    np.save(out / "w.npy", w)
    return metrics | {"layer": layer, "w_norm": float(np.linalg.norm(w))}


def tables(out: Path) -> dict[str, pl.DataFrame]:
    summary = json.loads((out / "summary.json").read_text())["summary"]
    w = np.load(out / "w.npy")
    return {"probe_metrics": pl.DataFrame([summary | {"direction": (w / np.linalg.norm(w)).tolist()}])}
