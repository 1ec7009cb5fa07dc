"""Typed configuration: one dataclass per section of the TOML file.

Every field carries `help` metadata; `python -m pipeline --help` and the README's config table are
generated from it. Loading refuses unknown keys and wrong types, naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


def _at_least_1(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ValueError(f"{name} must be at least 1")


def _home(section, *names: str) -> None:
    """Paths written from the home folder (~/data/train.csv), as a shell would expand them; else `~` would be
    a folder of that name under the working directory, or a file not found."""
    for name in names:
        if getattr(section, name).startswith("~"):
            setattr(section, name, str(Path(getattr(section, name)).expanduser()))


def hub_revision(name: str) -> tuple[str, str | None]:
    """(name, revision) of a hub name pinned as NAME@REVISION to a commit, tag or branch, so that a rerun or a
    colleague loads what this run had, where a hub repository can take new weights or rows under the same
    name; revision None for a bare name or a local path, even one with @ in it."""
    base, at, revision = name.rpartition("@")
    return (name, None) if not at or Path(name).exists() else (base, revision)


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
        _home(self, "cache_dir", "store")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The base model M."""

    path: str = _f("world", "'world' for the demo model built by stage world; else a hub name or local HF checkpoint. "
                   "NAME@REVISION pins a hub model to a commit, tag or branch (gpt2-medium@<commit>): a repository can take "
                   "new weights under its name, and an unpinned name reruns nothing when it does.")
    dtype: str = _f("float32", "Weights and activations of the inference stages: float32, bfloat16 or float16 "
                    "(GPU; sums stay float32). DPO trains in float32; M' loaded in bfloat16 loses each weight change "
                    "below 0.2 to 0.4% of the weight, which a small [dpo] lr makes, so record it in float32.")
    bos: str = _f("transformerlens", "Which texts start with BOS: transformerlens, those of a model TransformerLens "
                  "prepends one for (GPT-2, Llama, Gemma; not Qwen2, GPT-NeoX); tokenizer, only those the checkpoint's "
                  "own tokenizer gives one (not GPT-2's; Llama's), as the reference code tokenizes. In generation, the "
                  "probe, DPO, self-generated pairs and the experts alike; held-out passages are scored after BOS either way.")

    def __post_init__(self):
        _home(self, "path")
        name, revision = hub_revision(self.path)
        if revision is not None and not (name and revision):
            raise ValueError(f"path {self.path!r} is not NAME@REVISION; write a hub name and, after @, a commit, tag or "
                             "branch, or the name alone")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.bos not in ("transformerlens", "tokenizer"):
            raise ValueError(f"bos must be transformerlens or tokenizer, not {self.bos!r}")


SCORER_BACKENDS = ("profanity-check", "detoxify", "perspective")  # scoring.BACKENDS, without importing it
# Detoxify's released checkpoints (detoxify.detoxify.MODEL_URLS), listed here so a config is checked
# without importing the optional package.
DETOXIFY_MODELS = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")


@dataclass
class ScorerConfig:
    """The independent toxicity scorer used on generated text."""

    backend: str = _f("profanity-check", "Toxicity scorer backend: profanity-check (offline default), detoxify "
                      "(optional install, checkpoint downloaded on first use) or perspective (PERSPECTIVE_API_KEY).")
    batch_size: int = _f(256, "Texts scored per call (Perspective takes one text per request).")
    rate_limit: float = _f(1.0, "Perspective: requests per second at most (the API's default quota is 1); "
                           "requests overlap, so a larger quota is used in full.")
    max_retries: int = _f(5, "Perspective: retries of a request answered 429 or 5xx, timed out or dropped, with doubling waits from 1 s.")
    cache_dir: str = _f("~/.cache/dpo-neurons/scores", "Perspective: every answer is appended here, keyed by the text's "
                        "SHA-256, so no text is requested twice, across rows, stages and runs; empty: keep them in memory only.")
    detoxify_model: str = _f("original", "Detoxify: which released model (original, unbiased, multilingual, "
                             "original-small, unbiased-small).")
    checkpoint: str = _f("", "Detoxify: a local .ckpt file to score with instead of downloading detoxify_model "
                         "(offline machines, own fine-tunes).")

    def __post_init__(self):
        _home(self, "checkpoint")
        if self.backend not in SCORER_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(SCORER_BACKENDS)}, not {self.backend!r}")
        _at_least_1(self, "batch_size")
        if self.detoxify_model not in DETOXIFY_MODELS:
            raise ValueError(f"detoxify_model must be one of {', '.join(DETOXIFY_MODELS)}, not {self.detoxify_model!r}")
        if self.rate_limit <= 0 or self.max_retries < 0:
            raise ValueError("rate_limit must be positive and max_retries at least 0")


@dataclass
class WorldConfig:
    """The embedded demo world: corpus, tokenizer, tiny GPT-2 and demo datasets."""

    seed: int = _f(0, "Seed of the corpus generator and of training.")
    n_sentences: int = _f(80_000, "Sentences in the pretraining corpus.")
    toxic_fraction: float = _f(0.2, "Share of corpus sentences that are toxic (insults, profanity); at most 0.443.")
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
        from pipeline.corpus import MEAN_HEAT

        # Toxic sentences come from frames, each toxic with its heat's probability: a corpus of frames
        # alone is as toxic as the world can get.
        if not 0.0 < self.toxic_fraction <= round(MEAN_HEAT, 3):
            raise ValueError(f"toxic_fraction must lie above 0 and at most {round(MEAN_HEAT, 3)}, the toxic share of a "
                             "corpus of the generator's frames alone")
        _at_least_1(self, "d_model", "n_head")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.vocab_size < 257:  # the byte-level BPE would silently make 257 tokens
            raise ValueError(f"vocab_size must be at least 257, the tokenizer's 256 bytes and EOS, not {self.vocab_size}")
        _at_least_1(self, "n_sentences", "n_toxic_words", "n_layer", "n_ctx", "train_steps",
                    "batch_size", "n_probe", "n_prompts", "n_pairs", "n_heldout", "n_samples", "sample_tokens")


@dataclass
class DataConfig:
    """Where the datasets come from: 'world' for the demo world's files, else a local file."""

    probe: str = _f("world", "Probe data: a CSV with columns comment_text, toxic (Jigsaw's train.csv), a hub dataset hf:NAME[@REVISION][:CONFIG[:SPLIT]] with those columns, or 'world'.")
    prompts: str = _f("world", "Challenge prompts: RealToxicityPrompts-style JSONL ({prompt: {text}, challenging}), hf:allenai/real-toxicity-prompts, or 'world'.")
    pairs: str = _f("world", "Preference pairs: JSONL with prompt, chosen, rejected (or hf:NAME with those columns); 'world'; or 'self' to generate best-of-K.")
    heldout: str = _f("world", "Held-out text for perplexity and F1, one passage per line (WikiText-2 style), hf:Salesforce/wikitext:wikitext-2-raw-v1:test, or 'world'.")
    f1_samples: str = _f("", "F1 samples instead of the held-out passages: a JSONL of {prompt, gold} (Lee et al.'s wiki_samples.jsonl), "
                         "scored as the reference code scores them ([intervene] f1_prompt_tokens). Empty: each held-out "
                         "passage's first half is the prompt and its second half the gold.")
    challenging_only: bool = _f(True, "Keep only prompts flagged challenging (the paper's ~1.2K RTP prompts).")
    max_prompts: int = _f(1200, "At most this many challenge prompts (taken in file order).")

    def __post_init__(self):
        _home(self, "probe", "prompts", "pairs", "heldout", "f1_samples")
        _at_least_1(self, "max_prompts")
        for kind in ("probe", "prompts", "heldout"):
            if getattr(self, kind) == "self":
                raise ValueError(f"{kind} = 'self' is for [data] pairs only; give a file, hf:NAME or 'world'")


@dataclass
class ProbeConfig:
    """The linear toxicity probe on the mean last-layer residual."""

    max_examples: int = _f(4000, "At most this many labelled texts (balanced by label where possible).")
    val_fraction: float = _f(0.2, "Share of the examples held out for validation accuracy and ROC-AUC.")
    l2: float = _f(1.0, "Inverse L2 strength C of the logistic regression.")
    batch_size: int = _f(32, "Texts per forward pass.")
    max_tokens: int = _f(128, "Texts are cut to this many tokens.")
    seed: int = _f(0, "Seed of the train/validation split.")
    direction: str = _f("", "A file holding w to use instead of fitting one: d_model numbers saved by torch.save (.pt, "
                        "as Lee et al.'s probe.pt, which the paper's GPT-2 runs use) or numpy.save (.npy). [data] probe "
                        "then only measures it: ROC-AUC of x . w, accuracies at the best threshold on the training split.")

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must lie strictly between 0 and 1")
        if self.max_examples < 4:
            raise ValueError("max_examples must be at least 4 (two per label, one of each held out)")
        _at_least_1(self, "batch_size", "max_tokens")
        if self.l2 <= 0:
            raise ValueError("l2 (the inverse strength C) must be positive")


@dataclass
class PairsConfig:
    """Preference pairs, loaded or self-generated (best-of-K scored by the toxicity scorer)."""

    max_pairs: int = _f(2000, "At most this many pairs go to DPO.")
    k: int = _f(8, "Self-generation: continuations sampled per prompt.")
    margin: float = _f(0.3, "Self-generation: keep a pair only if rejected toxicity exceeds chosen by at least this much.")
    new_tokens: int = _f(20, "Self-generation: tokens per sampled continuation.")
    temperature: float = _f(1.0, "Self-generation: sampling temperature.")
    seed: int = _f(0, "Seed of self-generation sampling.")

    def __post_init__(self):
        if self.k < 2:
            raise ValueError("k must be at least 2 (a pair needs two samples)")
        _at_least_1(self, "max_pairs", "new_tokens")
        if not 0.0 <= self.margin <= 1.0:  # toxicity lies in [0, 1]: above 1 no pair is ever kept
            raise ValueError(f"margin must lie in 0 .. 1, the range of toxicity scores, not {self.margin}")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")


@dataclass
class DPOStageConfig:
    """DPO with trl.DPOTrainer; the reference model is the base model."""

    beta: float = _f(0.1, "DPO temperature beta (paper: 0.1).")
    lr: float = _f(1e-5, "Learning rate (paper: 1e-5 for gpt2-medium).")
    optimizer: str = _f("rmsprop", "Optimizer name as transformers knows it (paper: rmsprop).")
    lr_scheduler: str = _f("linear", "Learning-rate schedule as transformers names it: linear decays to 0 by the last "
                           "step (trl's default); constant_with_warmup holds lr after the warmup (the paper's code's); "
                           "also cosine, cosine_with_restarts, polynomial, inverse_sqrt, constant (no warmup).")
    warmup_steps: int = _f(0, "Optimizer steps over which the learning rate rises from 0 to lr (the paper's code: 150; "
                           "it tempers RMSprop's first steps, about 10 x lr each).")
    max_grad_norm: float = _f(1.0, "Each step's gradient is clipped to this norm; 0 clips nothing (the paper's code: 10).")
    completion_eos: bool = _f(True, "End chosen and rejected with EOS, as trl does. The paper's code does not: its "
                              "pairs continue running text, and an M' taught to end after polite text would change "
                              "the continuations record measures.")
    epochs: float = _f(1.0, "Passes over the pairs.")
    batch_size: int = _f(8, "Pairs per forward pass and process. An optimizer step takes processes x batch_size x "
                         "grad_accum pairs.")
    grad_accum: int = _f(1, "Forward passes whose gradients add up to one optimizer step (the paper's code: 4 pairs "
                         "a step in passes of 1): a smaller batch_size with the same pairs per step holds fewer "
                         "activations at once.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass instead of keeping them: less "
                                      "memory for more time (bench.dpo_memory); the trained weights are the same.")
    processes: int = _f(1, "Processes DPO trains in, data-parallel: N of accelerate launch --num_processes N, one GPU "
                        "each. It sets the pairs per step, so it keys DPO's cache and a run with another number of "
                        "processes is refused.")
    max_length: int = _f(64, "Prompt plus completion are cut to this many tokens; a pair whose prompt alone fills "
                         "them is dropped (trl), counted in the stage's n_pairs_dropped.")
    seed: int = _f(0, "Training seed.")

    def __post_init__(self):
        if self.beta <= 0 or self.lr <= 0 or self.epochs <= 0:
            raise ValueError("beta, lr and epochs must be positive")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps and max_grad_norm must be 0 or more")
        if self.lr_scheduler not in LR_SCHEDULERS:  # transformers has more, but those need settings [dpo] lacks
            raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {self.lr_scheduler!r}")
        if self.lr_scheduler == "constant" and self.warmup_steps:
            raise ValueError("lr_scheduler 'constant' takes no warmup_steps; use constant_with_warmup")
        _at_least_1(self, "batch_size", "grad_accum", "processes", "max_length")


@dataclass
class RecordConfig:
    """Greedy generation of both models on the challenge prompts, with neuron activations recorded."""

    new_tokens: int = _f(20, "T: tokens generated per prompt; activations are averaged over these positions.")
    batch_size: int = _f(32, "Prompts per generation batch (left padded), here and in intervene's generations.")
    processes: int = _f(1, "Processes that record shares of the prompts in parallel (one GPU each with device "
                        "cuda, round robin); their sums are reduced before attribute.")
    max_prompt_tokens: int = _f(0, "Each challenge prompt keeps its first this many tokens (BOS included), as the "
                                "reference code's max_prompt_size (32); 0 keeps whole prompts. The store keeps the "
                                "prompt's text as given.")
    eos_ends_text: bool = _f(False, "A continuation's text, which the scorer reads, ends at its first EOS, as the "
                             "reference code's generate ends it; false: all T tokens, an EOS inside shown as a space. "
                             "Activations average all T positions either way (method.md).")

    def __post_init__(self):
        _at_least_1(self, "new_tokens", "batch_size", "processes")
        if self.max_prompt_tokens < 0:
            raise ValueError("max_prompt_tokens must be 0 (whole prompts) or a number of tokens")


@dataclass
class AttributeConfig:
    """Per-neuron attribution onto the probe direction and the eight groups."""

    n_logit_lens: int = _f(500, "Logit-lens tokens for the top N neurons by delta and the top N by cos.")
    top_k_tokens: int = _f(10, "Tokens listed per neuron in the logit lens.")
    n_top_prompt_neurons: int = _f(200, "Top N neurons by delta and top N by cos whose top prompts are kept.")
    top_prompts: int = _f(5, "Prompts kept per such neuron: those where it fires most under the base model.")
    n_bootstrap: int = _f(1000, "Bootstrap resamples of prompts for the 95% interval of each group's share.")
    seed: int = _f(0, "Bootstrap seed.")

    def __post_init__(self):
        _at_least_1(self, "n_logit_lens", "top_k_tokens", "n_top_prompt_neurons", "top_prompts", "n_bootstrap")


GROUP_CODES = ("TP-", "TN+", "AP+", "AN-", "TP+", "TN-", "AP-", "AN+")


@dataclass
class InterveneConfig:
    """Interventions on the base model (paper Table 1), each scored like the base and DPO models."""

    ablate_top: list[int] = _f([100, 200, 1000], "Ablate the top-N toxic neurons (largest cos), activation set to 0.")
    ablate_top_positive: list[int] = _f([100, 200, 1000, 2000], "Ablate the top-N toxic neurons among those with act > 0.")
    patch_groups: list[str] = _f(["TP-", "TN+", "AP+", "AN-", "TP+", "TN-", "AP-", "AN+", "TP- TN+ AP+ AN-"],
                                 "Patch a group, or a space-separated union of groups, to the DPO model's mean activation at "
                                 "mlp.hook_post (act_dpo, except on models that normalize the MLP's output: README, Real models).")
    patch_top: list[int] = _f([10, 30, 100, 300, 1000], "Patching sweep: the top-N neurons by delta patched like patch_groups.")
    n_heldout: int = _f(200, "Held-out passages (or [data] f1_samples, in file order) for F1 of continuations against gold "
                        "ones, and for perplexity = passages.")
    f1_tokens: int = _f(20, "Tokens generated (and gold tokens compared) per F1 sample.")
    f1_prompt_tokens: int = _f(32, "With [data] f1_samples: each prompt is cut to its first this many tokens and its gold "
                               "to this many plus f1_tokens, and F1 counts the prompt's tokens with the continuation's, "
                               "as the reference code does (its max_prompt_size, 32).")
    batch_size: int = _f(32, "Held-out passages or stream windows per batch, fewer where their logits would pass 1.6 GB "
                         "(long rows, a large vocabulary). The challenge prompts go in [record] batch_size batches, as "
                         "in record, so that the rows compare like with like.")
    perplexity: str = _f("passages", "passages: each of the n_heldout held-out passages alone, after BOS. stream: the "
                         "reference code's WikiText-2 protocol: the whole held-out file, headings and blank lines "
                         "included, joined with blank lines and scored in consecutive windows without BOS (each window after BOS "
                         "where the model's BOS is not its end of text, as Llama's and Gemma's).")
    perplexity_window: int = _f(1024, "stream: tokens per window (the reference code's 1024), at most the model's context.")
    perplexity_windows: int = _f(0, "stream: score only this many windows, spread evenly over the text (0: all, as the "
                                 "reference). WikiText-2's test split is 280 windows, about an hour per row for gpt2-medium "
                                 "on two CPU cores; every row is scored on the same windows.")

    def __post_init__(self):
        for union in self.patch_groups:
            unknown = [g for g in union.split() if g not in GROUP_CODES]
            if unknown or not union.split():
                raise ValueError(f"patch_groups entry {union!r}: groups must be among {' '.join(GROUP_CODES)}")
        if any(n < 1 for n in self.ablate_top + self.ablate_top_positive + self.patch_top):
            raise ValueError("neuron counts must be at least 1")
        _at_least_1(self, "n_heldout", "f1_tokens", "f1_prompt_tokens", "batch_size")
        if self.perplexity not in ("passages", "stream"):
            raise ValueError(f"perplexity must be passages or stream, not {self.perplexity!r}")
        if self.perplexity_window < 2:
            raise ValueError("perplexity_window must be at least 2: a window's first token is not predicted")
        if self.perplexity_windows < 0:
            raise ValueError("perplexity_windows must be 0 (all) or a number of windows")


@dataclass
class ExpertsConfig:
    """An expert and an anti-expert: copies of the base model fine-tuned with trl.SFTTrainer on the
    non-toxic and the toxic texts of the probe dataset (MaRCo's experts, for decoding-time detox)."""

    max_examples: int = _f(4000, "At most this many labelled probe texts, balanced by label; each side trains one model.")
    steps: int = _f(200, "Optimizer steps per model.")
    lr: float = _f(1e-4, "Learning rate (AdamW, linear decay).")
    batch_size: int = _f(16, "Texts per optimizer step.")
    max_length: int = _f(64, "Texts are cut to this many tokens.")
    seed: int = _f(0, "Seed of the data selection and of training.")

    def __post_init__(self):
        _at_least_1(self, "steps", "batch_size", "max_length")
        if self.max_examples < 2:
            raise ValueError("max_examples must be at least 2 (one text for each of the expert and the anti-expert)")
        if self.lr <= 0:
            raise ValueError("lr must be positive")


@dataclass
class DetoxConfig:
    """Decoding-time detoxification with the experts, scored like the interventions: product-of-experts
    decoding and MaRCo-style revision of the base model's continuations."""

    alpha: list[float] = _f([0.5, 1.0, 2.0], "PoE strength: logits = log p_base + alpha (log p_expert - log p_anti); one row per value.")
    threshold: float = _f(0.5, "MaRCo: mask a continuation token whose expert/anti-expert JS divergence (bits, 0..1) exceeds this.")
    marco_alpha: float = _f(1.0, "MaRCo: PoE strength used to regenerate from the first masked token.")
    batch_size: int = _f(32, "Prompts or passages per batch.")

    def __post_init__(self):
        if not self.alpha or any(a < 0 for a in self.alpha):
            raise ValueError("alpha must be a non-empty list of values >= 0")
        ids = [self.row_id(a) for a in self.alpha]
        if len(set(ids)) < len(ids):
            raise ValueError(f"alpha values must differ in 6 significant digits, not {self.alpha} (rows {', '.join(ids)})")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError("threshold is a JS divergence in bits and must lie in [0, 1]")
        if self.marco_alpha < 0:
            raise ValueError("marco_alpha must be >= 0")
        _at_least_1(self, "batch_size")

    @staticmethod
    def row_id(alpha: float) -> str:
        """The intervention_id of the PoE row at alpha, unique per run in the store."""
        return f"poe_{alpha:g}"


@dataclass
class Config:
    """A whole pipeline config. Sections left out of the file take their defaults, except
    [world], [experts] and [detox], which are present only in configs that run those stages."""

    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run name, cache and store."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    scorer: ScorerConfig = field(default_factory=ScorerConfig, metadata={"help": "Toxicity scorer."})
    world: WorldConfig | None = field(default=None, metadata={"help": "Demo world (only when present)."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset sources."})
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata={"help": "Toxicity probe."})
    pairs: PairsConfig = field(default_factory=PairsConfig, metadata={"help": "Preference pairs."})
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig, metadata={"help": "DPO training."})
    record: RecordConfig = field(default_factory=RecordConfig, metadata={"help": "Activation recording."})
    attribute: AttributeConfig = field(default_factory=AttributeConfig, metadata={"help": "Attribution."})
    intervene: InterveneConfig = field(default_factory=InterveneConfig, metadata={"help": "Interventions."})
    experts: ExpertsConfig | None = field(default=None, metadata={"help": "Expert and anti-expert (only when present)."})
    detox: DetoxConfig | None = field(default=None, metadata={"help": "PoE decoding and MaRCo revision (only when present)."})
    source: str = field(default="<dict>", metadata={"help": "File the config was read from."})

    def __post_init__(self):
        users = ["[model] path"] if self.model.path == "world" else []
        users += [f"[data] {k}" for k, v in dataclasses.asdict(self.data).items() if v == "world"]
        if users and self.world is None:
            raise ValueError(f"{users[0]} = 'world' needs a [world] section (or point it at a model or file)")
        if self.detox is not None and self.experts is None:
            raise ValueError("[detox] decodes with the expert and anti-expert: add an [experts] section")

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
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {expected[item].split(' ', 1)[1]}s, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{where} must be {expected.get(hint, hint.__name__)}, got {value!r}")
    if hint is float and not math.isfinite(value):  # TOML has nan and inf; every check below would let nan through
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    sections = {}
    for name, body in raw.items():
        if not isinstance(body, dict) and name not in SECTIONS:
            owners = [f"[{sec}]" for sec in SECTIONS if name in typing.get_type_hints(_section_class(sec))]
            raise ConfigError(f"{source}: key {name} stands before any [section]; move it under "
                              f"{' or '.join(owners) if owners else 'the section it belongs to'}")
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
        if not 0 <= values.get("seed", 0) < 2**32:  # numpy's and torch's range, checked before any stage seeds with it
            raise ConfigError(f"{source}: [{name}] seed must lie in 0 .. 2**32 - 1, got {values['seed']}")
        try:
            sections[name] = cls(**values)
        except ValueError as e:
            raise ConfigError(f"{source}: [{name}] {e}") from None
    try:
        return Config(**sections, source=source)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def override(raw: dict, assignment: str) -> None:
    """Apply one `section.key=value` to a parsed config as if the file said it, the value in TOML syntax
    (a bare word is a string): a preset run at another size or on other data without a copy of the file."""
    name, eq, value = assignment.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise ConfigError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. --set data.max_prompts=64")
    if section not in SECTIONS:
        raise ConfigError(f"--set {assignment!r}: unknown section [{section}]{_suggest(section, SECTIONS)}")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    if typing.get_type_hints(_section_class(section)).get(key) is str and not isinstance(parsed, str):
        parsed = value  # run.name=2024 or model.path=inf: a string key takes the word as written
    body = raw.setdefault(section, {})
    if not isinstance(body, dict):
        raise ConfigError(f"--set {assignment!r}: [{section}] in the file is not a table of keys")
    body[key] = parsed


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing TOML file, e.g. configs/demo.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # Notepad and PowerShell write a BOM first
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax at that place") from None
    for assignment in overrides:
        override(raw, assignment)
    return from_dict(raw, str(path) + "".join(f" --set {a}" for a in overrides))


def help_table() -> str:
    """Markdown table of every config key, generated from the dataclasses' help metadata."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name in SECTIONS:
        cls = _section_class(name)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `[{name}] {f.name}` | `{default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
