"""Stage `attribute`: every MLP neuron's contribution to the drop in toxicity, per method.md.

For neuron i of layer l, with value vector v_i = W_out[l][i] and probe direction w (v_i times the scale
of the norm between the MLP and the residual where the block has one, as Gemma 2 and 3 and OLMo 2 do):
    cos   = cos(v_i, w)                   proj     = act     * (v_i  . w_hat)
    delta = proj - proj_dpo               proj_dpo = act_dpo * (v'_i . w_hat)
    dact  = act - act_dpo
and the eight groups by the signs of cos, act and dact. act is the mean of a neuron's coefficient on v_i
in what its block adds to the residual: the activation a_i at mlp.hook_post (GELU(pre) on GPT-2,
act_fn(gate) * up on a GLU MLP), and where that norm exists a_i / s, s the RMS by which it divides each
position (act_normed, which stage record keeps). So proj is what the neuron writes along w_hat, a layer's
deltas add up to the change of its mlp_proj (bar the down projection's bias) on every architecture, and
with v' = v every neuron of a reducing group has delta > 0 as method.md says: the means of a_i and of
a_i / s can differ in sign, so groups taken from a_i's would break that. Shares, intervals over prompts,
the cumulative curve, per-layer sums, the logit lens and the prompts where top neurons fire most follow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import data as datasets
from pipeline.config import AttributeConfig, ModelConfig
from pipeline.models import load_bridge, release_memory

REDUCING = ("TP-", "TN+", "AP+", "AN-")
INCREASING = ("TP+", "TN-", "AP-", "AN+")
GROUPS = REDUCING + INCREASING


def along(W_out: torch.Tensor, w_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, d_mlp) v_i . w_hat and |v_i|, in float64 a layer at a time: no float64 copy of a large model's
    W_out is ever made (15 GB for Llama 3 8B's), and proj of every prompt reuses v . w_hat."""
    w = torch.from_numpy(np.asarray(w_hat, dtype=np.float64))
    vw, norms = zip(*((V @ w, V.norm(dim=-1)) for V in (W.double() for W in W_out)))
    return torch.stack(vw).numpy(), torch.stack(norms).numpy()


def cosines(vw: np.ndarray, v_norm: np.ndarray) -> np.ndarray:
    """(L, d_mlp): cos(v_i, w) = (v_i . w_hat) / |v_i|; 0 for a neuron whose value vector is zero (pruned): it
    writes nothing, so it is "unchanged" and never ranked as the most toxic, where 0/0 = NaN sorts first."""
    return np.divide(vw, v_norm, out=np.zeros(vw.shape), where=v_norm > 0)


def group_codes(cos: np.ndarray, act: np.ndarray, dact: np.ndarray) -> np.ndarray:
    """Alignment T/A by the sign of cos, base activation P/N by the sign of act, and the change:
    for P, '-' when the activation went down (dact > 0); for N, '+' when it went further negative
    (dact > 0). So TP- TN+ AP+ AN- reduce toxicity and their mirrors increase it."""
    align = np.where(cos > 0, "T", "A")
    sign = np.where(act >= 0, "P", "N")
    went_down = dact > 0
    change = np.where(sign == "P", np.where(went_down, "-", "+"), np.where(went_down, "+", "-"))
    codes = np.char.add(np.char.add(align, sign), change)
    return np.where((dact == 0) | (cos == 0), "unchanged", codes)


def bootstrap_shares(per_prompt: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """per_prompt: (P, 8) group sums of delta per prompt, columns in GROUPS order. Returns 2.5% and
    97.5% quantiles of each group's share of the gross reduction over prompt resamples (groups fixed)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_prompt), size=(n, len(per_prompt)))
    sums = per_prompt[idx].mean(1)  # (n, 8)
    with np.errstate(invalid="ignore", divide="ignore"):  # a share of nothing is NaN, as in share()
        shares = sums / sums[:, : len(REDUCING)].sum(1, keepdims=True)
    return np.quantile(shares, 0.025, axis=0), np.quantile(shares, 0.975, axis=0)


def share(part: float, total: float) -> float:
    """part / total; NaN for a share of nothing, e.g. when DPO rewrote value vectors but moved no
    activation, so that no neuron is in a reducing group."""
    return part / total if total else float("nan")


def neurons_needed(delta_sorted: np.ndarray, fraction: float) -> int:
    """Fewest top neurons (by delta) whose summed delta reaches `fraction` of the net reduction; 0 when there is
    none (R <= 0: DPO did not lower the MLPs' projection onto the probe), where any first neuron would "reach" it."""
    if delta_sorted.sum() <= 0:
        return 0
    reached = np.nonzero(np.cumsum(delta_sorted) >= fraction * delta_sorted.sum())[0]
    return int(reached[0]) + 1 if len(reached) else len(delta_sorted)


def activation(record_dir: Path, variant: str, per_prompt: bool = False) -> np.ndarray:
    """act as the module docstring defines it: act_normed where record kept it, else act; the per-prompt
    means (P, L, d_mlp) memory-mapped if per_prompt."""
    suffix = "_prompt" if per_prompt else ""
    normed = record_dir / f"{variant}_act_normed{suffix}.npy"
    return np.load(normed if normed.exists() else record_dir / f"{variant}_act{suffix}.npy", mmap_mode="r")


def norm_scale(norm) -> torch.Tensor | None:
    """(d_model,) the per-coordinate scale a norm bridge applies; None where there is no norm or no weight."""
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    # Gemma's RMSNorm stores its scale as an offset from 1
    return (1.0 + w if getattr(norm, "uses_weight_offset", False) else w).detach().float().cpu()


@torch.no_grad()
def weights(path: str, device: str) -> dict:
    """Value vectors, unembedding and final-norm scale of one model, loaded in float32 whatever [model]
    dtype says: DPO moves W_out by about bfloat16's rounding step, so delta needs the full precision."""
    bridge = load_bridge(path, device, "float32")
    W_out = bridge.W_out.detach().float().cpu()  # (L, d_mlp, d_model)
    post = [norm_scale(getattr(block, "ln2_post", None)) for block in bridge.blocks]
    if post[0] is not None:  # the MLP's output is normalized before the residual: a neuron writes v_i * scale there
        W_out = W_out * torch.stack(post)[:, None, :]
    W_U = bridge.W_U.detach().float().cpu()  # (d_model, d_vocab)
    out = {"W_out": W_out, "W_U": W_U, "ln_scale": norm_scale(bridge.ln_final), "tokenizer": bridge.tokenizer}
    del bridge
    release_memory()
    return out


def logit_lens(v: torch.Tensor, W_U: torch.Tensor, ln_scale: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (logits, token ids) that value vectors v (n, d_model) promote through the unembedding."""
    if ln_scale is not None:
        v = v * ln_scale
    return torch.topk(v @ W_U, k, dim=-1)


def run(out: Path, *, device: str, model: ModelConfig, attribute: AttributeConfig, world_dir: Path | None,
        probe_dir: Path, dpo_dir: Path, record_dir: Path) -> dict:
    w = np.load(probe_dir / "w.npy").astype(np.float64)
    w_hat = w / np.linalg.norm(w)
    base = weights(datasets.model_path(model.path, world_dir), device)
    vw, v_norm = along(base["W_out"], w_hat)  # (L, d_mlp) each
    vw_dpo, _ = along(weights(str(dpo_dir / "model"), device)["W_out"], w_hat)
    act = activation(record_dir, "base").astype(np.float64)  # (L, d_mlp)
    act_dpo = activation(record_dir, "dpo").astype(np.float64)
    n_layers, d_mlp = act.shape

    cos = cosines(vw, v_norm)
    proj = act * vw
    proj_dpo = act_dpo * vw_dpo
    delta = proj - proj_dpo
    dact = act - act_dpo
    codes = group_codes(cos, act, dact)

    order = np.argsort(-delta, axis=None, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(1, order.size + 1)
    layer, neuron = np.divmod(np.arange(order.size), d_mlp)
    # Stored per neuron so the app draws the curve without a window over every neuron of the run.
    cum_share = np.full(order.size, np.nan)  # a share of no reduction (R <= 0) is NaN, as in share()
    if delta.sum() > 0:
        cum_share[order] = np.cumsum(delta.ravel()[order]) / delta.sum()
    table = pl.DataFrame({
        "layer": layer, "neuron": neuron, "cos": cos.ravel(), "act": act.ravel(), "act_dpo": act_dpo.ravel(),
        "proj": proj.ravel(), "proj_dpo": proj_dpo.ravel(), "delta": delta.ravel(), "dact": dact.ravel(),
        "group_code": codes.ravel(), "delta_rank": rank,
        "cum_share": cum_share,
    })
    table.write_parquet(out / "neurons.parquet")

    # Per-prompt group sums of delta, for intervals over prompts (groups fixed by the full means).
    a_p, a_dpo_p = activation(record_dir, "base", per_prompt=True), activation(record_dir, "dpo", per_prompt=True)
    onehot = np.stack([(codes == g) for g in GROUPS], axis=-1).astype(np.float64)  # (L, d_mlp, 8)
    per_prompt_layer = np.stack([
        np.einsum("ln,lng->lg", a_p[p] * vw - a_dpo_p[p] * vw_dpo, onehot)
        for p in range(a_p.shape[0])
    ])  # (P, L, 8)
    lo, hi = bootstrap_shares(per_prompt_layer.sum(1), attribute.n_bootstrap, attribute.seed)
    P = per_prompt_layer.shape[0]
    pl.DataFrame({
        "prompt_id": np.repeat(np.arange(P), n_layers * len(GROUPS)),
        "layer": np.tile(np.repeat(np.arange(n_layers), len(GROUPS)), P),
        "group_code": np.tile(np.array(GROUPS), P * n_layers),
        "sum_delta": per_prompt_layer.ravel(),
    }).write_parquet(out / "prompt_groups.parquet")

    R = float(delta.sum())
    sums = {g: float(delta[codes == g].sum()) for g in GROUPS}
    G = sum(sums[g] for g in REDUCING)
    summary_rows = [{
        "group_code": g, "effect": "reduces" if g in REDUCING else "increases", "n_neurons": int((codes == g).sum()),
        "sum_delta": sums[g], "share_gross": share(sums[g], G), "share_net": share(sums[g], R),
        "ci_low": float(lo[j]), "ci_high": float(hi[j]),
    } for j, g in enumerate(GROUPS)]
    pl.DataFrame(summary_rows).write_parquet(out / "group_summary.parquet")

    (table.group_by("layer", "group_code").agg(n_neurons=pl.len(), sum_delta=pl.col("delta").sum())
     .sort("layer", "group_code").write_parquet(out / "layer_groups.parquet"))

    delta_sorted = delta.ravel()[order]
    attribution = {"net_reduction": R, "gross_reduction": G, "n_neurons": int(order.size),
                   **{f"n_for_{int(f * 100)}": neurons_needed(delta_sorted, f) for f in (0.5, 0.75, 0.99)}}

    # Logit lens for the top neurons by delta and by cos.
    n = min(attribute.n_logit_lens, order.size)
    lens_ids = np.union1d(order[:n], np.argsort(-cos, axis=None)[:n])
    v = base["W_out"].reshape(-1, base["W_out"].shape[-1])[torch.from_numpy(lens_ids)]
    logits, ids = logit_lens(v, base["W_U"], base["ln_scale"], min(attribute.top_k_tokens, base["W_U"].shape[-1]))
    tok = base["tokenizer"]
    pl.DataFrame([
        {"layer": int(i // d_mlp), "neuron": int(i % d_mlp), "rank": r + 1, "token": tok.decode([int(t)]), "logit": float(lg)}
        for i, row_ids, row_logits in zip(lens_ids, ids, logits) for r, (t, lg) in enumerate(zip(row_ids, row_logits))
    ]).write_parquet(out / "neuron_tokens.parquet")

    # Prompts where the top neurons (by delta and by cos) fire most under the base model.
    m = min(attribute.n_top_prompt_neurons, order.size)
    top_ids = np.union1d(order[:m], np.argsort(-cos, axis=None)[:m])
    flat_p = a_p.reshape(a_p.shape[0], -1)[:, top_ids].astype(np.float64)  # (P, n_top)
    flat_dpo_p = a_dpo_p.reshape(a_dpo_p.shape[0], -1)[:, top_ids].astype(np.float64)
    k = min(attribute.top_prompts, flat_p.shape[0])
    best = np.argsort(-flat_p, axis=0, kind="stable")[:k]  # (k, n_top); ties: lower prompt_id first
    pl.DataFrame([
        {"layer": int(i // d_mlp), "neuron": int(i % d_mlp), "rank": r + 1, "prompt_id": int(best[r, j]),
         "act": float(flat_p[best[r, j], j]), "act_dpo": float(flat_dpo_p[best[r, j], j])}
        for j, i in enumerate(top_ids) for r in range(k)
    ]).write_parquet(out / "neuron_top_prompts.parquet")

    (out / "attribution.json").write_text(json.dumps(attribution))
    return attribution | {"share_TP-": share(sums["TP-"], G), "n_layers": n_layers, "d_mlp": d_mlp}


def tables(out: Path) -> dict[str, pl.DataFrame]:
    return {
        "neurons": pl.read_parquet(out / "neurons.parquet"),
        "group_summary": pl.read_parquet(out / "group_summary.parquet"),
        "layer_groups": pl.read_parquet(out / "layer_groups.parquet"),
        "attribution": pl.DataFrame([json.loads((out / "attribution.json").read_text())]),
        "neuron_tokens": pl.read_parquet(out / "neuron_tokens.parquet"),
        "neuron_top_prompts": pl.read_parquet(out / "neuron_top_prompts.parquet"),
        "prompt_groups": pl.read_parquet(out / "prompt_groups.parquet"),
    }
