"""The small runner: runs stages in order, caches each under a hash of what determines it.

A stage's cache key hashes its name, its modules' source, the config sections (or fields) its
result depends on, with the size and mtime of local files they name, and its upstream stages' keys
(of loaded pairs, DPO takes a key of their text alone), so changing one setting reruns that stage and
exactly what depends on it.
A stage writes into a temporary folder that is renamed into place when it finishes: an interrupted
stage leaves nothing that looks done, and a rerun resumes after the last finished stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import polars as pl

import store
from pipeline import config as config_mod
from pipeline import (attribute, corpus, data, detox, dpo, experts, intervene, models, pairs, probe, record, score,
                      scoring, world)

PACKAGES = ("torch", "transformers", "transformer-lens", "trl", "tokenizers", "datasets", "duckdb",
            "polars", "scikit-learn", "alt-profanity-check", "better-profanity")


@dataclass(frozen=True)
class Stage:
    """module.run(out, *, device, <section>=..., <dep>_dir=...) -> summary; module.tables(out) -> {table: frame}.
    `sections` names what the result depends on: a whole section ("probe") or one field ("data.pairs"; only
    the SCORES fields of [scorer], as its batch size, rate limit, retries and answer cache change no
    score, and neither record.processes nor dpo.gradient_checkpointing, which change no result); the stage
    receives the whole section either way. A dep that this config does not run (the world, for a real model)
    is passed as None."""

    name: str
    module: ModuleType
    sections: tuple[str, ...]
    deps: tuple[str, ...] = ()
    code: tuple[ModuleType, ...] = ()  # helper modules whose source also decides the result


SCORES = ("scorer.backend", "scorer.detoxify_model", "scorer.checkpoint")  # what decides a toxicity score
DETOXIFY_ONLY = ("scorer.detoxify_model", "scorer.checkpoint")
# Checkpointed steps train the same weights (tests/test_dpo.py): turning it on for a smaller GPU reuses a cached DPO.
DPO = tuple(f"dpo.{f.name}" for f in dataclasses.fields(config_mod.DPOStageConfig) if f.name != "gradient_checkpointing")

STAGES = (
    Stage("world", world, sections=("world",), code=(corpus,)),
    Stage("probe", probe, sections=("model", "data.probe", "probe"), deps=("world",), code=(data, models)),
    Stage("pairs", pairs, sections=("model", "data.prompts", "data.challenging_only", "data.max_prompts",
                                    "data.pairs", "pairs", *SCORES), deps=("world",), code=(data, models, scoring)),
    Stage("dpo", dpo, sections=("model.path", "model.bos", *DPO), deps=("world", "pairs"), code=(data, models)),
    Stage("record", record, sections=("model", "data.prompts", "data.challenging_only", "data.max_prompts",
                                      "record.new_tokens", "record.batch_size", "record.max_prompt_tokens",
                                      "record.eos_ends_text"),
          deps=("world", "probe", "dpo"), code=(data, models)),
    Stage("attribute", attribute, sections=("model.path", "attribute"), deps=("world", "probe", "dpo", "record"),
          code=(data, models)),
    Stage("intervene", intervene, sections=("model", "data.prompts", "data.challenging_only", "data.max_prompts",
                                            "data.heldout", "data.f1_samples", "record.new_tokens", "record.batch_size",
                                            "record.max_prompt_tokens", "record.eos_ends_text", "intervene"),
          deps=("world", "probe", "dpo", "record", "attribute"), code=(data, models, record)),
    Stage("experts", experts, sections=("model.path", "model.bos", "data.probe", "experts"), deps=("world",), code=(data, models)),
    Stage("detox", detox, sections=("model", "data.prompts", "data.challenging_only", "data.max_prompts", "data.heldout",
                                    "data.f1_samples", "record.new_tokens", "record.max_prompt_tokens", "record.eos_ends_text",
                                    *intervene.HELDOUT_FIELDS, "detox"),
          deps=("world", "probe", "record", "experts"), code=(data, models, record, intervene)),
    # Scoring is a stage of its own so that a [scorer] change rescores the continuations instead of generating them again.
    Stage("score", score, sections=SCORES, deps=("record", "intervene", "detox"), code=(scoring,)),
)


def _section_names(s: Stage) -> list[str]:
    return list(dict.fromkeys(sec.split(".")[0] for sec in s.sections))


# Loaded pairs depend on their file alone: a dtype or prompt setting must not retrain DPO on them. Their
# text depends on the file alone: the scorer only adds the scores the store keeps, and DPO reads the text.
LOADED_PAIRS_TEXT = ("data.pairs", "pairs.max_pairs")
LOADED_PAIRS = (*LOADED_PAIRS_TEXT, *SCORES)


def _fingerprint(value):
    """A config value with every string that names a local file or folder (data files, a checkpoint, a
    model folder, an hf: dataset that is a local folder) stamped with size and mtime of what is there, so
    that a file replaced at the same path reruns what read it. Hub names and 'world' are kept as they are."""
    if isinstance(value, dict):
        return {k: _fingerprint(v) for k, v in value.items()}
    if not isinstance(value, str) or not value:
        return value
    local = data.local_hub_folder(value) or (Path(value) if os.path.exists(value) else None)
    return {"path": value, "files": data.stamp(local)} if local else value


def _reads(cfg: config_mod.Config, s: Stage) -> tuple[str, ...]:
    return LOADED_PAIRS if s.name == "pairs" and cfg.data.pairs != "self" else s.sections


def _hashed_config(cfg: config_mod.Config, sections: tuple[str, ...]) -> dict:
    out = {}
    for sec in sections:
        name, _, key = sec.partition(".")
        if sec in DETOXIFY_ONLY and cfg.scorer.backend != "detoxify":
            continue  # another backend's settings decide no score
        out[sec] = _fingerprint(cfg.section(name)[key] if key else cfg.section(name))
    return out


def active_stages(cfg: config_mod.Config) -> list[Stage]:
    """The stages this config asks for, in run order: all of them, and the world only with [world]."""
    return [s for s in STAGES if all(getattr(cfg, sec) is not None for sec in _section_names(s))]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _source(modules) -> str:
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()


def cache_keys(cfg: config_mod.Config) -> dict[str, str]:
    keys: dict[str, str] = {}
    loaded = cfg.data.pairs != "self"
    # Raised pins rerun what they compute: a new transformers or trl trains and generates differently, a new
    # better-profanity changes the world's lexicon, and the store names the versions each run was made with.
    packages = package_versions()
    for s in active_stages(cfg):
        upstream = {d: keys[d] for d in s.deps if d in keys}
        if s.name == "dpo" and loaded:  # DPO trains on the pairs' text, which a [scorer] change leaves as it is
            upstream["pairs"] = _digest({"pairs text": _hashed_config(cfg, LOADED_PAIRS_TEXT),
                                         "code": _source((pairs, data)), "world": keys.get("world")})
        keys[s.name] = _digest({
            "stage": s.name,
            "code": _source((s.module, *s.code)),
            "config": _hashed_config(cfg, _reads(cfg, s)),
            "upstream": upstream,
            "packages": packages,
        })
    return keys


def stage_dir(cfg: config_mod.Config, stage: str, key: str) -> Path:
    return Path(cfg.run.cache_dir) / stage / key


def _is_done(path: Path) -> bool:
    return (path / "summary.json").is_file()


def descendants(stages: list[Stage], roots: set[str]) -> set[str]:
    out = set(roots)
    for s in stages:
        if out & set(s.deps):
            out.add(s.name)
    return out


def ancestors(stages: list[Stage], name: str) -> set[str]:
    deps = {s.name: s.deps for s in stages}
    out, todo = set(), list(deps[name])
    while todo:
        d = todo.pop()
        if d in deps and d not in out:
            out.add(d)
            todo.extend(deps[d])
    return out


def run(cfg: config_mod.Config, force: set[str] = frozenset(), only: str | None = None, log=print) -> str | None:
    """Run the pipeline; return the run_id written to the store (None with --only)."""
    stages = active_stages(cfg)
    names = [s.name for s in stages]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and only != "dpo":
        raise config_mod.ConfigError("several processes (accelerate launch) train DPO only: add --only dpo, then run "
                                     "the rest in one process (README: Running the paper's setup)")
    for name in set(force) | ({only} if only else set()):
        if name not in names:
            raise config_mod.ConfigError(f"{cfg.source}: no stage {name!r} in this config; its stages are {', '.join(names)}")
    if Path(cfg.run.cache_dir).exists() and not Path(cfg.run.cache_dir).is_dir():
        raise config_mod.ConfigError(f"[run] cache_dir {cfg.run.cache_dir} is a file; give a folder")
    if not only:  # a store that cannot take the run is refused before hours of work
        store.make_folder_for(Path(cfg.run.store), "[run] store")
        if Path(cfg.run.store).exists():
            store.connect(cfg.run.store, empty_ok=True).close()
    resolve_device(cfg.run.device)  # so is a missing GPU, and an optimizer name known only when dpo starts
    if "dpo" in names:
        dpo.check_optimizer(cfg.dpo.optimizer)
    keys = cache_keys(cfg)
    forced = descendants(stages, set(force))
    needed = ancestors(stages, only) if only else set()
    dirs = {s.name: stage_dir(cfg, s.name, keys[s.name]) for s in stages}
    to_run = {s.name for s in stages if (not only or s.name == only) and (s.name in forced or not _is_done(dirs[s.name]))}
    if to_run:
        # Imported before the inputs' check and the first stage: pyarrow's S3 bindings (imported through datasets) do
        # not survive a Ctrl-C in their import, and the process then dies by the signal after its one-line note
        # instead of exiting 130. A stage's "running" line now marks work, not imports.
        import transformer_lens.model_bridge  # noqa: F401
    _check_inputs(cfg, [s for s in stages if s.name in to_run], log)
    ran_any = False
    for s in stages:
        out = dirs[s.name]
        if only and s.name != only:
            if s.name in needed and not _is_done(out):
                raise config_mod.ConfigError(f"--only {only} needs stage {s.name} cached first; run without --only")
            continue
        if s.name not in to_run:
            log(f"[{s.name}] cached ({keys[s.name]}), nothing to do")
            continue
        log(f"[{s.name}] running ({keys[s.name]})")
        seconds = _run_stage(s, cfg, out, {f"{d}_dir": dirs.get(d) for d in s.deps})
        ran_any = True
        log(f"[{s.name}] done in {seconds:.1f}s")
    if only:
        log("--only: stage results cached, store not written")
        return None
    return _publish(cfg, stages, keys, dirs, ran_any, log)


_LOADERS = {  # each as the stages read it
    "probe": lambda path, cfg: data.load_probe(path, cfg.probe.max_examples, cfg.probe.seed),
    "prompts": lambda path, cfg: data.load_prompts(path, cfg.data.challenging_only, cfg.data.max_prompts),
    "pairs": lambda path, cfg: data.load_pairs(path, cfg.pairs.max_pairs),
    "heldout": lambda path, cfg: data.load_text(path),
}


def _check_inputs(cfg: config_mod.Config, to_run: list[Stage], log) -> None:
    """The model, the data files (hub datasets fetched), the scorer and the GPUs that the stages about to run need, checked
    before the first one starts: a missing pairs file or API key is found before hours of probe and record, not after."""
    if cfg.model.path != "world" and any(s.name != "score" for s in to_run):
        models.check_supported(cfg.model.path)
    read = {sec.partition(".")[2] for s in to_run for sec in _reads(cfg, s) if sec.startswith("data.")}
    for kind in [k for k in data.WORLD_FILES if k in read and getattr(cfg.data, k) not in ("world", "self")]:
        value = getattr(cfg.data, kind)
        if value.startswith(data.HUB):  # fetched now, so that a wrong split fails before hours of DPO
            log(f"[data] {kind}: {value}")
        # read through too: a pairs file with other keys, or prompts none of which is flagged challenging, would
        # otherwise fail in the stage that reads them, after those before it
        _LOADERS[kind](data.resolve(kind, value, None), cfg)
    if "f1_samples" in read and cfg.data.f1_samples:
        data.load_f1_samples(data.local_file("f1_samples", cfg.data.f1_samples))
    if any("scorer.backend" in _reads(cfg, s) for s in to_run):
        scoring.check(cfg.scorer)
    training = [s.name for s in to_run if s.name in ("dpo", "experts")]
    if training:
        _check_training(cfg, training)


def _check_training(cfg: config_mod.Config, training: list[str]) -> None:
    """What trl would otherwise take from the launcher's environment: how many processes share a step, and
    accelerate's own config (mixed precision, DeepSpeed, FSDP), which the stages' float32, data-parallel
    training and rank 0's whole-model save do not allow."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if "dpo" in training and processes != cfg.dpo.processes:
        if processes == 1:
            raise config_mod.ConfigError(
                f"[dpo] processes = {cfg.dpo.processes}, but this run would train DPO in one process: train it first "
                f"with accelerate launch --num_processes {cfg.dpo.processes} ... --only dpo (README: Several GPUs)")
        raise config_mod.ConfigError(f"this launch runs {processes} processes but [dpo] processes = {cfg.dpo.processes}: "
                                     f"add --set dpo.processes={processes}, here and in the one-process run after it")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        raise config_mod.ConfigError(f"accelerate's config asks for {precision} mixed precision, but stage "
                                     f"{training[0]} trains in float32: add --mixed_precision no to accelerate launch")
    sharded = [name for name, var in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP"))
               if os.environ.get(var, "false").lower() in ("1", "true", "yes")]
    if sharded:
        raise config_mod.ConfigError(f"accelerate's config shards the model with {sharded[0]}, but stage {training[0]} "
                                     "trains data-parallel and saves whole weights from rank 0: add --multi_gpu to "
                                     "accelerate launch")
    if processes == 1 and resolve_device(cfg.run.device) == "cuda":
        import torch

        if torch.cuda.device_count() > 1:  # trl's trainers refuse the DataParallel that transformers would build
            fix = ("train it first under accelerate launch with --only dpo (README: Several GPUs), or set "
                   "CUDA_VISIBLE_DEVICES=0" if training[0] == "dpo" else
                   "run it with CUDA_VISIBLE_DEVICES=0 (with [record] processes > 1, run --only record first)")
            raise config_mod.ConfigError(f"stage {training[0]} trains with trl, which takes one GPU per process, and this "
                                         f"process sees {torch.cuda.device_count()}: {fix}")


def _run_stage(s: Stage, cfg: config_mod.Config, out: Path, upstream: dict[str, Path]) -> float:
    """Run one stage into a temporary folder renamed to `out` when it is done; returns its seconds."""
    rank = int(os.environ.get("RANK", "0"))  # set by accelerate launch / torchrun: every rank runs the stage
    tmp = out.with_name(out.name + (".partial" if rank == 0 else f".partial.rank{rank}"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    sections = {name: getattr(cfg, name) for name in _section_names(s)}
    summary = s.module.run(tmp, device=resolve_device(cfg.run.device), **sections, **upstream)
    seconds = time.perf_counter() - t0
    if rank:  # only rank 0's result is kept
        shutil.rmtree(tmp, ignore_errors=True)
        return seconds
    (tmp / "summary.json").write_text(json.dumps({"stage": s.name, "seconds": seconds, "summary": summary}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return seconds


def _publish(cfg, stages, keys, dirs, ran_any, log) -> str:
    config_hash = _digest({"run": {"name": cfg.run.name, "model": cfg.model.path}, "stages": keys})
    existing = store.find_run(cfg.run.store, config_hash)
    if existing and not ran_any:
        log(f"nothing changed: run {existing} in {cfg.run.store} already holds these results")
        return existing
    tables: dict[str, list] = {}
    records = []
    for s in stages:
        for name, frame in s.module.tables(dirs[s.name]).items():
            tables.setdefault(name, []).append(frame)  # e.g. layers: record's base and dpo, then interventions
        rec = json.loads((dirs[s.name] / "summary.json").read_text())
        records.append({"stage": s.name, "cache_key": keys[s.name], "seconds": rec["seconds"], "summary": rec["summary"]})
    run_id = store.write_run(cfg.run.store, run={
        "name": cfg.run.name,
        "model": model_label(cfg),
        "config": cfg.to_dict(),
        "config_hash": config_hash,
        "packages": package_versions(),
    }, stages=records, tables={name: pl.concat(frames, how="diagonal_relaxed") for name, frames in tables.items()})
    log(f"wrote run {run_id} to {cfg.run.store}")
    return run_id


def model_label(cfg: config_mod.Config) -> str:
    """runs.model: the demo world's description, a local checkpoint's absolute path, or a hub name as given. The
    absolute path tells a folder named ckpt@100 from a hub model pinned to a revision (Compare runs pairs the
    neurons of a repository's revisions), and two runs' folders of one name apart."""
    if cfg.model.path == "world":
        return world.model_label(cfg.world)
    return os.path.abspath(cfg.model.path) if os.path.exists(cfg.model.path) else cfg.model.path


def resolve_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise config_mod.ConfigError("[run] device = 'cuda' but torch sees no CUDA GPU; use device = 'auto' or 'cpu', "
                                     "or install a CUDA build of torch")
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def status(cfg: config_mod.Config) -> list[dict]:
    """One row per stage: its key, whether it is cached, and its recorded time and summary."""
    rows = []
    for name, key in cache_keys(cfg).items():
        out = stage_dir(cfg, name, key)
        row = {"stage": name, "key": key, "state": "cached" if _is_done(out) else "to run"}
        if _is_done(out):
            rec = json.loads((out / "summary.json").read_text())
            row |= {"seconds": rec["seconds"], "summary": rec["summary"]}
        rows.append(row)
    return rows
