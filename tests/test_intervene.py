"""Stage intervene: the neuron hooks agree with edits of the weights themselves, patching every neuron
to the DPO model's activations reproduces the DPO model, the selections follow method.md, and an
end-to-end run on a planted base/DPO pair is checked against plain transformers."""

import copy
import json
import math
import statistics
from collections import Counter
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import attribute, config, detox, intervene, models, record, score, scoring
from pipeline.config import AttributeConfig, DataConfig, DetoxConfig, InterveneConfig, ModelConfig, RecordConfig, ScorerConfig
from tests.conftest import save_planted_pair, save_tiny_gpt2

TEXTS = ["The soup was cold", "After lunch, my neighbor said that the bus", "We will"]


def neuron_table(cos: np.ndarray, act: np.ndarray, act_dpo: np.ndarray, codes: np.ndarray, delta: np.ndarray) -> pl.DataFrame:
    """The columns of attribute's neurons.parquet that intervene reads, from (L, d_mlp) arrays, and the
    hook_act_dpo that intervene.run adds from record (act_dpo itself on a model without a norm after its MLP)."""
    L, d_mlp = cos.shape
    layer, neuron = np.divmod(np.arange(L * d_mlp), d_mlp)
    rank = np.empty(L * d_mlp, np.int64)
    rank[np.argsort(-delta, axis=None, kind="stable")] = np.arange(1, L * d_mlp + 1)
    return pl.DataFrame({"layer": layer, "neuron": neuron, "cos": cos.ravel(), "act": act.ravel(),
                         "act_dpo": act_dpo.ravel(), "hook_act_dpo": act_dpo.ravel(), "delta": delta.ravel(),
                         "group_code": codes.ravel(), "delta_rank": rank})


def test_ablation_hook_equals_zeroed_value_vectors(tiny_gpt2):
    """Two independent ablations of the top-n cos neurons: the hook on mlp.hook_post in the bridge,
    and the neurons' W_out rows (GPT-2 Conv1D c_proj: (d_mlp, d_model)) zeroed in a plain HF copy."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    L, d_mlp = hf.config.n_layer, hf.transformer.h[0].mlp.c_proj.weight.shape[0]
    rng = np.random.default_rng(0)
    cos = rng.normal(size=(L, d_mlp))
    zeros = np.zeros((L, d_mlp))
    n = 40
    chosen, make_hook = intervene.ablate_top(neuron_table(cos, zeros, zeros, np.full((L, d_mlp), "TP-"), zeros), n)
    hooks = intervene.layer_hooks(chosen, make_hook)

    layer, neuron = np.divmod(np.argsort(-cos, axis=None)[:n], d_mlp)
    assert len(set(layer)) == L  # the set spans every layer, so each layer's hook is exercised
    ablated = copy.deepcopy(hf)
    with torch.no_grad():
        for l, i in zip(layer, neuron):
            ablated.transformer.h[l].mlp.c_proj.weight[i] = 0.0

    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    rows = [bridge.to_tokens(t, move_to_device=False)[0] for t in TEXTS]
    ids, mask = record.left_pad(rows, bridge.tokenizer.pad_token_id)  # one padded batch, as the stage runs it
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        got = bridge(ids, attention_mask=mask)  # (B, L, vocab)
    with torch.no_grad():
        plain = bridge(ids, attention_mask=mask)
        for b, r in enumerate(rows):
            want = ablated(r[None]).logits[0]  # (len, vocab), unpadded
            assert torch.allclose(got[b, -len(r):], want, atol=1e-5)
            assert not torch.allclose(plain[b, -len(r):], want, atol=1e-3)  # the ablation does change the logits


def test_patching_every_neuron_to_dpo_activations_reproduces_dpo(tmp_path):
    """A 'DPO' copy that differs only in its MLP input biases: its activations, recorded per position
    in a first pass and written into the base model's mlp.hook_post, give the DPO model's logits."""
    base = save_tiny_gpt2(tmp_path / "base", n_layer=2, d_model=32, seed=5)
    dpo = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for blk in dpo.transformer.h:
            blk.mlp.c_fc.bias.add_(torch.randn(blk.mlp.c_fc.bias.shape, generator=torch.Generator().manual_seed(1)))
    dpo.save_pretrained(tmp_path / "dpo")

    dpo_bridge = models.load_bridge(str(tmp_path / "dpo"), "cpu")  # the base tokenizer is not needed: ids are given
    bridge = models.load_bridge(str(base), "cpu")
    d_mlp = bridge.cfg.d_mlp
    for text in TEXTS:
        ids = bridge.to_tokens(text, move_to_device=False)  # (1, len)
        with torch.no_grad():
            _, cache = dpo_bridge.run_with_cache(ids, names_filter=lambda h: h.endswith("mlp.hook_post"))
            hooks = [(f"blocks.{l}.mlp.hook_post", intervene.set_to(np.arange(d_mlp), cache[f"blocks.{l}.mlp.hook_post"].numpy()))
                     for l in range(bridge.cfg.n_layers)]  # values (1, len, d_mlp): per position
            with bridge.hooks(fwd_hooks=hooks):
                got = bridge(ids)
            want = dpo(ids).logits
            assert torch.allclose(got, want, atol=1e-5)
            assert not torch.allclose(bridge(ids), want, atol=1e-3)


def test_selections_follow_method():
    """Six neurons in two layers, the expected sets written out by hand."""
    cos = np.array([[0.9, -0.5, 0.7], [0.8, 0.1, -0.2]])
    act = np.array([[-1.0, 2.0, 0.5], [0.3, 0.2, -0.4]])
    act_dpo = act - 0.1
    codes = np.array([["TN+", "AP-", "TP-"], ["TP-", "TP-", "AN+"]])
    delta = np.array([[0.1, 0.6, 0.3], [0.5, -0.2, 0.0]])
    neurons = neuron_table(cos, act, act_dpo, codes, delta)
    pick = lambda kind, arg: set(zip(*intervene.KINDS[kind](neurons, arg)[0].select("layer", "neuron")))

    assert pick("ablate_top", 2) == {(0, 0), (1, 0)}
    assert pick("ablate_top_positive", 2) == {(1, 0), (0, 2)}  # (0, 0) has act < 0
    assert pick("patch_groups", ["TP-"]) == {(0, 2), (1, 0), (1, 1)}
    assert pick("patch_groups", ["TN+", "AN+"]) == {(0, 0), (1, 2)}
    assert pick("patch_top", 2) == {(0, 1), (1, 0)}

    cfg = InterveneConfig(ablate_top=[2, 50], ablate_top_positive=[4, 9], patch_groups=["TP-", "TN+ AN+"], patch_top=[2, 2])
    todo = intervene.plan(cfg, neurons)
    assert [iv.id for iv in todo] == ["ablate_top_2", "ablate_top_6", "ablate_top_positive_4", "patch_TP-",
                                      "patch_TN++AN+", "patch_top_2"]  # 9 capped at the 4 positive ones; 2 once
    assert [iv.n_neurons for iv in todo] == [2, 6, 4, 3, 2, 2]
    assert todo[1].params == {"n": 6, "n_asked": 50}


def test_f1():
    assert intervene.f1([7, 8, 9], [9, 8, 7]) == 1.0  # a bag: order does not count
    assert intervene.f1([1, 2], [3, 4]) == 0.0
    # pred {5: 2, 6: 2}, gold {5, 6, 7}: 2 tokens shared; P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7
    assert intervene.f1([5, 6, 5, 6], [5, 6, 7]) == pytest.approx(4 / 7)
    assert intervene.f1([], []) == 1.0 and intervene.f1([], [5]) == 0.0


def test_f1_compares_token_ids_with_the_gold_half_up_to_the_first_end_of_text(tiny_gpt2):
    """Planted continuations: the gold tokens themselves score 1; after an end of text nothing counts,
    not even tokens that match the gold."""
    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    tok, eos = bridge.tokenizer, bridge.tokenizer.eos_token_id
    passages = ["the river runs past the old mill and into the lake", "we cooked rice with beans for the whole family"]
    held = intervene.heldout_set(bridge, passages, f1_tokens=6, batch_size=2)
    gold = [tok(" " + " ".join(p.split()[len(p.split()) // 2:]), add_special_tokens=False)["input_ids"][:6] for p in passages]
    assert held.gold == gold and all(len(g) == 6 for g in gold)
    assert intervene.mean_f1(bridge, np.array(gold), held) == 1.0
    cut = np.array([g[:2] + [eos] + g[3:] for g in gold])  # 2 of 6 before the end of text: P = 1, R = 1/3
    assert intervene.mean_f1(bridge, cut, held) == pytest.approx(2 * (1 / 3) / (1 + 1 / 3))


def test_f1_lengths_beyond_the_context_are_refused_before_any_generation(tiny_gpt2, tmp_path):
    """They ended in an IndexError inside generation, after record and attribute had run."""
    from pipeline.data import DataError

    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    n_ctx = bridge.cfg.n_ctx
    (tmp_path / "h.txt").write_text("the river runs past the old mill and into the lake\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"prompt": "the river runs", "gold": "the river runs past"}) + "\n")
    for cfg, samples, message in [
            (InterveneConfig(f1_tokens=n_ctx - 1), None, f"f1_tokens = {n_ctx - 1} leaves no room"),
            (InterveneConfig(f1_tokens=10, f1_prompt_tokens=n_ctx - 9), tmp_path / "s.jsonl",
             rf"f1_prompt_tokens \+ f1_tokens = {n_ctx + 1} exceed")]:
        with pytest.raises(DataError, match=message) as e:
            intervene.load_heldout(bridge, tmp_path / "h.txt", cfg, 2, samples)
        assert "\n" not in str(e.value)
    held = intervene.load_heldout(bridge, tmp_path / "h.txt", InterveneConfig(f1_tokens=n_ctx - 2), 2)
    assert len(held.prefixes[0]) == 2  # BOS and the passage's last prefix token: the longest f1_tokens there is room for
    intervene.load_heldout(bridge, tmp_path / "h.txt", InterveneConfig(f1_tokens=10, f1_prompt_tokens=n_ctx - 10), 2,
                           tmp_path / "s.jsonl")


def test_f1_of_samples_counts_the_prompt_and_leaves_padding_out(tiny_gpt2, tmp_path):
    """Planted continuations under [data] f1_samples: a gold that is the prompt and then the continuation
    scores 1; after an end of text nothing counts (the reference's generate pads there, and GPT-2's padding
    is its end of text, left out of both bags)."""
    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    eos = bridge.tokenizer.eos_token_id
    prompt, cont = torch.tensor([11, 12, 13]), [20, 21, 22, 23]
    held = intervene.Heldout([], 1, [prompt], [[11, 12, 13, 20, 21, 22, 23]], counts_prefix=True)
    assert intervene.mean_f1(bridge, np.array([cont]), held) == 1.0
    # 3 prompt + 2 continuation tokens of 7 gold: P = 1, R = 5/7
    assert intervene.mean_f1(bridge, np.array([[20, 21, eos, 22]]), held) == pytest.approx(2 * (5 / 7) / (1 + 5 / 7))
    # the same continuation without counting the prompt, as the held-out passages are scored
    assert intervene.mean_f1(bridge, np.array([cont]), intervene.Heldout([], 1, [prompt], [cont])) == 1.0


def test_f1_samples_are_scored_as_the_reference_code_scores_them(tiny_gpt2, tmp_path):
    """[data] f1_samples through load_heldout and quality equal the reference code's tokenize, greedy generate
    and run_f1 recomputed with transformers: a GPT-2 tokenizer (no BOS) padding on the left with its end of
    text, prompts cut to f1_prompt_tokens, gold to that plus f1_tokens and padded on the right, padding left
    out of both bags. Only the first n_heldout samples count."""
    samples = [("the river runs past the old mill and into the lake", "the river runs past the mill , into the lake"),
               ("we cooked", "we cooked rice with beans for the whole family"),
               ("a small boat drifted past the harbour", "a small boat drifted past the harbour wall and the old tree"),
               ("she carried", "she carried the old books to the library on monday"),
               ("this sample is past n_heldout", "and is not scored")]
    (tmp_path / "wiki_samples.jsonl").write_text("".join(json.dumps({"prompt": p, "gold": g}) + "\n" for p, g in samples))
    (tmp_path / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    P, F = 6, 5
    cfg = InterveneConfig(n_heldout=4, f1_tokens=F, f1_prompt_tokens=P, batch_size=3)
    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    held = intervene.load_heldout(bridge, tmp_path / "heldout.txt", cfg, 3, tmp_path / "wiki_samples.jsonl")
    w_hat = np.ones(bridge.cfg.d_model, np.float32) / math.sqrt(bridge.cfg.d_model)
    ours = intervene.quality(bridge, held, [], cfg, w_hat, "base")["f1"]

    hf, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.padding_side, tok.pad_token_id = "left", tok.eos_token_id
    prompts = tok([p for p, _ in samples[:4]], max_length=P, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pred = hf.generate(**prompts, max_new_tokens=F, do_sample=False, pad_token_id=tok.pad_token_id)
    tok.padding_side = "right"
    gold = tok([g for _, g in samples[:4]], max_length=P + F, padding=True, truncation=True, return_tensors="pt").input_ids
    f1s = []
    for p_row, g_row in zip(pred.tolist(), gold.tolist()):
        _pred, _gold = [x for x in p_row if x != tok.pad_token_id], [x for x in g_row if x != tok.pad_token_id]
        same = sum((Counter(_gold) & Counter(_pred)).values())
        f1s.append(0 if same == 0 else 2 * (same / len(_pred)) * (same / len(_gold)) / (same / len(_pred) + same / len(_gold)))
    assert prompts.input_ids.shape[1] == P and tok.bos_token_id not in prompts.input_ids[:, -1].tolist()
    assert 0 < ours < 1 and ours == pytest.approx(statistics.mean(f1s), abs=1e-12)


# WikiText-2 as the hub gives it: blank entries empty, headings and text lines ending in a newline
WIKI = ["", " = Valley Notes = \n", "", " The weather in the valley was mild for most of the spring . \n", "",
        " = = Boats = = \n", "", " A small boat drifted past the harbour wall , and they planted beans . \n",
        " She carried the old books to the library on Monday . \n"]


def test_stream_perplexity_follows_the_reference_code(tiny_gpt2, tmp_path):
    """[intervene] perplexity = "stream" on a WikiText-shaped file written as data.from_hub writes one:
    equal to the reference code's run_perplexity recomputed with transformers ("\n\n".join of the
    entries, one tokenization, consecutive windows, every token but a window's first predicted)."""
    (tmp_path / "wiki.txt").write_text("".join(e.removesuffix("\n") + "\n" for e in WIKI))
    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    cfg = InterveneConfig(n_heldout=2, f1_tokens=3, perplexity="stream", perplexity_window=16)
    held = intervene.load_heldout(bridge, tmp_path / "wiki.txt", cfg, batch_size=2)
    ours = intervene.perplexity(bridge, held.rows, held.batch_size, [])

    hf, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval(), AutoTokenizer.from_pretrained(tiny_gpt2)
    ids = tok("\n\n".join(WIKI), return_tensors="pt").input_ids[0]
    nll, n = 0.0, 0
    for start in range(0, len(ids), 16):
        window = ids[start:start + 16]
        with torch.no_grad():
            logits = hf(window[None]).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
        n += len(window) - 1
    assert len(held.rows) > 2 and len(held.rows[-1]) < 16  # several windows, the last one shorter
    assert torch.equal(torch.cat(held.rows), ids[:sum(len(r) for r in held.rows)])
    assert ours == pytest.approx(math.exp(nll / n), rel=1e-4)
    # headings count here, unlike in the passages protocol, which also keeps F1's passages
    assert "Valley Notes" in tok.decode(held.rows[0]) and len(held.prefixes) == 2


def test_stream_perplexity_on_a_subset_of_windows(tiny_gpt2, tmp_path):
    """[intervene] perplexity_windows = 3 scores three of the windows, the first, the last and the one
    halfway, and their perplexity is the reference loop's over exactly those windows."""
    (tmp_path / "wiki.txt").write_text("".join(e.removesuffix("\n") + "\n" for e in WIKI))
    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    every = intervene.load_heldout(bridge, tmp_path / "wiki.txt", InterveneConfig(perplexity="stream", perplexity_window=8),
                                   batch_size=2).rows
    cfg = InterveneConfig(n_heldout=2, f1_tokens=3, perplexity="stream", perplexity_window=8, perplexity_windows=3)
    held = intervene.load_heldout(bridge, tmp_path / "wiki.txt", cfg, batch_size=2)
    assert len(every) >= 7 and len(every) % 2 == 1  # so that "halfway" is one window
    assert [r.tolist() for r in held.rows] == [every[i].tolist() for i in (0, len(every) // 2, len(every) - 1)]

    hf = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    nll, n = 0.0, 0
    for window in held.rows:
        with torch.no_grad():
            logits = hf(window[None]).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
        n += len(window) - 1
    assert intervene.perplexity(bridge, held.rows, held.batch_size, []) == pytest.approx(math.exp(nll / n), rel=1e-4)
    # more windows asked than the text has: all of them
    cfg = InterveneConfig(perplexity="stream", perplexity_window=8, perplexity_windows=len(every) + 5)
    assert len(intervene.load_heldout(bridge, tmp_path / "wiki.txt", cfg, batch_size=2).rows) == len(every)


HELDOUT = ["The weather in the valley was mild for most of the spring .", "She carried the old books to the library on Monday",
           "A small boat drifted past the harbour wall", "They planted three rows of beans behind the house ."]
PROMPTS = ["The soup was", "After lunch, my neighbor said that", "Could you fix the", "We will"]


def hf_perplexity(path, texts: list[str]) -> float:
    """Each passage alone, unpadded, through plain transformers: exp(total NLL / tokens after BOS)."""
    m = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(t)["input_ids"]])
        with torch.no_grad():
            loss = m(ids, labels=ids).loss  # mean over the len - 1 predicted tokens
        nll += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_perplexity_batches_keep_to_the_logits_budget_and_the_value(tiny_gpt2, monkeypatch):
    """Batches cut by the logits they would hold, and log-probabilities taken a few positions at a time, give
    the perplexity of plain transformers on each passage alone; F1's continuations, batched the same way, stay."""
    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    rows = [bridge.to_tokens(t, move_to_device=False)[0] for t in HELDOUT]
    V, widest = bridge.cfg.d_vocab, max(len(r) for r in rows)
    held, cfg = intervene.heldout_set(bridge, HELDOUT, f1_tokens=4, batch_size=3), InterveneConfig(f1_tokens=4, batch_size=4)
    generate, sizes = intervene.generate, []
    monkeypatch.setattr(intervene, "generate", lambda bridge, rows, *a: sizes.append(len(rows)) or generate(bridge, rows, *a))
    whole = intervene.quality(bridge, held, [], cfg, np.ones(bridge.cfg.d_model), "f1")["f1"]
    monkeypatch.setattr(intervene, "LOGITS_PER_BATCH", 2 * widest * V)
    monkeypatch.setattr(intervene, "POSITIONS_PER_CHUNK", 3)
    batches = intervene.logit_batches(rows, 3, V)
    assert [r for b in batches for r in b] == rows and [len(b) for b in batches] == [2, 2]
    assert [len(b) for b in intervene.logit_batches(rows, 1, V)] == [1, 1, 1, 1]
    assert [len(b) for b in intervene.logit_batches(rows, 4, widest * V - 1)] == [1, 1, 1, 1]  # a row over budget: alone
    assert intervene.perplexity(bridge, rows, 3, []) == pytest.approx(hf_perplexity(tiny_gpt2, HELDOUT), rel=1e-4)
    monkeypatch.setattr(intervene, "LOGITS_PER_BATCH", 2 * max(len(p) for p in held.prefixes) * V)
    assert intervene.quality(bridge, held, [], cfg, np.ones(bridge.cfg.d_model), "f1")["f1"] == whole
    assert sizes == [4, 2, 2]  # F1's prefixes in one batch, then two a batch within the budget


def test_a_forward_holds_one_layers_attention_pattern_at_a_time(tmp_path):
    """The bridge's GPT-2 attention kept each layer's pattern after its forward (models._bridge_keeps_no_pattern):
    on gpt2-medium, 12 GiB for a perplexity batch of 8 windows of 1,024 tokens. As each block ends, only its own
    (batch, heads, pos, pos) pattern may be alive, and none after the forward."""
    import gc

    bridge = models.load_bridge(str(save_tiny_gpt2(tmp_path / "m", n_layer=4)), "cpu")
    B, H, L = 3, bridge.cfg.n_heads, 29  # a length no other tensor has

    def patterns() -> int:  # alive: still reachable after a collection (a pattern kept as an attribute is)
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and tuple(o.shape) == (B, H, L, L))

    alive = []
    handles = [block.register_forward_hook(lambda *_: alive.append(patterns())) for block in bridge.blocks]
    try:
        intervene.perplexity(bridge, [torch.randint(1, 300, (L,)) for _ in range(B)], B, [])
    finally:
        for h in handles:
            h.remove()
    assert len(alive) == 4 and max(alive) <= 1 and patterns() == 0


class CharScorer:
    """Stands in for the scorer, which gives every garbled tiny-model text the same score: a fixed
    function of the characters, so different continuations get different toxicities."""

    name, version = "chars", "0"

    def __init__(self, batch_size: int):
        pass

    def score(self, texts: list[str]) -> list[float]:
        return [sum(map(ord, t)) % 997 / 996 for t in texts]


def test_run_end_to_end_on_planted_pair(tmp_path, monkeypatch):
    monkeypatch.setitem(scoring.BACKENDS, "chars", CharScorer)
    monkeypatch.setattr(config, "SCORER_BACKENDS", (*config.SCORER_BACKENDS, "chars"))
    scorer = ScorerConfig(backend="chars")
    base = save_planted_pair(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": {"text": t}, "challenging": True}) + "\n" for t in PROMPTS))
    (tmp_path / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")
    data = DataConfig(prompts=str(tmp_path / "prompts.jsonl"), heldout=str(tmp_path / "heldout.txt"))
    rec_cfg = RecordConfig(new_tokens=6, batch_size=4)
    dirs = {name: tmp_path / name for name in ("record", "attribute", "out", "score")}
    for d in dirs.values():
        d.mkdir()
    common = dict(device="cpu", model=ModelConfig(path=str(base)), world_dir=None, probe_dir=tmp_path / "probe", dpo_dir=tmp_path / "dpo")
    record.run(dirs["record"], data=data, record=rec_cfg, **common)
    attribute.run(dirs["attribute"], attribute=AttributeConfig(n_bootstrap=20), record_dir=dirs["record"], **common)
    cfg = InterveneConfig(ablate_top=[3], ablate_top_positive=[3, 100_000], patch_groups=["TP- AP+"], patch_top=[6, 6],
                          n_heldout=4, f1_tokens=5, batch_size=3)
    batches = []  # (rows, batch size) of every generation run makes
    generate = intervene.generate
    monkeypatch.setattr(intervene, "generate", lambda bridge, rows, *a: batches.append((len(rows), a[1])) or generate(bridge, rows, *a))
    summary = intervene.run(dirs["out"], data=data, record=rec_cfg, intervene=cfg, record_dir=dirs["record"],
                            attribute_dir=dirs["attribute"], **common)
    monkeypatch.setattr(intervene, "generate", generate)
    score.run(dirs["score"], device="cpu", scorer=scorer, record_dir=dirs["record"], intervene_dir=dirs["out"], detox_dir=None)
    t = intervene.tables(dirs["out"]) | score.tables(dirs["score"])

    n_neurons = pl.read_parquet(dirs["attribute"] / "neurons.parquet").height
    n_positive = pl.read_parquet(dirs["attribute"] / "neurons.parquet").filter(pl.col("act") > 0).height
    ids = ["ablate_top_3", "ablate_top_positive_3", f"ablate_top_positive_{n_positive}", "patch_TP-+AP+", "patch_top_6"]
    iv = t["interventions"]
    assert iv.columns == ["intervention_id", "kind", "params", "n_neurons", "toxicity", "toxic_share", "perplexity", "f1", "recovered"]
    assert iv["intervention_id"].to_list() == ["base", "dpo"] + ids and summary["n_interventions"] == len(ids)
    assert 0 < n_positive < n_neurons
    by_id = {r["intervention_id"]: r for r in iv.iter_rows(named=True)}
    # the stand-in scorer's drop on 4 prompts may be noise, where recovered is empty (test_score plants both cases)
    d = [b - a for b, a in zip(*(t["generations"].filter(pl.col("variant") == v)["toxicity"] for v in ("base", "dpo")))]
    if abs(statistics.mean(d)) > 2 * statistics.stdev(d) / math.sqrt(len(d)):
        assert by_id["base"]["recovered"] == 0.0 and by_id["dpo"]["recovered"] == 1.0
    else:
        assert iv["recovered"].null_count() == iv.height
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 and 0 <= r["f1"] <= 1 for r in by_id.values())
    assert by_id["ablate_top_3"]["n_neurons"] == 3 and json.loads(by_id["patch_top_6"]["params"]) == {"n": 6, "n_asked": 6}

    gens, layers = t["generations"], t["layers"]
    assert gens.columns == ["variant", "prompt_id", "prompt", "continuation", "toxicity", "scorer"]
    assert gens.group_by("variant", maintain_order=True).len().rows() == [(i, len(PROMPTS)) for i in ["base", "dpo"] + ids]
    assert layers.columns == ["variant", "layer", "mlp_proj"] and layers.height == 2 * len(ids)
    assert np.isfinite(layers["mlp_proj"].to_numpy()).all()
    for i in ["base", "dpo"] + ids:  # toxicity column agrees with the row's mean
        assert gens.filter(pl.col("variant") == i)["toxicity"].mean() == pytest.approx(by_id[i]["toxicity"])

    # Perplexity of the unmodified models: padded batches here, each passage alone in plain transformers.
    assert by_id["base"]["perplexity"] == pytest.approx(hf_perplexity(base, HELDOUT), rel=1e-4)
    assert by_id["dpo"]["perplexity"] == pytest.approx(hf_perplexity(tmp_path / "dpo" / "model", HELDOUT), rel=1e-4)
    # F1 recomputed with transformers: each passage split at its middle word, the greedy continuation of
    # the first half, token ids against the gold second half's first f1_tokens (the random model may share
    # none; test_f1_compares_token_ids_... plants continuations that do).
    hf, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    scores = []
    for passage in HELDOUT:
        words = passage.split()
        prefix = torch.tensor([[tok.bos_token_id] + tok(" ".join(words[:len(words) // 2]))["input_ids"]])
        with torch.no_grad():
            out = hf.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=cfg.f1_tokens,
                              do_sample=False, pad_token_id=tok.eos_token_id)
        pred = [t for t in out[0, prefix.shape[1]:].tolist() if t != tok.eos_token_id]  # generate stops at one
        gold = tok(" " + " ".join(words[len(words) // 2:]))["input_ids"][:cfg.f1_tokens]
        same = sum((Counter(pred) & Counter(gold)).values())
        scores.append(2 * same / (len(pred) + len(gold)))  # 2PR / (P + R) with P = same/|pred|, R = same/|gold|
    assert by_id["base"]["f1"] == pytest.approx(np.mean(scores))

    # The top six by delta are the planted neurons, the only weights DPO changed: patched to their
    # DPO means they bring the base model's perplexity to the DPO model's.
    ppl = {i: by_id[i]["perplexity"] for i in ("base", "dpo", "patch_top_6")}
    assert abs(ppl["patch_top_6"] - ppl["dpo"]) < 0.1 * abs(ppl["base"] - ppl["dpo"])

    # Ablated continuations equal transformers' greedy generation with those W_out rows zeroed.
    top3 = pl.read_parquet(dirs["attribute"] / "neurons.parquet").sort("cos", descending=True).head(3)
    hf = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        for l, i in zip(top3["layer"], top3["neuron"]):
            hf.transformer.h[l].mlp.c_proj.weight[i] = 0.0
        for p, got in zip(PROMPTS, gens.filter(pl.col("variant") == "ablate_top_3")["continuation"]):
            ids_p = torch.tensor([[tok.bos_token_id] + tok(p)["input_ids"]])
            out = hf.generate(ids_p, attention_mask=torch.ones_like(ids_p), max_new_tokens=rec_cfg.new_tokens, do_sample=False,
                              pad_token_id=tok.eos_token_id)
            assert tok.decode(out[0, ids_p.shape[1]:]).replace(tok.eos_token, " ") == got

    # The challenge prompts go in record's batches, the held-out prefixes in intervene's.
    assert set(batches) == {(len(PROMPTS), rec_cfg.batch_size)} | {(n, n) for n in (cfg.batch_size, len(HELDOUT) - cfg.batch_size)}
    # With no hooks, in record's batches, the shared generation path reproduces stage record's base
    # tokens and its mlp_proj bit for bit (in other batches its sums differ in their last bits).
    bridge = models.load_bridge(str(base), "cpu")
    w = np.load(tmp_path / "probe" / "w.npy")
    rows = record.prompt_tokens(bridge, PROMPTS, rec_cfg.new_tokens)
    tokens, proj = intervene.generate(bridge, rows, rec_cfg.new_tokens, rec_cfg.batch_size, [], w / np.linalg.norm(w), "check")
    assert (tokens == np.load(dirs["record"] / "base_tokens.npy")).all()
    assert (proj == np.load(dirs["record"] / "base_mlp_proj.npy")).all()

    # Both stages that measure rows beside record's hand [data] f1_samples to their held-out set and tokenize the
    # challenge prompts as [model] bos and [record] max_prompt_tokens say (test_f1_samples_... and test_record's
    # test_prompts_tokenized_as_the_reference_code_... check what each then does).
    class Handed(Exception):
        pass

    def load_heldout(bridge, path, cfg, batch_size, f1_samples=None):
        raise Handed(f1_samples)

    def prompt_tokens(*args):
        raise Handed([r.tolist() for r in record.prompt_tokens(*args)])

    (tmp_path / "wiki_samples.jsonl").write_text(json.dumps({"prompt": "We will", "gold": "We will see"}) + "\n")
    samples = replace(data, f1_samples=str(tmp_path / "wiki_samples.jsonl"))
    cut = replace(rec_cfg, max_prompt_tokens=2)
    for stage, inputs in ((intervene, dict(dpo_dir=tmp_path / "dpo", attribute_dir=dirs["attribute"])),
                          (detox, dict(detox=DetoxConfig(), experts_dir=tmp_path / "experts"))):
        for spied, spy, settings, handed in (("load_heldout", load_heldout,
                                              dict(data=samples, record=rec_cfg, model=ModelConfig(path=str(base))),
                                              tmp_path / "wiki_samples.jsonl"),
                                             ("prompt_tokens", prompt_tokens,
                                              dict(data=data, record=cut, model=ModelConfig(path=str(base), bos="tokenizer")),
                                              [tok(p)["input_ids"][:2] for p in PROMPTS])):
            with monkeypatch.context() as m:
                m.setattr(stage, spied, spy)
                with pytest.raises(Handed) as e:
                    stage.run(dirs["out"], device="cpu", world_dir=None, probe_dir=tmp_path / "probe", intervene=cfg,
                              record_dir=dirs["record"], **settings, **inputs)
            assert e.value.args == (handed,), (stage, spied)

    def decode(tok, tokens, eos_ends_text=False):
        raise Handed(eos_ends_text)

    with monkeypatch.context() as m:  # the interventions' texts end as record's do
        m.setattr(intervene, "decode", decode)
        with pytest.raises(Handed) as e:
            intervene.run(dirs["out"], data=data, record=replace(rec_cfg, eos_ends_text=True), intervene=cfg,
                          record_dir=dirs["record"], attribute_dir=dirs["attribute"], **common)
    assert e.value.args == (True,)
