"""Loading models: every stage goes through here, so a hub name, a local checkpoint and the demo
world's model take exactly the same path."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from pipeline.config import hub_revision
from pipeline.data import DataError


def _load_error(path: str, e: Exception) -> DataError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if first.startswith("Could not determine supported architecture"):
        return DataError(f"model {path!r} has an architecture that TransformerLens' bridge does not support; choose "
                         "a model of one it does (GPT-2, GPT-NeoX, Llama, Qwen2, Gemma, Mistral, ...)")
    reach = "a hub name and revision" if hub_revision(path)[1] else "a hub name"
    return DataError(f"model {path!r} could not be loaded ({first[:160]}); give a local HF checkpoint "
                     f"folder or {reach} this machine can reach")


def _bridge_reads_the_kv_cache() -> None:
    """transformer-lens 4.3's attention bridges look for the KV cache under `past_key_values` (or
    `layer_past`); transformers 5 passes it to attention modules as `cache`, so without this every
    cached generation step attends to itself alone. Hand the cache over under the name the bridge
    reads. tests/test_record.py checks cached generation against plain forwards and transformers."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    update = AttentionBridge._update_kv_cache
    if getattr(update, "reads_cache", False):
        return

    def _update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return update(self, k, v, **kwargs)

    _update_kv_cache.reads_cache = True
    AttentionBridge._update_kv_cache = _update_kv_cache


def _bridge_keeps_no_pattern() -> None:
    """transformer-lens 4.3's joint-QKV attention bridge (GPT-2's, GPT-NeoX's) keeps each forward's
    attention pattern in `_pattern`, which nothing reads: every layer's (batch, heads, pos, pos) pattern,
    in the model's dtype, stays alive until that layer's next forward. On gpt2-medium in float32 a
    perplexity batch of 8 windows of 1,024 tokens so holds 12 GiB besides its 1.5 GiB of logits. Drop it
    once the output is built; hooks on hook_pattern still see every pattern."""
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge

    process = JointQKVAttentionBridge._process_output
    if getattr(process, "keeps_no_pattern", False):
        return

    def _process_output(self, output):
        output = process(self, output)
        self._pattern = None
        return output

    _process_output.keeps_no_pattern = True
    JointQKVAttentionBridge._process_output = _process_output


def _bridge_installs_nothing() -> None:
    """transformer-lens 4.3 pip-installs torchvision into the running environment when a multimodal checkpoint's
    processor does not load (Gemma 3 from 4B), and with it another torch (a CUDA build of several GB over the
    pinned CPU wheel), in the middle of a run. The stages feed text only and need no processor: go without it."""
    from transformer_lens.model_bridge.sources.transformers import helpers

    def _ensure_torchvision() -> bool:
        try:
            import torchvision  # noqa: F401
        except Exception:
            return False
        return True

    helpers._ensure_torchvision = _ensure_torchvision


def load_bridge(path: str, device: str, dtype: str = "float32"):
    """A TransformerLens v4 bridge around the HF model at `path` (hub name or local folder), in eval mode,
    weights in `dtype` (a name of [model] dtype)."""
    from transformer_lens.model_bridge import TransformerBridge

    _bridge_reads_the_kv_cache()
    _bridge_keeps_no_pattern()
    _bridge_installs_nothing()
    name, revision = hub_revision(path)
    try:
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=getattr(torch, dtype), revision=revision)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    bridge.original_model.name_or_path = path  # what load_tokenizer reloads from it: the pinned revision too
    bridge.eval()
    if bridge.tokenizer.pad_token is None:
        bridge.tokenizer.pad_token = bridge.tokenizer.eos_token
    return bridge


def load_tokenizer(path: str):
    """The checkpoint's tokenizer as transformers loads it, pad = eos: its own special tokens, so no BOS on
    GPT-2, where the bridge's tokenizer prepends one."""
    from transformers import AutoTokenizer

    name, revision = hub_revision(path)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_hf(path: str, device: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) through transformers, pad = eos; `device` None leaves placement to the caller."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    name, revision = hub_revision(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), revision=revision)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if getattr(model.config, "vision_config", None) is not None:
        # Gemma 3 from 4B is multimodal. Stages feed it text only, and under DDP with gradient checkpointing a
        # parameter that gets no gradient (the vision tower's) stops the first step: train the language model alone.
        text = {id(p) for part in (model.get_decoder(), model.get_output_embeddings()) for p in part.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in text)
    return (model if device is None else model.to(device)), tok


def trainer_args(out: Path, device: str) -> dict:
    """What every trl trainer here (stages dpo and experts) is given besides its own hyperparameters."""
    return dict(
        output_dir=str(out),  # nothing is written there: save_strategy "no", the stage saves the model itself
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        # trl defaults to bf16 autocast and gradient checkpointing, made for large models on recent GPUs;
        # fp32 runs on any device and keeps the small log-probability ratios DPO learns from exact
        bf16=False,
        activation_checkpointing=False,
    )


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


def check_supported(path: str) -> None:
    """Refuses, from its HF config alone, a model that is not there or whose architecture the bridge does not
    support: stages that train through transformers (dpo, experts) would otherwise train it first."""
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config
    from transformers import AutoConfig

    name, revision = hub_revision(path)
    try:
        determine_architecture_from_hf_config(AutoConfig.from_pretrained(name, revision=revision))
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    # Without them transformers builds an empty tokenizer from the config alone, every text tokenizes to nothing
    # but BOS, and the run goes on to a probe of noise.
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"model {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                        f"beside the weights (tokenizer.save_pretrained({str(path)!r}))")


def prepends_bos(config) -> bool:
    """Whether TransformerLens prepends BOS to this model's inputs (`cfg.default_prepend_bos`): each
    architecture's adapter decides (GPT-2, Llama, Gemma: yes; Qwen2, GPT-NeoX, Phi: no). Read from the
    HF config through the adapter alone, without building the model."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    try:
        arch = determine_architecture_from_hf_config(config)
    except ValueError as e:
        raise _load_error(config.name_or_path, e) from None
    cfg = build_bridge_config_from_hf(config, arch, config.name_or_path, torch.float32)
    return bool(ArchitectureAdapterFactory.select_architecture_adapter(cfg).cfg.default_prepend_bos)


def adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS before a text by itself (Llama's does; GPT-2's does not)."""
    return tok.bos_token is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]


def bridge_prepends_bos(bridge, bos: str) -> bool:
    """to_tokens' prepend_bos under [model] bos: TransformerLens' own policy, or what the checkpoint's own
    tokenizer does (the reference code's tokenization)."""
    if bos == "transformerlens":
        return bool(bridge.cfg.default_prepend_bos)
    return adds_bos(load_tokenizer(bridge.original_model.name_or_path))


def bos_prefix(tok, config, bos: str = "transformerlens") -> str:
    """Text to put before a prompt so that transformers (the model with this HF config) sees the BOS that
    TransformerLens prepends: the BOS token where TransformerLens prepends one and the tokenizer does not
    add it itself (GPT-2); nothing where TransformerLens prepends none (Qwen2, GPT-NeoX), the tokenizer
    has no BOS, or it adds BOS itself (Llama); nothing with [model] bos = tokenizer, which leaves BOS to it."""
    if bos == "tokenizer" or tok.bos_token is None or not prepends_bos(config) or adds_bos(tok):
        return ""
    return tok.bos_token


def release_memory() -> None:
    """Return a dropped model's memory (call after `del model`): one large model is resident at a time."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
