"""Stage record: activations recorded during KV-cache generation equal one plain forward over
prompt + continuation (last T positions), greedy continuations equal transformers' own, and
nothing depends on the model's sizes. Tiny random GPT-2s are built here, two shapes."""

import json
import random

import numpy as np
import polars as pl
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline import corpus, models, record, world
from pipeline.config import DataConfig, ModelConfig, RecordConfig
from tests.conftest import save_planted_pair

T = 5
PROMPTS = ["Honestly, he is", "The cat", "After the game at the park, my neighbour yelled that the coach was",
           "I think", "Shut up, you are a", "We will"]  # different lengths in each batch of 4
SHAPES = {"2x32x128": dict(n_layer=2, n_embd=32, n_inner=None), "3x48x72": dict(n_layer=3, n_embd=48, n_inner=72)}


def tiny_model(tok, shape: dict, seed: int, eos_bias: float) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_head=2, initializer_range=0.1,
                                   bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **shape)).eval()
    with torch.no_grad():  # push the final residual towards EOS so that some greedy steps emit it
        e = m.transformer.wte.weight[tok.eos_token_id]
        m.transformer.ln_f.bias.add_(eos_bias * e / e.norm() ** 2)
    return m


@pytest.fixture(scope="module", params=list(SHAPES))
def stage(request, tmp_path_factory):
    """(out dir, {variant: model path}, w_hat, shape, summary) of one record run on tiny models of one shape."""
    tmp = tmp_path_factory.mktemp(f"record-{request.param}")
    r = random.Random(0)
    tok = world.train_tokenizer([corpus.neutral_sentence(r) for _ in range(2000)] + PROMPTS, vocab_size=400)
    shape = SHAPES[request.param]
    for name, seed in (("base", 0), ("dpo/model", 1)):
        tiny_model(tok, shape, seed, eos_bias=2.0).save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": {"text": p}, "challenging": True}) + "\n" for p in PROMPTS))
    w = np.random.default_rng(0).normal(size=shape["n_embd"]).astype(np.float32)
    (tmp / "probe").mkdir()
    np.save(tmp / "probe" / "w.npy", 3 * w)  # scaled: only the direction may matter
    out = tmp / "out"
    out.mkdir()
    summary = record.run(out, device="cpu", model=ModelConfig(path=str(tmp / "base")),
                         data=DataConfig(prompts=str(tmp / "prompts.jsonl"), challenging_only=True, max_prompts=100),
                         record=RecordConfig(new_tokens=T, batch_size=4), world_dir=None, probe_dir=tmp / "probe", dpo_dir=tmp / "dpo")
    paths = {"base": tmp / "base", "dpo": tmp / "dpo" / "model"}
    return out, paths, w / np.linalg.norm(w), shape, summary


def direct_measurement(path, token_rows: list[list[int]], w_hat):
    """Per-prompt mean of mlp.hook_post and of hook_mlp_out . w_hat over the last T positions of one
    plain forward each (no cache, no padding), and the same one position earlier."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    n = bridge.cfg.n_layers
    acts, projs, shifted = [], [], []
    for ids in token_rows:
        _, cache = bridge.run_with_cache(torch.tensor([ids]),
                                         names_filter=lambda h: h.endswith(("mlp.hook_post", "hook_mlp_out")))
        post = torch.stack([cache[f"blocks.{l}.mlp.hook_post"][0] for l in range(n)])  # (n_layers, pos, d_mlp)
        mlp_out = torch.stack([cache[f"blocks.{l}.hook_mlp_out"][0] for l in range(n)])  # (n_layers, pos, d_model)
        acts.append(post[:, -T:].mean(1).numpy())
        shifted.append(post[:, -T - 1:-1].mean(1).numpy())
        projs.append((mlp_out[:, -T:] @ torch.tensor(w_hat)).mean(1).numpy())
    return np.stack(acts), np.stack(projs), np.stack(shifted)  # (P, n_layers, d_mlp), (P, n_layers), ...


def full_rows(path, tokens: np.ndarray) -> list[list[int]]:
    """BOS + prompt + generated tokens, tokenized by the HF tokenizer alone."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [[tok.bos_token_id] + tok(p)["input_ids"] + list(map(int, gen)) for p, gen in zip(PROMPTS, tokens)]


@pytest.mark.parametrize("variant", record.VARIANTS)
def test_activations_equal_one_forward_over_prompt_and_continuation(stage, variant):
    out, paths, w_hat, shape, _ = stage
    tokens = np.load(out / f"{variant}_tokens.npy")
    act, proj, shifted = direct_measurement(paths[variant], full_rows(paths[variant], tokens), w_hat)

    np.testing.assert_allclose(np.load(out / f"{variant}_act_prompt.npy"), act, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.load(out / f"{variant}_act.npy"), act.mean(0), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.load(out / f"{variant}_mlp_proj.npy"), proj.mean(0), atol=1e-5, rtol=1e-4)
    # the check can tell an off-by-one window (last prompt token in, last generated token out) apart
    assert np.abs(shifted.mean(0) - act.mean(0)).max() > 1e-2


@pytest.mark.parametrize("variant", record.VARIANTS)
def test_greedy_continuations_equal_transformers_generate(stage, variant):
    out, paths, _, _, _ = stage
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths[variant])
    hf = GPT2LMHeadModel.from_pretrained(paths[variant], attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None  # exactly T tokens, EOS included
    tokens = np.load(out / f"{variant}_tokens.npy")
    assert tokens.shape == (len(PROMPTS), T)
    eos = tokens == tok.eos_token_id
    assert eos.any() and not eos.all(), "the tiny models should emit EOS at some steps, so that not stopping is tested"
    gens = pl.read_parquet(out / "continuations.parquet").filter(variant=variant).sort("prompt_id").to_dicts()
    for i, (prompt, g) in enumerate(zip(PROMPTS, gens, strict=True)):
        ids = torch.tensor([[tok.bos_token_id] + tok(prompt)["input_ids"]])  # one prompt, unpadded
        # explicit mask: the BOS here is also the pad id, and transformers would mask it out otherwise
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False)[0, ids.shape[1]:]
        assert ref.tolist() == tokens[i].tolist(), f"prompt {i}"
        assert g["prompt"] == prompt and g["continuation"] == tok.decode(ref).replace(tok.eos_token, " ")


def test_prompts_tokenized_as_the_reference_code_generate_as_it_does(tmp_path):
    """[model] bos = tokenizer, [record] max_prompt_tokens = 4: each model's continuations equal transformers'
    greedy generation from the tokenizer's own ids (no BOS on GPT-2) cut to their first 4, as the reference
    code generates, and the recorded activations are still those of the T generated positions."""
    from transformers import AutoTokenizer

    base = save_planted_pair(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    out.mkdir()
    record.run(out, device="cpu", model=ModelConfig(path=str(base), bos="tokenizer"),
               data=DataConfig(prompts=str(tmp_path / "prompts.jsonl"), challenging_only=False),
               record=RecordConfig(new_tokens=T, batch_size=4, max_prompt_tokens=4), world_dir=None,
               probe_dir=tmp_path / "probe", dpo_dir=tmp_path / "dpo")
    w = np.load(tmp_path / "probe" / "w.npy")
    for variant, path in (("base", base), ("dpo", tmp_path / "dpo" / "model")):
        tok = AutoTokenizer.from_pretrained(path)
        hf = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
        hf.generation_config.eos_token_id = None  # exactly T tokens, as record generates
        cut = [tok(p)["input_ids"][:4] for p in PROMPTS]
        # some cut, some shorter and padded in their batch
        assert tok.bos_token_id not in [r[0] for r in cut] and max(map(len, cut)) == 4 > min(map(len, cut))
        assert any(len(tok(p)["input_ids"]) > 4 for p in PROMPTS)
        tokens = np.load(out / f"{variant}_tokens.npy")
        for i, ids in enumerate(cut):
            ids = torch.tensor([ids])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False)[0, ids.shape[1]:]
            assert ref.tolist() == tokens[i].tolist(), (variant, i)
        act, _, _ = direct_measurement(path, [r + list(map(int, g)) for r, g in zip(cut, tokens)], w / np.linalg.norm(w))
        np.testing.assert_allclose(np.load(out / f"{variant}_act.npy"), act.mean(0), atol=1e-5, rtol=1e-4)


def test_continuation_text_ends_at_eos_only_where_asked(tmp_path):
    """[record] eos_ends_text: the text the scorer reads stops before the first EOS, as the reference code's
    generate stops there; by default all T tokens, EOS shown as a space. The tokens and activations are the same."""
    r = random.Random(0)
    tok = world.train_tokenizer([corpus.neutral_sentence(r) for _ in range(2000)] + PROMPTS, vocab_size=400)
    for name, seed in (("base", 0), ("dpo/model", 1)):
        tiny_model(tok, SHAPES["2x32x128"], seed, eos_bias=2.0).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "probe").mkdir()
    np.save(tmp_path / "probe" / "w.npy", np.ones(32, np.float32))
    outs = {}
    for ends in (False, True):
        outs[ends] = tmp_path / f"out{ends}"
        outs[ends].mkdir()
        record.run(outs[ends], device="cpu", model=ModelConfig(path=str(tmp_path / "base")),
                   data=DataConfig(prompts=str(tmp_path / "prompts.jsonl"), challenging_only=False),
                   record=RecordConfig(new_tokens=T, batch_size=4, eos_ends_text=ends), world_dir=None,
                   probe_dir=tmp_path / "probe", dpo_dir=tmp_path / "dpo")
    eos = tok.eos_token_id
    for variant in record.VARIANTS:
        tokens = np.load(outs[False] / f"{variant}_tokens.npy")
        assert (tokens == np.load(outs[True] / f"{variant}_tokens.npy")).all()
        assert (np.load(outs[False] / f"{variant}_act.npy") == np.load(outs[True] / f"{variant}_act.npy")).all()
        assert (tokens == eos).any(), "the tiny models should emit EOS"
        texts = {ends: pl.read_parquet(outs[ends] / "continuations.parquet").filter(variant=variant).sort("prompt_id")
                 ["continuation"].to_list() for ends in outs}
        for row, whole, cut in zip(tokens.tolist(), texts[False], texts[True]):
            assert whole == tok.decode(row).replace(tok.eos_token, " ")
            assert cut == tok.decode(row[:row.index(eos)] if eos in row else row)
        assert texts[False] != texts[True]
    # planted: what follows the first EOS is left out, not only the EOS
    a, b = tok(" the")["input_ids"][0], tok(" cat")["input_ids"][0]
    rows = np.array([[a, eos, b], [a, b, b]])
    assert record.decode(tok, rows, eos_ends_text=True) == [tok.decode([a]), tok.decode([a, b, b])]
    assert record.decode(tok, rows) == [tok.decode([a]) + " " + tok.decode([b]), tok.decode([a, b, b])]


def test_shapes_follow_the_model_and_tables_match_the_schema(stage):
    out, _, _, shape, summary = stage
    n_layers, d_mlp = shape["n_layer"], shape["n_inner"] or 4 * shape["n_embd"]
    for variant in record.VARIANTS:
        assert np.load(out / f"{variant}_act.npy").shape == (n_layers, d_mlp)
        assert np.load(out / f"{variant}_act_prompt.npy").shape == (len(PROMPTS), n_layers, d_mlp)
        assert np.load(out / f"{variant}_act_prompt.npy").dtype == np.float32
        assert np.load(out / f"{variant}_mlp_proj.npy").shape == (n_layers,)
    # the two variants are different models, so their recordings differ
    assert not np.allclose(np.load(out / "base_act.npy"), np.load(out / "dpo_act.npy"))

    continuations = pl.read_parquet(out / "continuations.parquet")
    assert continuations.columns == ["variant", "prompt_id", "prompt", "continuation"]
    assert continuations.height == 2 * len(PROMPTS)
    t = record.tables(out)
    assert list(t) == ["layers"] and t["layers"].columns == ["variant", "layer", "mlp_proj"]
    assert sorted(t["layers"].rows()) == sorted((v, l, float(np.load(out / f"{v}_mlp_proj.npy")[l]))
                                                for v in record.VARIANTS for l in range(n_layers))
    assert summary["n_prompts"] == len(PROMPTS) and summary["new_tokens"] == T


def test_hook_post_is_the_input_of_w_out(stage):
    """The recorded hook is the neuron activation a_i of method.md: what the MLP's output projection
    (GPT-2's c_proj, W_out) receives, read here from a plain transformers model."""
    out, paths, _, shape, _ = stage
    ids = full_rows(paths["base"], np.load(out / "base_tokens.npy"))[0]
    hf = GPT2LMHeadModel.from_pretrained(paths["base"], attn_implementation="eager").eval()
    seen = {}
    for l, block in enumerate(hf.transformer.h):
        block.mlp.c_proj.register_forward_pre_hook(lambda mod, args, l=l: seen.__setitem__(l, args[0][0]))
    with torch.no_grad():
        hf(torch.tensor([ids]))
    act, _, _ = direct_measurement(paths["base"], [ids], np.ones(shape["n_embd"], np.float32))
    w_out_input = torch.stack([seen[l][-T:].mean(0) for l in range(shape["n_layer"])]).numpy()  # (n_layers, d_mlp)
    np.testing.assert_allclose(act[0], w_out_input, atol=1e-5)


def test_prompt_longer_than_the_context_allows_is_refused(stage):
    out, paths, _, _, _ = stage
    bridge = models.load_bridge(str(paths["base"]), "cpu")
    with pytest.raises(record.datasets.DataError, match="new_tokens") as e:
        record.prompt_tokens(bridge, ["short", "I think " * 40], new_tokens=T)
    assert str(e.value).startswith("prompt 1 ('I think I think") and "\n" not in str(e.value)


@pytest.mark.parametrize("n, batch_size, processes", [(5, 2, 2), (8, 3, 2), (10, 2, 3), (3, 4, 2), (7, 1, 7), (1, 8, 4)])
def test_shards_are_cut_between_whole_batches(n, batch_size, processes):
    """A prompt is batched with the same others whatever the number of processes (its left-padding depends on them)."""
    shards = record.shard_prompts(n, batch_size, processes)
    assert np.concatenate(shards).tolist() == list(range(n)) and all(len(s) for s in shards)
    assert len(shards) == min(processes, -(-n // batch_size))
    batches = [s[i:i + batch_size].tolist() for s in shards for i in range(0, len(s), batch_size)]
    assert batches == [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def test_a_too_long_prompt_in_a_later_shard_is_named_by_its_number_among_all_prompts(tiny_gpt2, tmp_path):
    """Under [record] processes the second shard starts at prompt 2 (batches of 2); its too-long prompt is the
    stage's prompt 3."""
    prompts = PROMPTS[:3] + ["I think " * 40]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": {"text": p}}) + "\n" for p in prompts))
    (tmp_path / "probe").mkdir()
    np.save(tmp_path / "probe" / "w.npy", np.ones(32, np.float32))
    with pytest.raises(record.datasets.DataError) as e:
        record.run(tmp_path, device="cpu", model=ModelConfig(path=str(tiny_gpt2)),
                   data=DataConfig(prompts=str(tmp_path / "prompts.jsonl"), challenging_only=False, max_prompts=100),
                   record=RecordConfig(new_tokens=T, batch_size=2, processes=2), world_dir=None, probe_dir=tmp_path / "probe",
                   dpo_dir=tmp_path / "dpo")
    assert str(e.value).startswith("prompt 3 ('I think I think")


def test_activations_that_reach_inf_or_nan_stop_record_at_the_first_such_batch(tiny_gpt2, tmp_path, monkeypatch):
    """float16 tops out at 65,504: an MLP that passes it gives inf sums, which would reach every share as NaN.
    Record stops after the batch where they appear, not after every prompt, and tells a dtype too narrow from
    weights that hold NaN (a DPO run that diverged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import ConfigError

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(tmp_path / "big")
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(tmp_path / "nan")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1e7)
        model.save_pretrained(tmp_path / "big")
        model.transformer.h[1].mlp.c_proj.weight[0, 0] = float("nan")
        model.save_pretrained(tmp_path / "nan")
    batches = []
    record_batch = record._record_batch
    monkeypatch.setattr(record, "_record_batch", lambda *a: batches.append(1) or record_batch(*a))
    w_hat = np.ones(model.config.n_embd, np.float32) / np.sqrt(model.config.n_embd)
    prompts = ["The soup was", "We will", "Hello there"]
    record.generate_and_record(models.load_bridge(str(tmp_path / "big"), "cpu"), prompts, w_hat, 3, 1, "record base",
                               tmp_path / "float32_")
    for name, dtype, says in (("big", "float16", "in float16; set [model] dtype"), ("nan", "float32", "DPO run that diverged")):
        batches.clear()
        with pytest.raises(ConfigError) as e:
            record.generate_and_record(models.load_bridge(str(tmp_path / name), "cpu", dtype), prompts, w_hat, 3, 1,
                                       "record dpo", tmp_path / f"{name}_")
        assert "record dpo: the model's " in str(e.value) and says in str(e.value) and "\n" not in str(e.value)
        assert len(batches) == 1


def test_act_over_the_post_norm_rms_is_divided_in_float32_whatever_the_models_dtype():
    """On Gemma in bfloat16, a_i and the RMS s arrive in bfloat16; a_i / s rounded to bfloat16 again would add an
    error of up to 2^-9 of each value, which no mean over positions removes. The division runs in float32."""
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(3, 4, 1, 512, generator=g).to(torch.bfloat16)  # (passes, B, pos, d_mlp)
    scales = (torch.rand(3, 4, 1, 1, generator=g) * 30 + 1).to(torch.bfloat16)  # (passes, B, pos, 1)
    total = torch.zeros(4, 512)
    normed = record.OverPostNormScale(total)
    for a, s in zip(acts, scales):
        normed.keep(a, None)
        normed(s, None)
    want = (acts[1:].double() / scales[1:].double()).sum(0)[:, -1]  # the prompt pass (0) is skipped
    np.testing.assert_allclose(total.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
