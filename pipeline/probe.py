"""Stage `probe`: a linear toxicity probe w on the mean last-layer residual (method.md).

Logistic regression, toxic (1) vs non-toxic (0), on the mean over a text's tokens of
`blocks.{L-1}.hook_resid_post`. Only the direction matters downstream: w_hat = w / |w|, in the
residual stream's own coordinates (features are standardised for the fit, and w mapped back).
With [probe] direction, w is read from a file instead (the paper's GPT-2 runs use Lee et al.'s released
probe) and the labelled texts only measure it.
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
from pipeline.config import ConfigError, DataConfig, ModelConfig, ProbeConfig
from pipeline.models import bridge_prepends_bos, load_bridge, release_memory


def text_tokens(bridge, texts: list[str], max_tokens: int, prepend_bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and the 0/1 mask of each text's own tokens. Texts are tokenized as generation
    tokenizes prompts (to_tokens: BOS per prepend_bos, as record.prompt_tokens takes it, though the bridge's
    tokenizer adds one on GPT-NeoX too), so w is fit in the context record reads it in; cut to max_tokens
    and right-padded, as causal attention leaves the real positions untouched by padding after them."""
    rows = [bridge.to_tokens(t, prepend_bos=prepend_bos, move_to_device=False, truncate=False)[0][:max_tokens] for t in texts]
    ids = torch.full((len(rows), max(len(r) for r in rows)), bridge.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(ids.shape)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    if prepend_bos:
        mask[:, 0] = 0
    return ids, mask


class _LastResidual(Exception):
    """Ends a forward at the last block's output. The final norm and the unembedding would follow, and
    their (B, T, vocab) logits are the forward's largest tensor: about 4 GB in float32 for 32 texts of 128
    tokens at Gemma's 256k vocabulary. TransformerLens' stop_at_layer = n_layers does not skip them."""


def _stop_with(resid, hook):
    raise _LastResidual(resid)


@torch.no_grad()
def mean_residual(bridge, texts: list[str], batch_size: int, max_tokens: int, bos: str = "transformerlens") -> np.ndarray:
    """(N, d_model) mean of the last block's output over each text's own tokens (BOS, as [model] bos places it,
    and padding excluded)."""
    layer, prepend_bos = bridge.cfg.n_layers - 1, bridge_prepends_bos(bridge, bos)
    feats = []
    for i in tqdm(range(0, len(texts), batch_size), desc="probe features", unit="batch"):
        ids, mask = text_tokens(bridge, texts[i:i + batch_size], max_tokens, prepend_bos)
        ids, mask = ids.to(bridge.cfg.device), mask.to(bridge.cfg.device)
        try:
            bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", _stop_with)])
        except _LastResidual as stop:
            resid = stop.args[0].float()  # (B, T, d_model)
        else:  # resid would be the last batch's
            raise RuntimeError(f"blocks.{layer}.hook_resid_post never ran")
        feats.append(((resid * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).cpu())
    return torch.cat(feats).numpy()


def split(y: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the validation texts."""
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
    return train, val


def fit(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, dict]:
    """Train/validation split, fit, metrics; returns w in residual coordinates."""
    train, val = split(y, cfg)
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


def load_direction(path: str, d_model: int) -> np.ndarray:
    """w from a [probe] direction file, or a one-line error naming what the file holds instead."""
    if not Path(path).is_file():
        raise datasets.DataError(f"[probe] direction file {path} not found; give a probe vector saved with torch.save or "
                                 "numpy.save, or leave direction empty to fit one")
    try:
        w = np.load(path) if path.endswith(".npy") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and numpy raise many kinds on a file that is not theirs
        raise datasets.DataError(f"[probe] direction {path} could not be read ({type(e).__name__}); save the vector "
                                 "itself with torch.save (.pt) or numpy.save (.npy)") from None
    w = w.detach().float().numpy() if isinstance(w, torch.Tensor) else w
    if not isinstance(w, np.ndarray) or w.size != d_model:
        held = f"{w.size} numbers" if isinstance(w, np.ndarray) else f"a {type(w).__name__}"
        raise datasets.DataError(f"[probe] direction {path} holds {held}; it needs the {d_model} numbers of one vector "
                                 "in this model's residual stream (a probe of another model?)")
    w = w.astype(np.float32).reshape(-1)
    if not np.isfinite(w).all() or not w.any():
        raise datasets.DataError(f"[probe] direction {path} holds zeros, inf or NaN; it needs a direction")
    return w


def measure(x: np.ndarray, y: np.ndarray, w: np.ndarray, cfg: ProbeConfig) -> dict:
    """fit's metrics for a given w, on fit's split: ROC-AUC of x . w, and accuracies of x . w > t at the
    threshold t that is most accurate on the training texts. A w that points away from toxicity is refused:
    every group's sign would be flipped."""
    train, val = split(y, cfg)
    s = x @ w
    auc = float(roc_auc_score(y[val], s[val]))
    if auc < 0.5:
        raise ConfigError(f"[probe] direction ranks the non-toxic validation texts of [data] probe above the toxic ones "
                          f"(ROC-AUC {auc:.2f}): it points away from toxicity; save its negative")
    cuts = np.concatenate([[-np.inf], np.sort(s[train])])
    train_accuracy = [((s[train] > c) == y[train]).mean() for c in cuts]
    t = cuts[np.argmax(train_accuracy)]
    return {"n_train": int(len(train)), "n_val": int(len(val)), "train_accuracy": float(max(train_accuracy)),
            "val_accuracy": float(((s[val] > t) == y[val]).mean()), "val_roc_auc": auc}


def run(out: Path, *, device: str, model: ModelConfig, data: DataConfig, probe: ProbeConfig,
        world_dir: Path | None = None) -> dict:
    texts, labels = datasets.load_probe(datasets.resolve("probe", data.probe, world_dir), probe.max_examples, probe.seed)
    bridge = load_bridge(datasets.model_path(model.path, world_dir), device, model.dtype)
    given = load_direction(probe.direction, bridge.cfg.d_model) if probe.direction else None  # before hours of features
    x = mean_residual(bridge, texts, probe.batch_size, probe.max_tokens, model.bos)
    layer = bridge.cfg.n_layers - 1
    del bridge
    release_memory()
    if given is not None:
        w, metrics = given, measure(x, np.array(labels), given, probe)
    else:
        w, metrics = fit(x, np.array(labels), probe)
        if not w.any():  # every text's feature alike: record would divide by |w| = 0 and blame DPO for the NaN
            raise datasets.DataError(f"the probe fitted w = 0: every text of [data] probe gave the same features (with "
                                     f"[probe] max_tokens = {probe.max_tokens}, a text may be its BOS alone); raise max_tokens")
    np.save(out / "w.npy", w)
    return metrics | {"layer": layer, "w_norm": float(np.linalg.norm(w))}


def tables(out: Path) -> dict[str, pl.DataFrame]:
    summary = json.loads((out / "summary.json").read_text())["summary"]
    w = np.load(out / "w.npy")
    return {"probe_metrics": pl.DataFrame([summary | {"direction": (w / np.linalg.norm(w)).tolist()}])}
