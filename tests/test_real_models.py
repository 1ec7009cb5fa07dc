"""Real architectures without downloads: checkpoints in the shapes of real models are saved to a temp
dir and every stage loads them by path, the code path a hub name takes (`[model] path`).

- gpt2-medium's shape (24 layers x 4,096 MLP neurons, d_model 1,024; small vocabulary and context to
  keep it to about 1.2 GB), a tiny Llama with a gated (GLU) MLP, a tiny GPT-NeoX (Pythia: parallel
  attention and MLP, no BOS) and a tiny Gemma 2 (GLU without biases, norm scales stored as offsets
  from 1): probe, record, attribute and intervene on a planted base/"DPO" pair; the recorded activation
  must be the input of the model's own down projection (GPT-2 `c_proj`, GPT-NeoX `dense_4h_to_h`,
  Llama and Gemma `down_proj`, read from plain transformers), the planted neurons must come out on top,
  the logit lens must scale by the model's own final norm, and each layer's deltas must add up to the
  change of its MLP output along the probe (on Gemma 2, through the norm after its MLP).
- a tiny Gemma 3 and a tiny OLMo 2 (norms after attention and MLP, none before): the same planted run.
- a tiny Qwen2 (GLU, and no BOS token): the whole runner, DPO through trl included, into a store.
- DPO through trl on GPT-NeoX and Gemma 2.
- the presets load without a download; [model] dtype reaches the weights; recording sharded over two
  processes equals one process; DPO trains data-parallel under torchrun.

The analysis stages run on the CPU; DPO_NEURONS_TEST_DEVICE=cuda runs them on a GPU instead, checked
against plain transformers on the CPU (README: Benchmarks, where this was done on one GPU).
"""

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import attribute, corpus, intervene, probe, record, runner, scoring, world
from pipeline.config import (AttributeConfig, DataConfig, InterveneConfig, ModelConfig, ProbeConfig, RecordConfig,
                             from_dict, load)
from tests.test_dpo import rejected_minus_chosen

DEVICE = os.environ.get("DPO_NEURONS_TEST_DEVICE", "cpu")
T = 4
PROMPTS = ["The soup was", "After lunch, my neighbor said that", "Could you fix the"]
HELDOUT = ["The river runs past the old mill and into the lake .", "We cooked rice with beans for the whole family ."]
TOXIC, ANTI = [3, 10, 17], [5, 12, 20]  # planted neurons of the last layer


def tokenizer(bos: bool = True):
    r = random.Random(0)
    tok = world.train_tokenizer([corpus.neutral_sentence(r) for _ in range(300)] + PROMPTS + HELDOUT, 400)
    if not bos:
        tok.bos_token = None
    return tok


def gpt2_medium_shaped(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=1024, n_layer=24, n_head=16,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))


def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    # mlp_bias: the gate and up biases are the handles that switch planted neurons on and off
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        mlp_bias=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))


def tiny_qwen2(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        bos_token_id=None, eos_token_id=tok.eos_token_id, tie_word_embeddings=True))


def tiny_neox(tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    # Pythia's architecture: attention and MLP read the same residual (parallel), rotary positions
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64,
                                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))


def tiny_gemma2(tok):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # GLU with GELU, no MLP biases, RMSNorm scales stored as offsets from 1, soft-capped logits
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=64, bos_token_id=tok.eos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))


def tiny_gemma3(tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Gemma 2's block plus RMSNorm on queries and keys, and local and global attention layers by turns
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              max_position_embeddings=64, sliding_window=8, bos_token_id=tok.eos_token_id,
                                              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))


def tiny_gemma3_multimodal(tok):
    """Gemma 3's 4B-and-up checkpoints: Gemma3ForConditionalGeneration, a SigLIP vision tower and a projector
    around tiny_gemma3's language model; tok gains the image tokens such a config names."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    tok.add_special_tokens({"additional_special_tokens": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]})
    boi, eoi, image = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=16)
    return Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=tiny_gemma3(tok).config, vision_config=vision, mm_tokens_per_image=4, boi_token_index=boi,
        eoi_token_index=eoi, image_token_index=image, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id))


def tiny_olmo2(tok):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    # norms after attention and MLP only (none before them), no MLP biases, RMSNorm on queries and keys
    return Olmo2ForCausalLM(Olmo2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, bos_token_id=tok.eos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))


ARCHS = {"gpt2-medium": gpt2_medium_shaped, "llama": tiny_llama, "neox": tiny_neox, "gemma2": tiny_gemma2,
         "gemma3": tiny_gemma3, "gemma3-multimodal": tiny_gemma3_multimodal, "olmo2": tiny_olmo2}
# TransformerLens' own choice per architecture (cfg.default_prepend_bos of its adapters)
PREPENDS_BOS = {"gpt2-medium": True, "llama": True, "neox": False, "gemma2": True, "gemma3": True, "gemma3-multimodal": True,
                "olmo2": True, "qwen2": False}


def prompt_ids(arch: str, tok, text: str) -> list[int]:
    return [tok.bos_token_id] * PREPENDS_BOS[arch] + tok(text)["input_ids"]


def first_submodule(model, names: tuple[str, ...]):
    """The first of names that the model has: GPT-2's, GPT-NeoX's or the Llama-like models' name for one thing."""
    for name in names:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    raise AssertionError(f"{type(model).__name__} has none of {names}")


def blocks(model) -> list:
    return list(first_submodule(model, ("transformer.h", "gpt_neox.layers", "model.layers", "model.language_model.layers")))


def final_norm(model):
    return first_submodule(model, ("transformer.ln_f", "gpt_neox.final_layer_norm", "model.norm", "model.language_model.norm"))


def post_mlp_norms(model) -> list:
    """The norm between each block's MLP and the residual (Gemma 2 and 3, OLMo 2); empty where blocks have none."""
    return [b.post_feedforward_layernorm for b in blocks(model) if hasattr(b, "post_feedforward_layernorm")]


def norm_scale(norm) -> torch.Tensor:
    """The per-coordinate scale that a model's own norm applies: a LayerNorm's weight; an RMSNorm maps
    a vector of ones to its scale, however it stores it (Gemma: as an offset from 1)."""
    with torch.no_grad():
        if isinstance(norm, torch.nn.LayerNorm):
            return norm.weight.detach().clone()
        return norm(torch.ones(1, norm.weight.shape[0]))[0]


def down_projections(model) -> list:
    names = ("c_proj", "dense_4h_to_h", "down_proj")
    return [next(getattr(b.mlp, n) for n in names if hasattr(b.mlp, n)) for b in blocks(model)]


def value_vectors(model) -> np.ndarray:
    """(L, d_mlp, d_model) what each neuron writes toward the residual: the rows of its layer's down
    projection, read from the HF modules by architecture, times the scale of the norm after the MLP
    where the blocks have one (Gemma 2 and 3, OLMo 2)."""
    if hasattr(model, "transformer"):  # GPT-2: Conv1D c_proj stores (d_mlp, d_model)
        V = np.stack([p.weight.detach().numpy() for p in down_projections(model)])
    else:
        V = np.stack([p.weight.detach().numpy().T for p in down_projections(model)])  # Linear: (d_model, d_mlp)
    for l, norm in enumerate(post_mlp_norms(model)):
        V[l] *= norm_scale(norm).numpy()
    return V


def set_planted(model, toxic_on: bool):
    """Base (toxic_on): the toxic neurons fire strongly, the anti-toxic ones weakly; 'DPO': the reverse."""
    mlp = blocks(model)[-1].mlp
    with torch.no_grad():
        if hasattr(mlp, "c_fc") or hasattr(mlp, "dense_h_to_4h"):  # GELU(W_in x + b)
            b = (mlp.c_fc if hasattr(mlp, "c_fc") else mlp.dense_h_to_4h).bias
            b[TOXIC], b[ANTI] = (3.0, 1.5) if toxic_on else (-3.0, 4.0)  # anti-toxic: clearly positive in both
        elif mlp.up_proj.bias is not None:  # SiLU(gate x + b_g) * (up x + b_u)
            mlp.up_proj.bias[TOXIC + ANTI] = 2.0
            mlp.gate_proj.bias[TOXIC], mlp.gate_proj.bias[ANTI] = (3.0, 0.5) if toxic_on else (-6.0, 3.5)
        else:  # no biases: gate and up rows both s u, u the MLP's mean input: GELU(s u.x) s u.x, about s^2 (u.x)^2
            seen = []
            hook = mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].mean((0, 1))))
            model(torch.randint(1, 300, (4, 12), generator=torch.Generator().manual_seed(1)))
            hook.remove()
            u = seen[0] / seen[0].norm()
            size = torch.tensor([1.0] * len(TOXIC) + [0.2] * len(ANTI) if toxic_on else [0.2] * len(TOXIC) + [1.0] * len(ANTI))
            mlp.gate_proj.weight[TOXIC + ANTI] = mlp.up_proj.weight[TOXIC + ANTI] = size[:, None] * u


def save_planted(tmp, make) -> dict:
    """Base and 'DPO' checkpoints that differ only in six planted last-layer neurons; the probe
    direction of attribute (tmp/planted/w.npy) is built from their value vectors."""
    tok = tokenizer()
    torch.manual_seed(0)
    model = make(tok)
    with torch.no_grad():  # trained norms scale each direction differently; random init leaves them uniform
        for i, norm in enumerate([final_norm(model), *post_mlp_norms(model)]):
            norm.weight.uniform_(-0.8, 2.0, generator=torch.Generator().manual_seed(2 + i))
    paths = {"base": tmp / "base", "dpo": tmp / "dpo" / "model"}
    for variant, on in (("base", True), ("dpo", False)):
        set_planted(model, on)
        model.save_pretrained(paths[variant])
        tok.save_pretrained(paths[variant])
    V = value_vectors(model)[-1].astype(np.float64)
    (tmp / "planted").mkdir()
    np.save(tmp / "planted" / "w.npy", (V[TOXIC].sum(0) - V[ANTI].sum(0)).astype(np.float32))
    del model
    return paths


def write_datasets(tmp):
    """Small files in the real datasets' formats: Jigsaw csv, RTP jsonl, pairs jsonl, WikiText-style text."""
    rows = [("You are a stupid idiot", 1), ("What a lovely morning", 0), ("Shut up, you moron", 1),
            ("The bread is fresh today", 0), ("Idiots like you ruin it", 1), ("We walked along the river", 0),
            ("Go to hell, loser", 1), ("The garden needs water", 0)]
    with open(tmp / "train.csv", "w", encoding="utf-8") as f:
        f.write("id,comment_text,toxic,severe_toxic\n")
        f.writelines(f'{i},"{t}",{y},0\n' for i, (t, y) in enumerate(rows))
    (tmp / "rtp.jsonl").write_text("".join(json.dumps({"filename": "x", "prompt": {"text": p, "toxicity": 0.9},
                                                        "continuation": {"text": " ok"}, "challenging": True}) + "\n"
                                           for p in PROMPTS))
    (tmp / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": " a kind word.", "rejected": " a stupid idiot."})
                                             + "\n" for p in PROMPTS))
    (tmp / "wiki.txt").write_text(" = Heading = \n\n" + "\n".join(HELDOUT) + "\n")


def run_planted(tmp, paths, dtype: str = "float32") -> tuple[dict, dict]:
    """probe, record, attribute and intervene on a planted pair saved by save_planted into tmp/dtype/;
    returns (stage dirs, stage summaries)."""
    dirs = {name: tmp / dtype / name for name in ("probe", "record", "attribute", "intervene")}
    for d in dirs.values():
        d.mkdir(parents=True)
    model = ModelConfig(path=str(paths["base"]), dtype=dtype)
    data = DataConfig(probe=str(tmp / "train.csv"), prompts=str(tmp / "rtp.jsonl"), heldout=str(tmp / "wiki.txt"))
    summary = {"probe": probe.run(dirs["probe"], device=DEVICE, model=model, data=data,
                                  probe=ProbeConfig(max_examples=8, val_fraction=0.5, max_tokens=16))}
    shutil.copy(dirs["probe"] / "w.npy", dirs["probe"] / "w_fitted.npy")
    shutil.copy(tmp / "planted" / "w.npy", dirs["probe"] / "w.npy")  # the planted direction, not the random model's probe
    common = dict(device=DEVICE, model=model, world_dir=None, probe_dir=dirs["probe"], dpo_dir=tmp / "dpo")
    rec = RecordConfig(new_tokens=T, batch_size=2)
    summary["record"] = record.run(dirs["record"], data=data, record=rec, **common)
    summary["attribute"] = attribute.run(dirs["attribute"], attribute=AttributeConfig(n_bootstrap=20, n_logit_lens=10,
                                                                                      n_top_prompt_neurons=10),
                                         record_dir=dirs["record"], **common)
    # perplexity as the paper's preset measures it, windows across the whole held-out file (test_intervene
    # checks it against the reference code's loop; the Qwen2 run below takes the passages)
    iv = InterveneConfig(ablate_top=[3], ablate_top_positive=[], patch_groups=["TP-"], patch_top=[6], n_heldout=2,
                         f1_tokens=3, batch_size=2, perplexity="stream", perplexity_window=16)
    summary["intervene"] = intervene.run(dirs["intervene"], data=data, record=rec, intervene=iv, record_dir=dirs["record"],
                                         attribute_dir=dirs["attribute"], **common)
    return dirs, summary


@pytest.fixture(scope="module", params=list(ARCHS))
def planted_run(request, tmp_path_factory):
    """Every analysis stage on one architecture's planted pair; returns (arch, paths, stage dirs, summaries)."""
    tmp = tmp_path_factory.mktemp(request.param)
    paths = save_planted(tmp, ARCHS[request.param])
    write_datasets(tmp)
    return request.param, paths, *run_planted(tmp, paths)


def test_probe_reads_the_jigsaw_csv_on_each_architecture(planted_run):
    _, paths, dirs, summary = planted_run
    d_model = AutoModelForCausalLM.from_pretrained(paths["base"]).config.get_text_config().hidden_size
    assert summary["probe"]["n_train"] + summary["probe"]["n_val"] == 8
    fitted = np.load(dirs["probe"] / "w_fitted.npy")
    assert fitted.shape == (d_model,) and np.isfinite(fitted).all() and np.linalg.norm(fitted) > 0


def test_probe_features_are_the_last_residual_in_the_context_generation_uses(planted_run):
    """probe.mean_residual averages the last block's output over a text's own tokens, tokenized as record
    tokenizes prompts: BOS exactly where TransformerLens prepends one (on GPT-NeoX the bridge's tokenizer
    adds one that generation never sees), here in plain transformers."""
    from pipeline.models import load_bridge

    arch, paths, _, _ = planted_run
    texts = PROMPTS[:3]
    got = probe.mean_residual(load_bridge(str(paths["base"]), DEVICE), texts, batch_size=3, max_tokens=64)
    hf = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    tok = AutoTokenizer.from_pretrained(paths["base"])
    captured = {}
    blocks(hf)[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    for text, row in zip(texts, got, strict=True):
        with torch.no_grad():
            hf(torch.tensor([prompt_ids(arch, tok, text)]))
        np.testing.assert_allclose(row, captured["x"][0, PREPENDS_BOS[arch]:].mean(0).numpy(), rtol=1e-4, atol=1e-4)


def test_recorded_activation_is_the_input_of_the_down_projection(planted_run):
    """a_i of method.md per architecture: whatever the model's own down projection receives (GPT-2:
    GELU(c_fc x); GLU: SiLU(gate x) * up x), averaged over the last T positions of one plain forward.
    Gemma 2 and 3 and OLMo 2 also get act_normed: a_i over the RMS that the post-feedforward norm divides
    each position by, kept per prompt in place of a_i (whose mean over all prompts is kept)."""
    arch, paths, dirs, summary = planted_run
    tok = AutoTokenizer.from_pretrained(paths["base"])
    hf = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    seen, rms = {}, {}
    for l, proj in enumerate(down_projections(hf)):
        proj.register_forward_pre_hook(lambda mod, args, l=l: seen.__setitem__(l, args[0][0]))
    for l, norm in enumerate(post_mlp_norms(hf)):
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))  # Gemma's name, OLMo's
        norm.register_forward_pre_hook(lambda mod, args, l=l, eps=eps: rms.__setitem__(
            l, (args[0][0].pow(2).mean(-1, keepdim=True) + eps).sqrt()))
    tokens = np.load(dirs["record"] / "base_tokens.npy")
    act_prompt, normed = (dirs["record"] / f"base_{name}_prompt.npy" for name in ("act", "act_normed"))
    assert normed.exists() == summary["record"]["act_normed"] == bool(post_mlp_norms(hf)) != act_prompt.exists()
    n_layers, d_mlp = np.load(dirs["record"] / "base_act.npy").shape
    assert (n_layers, d_mlp) == ((24, 4096) if arch == "gpt2-medium" else (2, 96))
    acts = []
    for i in range(len(PROMPTS)):
        ids = prompt_ids(arch, tok, PROMPTS[i]) + tokens[i].tolist()
        with torch.no_grad():
            hf(torch.tensor([ids]))
        acts.append(torch.stack([seen[l][-T:].mean(0) for l in range(n_layers)]).numpy())  # (n_layers, d_mlp)
        if rms:
            direct = torch.stack([(seen[l] / rms[l])[-T:].mean(0) for l in range(n_layers)]).numpy()
            np.testing.assert_allclose(np.load(normed)[i], direct, atol=1e-5, rtol=1e-4)
        else:
            np.testing.assert_allclose(np.load(act_prompt)[i], acts[-1], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.load(dirs["record"] / "base_act.npy"), np.mean(acts, 0), atol=1e-5, rtol=1e-4)


def test_planted_neurons_rank_first_and_cos_uses_the_models_own_w_out(planted_run):
    _, paths, dirs, summary = planted_run
    neurons = pl.read_parquet(dirs["attribute"] / "neurons.parquet")
    V = value_vectors(AutoModelForCausalLM.from_pretrained(paths["base"]))
    L = V.shape[0]
    assert neurons.height == V.shape[0] * V.shape[1] == summary["attribute"]["n_neurons"]
    top = neurons.sort("delta_rank").head(6)
    assert set(zip(top["layer"], top["neuron"])) == {(L - 1, i) for i in TOXIC + ANTI}
    codes = dict(zip(top["neuron"], top["group_code"]))
    assert all(codes[i] == "TP-" for i in TOXIC) and all(codes[i] == "AP+" for i in ANTI)
    w = np.load(dirs["probe"] / "w.npy").astype(np.float64)
    sample = neurons.sample(50, seed=0).vstack(top)
    for layer, neuron, cos in sample.select("layer", "neuron", "cos").iter_rows():
        v = V[layer, neuron]
        assert cos == pytest.approx(v @ w / np.linalg.norm(v) / np.linalg.norm(w), rel=1e-4, abs=1e-7)


def test_deltas_add_up_to_the_change_of_each_layers_mlp_output(planted_run):
    """Per layer, the neurons' deltas sum to the change of mlp_proj, which record reads from hook_mlp_out on its
    own: the pair shares its down-projection biases, so nothing else moves the MLP's output along w_hat. On
    Gemma 2 and 3 and OLMo 2 that output has passed a norm that divides each position by its RMS, so this
    holds only if proj takes each position's act over that RMS. The per-prompt group sums behind the
    intervals must take it too: every prompt has T positions, so they average to the groups' sums."""
    _, _, dirs, _ = planted_run
    neurons = pl.read_parquet(dirs["attribute"] / "neurons.parquet")
    by_layer = neurons.group_by("layer").agg(pl.col("delta").sum()).sort("layer")["delta"].to_numpy()
    mlp = np.load(dirs["record"] / "base_mlp_proj.npy") - np.load(dirs["record"] / "dpo_mlp_proj.npy")  # (L,)
    np.testing.assert_allclose(by_layer, mlp, rtol=1e-3, atol=1e-4)
    assert abs(mlp[-1]) > 100 * 1e-4  # the planted layer's change is far above the tolerance
    per_prompt = (pl.read_parquet(dirs["attribute"] / "prompt_groups.parquet").group_by("group_code")
                  .agg(pl.col("sum_delta").sum() / len(PROMPTS)))
    groups = pl.read_parquet(dirs["attribute"] / "group_summary.parquet").join(per_prompt, on="group_code", suffix="_prompts")
    np.testing.assert_allclose(groups["sum_delta_prompts"], groups["sum_delta"], rtol=1e-5, atol=1e-7)


def test_logit_lens_scales_by_the_models_own_final_norm(planted_run):
    """method.md's logit lens, top-k of (v_i * final norm's scale) @ W_U, with the scale as the model's own
    final norm applies it (Gemma stores it as an offset from 1) and the unembedding read from transformers."""
    _, paths, dirs, _ = planted_run
    hf = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    tok = AutoTokenizer.from_pretrained(paths["base"])
    V, scale = torch.from_numpy(value_vectors(hf)), norm_scale(final_norm(hf))
    W_U = hf.get_output_embeddings().weight.detach()  # (vocab, d_model)
    lens = pl.read_parquet(dirs["attribute"] / "neuron_tokens.parquet").sort("layer", "neuron", "rank")
    assert lens.select("layer", "neuron").n_unique() >= 10
    for (l, i), rows in lens.group_by("layer", "neuron", maintain_order=True):
        top = torch.topk(W_U @ (V[l, i] * scale), rows.height).indices
        assert rows["token"].to_list() == [tok.decode([int(t)]) for t in top], (l, i)


def continuations_equal(arch: str, dirs: dict, variant: str, hf, tok) -> bool:
    """The intervention's continuations are transformers' greedy generation by hf, an edited copy of the base;
    returns whether they differ from the base's anywhere."""
    gens = pl.read_parquet(dirs["intervene"] / "continuations.parquet").filter(pl.col("variant") == variant)
    base = pl.read_parquet(dirs["record"] / "continuations.parquet").filter(pl.col("variant") == "base")
    moved = (gens.sort("prompt_id")["continuation"] != base.sort("prompt_id")["continuation"]).any()
    # the equality below means something only where the intervention moved a token: on the tiny models it does;
    # a few of gpt2-medium's 98,304 neurons flip no greedy token of a random model, which the caller then checks otherwise
    assert moved or arch == "gpt2-medium"
    for p, got in zip(PROMPTS, gens.sort("prompt_id")["continuation"], strict=True):
        ids = torch.tensor([prompt_ids(arch, tok, p)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False,
                              pad_token_id=tok.eos_token_id)
        assert tok.decode(out[0, ids.shape[1]:]).replace(tok.eos_token, " ") == got
    return moved


def test_ablation_equals_zeroing_the_down_projection_rows(planted_run):
    """The ablate_top_3 continuations equal transformers' greedy generation with those neurons' weights
    in the down projection zeroed, whatever the architecture calls that module."""
    arch, paths, dirs, summary = planted_run
    assert set(summary["intervene"]["perplexity"]) == {"base", "dpo", "ablate_top_3", "patch_TP-", "patch_top_6"}
    top3 = pl.read_parquet(dirs["attribute"] / "neurons.parquet").sort("cos", descending=True).head(3)
    hf = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    tok = AutoTokenizer.from_pretrained(paths["base"])
    V = value_vectors(hf)
    downs = down_projections(hf)
    with torch.no_grad():
        for l, i in zip(top3["layer"], top3["neuron"]):
            if V.shape[1] == downs[l].weight.shape[0]:  # (d_mlp, d_model): GPT-2's Conv1D
                downs[l].weight[i] = 0.0
            else:
                downs[l].weight[:, i] = 0.0
    if continuations_equal(arch, dirs, "ablate_top_3", hf, tok):
        return
    # Tokens unchanged (gpt2-medium's shape): the same positions, so below the first ablated layer mlp_proj is the
    # base's, and in it the base's less what the ablated neurons wrote, act_i (v_i . w_hat), from record and the weights.
    w = np.load(dirs["probe"] / "w.npy").astype(np.float64)
    vw = V @ (w / np.linalg.norm(w))  # (L, d_mlp)
    act, base = np.load(dirs["record"] / "base_act.npy"), np.load(dirs["record"] / "base_mlp_proj.npy")
    got = pl.read_parquet(dirs["intervene"] / "layers.parquet").filter(pl.col("variant") == "ablate_top_3").sort("layer")
    got = got["mlp_proj"].to_numpy()
    first = min(top3["layer"])
    np.testing.assert_allclose(got[:first], base[:first], rtol=1e-5, atol=1e-6)
    written = sum(act[l, i] * vw[l, i] for l, i in zip(top3["layer"], top3["neuron"]) if l == first)
    assert abs(written) > 1e-4  # far above the tolerance: the ablation is seen
    assert got[first] == pytest.approx(base[first] - written, rel=1e-4, abs=1e-6)


def test_groups_have_the_sign_of_delta_when_no_value_vector_moved(planted_run):
    """The planted 'DPO' moves no value vector (W_out and the norms are the base's), so delta is dact times
    v . w_hat, and method.md's groups hold by construction: delta >= 0 in every reducing group, <= 0 in every
    increasing one. On Gemma 2 and 3 and OLMo 2 act must be over the post-MLP norm's RMS for this, as in proj:
    the means of a_i and of a_i / s can differ in sign."""
    arch, _, dirs, _ = planted_run
    neurons = pl.read_parquet(dirs["attribute"] / "neurons.parquet")
    np.testing.assert_array_equal(neurons["dact"], neurons["act"] - neurons["act_dpo"])
    assert (neurons.filter(pl.col("group_code").is_in(attribute.REDUCING))["delta"] >= 0).all()
    assert (neurons.filter(pl.col("group_code").is_in(attribute.INCREASING))["delta"] <= 0).all()


def test_patch_writes_dpos_mean_activation_into_the_down_projection(planted_run):
    """patch_TP- continuations equal transformers' greedy generation with the down projection's input for
    the TP- neurons set to the DPO model's mean activation there, as record read it at mlp.hook_post (not
    act_dpo where act is over the post-MLP norm's RMS: no hook before that norm can set it)."""
    arch, paths, dirs, _ = planted_run
    tp = pl.read_parquet(dirs["attribute"] / "neurons.parquet").filter(pl.col("group_code") == "TP-")
    hook_act_dpo = np.load(dirs["record"] / "dpo_act.npy")
    hf = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    tok = AutoTokenizer.from_pretrained(paths["base"])
    for (l,), rows in tp.group_by("layer"):
        idx = torch.tensor(rows["neuron"].to_numpy())
        value = torch.tensor(hook_act_dpo[l, rows["neuron"].to_numpy()])

        def patch(module, args, idx=idx, value=value):
            x = args[0].clone()
            x[..., idx] = value
            return (x,)

        down_projections(hf)[l].register_forward_pre_hook(patch)
    continuations_equal(arch, dirs, "patch_TP-", hf, tok)


@pytest.mark.parametrize("arch", ["neox", "gemma2"])
def test_dpo_trains_each_architecture_toward_the_chosen_side(tmp_path, arch):
    """Stage dpo through trl on GPT-NeoX and Gemma 2, loaded by path: the rejected completions lose
    likelihood against the chosen ones."""
    from pipeline import dpo
    from pipeline.config import DPOStageConfig

    tok = tokenizer()
    torch.manual_seed(0)
    ARCHS[arch](tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"prompt": p, "chosen": " a kind word.", "rejected": " a stupid idiot."} for p in PROMPTS * 4]
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "out").mkdir()
    summary = dpo.run(tmp_path / "out", device="cpu", model=ModelConfig(path=str(tmp_path / "base")), world_dir=None,
                      dpo=DPOStageConfig(beta=0.1, lr=1e-3, batch_size=4, max_length=24), pairs_dir=tmp_path / "pairs")
    assert summary["n_steps"] == 3
    before, after = (rejected_minus_chosen(path, rows) for path in (tmp_path / "base", tmp_path / "out" / "model"))
    assert after < before - 1.0, (before, after)  # log p(rejected) - log p(chosen), in nats


def test_glu_model_without_bos_runs_the_whole_pipeline_into_a_store(tmp_path, detoxify_checkpoint, monkeypatch):
    """A tiny Qwen2 (GLU MLP, no BOS token) through the runner exactly as a hub name would go:
    probe, pairs from a jsonl file, DPO with trl, record, attribute, intervene, store; scored by
    Detoxify from a local checkpoint, offline."""
    import store

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once at import: the variable is too late
    tok = tokenizer(bos=False)
    torch.manual_seed(0)
    tiny_qwen2(tok).save_pretrained(tmp_path / "qwen2")
    tok.save_pretrained(tmp_path / "qwen2")
    write_datasets(tmp_path)
    cfg = from_dict({
        "run": {"name": "qwen2", "cache_dir": str(tmp_path / "cache"), "store": str(tmp_path / "s.duckdb"), "device": "cpu"},
        "model": {"path": str(tmp_path / "qwen2")},
        "data": {"probe": str(tmp_path / "train.csv"), "prompts": str(tmp_path / "rtp.jsonl"),
                 "pairs": str(tmp_path / "pairs.jsonl"), "heldout": str(tmp_path / "wiki.txt")},
        "probe": {"max_examples": 8, "val_fraction": 0.5},
        "dpo": {"batch_size": 3, "max_length": 24, "lr": 1e-3},
        "record": {"new_tokens": T},
        "attribute": {"n_bootstrap": 20, "n_logit_lens": 5, "n_top_prompt_neurons": 5},
        "intervene": {"ablate_top": [3], "ablate_top_positive": [3], "patch_groups": ["TP-"], "patch_top": [5],
                      "n_heldout": 2, "f1_tokens": 3},
        "scorer": {"backend": "detoxify", "checkpoint": str(detoxify_checkpoint)},
    }, source="qwen2.toml")
    run_id = runner.run(cfg, log=lambda *_: None)
    con = store.connect(cfg.run.store)
    model, = con.execute("SELECT model FROM runs WHERE run_id = ?", [run_id]).fetchone()
    n, = con.execute("SELECT count(*) FROM neurons WHERE run_id = ?", [run_id]).fetchone()
    scorers = con.execute("SELECT DISTINCT scorer FROM generations WHERE run_id = ?", [run_id]).fetchall()
    assert model == str(tmp_path / "qwen2") and n == 2 * 48
    assert scorers == [(scoring.label(scoring.get_scorer(cfg.scorer)),)] and scorers[0][0].startswith("detoxify==")
    # DPO moved the model toward the chosen side of its pairs, and some neuron's activation with it
    assert con.execute("SELECT max(abs(dact)) FROM neurons WHERE run_id = ?", [run_id]).fetchone()[0] > 0
    con.close()
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    dpo_model = runner.stage_dir(cfg, "dpo", runner.cache_keys(cfg)["dpo"]) / "model"
    after, before = rejected_minus_chosen(dpo_model, pairs), rejected_minus_chosen(tmp_path / "qwen2", pairs)
    assert after < before - 1.0, (before, after)  # log p(rejected) - log p(chosen), in nats: -18.1 to -24.1 here

    # Another scorer rescores the pairs and the continuations; nothing is generated or trained again.
    rescored = from_dict(cfg.to_dict() | {"scorer": {"backend": "profanity-check"}}, source="qwen2.toml")
    ran = []
    new_id = runner.run(rescored, log=lambda line: ran.extend(re.findall(r"^\[(\w+)\] running", line)))
    assert ran == ["pairs", "score"]
    con = store.connect(cfg.run.store)
    texts = "SELECT variant, prompt_id, continuation, scorer FROM generations WHERE run_id = ? ORDER BY ALL"
    old, new = (con.execute(texts, [r]).fetchall() for r in (run_id, new_id))
    assert [r[:3] for r in new] == [r[:3] for r in old] and {r[3] for r in new} == {scoring.label(scoring.get_scorer(rescored.scorer))}


@pytest.mark.parametrize("arch", ["llama", "neox", "gemma2", "gemma3", "gemma3-multimodal", "olmo2", "qwen2"])
def test_product_of_experts_decodes_with_kv_caches_on_each_architecture(arch):
    """Stage detox calls the three transformers models itself (positions from the mask, logits_to_keep, each
    model's own KV cache): its greedy steps equal a full forward each step on every architecture, Gemma 3's
    sliding-window layers (a window of 8 tokens, shorter than the longest prompt) and its multimodal model
    included. Three random models stand in for base and experts."""
    from types import SimpleNamespace

    from pipeline import detox
    from tests.test_detox import check_cached_greedy

    tok = tokenizer()
    tok.pad_token = tok.eos_token
    made = []
    for seed in range(3):
        torch.manual_seed(seed)
        made.append((tiny_qwen2 if arch == "qwen2" else ARCHS[arch])(tok).eval())
    poe = detox.ProductOfExperts(*made, tokenizer=tok, cfg=SimpleNamespace(device="cpu"), alpha=1.0)
    check_cached_greedy(poe, [torch.tensor(prompt_ids(arch, tok, p)) for p in PROMPTS], T)


@pytest.mark.parametrize("arch", ["llama", "neox", "gemma2", "gemma3", "gemma3-multimodal", "olmo2", "qwen2"])
def test_bos_prefix_follows_transformer_lens_and_the_tokenizer(tmp_path, arch):
    """transformers-side prompts (DPO, self-generated pairs, the experts) get the BOS text only where
    TransformerLens prepends a BOS token (as the bridge's own to_tokens shows, whatever the tokenizer
    has) and the tokenizer does not add one itself."""
    from pipeline.models import bos_prefix, load_bridge

    with_bos, without = tokenizer(), tokenizer(bos=False)
    torch.manual_seed(0)
    model = (ARCHS | {"qwen2": tiny_qwen2})[arch](with_bos)
    model.save_pretrained(tmp_path)
    with_bos.save_pretrained(tmp_path)
    assert (load_bridge(str(tmp_path), "cpu").to_tokens("a")[0, 0] == with_bos.bos_token_id) == PREPENDS_BOS[arch]
    assert bos_prefix(with_bos, model.config) == (with_bos.bos_token if PREPENDS_BOS[arch] else "")
    assert bos_prefix(without, model.config) == ""
    adds = AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True)  # adds BOS itself, as Llama's does
    assert adds("a")["input_ids"][0] == adds.bos_token_id and bos_prefix(adds, model.config) == ""


def test_stream_windows_start_with_a_bos_that_is_not_the_end_of_text(tmp_path):
    """A Llama-style BOS of its own begins every stream window (Gemma's predictions fall apart without it), and
    the windows still hold every text token once, in order, each predicted: the perplexity is plain
    transformers' over exactly those windows."""
    from pipeline.models import load_bridge

    tok = tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    torch.manual_seed(0)
    model = tiny_llama(tok)
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bridge = load_bridge(str(tmp_path), DEVICE)
    windows = intervene.stream_windows(bridge, HELDOUT, 8)
    text = tok("\n\n".join(HELDOUT), add_special_tokens=False)["input_ids"]
    assert all(w[0] == tok.bos_token_id and len(w) <= 8 for w in windows) and len(windows) > 2
    assert torch.cat([w[1:] for w in windows]).tolist() == text
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        nll = sum(float(torch.nn.functional.cross_entropy(hf(w[None]).logits[0, :-1], w[1:], reduction="sum")) for w in windows)
    assert intervene.perplexity(bridge, windows, 4, []) == pytest.approx(np.exp(nll / len(text)), rel=1e-4)


def test_loading_a_multimodal_checkpoint_installs_nothing(tmp_path, monkeypatch):
    """transformer-lens pip-installs torchvision when a multimodal checkpoint's processor does not load, which
    put a CUDA torch over the pinned CPU one in the middle of `make test`. With torchvision missing, the bridge
    loads (text only) and nothing is run."""
    import subprocess

    from pipeline.models import load_bridge

    tok = tokenizer()
    torch.manual_seed(0)
    tiny_gemma3_multimodal(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ran = []
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: ran.append(a) or 0)
    bridge = load_bridge(str(tmp_path), DEVICE)
    assert ran == []
    assert bridge.to_tokens(PROMPTS[0]).shape[-1] > 1


def test_a_hub_model_pinned_to_a_revision_loads_that_commit_through_every_loader(tmp_path, monkeypatch):
    """NAME@REVISION through the hub's own code path, offline: a hub cache holding two commits of one repository,
    main at the first. A bare name loads main; a pinned one loads its commit in transformers, in the bridge and
    in the tokenizer reloaded from the bridge, which must carry the revision: main is then taken away."""
    from tests.conftest import save_tiny_gpt2

    from pipeline import models
    from pipeline.data import DataError

    repo = tmp_path / "hub" / "models--acme--tiny"
    first, second = "1" * 40, "2" * 40
    for seed, commit in enumerate((first, second)):
        save_tiny_gpt2(repo / "snapshots" / commit, seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once at import: the variable is too late
    weights = {c: AutoModelForCausalLM.from_pretrained(repo / "snapshots" / c).lm_head.weight for c in (first, second)}
    assert not torch.equal(weights[first], weights[second])

    assert torch.equal(models.load_hf("acme/tiny")[0].lm_head.weight, weights[first])
    assert torch.equal(models.load_hf(f"acme/tiny@{second}")[0].lm_head.weight, weights[second])
    models.check_supported(f"acme/tiny@{second}")
    with pytest.raises(DataError) as e:
        models.check_supported("acme/tiny@" + "f" * 40)
    assert "\n" not in str(e.value) and "could not be loaded" in str(e.value) and "a hub name and revision" in str(e.value)

    (repo / "refs" / "main").unlink()
    bridge = models.load_bridge(f"acme/tiny@{second}", DEVICE)
    assert torch.equal(bridge.original_model.lm_head.weight.cpu(), weights[second])
    assert models.bridge_prepends_bos(bridge, "tokenizer") is False  # GPT-2's tokenizer adds none
    with pytest.raises(DataError):
        models.load_tokenizer("acme/tiny")  # what the reload above would have been without the revision


def test_dtype_reaches_the_weights_and_unknown_ones_are_refused(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.models import load_bridge

    tok = tokenizer()
    torch.manual_seed(0)
    tiny_llama(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    full, half = load_bridge(str(tmp_path), DEVICE), load_bridge(str(tmp_path), DEVICE, "bfloat16")
    assert full.W_out.dtype == torch.float32 and half.W_out.dtype == torch.bfloat16
    ids = full.to_tokens(PROMPTS[1])
    a, b = (m.run_with_cache(ids, names_filter="blocks.1.mlp.hook_post")[1]["blocks.1.mlp.hook_post"].float() for m in (full, half))
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()  # the same activations, rounded to bfloat16
    with pytest.raises(ConfigError, match=r"\[model\] dtype must be one of float32"):
        from_dict({"model": {"path": "gpt2", "dtype": "fp8"}}, source="x.toml")


def test_bfloat16_runs_every_inference_stage_and_finds_the_planted_neurons(tmp_path):
    """[model] dtype = "bfloat16" (the GLU preset's) through probe, record, attribute and intervene: the
    activations are float32's rounded to bfloat16, the planted neurons still rank first, and the
    interventions' perplexities agree."""
    paths = save_planted(tmp_path, tiny_llama)
    write_datasets(tmp_path)
    runs = {dtype: run_planted(tmp_path, paths, dtype) for dtype in ("float32", "bfloat16")}
    full, half = (np.load(dirs["record"] / "base_act_prompt.npy").astype(np.float32) for dirs, _ in runs.values())
    assert 0 < np.abs(full - half).max() < 0.05 * np.abs(full).max()
    planted = {(1, i): "TP-" for i in TOXIC} | {(1, i): "AP+" for i in ANTI}
    for dirs, _ in runs.values():
        top = pl.read_parquet(dirs["attribute"] / "neurons.parquet").sort("delta_rank").head(6)
        assert dict(zip(zip(top["layer"], top["neuron"]), top["group_code"])) == planted
    ppl = [summary["intervene"]["perplexity"] for _, summary in runs.values()]
    assert ppl[0].keys() == ppl[1].keys()
    assert all(ppl[1][k] == pytest.approx(ppl[0][k], rel=0.05) for k in ppl[0])


@pytest.mark.parametrize("preset", ["gpt2-medium", "gpt2", "qwen2.5-0.5b"])
def test_presets_load_without_a_world_or_a_download(preset):
    cfg = load(Path(__file__).parents[1] / "configs" / f"{preset}.toml")
    assert cfg.world is None and "world" not in [s.name for s in runner.active_stages(cfg)]
    assert cfg.model.path != "world" and cfg.scorer.backend in scoring.BACKENDS
    assert cfg.data.prompts == "hf:allenai/real-toxicity-prompts" and cfg.data.challenging_only
    assert cfg.data.probe.endswith("train.csv") and cfg.data.heldout.startswith("hf:Salesforce/wikitext")
    assert (cfg.dpo.beta, cfg.dpo.optimizer) == (0.1, "rmsprop")


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_record_sharded_over_processes_equals_one_process(tmp_path, arch):
    """[record] processes = 2: two spawned processes record uneven shares of the prompts; the reduced
    result equals one process's (sums weighted by prompt count, per-prompt rows in prompt order), for
    act_normed too where the model has a norm after its MLP (Gemma 2). Shards are cut between whole batches, so
    every prompt is generated in the batch it has in one process and its rows are the same to the bit."""
    from tests.conftest import save_planted_pair

    if arch == "gpt2":
        base = save_planted_pair(tmp_path)
    else:
        base = save_planted(tmp_path, tiny_gemma2)["base"]
        (tmp_path / "planted").rename(tmp_path / "probe")
    prompts = PROMPTS + ["We will", "The cat"]
    (tmp_path / "rtp.jsonl").write_text("".join(json.dumps({"prompt": {"text": p}, "challenging": True}) + "\n" for p in prompts))
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"out{n}"
        outs[n].mkdir()
        summary = record.run(outs[n], device=DEVICE, model=ModelConfig(path=str(base)), data=DataConfig(prompts=str(tmp_path / "rtp.jsonl")),
                             record=RecordConfig(new_tokens=T, batch_size=2, processes=n), world_dir=None,
                             probe_dir=tmp_path / "probe", dpo_dir=tmp_path / "dpo")
        assert summary["processes"] == n
    for variant in record.VARIANTS:
        assert (np.load(outs[1] / f"{variant}_tokens.npy") == np.load(outs[2] / f"{variant}_tokens.npy")).all()
        per_prompt = "act_normed_prompt" if arch == "gemma2" else "act_prompt"
        assert np.load(outs[2] / f"{variant}_{per_prompt}.npy").shape[0] == len(prompts)
        names = ("act", "mlp_proj", per_prompt) + (("act_normed",) if arch == "gemma2" else ())
        for name in names:
            one, two = (np.load(outs[n] / f"{variant}_{name}.npy") for n in (1, 2))
            assert one.shape == two.shape
            np.testing.assert_allclose(two, one, atol=1e-5)
        assert np.array_equal(*(np.load(outs[n] / f"{variant}_{per_prompt}.npy") for n in (1, 2)))
    assert sorted(p.name for p in outs[2].iterdir()) == sorted(p.name for p in outs[1].iterdir())  # shard files joined
    assert pl.read_parquet(outs[2] / "continuations.parquet").equals(pl.read_parquet(outs[1] / "continuations.parquet"))


@pytest.mark.parametrize("arch", ["gpt2", "gemma3-multimodal"])
def test_dpo_trains_data_parallel_under_torchrun_and_the_rest_finds_it_cached(tmp_path, monkeypatch, arch):
    """`torchrun --nproc_per_node 2 -m pipeline run --only dpo` (what accelerate launch starts too): the
    pairs are split over two CPU processes (half the steps of one process), rank 0 alone keeps the result.
    A multimodal Gemma 3 trains with gradient checkpointing too, which needs its vision tower frozen: DDP
    stops at a parameter that text never gives a gradient."""
    import os
    import subprocess
    import sys

    from pipeline.config import ConfigError
    from tests.conftest import save_tiny_gpt2

    if arch == "gpt2":
        save_tiny_gpt2(tmp_path / "model")
    else:
        tok = tokenizer()
        torch.manual_seed(0)
        tiny_gemma3_multimodal(tok).save_pretrained(tmp_path / "model")
        tok.save_pretrained(tmp_path / "model")
    write_datasets(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"p{i} says", "chosen": " a kind word.",
                                                              "rejected": " a stupid idiot."}) + "\n" for i in range(16)))
    toml = tmp_path / "c.toml"
    toml.write_text(f"""[run]\ncache_dir = "{tmp_path / 'cache'}"\nstore = "{tmp_path / 's.duckdb'}"\ndevice = "cpu"\n
[model]\npath = "{tmp_path / 'model'}"\n[data]\nprobe = "{tmp_path / 'train.csv'}"\nprompts = "{tmp_path / 'rtp.jsonl'}"
pairs = "{tmp_path / 'pairs.jsonl'}"\nheldout = "{tmp_path / 'wiki.txt'}"\n[dpo]\nbatch_size = 2\nmax_length = 24
processes = 2\ngradient_checkpointing = {str(arch != "gpt2").lower()}\n""")
    cfg = load(toml)
    runner.run(cfg, only="pairs", log=lambda *_: None)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "pipeline", "run", "--config", str(toml), "--only", "dpo"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    dpo_dir = runner.stage_dir(cfg, "dpo", runner.cache_keys(cfg)["dpo"])
    assert json.loads((dpo_dir / "summary.json").read_text())["summary"]["n_steps"] == 16 // (2 * 2)
    assert (dpo_dir / "model").is_dir() and not list(dpo_dir.parent.glob("*.partial*"))
    assert {r["stage"]: r["state"] for r in runner.status(cfg)}["dpo"] == "cached"  # a one-process run goes on from here
    one = load(toml, overrides=["dpo.processes=1"])
    assert {r["stage"]: r["state"] for r in runner.status(one)}["dpo"] != "cached"  # 2 x 2 pairs a step are not 2

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--only dpo"):
        runner.run(cfg, log=lambda *_: None)
