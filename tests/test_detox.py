"""Stages experts and detox: the product of experts and MaRCo-style revision, on a constructed case
whose answer is known, against direct computations, and end to end on the tiny world."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from scipy.spatial.distance import jensenshannon

import store
from pipeline import config, corpus, data, detox, models, record, runner
from tests.conftest import TINY_WORLD, tiny_config

V, TOXIC, TRIGGER = 10, 5, 4


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend on the current token alone: table[token]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (V, V)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, cache=None, use_cache=False):
        # (B, L or logits_to_keep, V); the newest token alone decides, so a cache has nothing to keep
        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:], cache=None)


def constructed_poe(alpha: float) -> detox.ProductOfExperts:
    """Base: after token t, t + 1 is likely (so from 0 it counts 1, 2, 3, 4, 5, ...). The anti-expert
    strongly prefers TOXIC after TRIGGER, the expert avoids it there; elsewhere all three agree."""
    base = torch.zeros(V, V)
    base[torch.arange(V), (torch.arange(V) + 1) % V] = 2.0
    anti, expert = base.clone(), base.clone()
    anti[TRIGGER, TOXIC], expert[TRIGGER, TOXIC] = 8.0, -8.0
    return detox.ProductOfExperts(Bigram(base), Bigram(expert), Bigram(anti), tokenizer=SimpleNamespace(pad_token_id=0),
                                  cfg=SimpleNamespace(device="cpu", n_ctx=64), alpha=alpha)


def test_poe_avoids_the_token_the_anti_expert_wants_and_jsd_ranks_it_first():
    prompts = [torch.tensor([0]), torch.tensor([2, 1])]
    base = detox.greedy(constructed_poe(0.0), prompts, 8, batch_size=2)
    assert (base == TOXIC).any(1).all()  # the base model walks into the toxic token
    assert not (detox.greedy(constructed_poe(1.0), prompts, 8, batch_size=2) == TOXIC).any()

    jsd = detox.token_divergence(constructed_poe(1.0), prompts, base, batch_size=2)
    assert (jsd.argmax(1) == (base == TOXIC).argmax(1)).all()
    jsd, first, revised = detox.revise(constructed_poe(1.0), prompts, base, threshold=0.5, batch_size=2)
    assert (first == (base == TOXIC).argmax(1)).all()
    for row, f, new in zip(base, first, revised):
        assert (new[:f] == row[:f]).all() and TOXIC not in new

    # From 6 the base counts 7, 8, 9, 0, 1, 2, 3, 4: the trigger comes last, so nothing is masked and the
    # continuation stays as it is (every continuation of the tiny world gets revised, so only this checks it)
    clean = detox.greedy(constructed_poe(0.0), [torch.tensor([6])], 8, batch_size=1)
    assert TOXIC not in clean
    _, first, revised = detox.revise(constructed_poe(1.0), [*prompts, torch.tensor([6])], np.concatenate([base, clean]),
                                     threshold=0.5, batch_size=2)
    assert first[-1] == 8 and (revised[-1] == clean[0]).all() and (first[:2] < 8).all()


def test_poe_is_the_normalised_product_of_the_three_distributions():
    g = torch.Generator().manual_seed(0)
    b, e, a = (torch.randn(V, V, generator=g) for _ in range(3))
    ids, mask = torch.tensor([[0, 3, 7, 2], [0, 0, 5, 1]]), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    alpha = 0.7
    poe = detox.ProductOfExperts(Bigram(b), Bigram(e), Bigram(a), tokenizer=None, cfg=SimpleNamespace(device="cpu"),
                                 alpha=alpha)
    p = torch.softmax(b[ids], -1) * (torch.softmax(e[ids], -1) / torch.softmax(a[ids], -1)) ** alpha
    assert torch.allclose(poe(ids, mask).log_softmax(-1), (p / p.sum(-1, keepdim=True)).log(), atol=1e-5)
    assert torch.equal(poe(ids, mask, logits_to_keep=1), poe(ids, mask)[:, -1:])
    assert torch.allclose(replace(poe, alpha=0.0)(ids, mask), b[ids])


def test_jsd_matches_a_direct_computation_and_its_properties():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(5, V, generator=g) * 3, torch.randn(5, V, generator=g) * 3
    ours = detox.jsd_bits(p, q).numpy()
    direct = [jensenshannon(np.exp(x), np.exp(y), base=2) ** 2
              for x, y in zip(p.log_softmax(-1).double().numpy(), q.log_softmax(-1).double().numpy())]
    np.testing.assert_allclose(ours, direct, atol=1e-5)
    assert np.allclose(ours, detox.jsd_bits(q, p).numpy()) and ((ours > 0) & (ours < 1)).all()
    assert detox.jsd_bits(p, p).abs().max() < 1e-5
    disjoint = torch.full((2, V), -1e4)
    disjoint[0, 0], disjoint[1, 1] = 0.0, 0.0
    assert abs(float(detox.jsd_bits(disjoint[0], disjoint[1])) - 1.0) < 1e-5


@pytest.mark.parametrize("text, piece", [
    ("[world]\n[detox]\n", "add an [experts] section"),
    ("[world]\n[experts]\n[detox]\nalpha = [-1.0]\n", "[detox] alpha"),
    ("[world]\n[experts]\n[detox]\nthreshold = 2.0\n", "[detox] threshold"),
    ("[world]\n[experts]\nsteps = 0\n", "[experts] steps must be at least 1"),
])
def test_bad_detox_config_is_refused(tmp_path, text, piece):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(tmp_path / "c.toml")
    assert piece in str(e.value) and "\n" not in str(e.value)


def test_experts_and_detox_run_only_with_their_sections(tmp_path):
    stages = lambda cfg: [s.name for s in runner.active_stages(cfg)]
    with_them = tiny_config(tmp_path)
    assert stages(with_them)[-3:] == ["experts", "detox", "score"]
    raw = with_them.to_dict()
    raw.pop("experts"), raw.pop("detox")
    assert not {"experts", "detox"} & set(stages(config.from_dict(raw)))


def _dirs(cfg):
    keys = runner.cache_keys(cfg)
    return {s: runner.stage_dir(cfg, s, k) for s, k in keys.items()}


def _nll(path, texts: list[str]) -> float:
    model, tok = models.load_hf(str(path), "cpu")
    with torch.no_grad():
        losses = [float(model(ids, labels=ids).loss) for t in texts
                  for ids in [torch.tensor([[tok.bos_token_id] + tok(t)["input_ids"]])]]
    return float(np.mean(losses))


def test_experts_learn_their_side_of_the_probe_data(tiny_run):
    cfg, _ = tiny_run
    dirs = _dirs(cfg)
    texts, labels = data.load_probe(dirs["world"] / "probe.csv", 60, seed=1)
    toxic = [t for t, y in zip(texts, labels) if y]
    clean = [t for t, y in zip(texts, labels) if not y]
    expert, anti = dirs["experts"] / "expert", dirs["experts"] / "anti"
    # each model is better than the other on the side it was trained on
    assert _nll(anti, toxic) < _nll(expert, toxic)
    assert _nll(expert, clean) < _nll(anti, clean)


def check_cached_greedy(poe: detox.ProductOfExperts, rows: list[torch.Tensor], T: int) -> dict:
    """greedy feeds each model only its newest token after the first step, its KV cache holding the rest:
    its tokens must be those of one full forward of the PoE over the left-padded sequence at every step,
    and the cached logits the full ones. Returns the caches the checked steps kept."""
    got = detox.greedy(poe, rows, T, batch_size=len(rows))
    ids, mask = record.left_pad(rows, poe.tokenizer.pad_token_id)
    caches, fed = {}, ids
    with torch.no_grad():
        for t in range(T):
            full = poe(ids, mask)[:, -1]  # (B, vocab)
            cached = poe(fed, mask, logits_to_keep=1, caches=caches)[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
            fed = full.argmax(-1)[:, None]
            assert (fed[:, 0].numpy() == got[:, t]).all(), t
            ids, mask = torch.cat([ids, fed], 1), torch.cat([mask, torch.ones_like(fed)], 1)
    return caches


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_cached_greedy_steps_equal_a_full_forward_each_step(tiny_run, alpha):
    """On the tiny world's base model and experts, prompts of different lengths (left padding)."""
    cfg, _ = tiny_run
    dirs = _dirs(cfg)
    base, tok = models.load_hf(str(dirs["world"] / "model"), "cpu")
    expert, anti = (models.load_hf(str(dirs["experts"] / name), "cpu")[0] for name in ("expert", "anti"))
    poe = detox.ProductOfExperts(base, expert, anti, tokenizer=tok, cfg=SimpleNamespace(device="cpu"), alpha=alpha)
    rows = [torch.tensor(tok(t)["input_ids"]) for t in ("you are such a", "the weather today", "my neighbour said that he")]
    caches = check_cached_greedy(poe, rows, T=6)
    assert len(caches) == (1 if alpha == 0 else 3)


@pytest.fixture(scope="module")
def tiny_store(tiny_run):
    cfg, run_id = tiny_run
    con = store.connect(cfg.run.store)
    q = lambda sql: con.sql(sql, params=[run_id]).pl()
    yield cfg, run_id, q
    con.close()


def test_detox_rows_are_scored_like_the_interventions(tiny_store):
    cfg, _, q = tiny_store
    iv = q("SELECT * FROM interventions WHERE run_id = ?")
    ends = dict(zip(iv["intervention_id"], iv["toxicity"]))
    ours = iv.filter(pl.col("kind").is_in(["poe", "marco"]))
    assert sorted(ours["intervention_id"]) == sorted([f"poe_{a:g}" for a in cfg.detox.alpha] + ["marco"])
    for r in ours.iter_rows(named=True):
        assert r["perplexity"] > 1 and 0 <= r["f1"] <= 1 and 0 <= r["toxic_share"] <= 1 and r["n_neurons"] == 0
        assert r["recovered"] == pytest.approx((ends["base"] - r["toxicity"]) / (ends["base"] - ends["dpo"]))
        gens = q(f"SELECT toxicity FROM generations WHERE run_id = ? AND variant = '{r['intervention_id']}'")
        assert gens.height == TINY_WORLD["n_prompts"] and gens["toxicity"].mean() == pytest.approx(r["toxicity"])
        assert q(f"SELECT * FROM layers WHERE run_id = ? AND variant = '{r['intervention_id']}'").height == cfg.world.n_layer
    assert json.loads(ours.filter(pl.col("kind") == "marco")["params"][0])["threshold"] == cfg.detox.threshold
    # the science on the tiny world: DPO, the strongest PoE and MaRCo each cut the base model's toxicity (0.25 to 0.01-0.02 here)
    assert max(ends["dpo"], ends[config.DetoxConfig.row_id(max(cfg.detox.alpha))], ends["marco"]) < ends["base"] / 2, ends


def test_alpha_zero_is_the_base_model(tiny_store):
    """PoE at alpha 0 must reproduce record's base generations and mlp_proj and intervene's base perplexity:
    the same tokens, positions and projection, read by another code path."""
    _, _, q = tiny_store
    gens = q("SELECT variant, prompt_id, continuation FROM generations WHERE run_id = ? AND variant IN ('base', 'poe_0')")
    wide = gens.pivot(on="variant", index="prompt_id", values="continuation")
    assert (wide["base"] == wide["poe_0"]).all()
    layers = q("SELECT variant, layer, mlp_proj FROM layers WHERE run_id = ? AND variant IN ('base', 'poe_0')")
    wide = layers.pivot(on="variant", index="layer", values="mlp_proj")
    np.testing.assert_allclose(wide["poe_0"], wide["base"], rtol=1e-4, atol=1e-5)
    ppl = dict(q("SELECT intervention_id, perplexity FROM interventions WHERE run_id = ?").iter_rows())
    assert ppl["poe_0"] == pytest.approx(ppl["base"], rel=1e-4)


def test_revisions_keep_the_text_before_the_first_masked_token(tiny_store):
    cfg, _, q = tiny_store
    rev = q("SELECT * FROM revisions WHERE run_id = ? ORDER BY prompt_id, position")
    T = cfg.record.new_tokens
    assert rev.height == TINY_WORLD["n_prompts"] * T
    assert (rev["masked"] == (rev["jsd"] > cfg.detox.threshold)).all()
    first = rev.group_by("prompt_id").agg(pl.col("position").filter(pl.col("masked")).min().fill_null(T).alias("first"))
    rev = rev.join(first, on="prompt_id")
    assert (rev["regenerated"] == (rev["position"] >= rev["first"])).all()
    texts = q("SELECT prompt_id, variant, continuation FROM generations WHERE run_id = ? AND variant IN ('base', 'marco')") \
        .pivot(on="variant", index="prompt_id", values="continuation")
    per_prompt = rev.group_by("prompt_id").agg(pl.col("original").first(), pl.col("revised").first(),
                                               pl.col("token").str.join("").alias("joined"), pl.col("first").first())
    check = per_prompt.join(texts, on="prompt_id")
    assert (check["original"] == check["base"]).all() and (check["revised"] == check["marco"]).all()
    assert (check["joined"] == check["original"]).all()
    kept = rev.filter(pl.col("position") < pl.col("first")).group_by("prompt_id").agg(pl.col("token").str.join("").alias("kept"))
    check = check.join(kept, on="prompt_id", how="left").with_columns(pl.col("kept").fill_null(""))
    assert all(r.startswith(k) for r, k in zip(check["revised"], check["kept"]))
    assert ((check["first"] > 0) & (check["first"] < T)).any()  # some continuation keeps a prefix and revises the rest


def test_insults_are_where_expert_and_anti_expert_disagree(tiny_store):
    """The planted effect of the world: the experts were trained on either side of the insult, so
    the base continuations' insult tokens carry more divergence than their other tokens."""
    cfg, _, q = tiny_store
    lexicon = {w.lower() for w in corpus.toxic_lexicon(cfg.world.n_toxic_words, cfg.world.seed)}
    rev = q("SELECT token, jsd FROM revisions WHERE run_id = ?").with_columns(
        insult=pl.col("token").str.strip_chars().str.to_lowercase().is_in(list(lexicon)))
    insults, others = rev.filter("insult")["jsd"], rev.filter(~pl.col("insult"))["jsd"]
    assert insults.len() > 0 and insults.mean() > 2 * others.mean()
