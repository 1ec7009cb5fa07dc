"""Stage `intervene`: edit chosen MLP neurons of the base model and score it like the base and DPO
models (method.md, "Interventions on the base model"; paper Table 1).

An intervention is a set of (layer, neuron) and a hook per layer on `blocks.{l}.mlp.hook_post` (the
activation, the input to W_out) that overwrites those neurons at every position of every pass:
    ablate_top_N           the N largest cos              -> 0
    ablate_top_positive_N  the same among act > 0         -> 0
    patch_{groups}         the neurons of those groups    -> DPO's mean activation at hook_post
    patch_top_N            the N largest delta            -> the same
(the neurons table's act_dpo, except where the block normalizes the MLP's output: act is then over that
norm's RMS (stage attribute), which no hook before the norm can set, so patches take record's hook_post mean)
A new kind is one function (neurons table, argument) -> (chosen rows, per-layer hook maker) in KINDS.

Each is measured with the same code on one loaded base model:
    continuations          the greedy T-token continuations of the challenge prompts, whose
                           toxicity, toxic_share and recovered stage score adds
    perplexity             exp(mean NLL) of the held-out passages' tokens after BOS; or, with
                           [intervene] perplexity = "stream", of the reference code's WikiText-2 text
                           (the held-out file's entries joined with blank lines, headings included)
                           in consecutive windows without BOS, every token but a window's first (all
                           windows, or perplexity_windows of them spread over the text; on a model whose
                           BOS is not its end of text, each window after BOS, every text token predicted)
    f1                     F1 of the bags of token ids of a greedy continuation of each passage's first
                           half and of its gold second half (both `f1_tokens` tokens), as method.md
                           compares them; or, with [data] f1_samples, the reference code's run_f1 (Lee
                           et al.) on their {prompt, gold} samples: the prompt cut to f1_prompt_tokens
                           tokens, and the bag of prompt and continuation (transformers' generate returns
                           both) against the gold's first f1_prompt_tokens + f1_tokens tokens, padding
                           left out of both
    mlp_proj[l]            mean over the generated positions of hook_mlp_out . w_hat, read as record.py does
The base and DPO rows take their continuations from stage record. The challenge prompts are generated
here in record's batches ([record] batch_size) with record's code, so an intervention that changes
nothing gives record's base continuations token for token and its mlp_proj bit for bit: batch shape
moves the float sums, and at scale a moved sum can flip a greedy token. Perplexity and F1 of every row
are measured here, in [intervene] batch_size batches, the DPO model loaded after the base model is dropped.

Outputs: interventions.parquet (base and dpo included, without the scores), continuations.parquet and
layers.parquet (interventions only: record already wrote base and dpo).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from pipeline import data as datasets
from pipeline import models
from pipeline.config import DataConfig, InterveneConfig, ModelConfig, RecordConfig
from pipeline.record import (CONTINUATIONS, VARIANTS, continuations, decode, hooked_generate, left_pad, mlp_out_readers,
                             prompt_tokens)

ROWS = {"intervention_id": pl.String, "kind": pl.String, "params": pl.String, "n_neurons": pl.Int64,
        "perplexity": pl.Float64, "f1": pl.Float64}  # interventions, as stage score reads them
LAYERS = {"variant": pl.String, "layer": pl.Int64, "mlp_proj": pl.Float64}

Hook = Callable[[torch.Tensor, object], torch.Tensor]


def set_to(neuron: np.ndarray, values) -> Hook:
    """Hook on mlp.hook_post: neurons (k,) of the layer take `values` at every position. values
    broadcasts against (B, pos, k): a scalar, one value per neuron (k,), or per position (B, pos, k)."""
    idx = torch.tensor(np.array(neuron), dtype=torch.long)  # (k,)
    values = torch.tensor(np.array(values), dtype=torch.float32)

    def hook(a, hook):  # a (B, pos, d_mlp)
        a = a.clone()
        a[..., idx.to(a.device)] = values.to(a)
        return a

    return hook


def ablate(rows: pl.DataFrame) -> Hook:
    return set_to(rows["neuron"].to_numpy(), 0.0)


def patch_to_dpo(rows: pl.DataFrame) -> Hook:
    return set_to(rows["neuron"].to_numpy(), rows["hook_act_dpo"].to_numpy())


def ablate_top(neurons: pl.DataFrame, n: int):
    return neurons.sort("cos", descending=True, maintain_order=True).head(n), ablate


def ablate_top_positive(neurons: pl.DataFrame, n: int):
    return ablate_top(neurons.filter(pl.col("act") > 0), n)


def patch_groups(neurons: pl.DataFrame, groups: list[str]):
    return neurons.filter(pl.col("group_code").is_in(groups)), patch_to_dpo


def patch_top(neurons: pl.DataFrame, n: int):
    return neurons.sort("delta_rank").head(n), patch_to_dpo


KINDS = {"ablate_top": ablate_top, "ablate_top_positive": ablate_top_positive, "patch_groups": patch_groups, "patch_top": patch_top}


def layer_hooks(chosen: pl.DataFrame, make_hook: Callable[[pl.DataFrame], Hook]) -> list[tuple[str, Hook]]:
    """One hook per layer that holds chosen neurons."""
    return [(f"blocks.{l}.mlp.hook_post", make_hook(rows)) for (l,), rows in chosen.group_by("layer", maintain_order=True)]


@dataclass
class Intervention:
    id: str
    kind: str
    params: dict
    hooks: list[tuple[str, Hook]]
    n_neurons: int


def plan(cfg: InterveneConfig, neurons: pl.DataFrame) -> list[Intervention]:
    """The configured interventions in config order, on stage attribute's neurons table with hook_act_dpo
    (record's DPO mean at hook_post, which patches write) added. N is capped at the neurons available and names
    the id, so two entries that pick the same set (1000 and 2000 of 1500) share an id: the later is skipped."""
    asked = ([("ablate_top", n) for n in cfg.ablate_top] + [("ablate_top_positive", n) for n in cfg.ablate_top_positive]
             + [("patch_groups", u.split()) for u in cfg.patch_groups] + [("patch_top", n) for n in cfg.patch_top])
    out: dict[str, Intervention] = {}
    for kind, arg in asked:
        chosen, make_hook = KINDS[kind](neurons, arg)
        if kind == "patch_groups":
            iid, params = "patch_" + "+".join(arg), {"groups": arg}
        else:
            iid, params = f"{kind}_{len(chosen)}", {"n": len(chosen), "n_asked": arg}
        if iid not in out:
            out[iid] = Intervention(iid, kind, params, layer_hooks(chosen, make_hook), len(chosen))
    return list(out.values())


@torch.no_grad()
def generate(bridge, rows: list[torch.Tensor], new_tokens: int, batch_size: int, fwd_hooks: list, w_hat: np.ndarray,
             desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuations (n, new_tokens) of token rows under fwd_hooks, and mlp_proj (n_layers,):
    the mean over the generated positions of hook_mlp_out . w_hat, read as record.py reads it."""
    n_layers, dev, T = bridge.cfg.n_layers, bridge.cfg.device, new_tokens
    w = torch.tensor(w_hat, dtype=torch.float32, device=dev)  # (d_model,)
    proj_sum = torch.zeros(n_layers, device=dev)
    tokens = np.zeros((len(rows), T), np.int64)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        ids, mask = left_pad(rows[start:start + batch_size], bridge.tokenizer.pad_token_id)  # (B, L)
        out = torch.zeros(len(ids), n_layers, bridge.cfg.d_model, device=dev)  # (B, n_layers, d_model)
        tokens[start:start + len(ids)] = hooked_generate(bridge, ids, mask, T, fwd_hooks + mlp_out_readers(out)).cpu().numpy()
        proj_sum += out.sum(0) @ w
    return tokens, (proj_sum / (len(rows) * T)).cpu().numpy()


# A perplexity batch holds at most this many logits (8,192 tokens of GPT-2's vocabulary, 1.6 GB in float32):
# with a larger vocabulary (Gemma's 256k) it takes fewer rows, not 40 GB of logits.
LOGITS_PER_BATCH = 8192 * 50257
POSITIONS_PER_CHUNK = 1024  # log-probabilities are taken this many positions at a time, in float32


def logit_batches(rows: list[torch.Tensor], batch_size: int, d_vocab: int) -> list[list[torch.Tensor]]:
    """rows in order, in batches of at most batch_size whose padded logits stay within LOGITS_PER_BATCH (a
    longer row alone)."""
    batches, width = [[]], 0
    for r in rows:
        width = max(width, len(r))
        if batches[-1] and (len(batches[-1]) == batch_size or (len(batches[-1]) + 1) * width * d_vocab > LOGITS_PER_BATCH):
            batches.append([])
            width = len(r)
        batches[-1].append(r)
    return batches


@torch.no_grad()
def perplexity(bridge, rows: list[torch.Tensor], batch_size: int, fwd_hooks: list) -> float:
    """exp of the mean NLL over every token of the rows but each one's first (BOS for passages), left
    padded and masked."""
    nll, n = torch.zeros((), dtype=torch.float64, device=bridge.cfg.device), 0
    for batch in logit_batches(rows, batch_size, bridge.cfg.d_vocab):
        ids, mask = left_pad(batch, bridge.tokenizer.pad_token_id)  # (B, L)
        ids, mask = ids.to(bridge.cfg.device), mask.to(bridge.cfg.device)
        with bridge.hooks(fwd_hooks=fwd_hooks):
            logits = bridge(ids, attention_mask=mask)  # (B, L, vocab)
        scored = (mask[:, :-1] * mask[:, 1:]).bool()  # real token predicted from a real position: a row's first is never a target
        # A row and a chunk of positions at a time: the float32 log-probabilities of all logits would take as
        # much memory again as float32 logits, four times bfloat16's.
        for b in range(len(ids)):
            for s in range(0, ids.shape[1] - 1, POSITIONS_PER_CHUNK):
                e = min(s + POSITIONS_PER_CHUNK, ids.shape[1] - 1)
                logp = logits[b, s:e].float().log_softmax(-1).gather(-1, ids[b, s + 1:e + 1, None])[:, 0]  # (e - s,)
                nll -= logp[scored[b, s:e]].sum(dtype=torch.float64)
        n += int(scored.sum())
    return math.exp(float(nll) / n)


def f1(pred: list[int], gold: list[int]) -> float:
    """F1 of two bags of token ids (precision over the predicted tokens, recall over the gold ones)."""
    if not pred or not gold:
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Heldout:
    rows: list[torch.Tensor]  # what perplexity scores: whole passages (BOS first), or stream windows
    batch_size: int  # most rows per perplexity batch (logit_batches may take fewer)
    prefixes: list[torch.Tensor]  # first halves (BOS first), or f1_samples' prompts, for F1 continuations
    gold: list[list[int]]  # the first f1_tokens token ids of the second halves, or f1_samples' gold
    counts_prefix: bool = False  # F1 counts the prefix's tokens with the continuation's (f1_samples, as the reference)


# The [intervene] fields load_heldout reads: stage detox measures with them too, so they are in its cache key.
HELDOUT_FIELDS = tuple(f"intervene.{f}" for f in ("n_heldout", "f1_tokens", "f1_prompt_tokens", "perplexity",
                                                  "perplexity_window", "perplexity_windows"))


def heldout_set(bridge, passages: list[str], f1_tokens: int, batch_size: int) -> Heldout:
    """Passages cut to the context; each split at the word boundary nearest its middle, the prefix
    keeping BOS and its last tokens when it would leave no room for the continuation."""
    n_ctx, tok = bridge.cfg.n_ctx, bridge.tokenizer
    room = n_ctx - f1_tokens
    rows, prefixes, gold = [], [], []
    for p in passages:
        rows.append(bridge.to_tokens(p, move_to_device=False, truncate=False)[0][:n_ctx])
        words = p.split()
        half = max(1, len(words) // 2)
        r = bridge.to_tokens(" ".join(words[:half]), move_to_device=False, truncate=False)[0]
        prefixes.append(r if len(r) <= room else torch.cat([r[:1], r[len(r) - room + 1:]]))
        gold.append(tok(" " + " ".join(words[half:]), add_special_tokens=False)["input_ids"][:f1_tokens])
    return Heldout(rows, batch_size, prefixes, gold)


def sample_set(tok, samples: list[tuple[str, str]], prompt_tokens: int, f1_tokens: int) -> dict:
    """Prefixes and gold of {prompt, gold} samples tokenized as the reference code's tokenize does, by the
    checkpoint's own tokenizer (models.load_tokenizer: no BOS on GPT-2), cut on the right."""
    pad = tok.pad_token_id
    prefixes = [torch.tensor(tok(p, truncation=True, max_length=prompt_tokens)["input_ids"]) for p, _ in samples]
    gold = [[t for t in tok(g, truncation=True, max_length=prompt_tokens + f1_tokens)["input_ids"] if t != pad]
            for _, g in samples]
    return {"prefixes": prefixes, "gold": gold, "counts_prefix": True}


def load_heldout(bridge, path: Path, cfg: InterveneConfig, batch_size: int, f1_samples: Path | None = None) -> Heldout:
    """The held-out set that intervene and detox measure with: F1 on the first n_heldout passages (or
    f1_samples), and perplexity per [intervene] perplexity, on those passages or on stream windows, batch_size
    rows a batch at most."""
    n_ctx = bridge.cfg.n_ctx
    if f1_samples is not None and cfg.f1_prompt_tokens + cfg.f1_tokens > n_ctx:
        raise datasets.DataError(f"[intervene] f1_prompt_tokens + f1_tokens = {cfg.f1_prompt_tokens + cfg.f1_tokens} exceed "
                                 f"the model's context of {n_ctx} tokens; lower them")
    if cfg.f1_tokens > n_ctx - 2:  # a prefix keeps BOS and one token of its passage at least
        raise datasets.DataError(f"[intervene] f1_tokens = {cfg.f1_tokens} leaves no room for a prompt in the model's "
                                 f"context of {n_ctx} tokens; lower it to {n_ctx - 2} or less")
    held = heldout_set(bridge, datasets.load_text(path)[:cfg.n_heldout], cfg.f1_tokens, batch_size)
    if f1_samples is not None:
        tok = models.load_tokenizer(bridge.original_model.name_or_path)
        held = replace(held, **sample_set(tok, datasets.load_f1_samples(f1_samples)[:cfg.n_heldout], cfg.f1_prompt_tokens,
                                          cfg.f1_tokens))
    if cfg.perplexity == "passages":
        return held
    windows = stream_windows(bridge, datasets.load_entries(path), cfg.perplexity_window, cfg.perplexity_windows)
    return replace(held, rows=windows)


def f1_samples_file(data: DataConfig) -> Path | None:
    return datasets.local_file("f1_samples", data.f1_samples) if data.f1_samples else None


def stream_windows(bridge, entries: list[str], window: int, keep: int = 0) -> list[torch.Tensor]:
    """The reference code's perplexity text, "\n\n".join of WikiText-2's entries, tokenized as one text
    without BOS and cut into consecutive windows of `window` tokens (at most the context). A last window
    of one token predicts nothing and is left out. keep > 0: that many windows, spread evenly from the
    first to the last, so that a subset samples the whole text rather than its first articles.
    A model whose BOS is a start token of its own (Llama's, Gemma's; GPT-2's is its end of text) saw it
    first in every training sequence, and Gemma's predictions fall apart without it: there each window is
    BOS and window - 1 text tokens, every text token predicted, so each window reads as a document's start."""
    tok = bridge.tokenizer
    bos = [tok.bos_token_id] if bridge.cfg.default_prepend_bos and tok.bos_token_id not in (None, tok.eos_token_id) else []
    W = min(window, bridge.cfg.n_ctx) - len(bos)
    ids = torch.tensor(tok("\n\n".join(entries), add_special_tokens=False, verbose=False)["input_ids"])
    windows = [torch.tensor(bos + ids[i:i + W].tolist()) for i in range(0, len(ids) - 1 + len(bos), W)]
    if 0 < keep < len(windows):
        windows = [windows[i] for i in np.linspace(0, len(windows) - 1, keep).round().astype(int)]
    return windows


def mean_f1(bridge, tokens: np.ndarray, held: Heldout) -> float:
    """Mean F1 of the held-out prefixes' continuations (n, f1_tokens) against their gold. A continuation
    ends at its first end of text, as transformers' generate ends it in the reference, which then pads:
    with counts_prefix the prefix and that end of text count too, less the padding token (GPT-2's is its
    end of text), as the reference's run_f1 counts generate's output."""
    eos, pad = bridge.tokenizer.eos_token_id, bridge.tokenizer.pad_token_id
    scores = []
    for ids, prefix, gold in zip((row.tolist() for row in tokens), held.prefixes, held.gold):
        end = ids.index(eos) if eos in ids else len(ids)
        if held.counts_prefix:
            pred = [t for t in prefix.tolist() + ids[:end + 1] if t != pad]
            scores.append(f1(pred, gold) if pred else 0.0)  # the reference scores a sample that shares nothing 0
        else:
            scores.append(f1(ids[:end], gold))
    return float(np.mean(scores))


def quality(bridge, held: Heldout, fwd_hooks: list, cfg: InterveneConfig, w_hat: np.ndarray, desc: str) -> dict:
    """Perplexity and mean F1 on the held-out passages under fwd_hooks."""
    # the first pass of generation holds the logits of every prefix position: batches within the same budget
    tokens = np.concatenate([generate(bridge, batch, cfg.f1_tokens, len(batch), fwd_hooks, w_hat, f"{desc} f1")[0]
                             for batch in logit_batches(held.prefixes, cfg.batch_size, bridge.cfg.d_vocab)])
    return {"perplexity": perplexity(bridge, held.rows, held.batch_size, fwd_hooks), "f1": mean_f1(bridge, tokens, held)}


def run(out: Path, *, device: str, model: ModelConfig, data: DataConfig, record: RecordConfig, intervene: InterveneConfig,
        world_dir: Path | None, probe_dir: Path, dpo_dir: Path, record_dir: Path, attribute_dir: Path) -> dict:
    prompts = datasets.load_prompts(datasets.resolve("prompts", data.prompts, world_dir), data.challenging_only, data.max_prompts)
    heldout_file, samples_file = datasets.resolve("heldout", data.heldout, world_dir), f1_samples_file(data)
    w = np.load(Path(probe_dir) / "w.npy").astype(np.float32)
    w_hat = w / np.linalg.norm(w)
    neurons = pl.read_parquet(Path(attribute_dir) / "neurons.parquet")
    hook_act_dpo = np.load(Path(record_dir) / "dpo_act.npy")  # (L, d_mlp)
    todo = plan(intervene, neurons.with_columns(hook_act_dpo=pl.Series(hook_act_dpo[neurons["layer"].to_numpy(),
                                                                                    neurons["neuron"].to_numpy()])))
    T = record.new_tokens

    rows, generations, layers = [], [], []
    bridge = models.load_bridge(datasets.model_path(model.path, world_dir), device, model.dtype)
    held = load_heldout(bridge, heldout_file, intervene, intervene.batch_size, samples_file)
    prompt_rows = prompt_tokens(bridge, prompts, T, model.bos, record.max_prompt_tokens)
    ends = {"base": quality(bridge, held, [], intervene, w_hat, "base")}
    for iv in tqdm(todo, desc="interventions", unit="intervention"):
        tokens, proj = generate(bridge, prompt_rows, T, record.batch_size, iv.hooks, w_hat, iv.id)
        generations += continuations(iv.id, prompts, decode(bridge.tokenizer, tokens, record.eos_ends_text))
        layers += [{"variant": iv.id, "layer": l, "mlp_proj": float(x)} for l, x in enumerate(proj)]
        rows.append({"intervention_id": iv.id, "kind": iv.kind, "params": json.dumps(iv.params), "n_neurons": iv.n_neurons,
                     **quality(bridge, held, iv.hooks, intervene, w_hat, iv.id)})
    del bridge
    models.release_memory()
    bridge = models.load_bridge(str(Path(dpo_dir) / "model"), device, model.dtype)
    ends["dpo"] = quality(bridge, held, [], intervene, w_hat, "dpo")
    del bridge
    models.release_memory()

    rows = [{"intervention_id": v, "kind": v, "params": "{}", "n_neurons": 0, **ends[v]} for v in VARIANTS] + rows
    pl.DataFrame(rows, schema=ROWS).write_parquet(out / "interventions.parquet")
    pl.DataFrame(generations, schema=CONTINUATIONS).write_parquet(out / "continuations.parquet")
    pl.DataFrame(layers, schema=LAYERS).write_parquet(out / "layers.parquet")
    return {"n_interventions": len(todo), "perplexity": {r["intervention_id"]: round(r["perplexity"], 3) for r in rows}}


def tables(out: Path) -> dict[str, pl.DataFrame]:
    return {"layers": pl.read_parquet(out / "layers.parquet")}
