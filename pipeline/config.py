"""Typed configuration: one dataclass per section of the TOML file.

Every field carries `help` metadata; `python -m pipeline --help` and the README's config table are
generated from it. Loading refuses unknown keys and wrong types, naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


def _f(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Where the run's artifacts go and what it is called."""

    name: str = _f("run", "Label of the run in the store and the app.")
    cache_dir: str = _f(".cache", "Folder of cached stage results, keyed by a hash of config and inputs.")
    store: str = _f("store/dpo_neurons.duckdb", "DuckDB store file the run is written into.")
    device: str = _f("auto", "Torch device: auto (cuda when available, else cpu), cpu or cuda.")

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")


@dataclass
class ModelConfig:
    """The base model M."""

    path: str = _f("world", "'world' for the demo model built by stage world; else a hub name or local HF checkpoint.")


@dataclass
class ScorerConfig:
    """The independent toxicity scorer used on generated text."""

    backend: str = _f("profanity-check", "Toxicity scorer backend (offline default: profanity-check).")
    batch_size: int = _f(256, "Texts scored per call.")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass
class WorldConfig:
    """The embedded demo world: corpus, tokenizer, tiny GPT-2 and demo datasets."""

    seed: int = _f(0, "Seed of the corpus generator and of training.")
    n_sentences: int = _f(80_000, "Sentences in the pretraining corpus.")
    toxic_fraction: float = _f(0.2, "Share of corpus sentences that are toxic (insults, profanity).")
    n_toxic_words: int = _f(150, "Toxic words drawn from the better-profanity lexicon.")
    vocab_size: int = _f(4096, "Byte-level BPE vocabulary size.")
    n_layer: int = _f(4, "Transformer blocks.")
    d_model: int = _f(128, "Residual stream width (the MLP is 4x wider).")
    n_head: int = _f(4, "Attention heads.")
    n_ctx: int = _f(64, "Context length in tokens.")
    train_steps: int = _f(600, "Optimizer steps of pretraining.")
    batch_size: int = _f(32, "Sequences of n_ctx tokens per step.")
    lr: float = _f(3e-3, "Peak learning rate (AdamW, linear warmup, cosine decay).")
    n_probe: int = _f(4000, "Labelled sentences in the probe dataset (toxic and neutral).")
    n_prompts: int = _f(400, "Challenge prompts: prefixes whose continuations are often toxic.")
    n_pairs: int = _f(2000, "Preference pairs (prompt, non-toxic chosen, toxic rejected).")
    n_heldout: int = _f(2000, "Held-out neutral sentences for perplexity and F1.")
    n_samples: int = _f(64, "Challenge prompts greedily continued by the trained model for the report.")
    sample_tokens: int = _f(20, "New tokens per sample continuation.")

    def __post_init__(self):
        if not 0.0 < self.toxic_fraction < 1.0:
            raise ValueError("toxic_fraction must lie strictly between 0 and 1")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        for name in ("n_sentences", "n_toxic_words", "vocab_size", "n_layer", "n_ctx", "train_steps",
                     "batch_size", "n_probe", "n_prompts", "n_pairs", "n_heldout", "n_samples",
                     "sample_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass
class Config:
    """A whole pipeline config. Sections left out of the file take their defaults, except
    [world], which is present only in configs that build the demo world."""

    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run name, cache and store."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    scorer: ScorerConfig = field(default_factory=ScorerConfig, metadata={"help": "Toxicity scorer."})
    world: WorldConfig | None = field(default=None, metadata={"help": "Demo world (only when present)."})
    source: str = field(default="<dict>", metadata={"help": "File the config was read from."})

    def __post_init__(self):
        if self.model.path == "world" and self.world is None:
            raise ValueError("[model] path = 'world' needs a [world] section")

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return {k: v for k, v in d.items() if v is not None}


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}


def _section_class(name: str) -> type:
    hint = typing.get_type_hints(Config)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _check_type(value, hint, where: str):
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{where} must be {expected.get(hint, hint.__name__)}, got {value!r}")
    return value


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    sections = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]{_suggest(name, SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys")
        cls = _section_class(name)
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in body.items():
            if key not in hints:
                raise ConfigError(f"{source}: unknown key [{name}] {key}{_suggest(key, hints)}")
            values[key] = _check_type(value, hints[key], f"{source}: [{name}] {key}")
        try:
            sections[name] = cls(**values)
        except ValueError as e:
            raise ConfigError(f"{source}: [{name}] {e}") from None
    try:
        return Config(**sections, source=source)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def load(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing TOML file, e.g. configs/demo.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax at that place") from None
    return from_dict(raw, str(path))


def help_table() -> str:
    """Markdown table of every config key, generated from the dataclasses' help metadata."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name in SECTIONS:
        cls = _section_class(name)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `[{name}] {f.name}` | `{default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
