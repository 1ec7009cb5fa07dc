"""Stage `detox`: decoding-time detoxification with the expert and anti-expert of stage `experts`,
measured exactly like the interventions of stage `intervene`, and scored with them by stage `score`,
so that the rows sit side by side.

Product of experts (PoE; DExperts, Liu et al. 2021), for each alpha of [detox] alpha:
    next-token logits = log_softmax(base) + alpha * (log_softmax(expert) - log_softmax(anti))
greedy, T tokens, on the same challenge prompts (same tokens) as record and intervene. alpha = 0 is
the base model.

MaRCo-style revision (Hallinan et al. 2023) of the base model's greedy continuations (stage record):
for each continuation token t, the Jensen-Shannon divergence in bits between the expert's and the
anti-expert's next-token distributions at the position that predicts t; tokens above [detox]
threshold are masked. MaRCo fills masked spans in place with a seq2seq model; a causal LM cannot see
the text after a span, so here the continuation is kept up to its first masked token and the rest
is regenerated greedily under the PoE at [detox] marco_alpha (same length T).

Each row is measured as intervene.py measures its rows, with its functions:
    continuations          the T-token continuations, scored with intervene's by stage score
                           (toxicity, toxic_share, and recovered against record's base and DPO rows)
    perplexity             intervene.perplexity of the PoE's normalised distribution on the held-out
                           passages (MaRCo: the PoE it regenerates with)
    f1                     intervene.mean_f1 of the held-out prefixes' (or f1_samples' prompts') continuations
                           against the gold ones
                           (MaRCo: the base model's continuations, revised)
    mlp_proj[l]            mean over the continuation positions of the base model's hook_mlp_out .
                           w_hat, from one forward over prompt + continuation (method.md's definition):
                           what the base model's MLPs write while reading the detoxified text
The three models are plain transformers models (greedy steps feed each its newest token and keep its
KV cache; positions come from the attention mask); the base one is the model inside the base model's
TransformerBridge, which also tokenizes, exactly as record does, and reads mlp_proj.

Outputs: interventions.parquet (without the scores), continuations.parquet, layers.parquet (kinds
poe and marco) and revisions.parquet (per MaRCo token: its divergence, whether it was masked, both texts).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from pipeline import data as datasets
from pipeline import models
from pipeline.config import DataConfig, DetoxConfig, InterveneConfig, ModelConfig, RecordConfig
from pipeline.intervene import LAYERS, ROWS, f1_samples_file, load_heldout, mean_f1, perplexity
from pipeline.record import CONTINUATIONS, continuations, decode, left_pad, prompt_tokens

REVISIONS = {"variant": pl.String, "prompt_id": pl.Int64, "position": pl.Int64, "token": pl.String, "jsd": pl.Float64,
             "masked": pl.Boolean, "regenerated": pl.Boolean, "original": pl.String, "revised": pl.String}


def jsd_bits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits (0..1) between the distributions of two logit tensors (..., vocab) -> (...)."""
    lp, lq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    lm = torch.logaddexp(lp, lq) - math.log(2)  # log of the mixture (p + q) / 2
    kl = lambda la: (la.exp() * (la - lm)).sum(-1)
    return (kl(lp) + kl(lq)) / (2 * math.log(2))


def _logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0, caches: dict | None = None) -> torch.Tensor:
    """(B, L, vocab) float logits of a transformers causal LM on left-padded ids (B, L), positions counted from
    the mask (B, L); (B, keep, vocab) of the last keep positions only when keep > 0 (the unembedding skips
    the rest). With caches, a dict that keeps each model's KV cache from one call to the next, ids are the
    newest positions only, those the model's cache has not seen, and mask still covers every position."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    if caches is None:
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits.float()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, cache=caches.get(model),
                use_cache=True)
    caches[model] = out.cache
    return out.logits.float()


@dataclass(frozen=True)
class ProductOfExperts:
    """Base, expert and anti-expert behind one forward. Offers what intervene.perplexity asks of a
    model (tokenizer, cfg.device, hooks(), __call__), so the PoE is scored by the same code."""

    base: object
    expert: object
    anti: object
    tokenizer: object
    cfg: SimpleNamespace  # device, n_ctx, d_vocab
    alpha: float = 0.0

    @contextmanager
    def hooks(self, fwd_hooks: list):
        if fwd_hooks:
            raise ValueError("a product of experts takes no hooks: it edits logits, not neurons")
        yield

    def __call__(self, ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
                 caches: dict | None = None) -> torch.Tensor:
        """log p_base + alpha (log p_expert - log p_anti), unnormalised, (B, L or logits_to_keep, vocab); caches
        as in _logits. One model at a time, in place: three vocabulary-wide tensors at most, where the three
        models' logits and their log-softmaxes at once would be seven."""
        if self.alpha == 0:
            return _logits(self.base, ids, attention_mask, logits_to_keep, caches)
        log_p = lambda m: _logits(m, ids, attention_mask, logits_to_keep, caches).log_softmax(-1)
        out = log_p(self.expert)
        out.sub_(log_p(self.anti)).mul_(self.alpha)
        return out.add_(log_p(self.base))

    def divergence(self, ids: torch.Tensor, attention_mask: torch.Tensor, last: int) -> torch.Tensor:
        """(B, last) JS divergence (bits) of the expert's and anti-expert's next-token distributions at the
        last positions."""
        return jsd_bits(_logits(self.expert, ids, attention_mask, last), _logits(self.anti, ids, attention_mask, last))


@torch.no_grad()
def greedy(model, rows: list[torch.Tensor], new_tokens: int, batch_size: int, desc: str = "greedy") -> np.ndarray:
    """(n, new_tokens) greedy continuations of token rows; after the first step each step feeds the models
    only the token it added, their KV caches holding the rest."""
    out = np.zeros((len(rows), new_tokens), np.int64)
    dev = model.cfg.device
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        ids, mask = left_pad(rows[start:start + batch_size], model.tokenizer.pad_token_id)  # (B, L)
        ids, mask = ids.to(dev), mask.to(dev)
        fed, caches = ids, {}
        for _ in range(new_tokens):
            nxt = model(fed, attention_mask=mask, logits_to_keep=1, caches=caches)[:, -1].argmax(-1)  # (B,)
            fed = nxt[:, None]
            ids = torch.cat([ids, fed], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out[start:start + len(ids)] = ids[:, -new_tokens:].cpu().numpy()
    return out


def _joined(rows: list[torch.Tensor], tokens: np.ndarray) -> list[torch.Tensor]:
    return [torch.cat([r, torch.from_numpy(t)]) for r, t in zip(rows, tokens)]


@torch.no_grad()
def token_divergence(poe: ProductOfExperts, rows: list[torch.Tensor], tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """(n, T) JS divergence (bits) between expert and anti-expert at the position predicting each continuation token."""
    T = tokens.shape[1]
    out = np.zeros(tokens.shape, np.float64)
    full = _joined(rows, tokens)
    for start in range(0, len(full), batch_size):
        ids, mask = left_pad(full[start:start + batch_size], poe.tokenizer.pad_token_id)
        d = poe.divergence(ids.to(poe.cfg.device), mask.to(poe.cfg.device), T + 1)  # (B, T + 1): positions L-T-1..L-1
        out[start:start + len(ids)] = d[:, :-1].cpu().numpy()  # position L-T-1+t predicts token t
    return out


def revise(poe: ProductOfExperts, rows: list[torch.Tensor], tokens: np.ndarray, threshold: float, batch_size: int):
    """MaRCo-style revision: (jsd (n, T), first masked position (n,) with T for none, revised tokens (n, T)).
    Each continuation is kept up to its first masked token and regenerated from there under poe."""
    T = tokens.shape[1]
    jsd = token_divergence(poe, rows, tokens, batch_size)
    masked = jsd > threshold
    first = np.where(masked.any(1), masked.argmax(1), T)
    revised = tokens.copy()
    for f in np.unique(first[first < T]):  # rows that keep the same number of tokens regenerate together
        idx = np.flatnonzero(first == f)
        kept = _joined([rows[i] for i in idx], tokens[idx, :f])
        revised[idx, f:] = greedy(poe, kept, T - f, batch_size, f"revise from {f}")
    return jsd, first, revised


class _LastMLPOut(Exception):
    """Ends a forward once the last block's MLP has written: mlp_proj reads nothing after it, and the final
    norm and unembedding would make (B, L, vocab) logits for nothing."""


@torch.no_grad()
def mlp_proj(bridge, rows: list[torch.Tensor], tokens: np.ndarray, w_hat: np.ndarray, batch_size: int) -> np.ndarray:
    """(n_layers,) mean over the continuation positions of hook_mlp_out . w_hat, one forward of the base
    model over each prompt + continuation (the last T positions hold the continuation's tokens)."""
    n_layers, dev, T = bridge.cfg.n_layers, bridge.cfg.device, tokens.shape[1]
    w = torch.tensor(w_hat, dtype=torch.float32, device=dev)  # (d_model,)
    total = torch.zeros(n_layers, device=dev)
    full = _joined(rows, tokens)
    for start in range(0, len(full), batch_size):
        ids, mask = left_pad(full[start:start + batch_size], bridge.tokenizer.pad_token_id)

        def reader(l: int):
            def read(o, hook):  # o (B, L, d_model); returns None: a returned tensor would replace the activation
                total[l] += (o[:, -T:].float() @ w).sum()
                if l == n_layers - 1:
                    raise _LastMLPOut
            return read

        try:
            with bridge.hooks(fwd_hooks=[(f"blocks.{l}.hook_mlp_out", reader(l)) for l in range(n_layers)]):
                bridge(ids.to(dev), attention_mask=mask.to(dev))
        except _LastMLPOut:
            continue
        raise RuntimeError(f"blocks.{n_layers - 1}.hook_mlp_out never ran")  # total would lack that layer
    return (total / (len(full) * T)).cpu().numpy()


def run(out: Path, *, device: str, model: ModelConfig, data: DataConfig, record: RecordConfig, intervene: InterveneConfig,
        detox: DetoxConfig, world_dir: Path | None, probe_dir: Path, record_dir: Path, experts_dir: Path) -> dict:
    prompts = datasets.load_prompts(datasets.resolve("prompts", data.prompts, world_dir), data.challenging_only, data.max_prompts)
    heldout_file, samples_file = datasets.resolve("heldout", data.heldout, world_dir), f1_samples_file(data)
    w = np.load(Path(probe_dir) / "w.npy").astype(np.float32)
    w_hat = w / np.linalg.norm(w)
    base_tokens = np.load(Path(record_dir) / "base_tokens.npy")  # (n_prompts, T): the base model's greedy continuations
    T, bs = record.new_tokens, detox.batch_size

    path = datasets.model_path(model.path, world_dir)
    bridge = models.load_bridge(path, device, model.dtype)
    prompt_rows = prompt_tokens(bridge, prompts, T, model.bos, record.max_prompt_tokens)
    held = load_heldout(bridge, heldout_file, intervene, bs, samples_file)
    # The base of the PoE is the transformers model inside the bridge, called directly (no hooks run): one copy.
    loaded = [models.load_hf(str(Path(experts_dir) / name), device, model.dtype)[0] for name in ("expert", "anti")]
    poe = ProductOfExperts(bridge.original_model, *loaded, tokenizer=bridge.tokenizer,
                           cfg=SimpleNamespace(device=device, n_ctx=bridge.cfg.n_ctx, d_vocab=bridge.cfg.d_vocab))

    rows, generations, layers = [], [], []

    def add(iid: str, kind: str, params: dict, tokens: np.ndarray, quality: dict) -> None:
        generations.extend(continuations(iid, prompts, decode(bridge.tokenizer, tokens, record.eos_ends_text)))
        layers.extend({"variant": iid, "layer": l, "mlp_proj": float(x)}
                      for l, x in enumerate(mlp_proj(bridge, prompt_rows, tokens, w_hat, bs)))
        rows.append({"intervention_id": iid, "kind": kind, "params": json.dumps(params), "n_neurons": 0} | quality)

    def quality_of(p: ProductOfExperts, f1_tokens: np.ndarray) -> dict:
        return {"perplexity": perplexity(p, held.rows, held.batch_size, []), "f1": mean_f1(bridge, f1_tokens, held)}

    for alpha in detox.alpha:
        p = replace(poe, alpha=alpha)
        tokens = greedy(p, prompt_rows, T, bs, f"poe {alpha:g}")
        add(DetoxConfig.row_id(alpha), "poe", {"alpha": alpha}, tokens,
            quality_of(p, greedy(p, held.prefixes, intervene.f1_tokens, bs, f"poe {alpha:g} f1")))

    p = replace(poe, alpha=detox.marco_alpha)
    jsd, first, revised = revise(p, prompt_rows, base_tokens, detox.threshold, bs)
    # intervene has these continuations too; reading them would make detox re-run whenever the interventions change
    held_base = greedy(replace(poe, alpha=0.0), held.prefixes, intervene.f1_tokens, bs, "base f1")
    held_revised = revise(p, held.prefixes, held_base, detox.threshold, bs)[2]
    share_revised = float(np.mean(first < T))
    add("marco", "marco", {"alpha": detox.marco_alpha, "threshold": detox.threshold, "share_revised": share_revised,
                           "share_masked": float(np.mean(jsd > detox.threshold))}, revised, quality_of(p, held_revised))

    original, new = (decode(bridge.tokenizer, t, record.eos_ends_text) for t in (base_tokens, revised))
    eos = bridge.tokenizer.eos_token
    revisions = [{"variant": "marco", "prompt_id": i, "position": t,
                  "token": bridge.tokenizer.decode([int(base_tokens[i, t])]).replace(eos, " "),
                  "jsd": float(jsd[i, t]), "masked": bool(jsd[i, t] > detox.threshold), "regenerated": bool(t >= first[i]),
                  "original": original[i], "revised": new[i]}
                 for i in range(len(prompts)) for t in range(T)]
    del bridge, poe, p, loaded
    models.release_memory()

    pl.DataFrame(rows, schema=ROWS).write_parquet(out / "interventions.parquet")
    pl.DataFrame(generations, schema=CONTINUATIONS).write_parquet(out / "continuations.parquet")
    pl.DataFrame(layers, schema=LAYERS).write_parquet(out / "layers.parquet")
    pl.DataFrame(revisions, schema=REVISIONS).write_parquet(out / "revisions.parquet")
    return {"perplexity": {r["intervention_id"]: round(r["perplexity"], 3) for r in rows}, "share_revised": round(share_revised, 4)}


def tables(out: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(out / f"{name}.parquet") for name in ("layers", "revisions")}
