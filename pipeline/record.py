"""Stage `record`: both models greedily continue the challenge prompts while hooks record their MLPs.

"Over the generated tokens" (method.md) means the T positions holding the generated tokens, as if
one forward ran over prompt + continuation and we kept the last T positions. Generation runs one
forward pass per new token, and a pass's newest position holds the token it was fed last; the T-th
generated token is fed only by the pass that would pick token T + 1. So we generate T + 1 tokens,
skip pass 0 (its newest position is the last prompt token), read passes 1..T, and drop token
T + 1. Sums accumulate on the model's device as the passes stream by; no [prompts x tokens x
neurons] tensor ever exists, and the generated text is never run through the model again.

Generation uses the KV cache: pass 0 runs the whole (left-padded) prompt, every later pass one new
position. With transformer-lens 4.3 and transformers 5.24 the bridge's attention looks for the cache
under a name transformers no longer uses; models.load_bridge hands it over (without that, every
cached step silently attends to itself alone; tests/test_record.py catches it).

Where blocks normalize the MLP's output before adding it to the residual (Gemma 2 and 3, OLMo 2), that
norm divides each position by its RMS s, so neuron i writes (a_i / s) v_i there: record also keeps the mean
of a_i / s (act_normed), which stage attribute takes as the activation, while act stays the hook's (patches
write it back there). Per prompt, record keeps only the one attribute takes: at Gemma 2 9B's size each
such file is 2.9 GB.

Outputs, per variant (base, dpo):
  {variant}_act.npy         (n_layers, d_mlp) float32  mean neuron activation (mlp.hook_post)
  {variant}_act_prompt.npy  (n_prompts, n_layers, d_mlp) float32  the same mean, per prompt (float16 would
                            overflow past 65,504 and round away DPO's small per-prompt changes)
  {variant}_act_normed.npy, {variant}_act_normed_prompt.npy  the same for a_i / s, on models with that norm,
                            which have no act_prompt
  {variant}_mlp_proj.npy    (n_layers,) float32  mean of (MLP output . w_hat)
  {variant}_tokens.npy      (n_prompts, T) int64  the generated token ids
  continuations.parquet     {variant, prompt_id, prompt, continuation}, scored by stage score
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from pipeline import data as datasets
from pipeline import models
from pipeline.config import ConfigError, DataConfig, ModelConfig, RecordConfig

VARIANTS = ("base", "dpo")
NEURON_MEANS = ("act", "act_normed")  # kept per neuron; the last a model has also per prompt (module docstring)
CONTINUATIONS = {"variant": pl.String, "prompt_id": pl.Int64, "prompt": pl.String, "continuation": pl.String}


def prompt_tokens(bridge, prompts: list[str], new_tokens: int, bos: str = "transformerlens",
                  max_tokens: int = 0, first: int = 0) -> list[torch.Tensor]:
    """Each prompt tokenized alone, BOS first as [model] bos says, cut to its first max_tokens (0: whole);
    refuses prompts that leave no room for the continuation, before any generation time is spent.
    first: the stage's index of prompts[0] (a shard's offset), so that an error names the prompt's number."""
    prepend_bos = models.bridge_prepends_bos(bridge, bos)
    rows = [bridge.to_tokens(p, prepend_bos=prepend_bos, move_to_device=False, truncate=False)[0] for p in prompts]
    rows = [r[:max_tokens] for r in rows] if max_tokens else rows
    room = bridge.cfg.n_ctx - new_tokens
    for i, r in enumerate(rows):
        if len(r) > room:
            raise datasets.DataError(f"prompt {first + i} ({prompts[i][:40]!r}) has {len(r)} tokens; with [record] new_tokens = "
                                     f"{new_tokens} the context of {bridge.cfg.n_ctx} holds at most {room}; lower "
                                     "new_tokens or shorten it")
    return rows


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and 0/1 attention mask, right-aligned so every row's next token comes last."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


class AfterPromptPass:
    """Forward hook that adds the newest position of every pass but the first (the prompt pass) into
    total (B, width), which stays float32 whatever the model's dtype: in pass k the newest position
    holds generated token k. One kernel per hook and pass, as generation on a GPU is bound by launches."""

    def __init__(self, total: torch.Tensor):
        self.total, self.passes = total, 0

    def __call__(self, x, hook):  # x (B, pos, width)
        if self.passes:
            self.total.add_(x[:, -1])
        self.passes += 1


class OverPostNormScale(AfterPromptPass):
    """Adds a_i / s into total (B, d_mlp), s the RMS by which the norm after the MLP divides the newest
    position (its hook_scale). Two hooks a layer: `keep` at mlp.hook_post holds the newest activation
    until ln2_post.hook_scale, later in the same pass, divides it, in float32: a quotient rounded to bfloat16
    would carry an error of up to 2^-9 of itself into every mean."""

    def keep(self, x, hook):  # x (B, pos, d_mlp)
        self.act = x[:, -1]

    def __call__(self, scale, hook):  # scale (B, pos, 1)
        if self.passes:
            self.total.add_(self.act.float() / scale[:, -1].float())
        self.passes += 1


def mlp_out_readers(out: torch.Tensor) -> list:
    """Hooks that sum each layer's hook_mlp_out over the generated positions into out (B, n_layers,
    d_model); mlp_proj is then (out summed over B) . w_hat, once per batch instead of per pass."""
    return [(f"blocks.{l}.hook_mlp_out", AfterPromptPass(out[:, l])) for l in range(out.shape[1])]


def hooked_generate(bridge, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, fwd_hooks: list) -> torch.Tensor:
    """(B, T) greedy tokens after the left-padded prompts ids (B, L), generated with fwd_hooks active.
    T + 1 tokens are generated so that the pass fed token T is seen (module docstring); every
    AfterPromptPass among the hooks must have seen all T + 1 passes, or its mean would be skewed."""
    T, dev = new_tokens, bridge.cfg.device
    with bridge.hooks(fwd_hooks=fwd_hooks):
        out = bridge.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=T + 1, do_sample=False,
                              stop_at_eos=False, use_past_kv_cache=True, return_type="tokens", verbose=False)
    passes = {h.passes for _, h in fwd_hooks if isinstance(h, AfterPromptPass)}
    if passes - {T + 1}:
        raise RuntimeError(f"expected {T + 1} forward passes per hook, saw {sorted(passes)}")
    return out[:, ids.shape[1]:ids.shape[1] + T]


def open_npy(path: Path, shape: tuple, dtype) -> BinaryIO:
    """A .npy file opened for its rows to be written in order after the header, a batch at a time."""
    f = open(path, "wb")
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": shape})
    return f


def neuron_means(bridge) -> tuple[str, ...]:
    """The means record keeps per neuron: act, and act_normed where blocks normalize the MLP's output."""
    return NEURON_MEANS if hasattr(bridge.blocks[0], "ln2_post") else NEURON_MEANS[:1]


def per_prompt(names: tuple[str, ...] | list[str]) -> str:
    """Of a model's neuron means, the one record also keeps per prompt: the activation attribute takes."""
    return names[-1]


@torch.no_grad()
def generate_and_record(bridge, prompts: list[str], w_hat: np.ndarray, new_tokens: int, batch_size: int, desc: str,
                        prefix: Path, bos: str = "transformerlens", max_prompt_tokens: int = 0, first: int = 0) -> dict:
    """Means over the generated positions (module docstring); the per-prompt means are streamed to
    {prefix}{name}_prompt.npy batch by batch, so memory does not grow with the number of prompts."""
    cfg = bridge.cfg
    n_layers, d_mlp, T, dev = cfg.n_layers, cfg.d_mlp, new_tokens, cfg.device
    w = torch.tensor(w_hat, dtype=torch.float32, device=dev)  # (d_model,)
    rows = prompt_tokens(bridge, prompts, T, bos, max_prompt_tokens, first)

    names = neuron_means(bridge)
    sums = {name: torch.zeros(n_layers, d_mlp, device=dev) for name in names} | {"mlp_proj": torch.zeros(n_layers, device=dev)}
    tokens = np.zeros((len(prompts), T), np.int64)
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(open_npy(Path(f"{prefix}{name}_prompt.npy"), (len(prompts), n_layers, d_mlp),
                                                    np.float32)) for name in [per_prompt(names)]}
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            tokens[start:start + batch_size] = _record_batch(bridge, rows[start:start + batch_size], T, w, sums, files)
            check_finite(sums, desc, cfg.dtype)
    n = len(prompts) * T
    return {name: (s / n).cpu().numpy() for name, s in sums.items()} | {"tokens": tokens}


def check_finite(sums: dict[str, torch.Tensor], desc: str, dtype: torch.dtype) -> None:
    """Refuses sums that reached inf or NaN, after the batch where they did: NaN means would pass through
    attribute into every share and chart of the run."""
    broken = [name for name, s in sums.items() if not torch.isfinite(s).all()]
    if not broken:
        return
    fix = ("set [model] dtype = \"bfloat16\" or \"float32\" (float16's range is too narrow for some models, Gemma's among "
           "them)" if dtype == torch.float16 else "the weights may hold inf or NaN (a DPO run that diverged: lower [dpo] lr)")
    raise ConfigError(f"{desc}: the model's {' and '.join(broken)} reached inf or NaN in {str(dtype).removeprefix('torch.')}; {fix}")


def _record_batch(bridge, rows: list[torch.Tensor], T: int, w: torch.Tensor, sums: dict[str, torch.Tensor],
                  prompt_files: dict) -> np.ndarray:
    """Generate one batch, add its sums into sums (mlp_proj and the per-neuron means it holds), append the
    per-prompt means of those that prompt_files names to them."""
    n_layers, d_mlp, dev = bridge.cfg.n_layers, bridge.cfg.d_mlp, bridge.cfg.device
    ids, mask = left_pad(rows, bridge.tokenizer.pad_token_id)
    # (B, n_layers, d_mlp) sums over T positions
    batch = {name: torch.zeros(len(ids), n_layers, d_mlp, device=dev) for name in sums if name in NEURON_MEANS}
    out = torch.zeros(len(ids), n_layers, bridge.cfg.d_model, device=dev)  # (B, n_layers, d_model) likewise
    hooks = [(f"blocks.{l}.mlp.hook_post", AfterPromptPass(batch["act"][:, l])) for l in range(n_layers)] + mlp_out_readers(out)
    if "act_normed" in batch:
        for l in range(n_layers):
            normed = OverPostNormScale(batch["act_normed"][:, l])
            hooks += [(f"blocks.{l}.mlp.hook_post", normed.keep), (f"blocks.{l}.ln2_post.hook_scale", normed)]
    tokens = hooked_generate(bridge, ids, mask, T, hooks).cpu().numpy()
    sums["mlp_proj"] += out.sum(0) @ w
    for name, total in batch.items():
        sums[name] += total.sum(0)
        if name in prompt_files:
            prompt_files[name].write((total / T).cpu().numpy().tobytes())
    return tokens


def shard_prompts(n: int, batch_size: int, processes: int) -> list[np.ndarray]:
    """Prompt indices per process, cut between whole batches: the batches are then those of one process, whose
    left-padding (and so float sums and greedy tokens) a batch's composition decides, so that the number of
    processes changes no result (it is in no cache key)."""
    n_batches = -(-n // batch_size)
    return [np.arange(b[0] * batch_size, min((b[-1] + 1) * batch_size, n))
            for b in np.array_split(np.arange(n_batches), min(processes, n_batches))]


def shard_device(device: str, i: int) -> str:
    """Shard i's device: on CUDA one GPU per process, round robin; CPU processes share the CPU."""
    return f"cuda:{i % torch.cuda.device_count()}" if device == "cuda" else device


def record_shard(path: str, device: str, dtype: str, bos: str, prompts: list[str], first: int, w_hat: np.ndarray,
                 record: RecordConfig, desc: str, prefix: Path) -> dict:
    """One process's share of the prompts, from the stage's prompt `first` on: generate_and_record on them,
    plus the decoded continuations."""
    bridge = models.load_bridge(path, device, dtype)
    rec = generate_and_record(bridge, prompts, w_hat, record.new_tokens, record.batch_size, desc, prefix,
                              bos, record.max_prompt_tokens, first)
    rec["texts"] = decode(bridge.tokenizer, rec["tokens"], record.eos_ends_text)
    rec["n"] = len(prompts)
    del bridge
    models.release_memory()
    return rec


def reduce_shards(parts: list[dict], prefixes: list[Path], out_prefix: Path) -> tuple[dict, list[str]]:
    """Shards in prompt order -> the single-process result: means weighted by prompt count (every prompt
    has T positions), tokens and texts concatenated, each per-prompt file ({prefix}{name}_prompt.npy)
    joined into one (streamed)."""
    n = sum(p["n"] for p in parts)
    names = [name for name in NEURON_MEANS if name in parts[0]]
    rec = {name: sum(p[name] * p["n"] for p in parts) / n for name in [*names, "mlp_proj"]}
    rec["tokens"] = np.concatenate([p["tokens"] for p in parts])
    for name in [per_prompt(names)]:
        files, joined = [Path(f"{prefix}{name}_prompt.npy") for prefix in prefixes], Path(f"{out_prefix}{name}_prompt.npy")
        if len(files) == 1:
            files[0].rename(joined)
            continue
        first = np.load(files[0], mmap_mode="r")
        with open_npy(joined, (n, *first.shape[1:]), first.dtype) as f:
            for file in files:
                for row in np.load(file, mmap_mode="r"):
                    f.write(np.ascontiguousarray(row).tobytes())
                file.unlink()
    return rec, [t for p in parts for t in p["texts"]]


def decode(tok, tokens: np.ndarray, eos_ends_text: bool = False) -> list[str]:
    """Texts of continuations (n, T): up to the first end of text with eos_ends_text, else all T tokens with
    an end of text inside shown as a space, the break it is rather than glue."""
    eos, rows = tok.eos_token_id, [row.tolist() for row in tokens]
    if eos_ends_text:
        rows = [r[:r.index(eos)] if eos in r else r for r in rows]
    return [t.replace(tok.eos_token, " ") for t in tok.batch_decode(rows)]


def continuations(variant: str, prompts: list[str], texts: list[str]) -> list[dict]:
    """Rows of continuations.parquet: one variant's continuations of the prompts, in prompt order."""
    return [{"variant": variant, "prompt_id": i, "prompt": p, "continuation": c} for i, (p, c) in enumerate(zip(prompts, texts))]


def run(out: Path, *, device: str, model: ModelConfig, data: DataConfig, record: RecordConfig,
        world_dir: Path | None, probe_dir: Path, dpo_dir: Path) -> dict:
    prompts = datasets.load_prompts(datasets.resolve("prompts", data.prompts, world_dir), data.challenging_only, data.max_prompts)
    w = np.load(Path(probe_dir) / "w.npy").astype(np.float32)
    w_hat = w / np.linalg.norm(w)
    paths = {"base": datasets.model_path(model.path, world_dir), "dpo": str(Path(dpo_dir) / "model")}

    summary: dict = {"n_prompts": len(prompts), "new_tokens": record.new_tokens, "processes": record.processes}
    rows = []
    for variant in VARIANTS:
        t0 = time.perf_counter()
        shards = shard_prompts(len(prompts), record.batch_size, record.processes)
        jobs = [(paths[variant], shard_device(device, i), model.dtype, model.bos, [prompts[j] for j in idx], int(idx[0]),
                 w_hat, record, f"record {variant}" + (f" {i + 1}/{len(shards)}" if len(shards) > 1 else ""),
                 out / f"shard{i}_{variant}_") for i, idx in enumerate(shards)]
        if len(jobs) == 1:
            parts = [record_shard(*jobs[0])]
        else:
            # An executor, not a Pool: a worker that dies (out of memory, say) fails the stage instead of being
            # replaced forever while the stage waits.
            with ProcessPoolExecutor(len(jobs), mp_context=torch.multiprocessing.get_context("spawn")) as pool:
                parts = list(pool.map(record_shard, *zip(*jobs)))
        rec, texts = reduce_shards(parts, [j[-1] for j in jobs], out / f"{variant}_")
        summary[f"seconds_{variant}"] = round(time.perf_counter() - t0, 2)
        for name, arr in rec.items():
            np.save(out / f"{variant}_{name}.npy", arr)
        rows += continuations(variant, prompts, texts)
    pl.DataFrame(rows, schema=CONTINUATIONS).write_parquet(out / "continuations.parquet")
    summary["act_normed"] = (out / "base_act_normed.npy").exists()  # SQL on a run shows which activation attribute took
    return summary


def tables(out: Path) -> dict[str, pl.DataFrame]:
    layers = pl.concat([
        pl.DataFrame({"variant": [variant] * len(proj), "layer": np.arange(len(proj)), "mlp_proj": proj.astype(np.float64)})
        for variant in VARIANTS for proj in [np.load(out / f"{variant}_mlp_proj.npy")]
    ])
    return {"layers": layers}
