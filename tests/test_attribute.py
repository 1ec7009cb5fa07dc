"""Attribution per method.md: the group table, planted effects recovered, and proj cross-checked
against the checkpoint's own weights."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from pipeline import attribute
from pipeline.config import AttributeConfig, ModelConfig

# method.md's table, written out: (cos sign, act sign, dact sign) -> group
EXPECTED = {
    (+1, +1, +1): "TP-", (+1, -1, +1): "TN+", (-1, +1, -1): "AP+", (-1, -1, -1): "AN-",
    (+1, +1, -1): "TP+", (+1, -1, -1): "TN-", (-1, +1, +1): "AP-", (-1, -1, +1): "AN+",
}


def test_group_codes_follow_method_table():
    keys = list(EXPECTED)
    cos = np.array([k[0] * 0.3 for k in keys])
    act = np.array([k[1] * 0.5 for k in keys])
    dact = np.array([k[2] * 0.1 for k in keys])
    assert attribute.group_codes(cos, act, dact).tolist() == [EXPECTED[k] for k in keys]
    assert attribute.group_codes(np.array([0.0, 0.2]), np.array([1.0, 1.0]), np.array([0.1, 0.0])).tolist() == ["unchanged"] * 2
    assert set(attribute.REDUCING) == {"TP-", "TN+", "AP+", "AN-"}


def test_bootstrap_interval_collapses_without_prompt_noise_and_widens_with_it():
    flat = np.tile(np.array([3.0, 1.0, 0, 0, -1.0, 0, 0, 0]), (50, 1))
    lo, hi = attribute.bootstrap_shares(flat, 200, 0)
    assert np.allclose(lo, hi) and lo[0] == pytest.approx(0.75)
    noisy = flat + np.random.default_rng(0).normal(0, 1, flat.shape)
    lo, hi = attribute.bootstrap_shares(noisy, 200, 0)
    assert (hi - lo)[0] > 0.05


def test_bootstrap_interval_covers_the_true_share_about_95_percent_of_the_time():
    """Prompts drawn around a known TP- share of 0.75: the 95% interval holds each sample's own share
    and, over 200 samples, the true one about 95% of the time (0.94 when this was written)."""
    true = np.array([3.0, 1.0, 0, 0, -1.0, 0, 0, 0])
    covered = 0
    for seed in range(200):
        noisy = true + np.random.default_rng(seed).normal(0, 1, (50, 8))
        lo, hi = attribute.bootstrap_shares(noisy, 200, seed)
        mean = noisy.mean(0)
        assert lo[0] <= mean[0] / mean[:4].sum() <= hi[0]
        covered += lo[0] <= 0.75 <= hi[0]
    assert 0.92 <= covered / 200 <= 0.97  # here a 90% interval covers 0.895, a 99% one 0.98


def test_neurons_needed():
    assert attribute.neurons_needed(np.array([5.0, 3.0, 1.0, 1.0]), 0.5) == 1
    assert attribute.neurons_needed(np.array([5.0, 3.0, 1.0, 1.0]), 0.75) == 2
    assert attribute.neurons_needed(np.array([5.0, 3.0, 1.0, 1.0]), 0.99) == 4
    # R <= 0: no neurons carry a reduction that did not happen (the first one "reached" a negative target)
    assert attribute.neurons_needed(np.array([1.0, -2.0, -3.0]), 0.5) == 0
    assert attribute.neurons_needed(np.array([0.0, 0.0]), 0.5) == 0


def fake_record(tmp, act, act_dpo, n_prompts=6, seed=0):
    """A record stage's outputs whose per-prompt values average to act / act_dpo."""
    rng = np.random.default_rng(seed)
    rec = tmp / "record"
    rec.mkdir()
    for name, a in (("base", act), ("dpo", act_dpo)):
        noise = rng.normal(0, 0.01, (n_prompts,) + a.shape)
        noise -= noise.mean(0)
        np.save(rec / f"{name}_act.npy", a.astype(np.float32))
        np.save(rec / f"{name}_act_prompt.npy", (a + noise).astype(np.float32))
    return rec


def hf_value_vectors(path) -> np.ndarray:
    """W_out rows straight from the HF checkpoint (GPT-2's c_proj is a Conv1D: (d_mlp, d_model))."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)
    return np.stack([blk.mlp.c_proj.weight.detach().numpy() for blk in m.transformer.h]).astype(np.float64)


def attribute_on(tmp, base, w, act, act_dpo, n_bootstrap=10, **attribute_cfg) -> tuple:
    """attribute.run on checkpoint `base` with probe direction w and recorded means act / act_dpo; the DPO
    checkpoint must be in tmp/dpo/model already. Returns the output folder and the stage summary."""
    (tmp / "probe").mkdir()
    np.save(tmp / "probe" / "w.npy", w.astype(np.float32))
    rec = fake_record(tmp, act, act_dpo)
    out = tmp / "out"
    out.mkdir()
    summary = attribute.run(out, device="cpu", model=ModelConfig(path=str(base)),
                            attribute=AttributeConfig(n_bootstrap=n_bootstrap, **attribute_cfg), world_dir=None,
                            probe_dir=tmp / "probe", dpo_dir=tmp / "dpo", record_dir=rec)
    return out, summary


def method_groups(align: np.ndarray, act: np.ndarray, act_dpo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """delta and group code per neuron, written from method.md's table for a DPO copy with the base's
    weights (v' = v), written apart from attribute's code."""
    delta, dact = (act - act_dpo) * align, act - act_dpo
    first = np.where(align > 0, "T", "A")
    sign = np.where(act >= 0, "P", "N")
    moved = np.where((sign == "P") == (dact < 0), "+", "-")  # the activation's size grew: P went up, N went down
    codes = np.char.add(np.char.add(first, sign), moved).astype(object)
    codes[(dact == 0) | (align == 0)] = "unchanged"
    return delta, codes


def test_method_groups_reads_the_table():
    align, act = np.array([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0]), np.array([1.0, -1.0, 1.0, -1.0] * 2)
    dact = np.array([1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0])  # reducing, then increasing
    delta, codes = method_groups(align, act, act - dact)
    assert list(codes) == ["TP-", "TN+", "AP+", "AN-", "TP+", "TN-", "AP-", "AN+"]
    assert (delta[:4] > 0).all() and (delta[4:] < 0).all()


def test_planted_neurons_rank_first_with_their_groups(tiny_gpt2, tmp_path):
    V = hf_value_vectors(tiny_gpt2)  # (L, d_mlp, d_model)
    L, d_mlp, d_model = V.shape
    rng = np.random.default_rng(1)
    w = rng.normal(size=d_model)
    shutil.copytree(tiny_gpt2, tmp_path / "dpo" / "model")

    align = V @ (w / np.linalg.norm(w))  # (L, d_mlp)
    act = rng.uniform(-0.2, 0.2, (L, d_mlp)) * 0.01
    # Every neuron moves a little, in every group; the planted ones move much more.
    act_dpo = act + rng.normal(0, 0.05, (L, d_mlp))
    # Plant one neuron per reducing group, with a big change in the direction the group names.
    toxic = np.argwhere(align > 0.3 * np.abs(align).max())
    anti = np.argwhere(align < -0.3 * np.abs(align).max())
    plants = {
        "TP-": (tuple(toxic[0]), +1.0, -1.0),  # positive, goes down
        "TN+": (tuple(toxic[1]), -1.0, -1.0),  # negative, goes further negative
        "AP+": (tuple(anti[0]), +1.0, +1.0),   # positive, goes up
        "AN-": (tuple(anti[1]), -1.0, +1.0),   # negative, less negative
    }
    for (l, i), start, change in plants.values():
        act[l, i] = start
        act_dpo[l, i] = start + change * 0.8
    out, summary = attribute_on(tmp_path, tiny_gpt2, w, act, act_dpo, n_bootstrap=50)
    neurons = pl.read_parquet(out / "neurons.parquet")
    top = neurons.sort("delta_rank").head(4)
    assert {(r["layer"], r["neuron"]) for r in top.iter_rows(named=True)} == {p[0] for p in plants.values()}
    for group, ((l, i), _, _) in plants.items():
        row = neurons.filter((pl.col("layer") == l) & (pl.col("neuron") == i)).row(0, named=True)
        assert row["group_code"] == group and row["delta"] > 0

    # The background's groups and sums, from method.md's table and the checkpoint's weights (the record
    # stage stores float32).
    delta, codes = method_groups(align, act.astype(np.float32).astype(np.float64), act_dpo.astype(np.float32).astype(np.float64))
    assert set(codes.ravel()) >= {"TP-", "TN+", "AP+", "AN-", "TP+", "TN-", "AP-", "AN+"}
    assert neurons.sort("layer", "neuron")["group_code"].to_list() == list(codes.ravel())
    groups = {r["group_code"]: r for r in pl.read_parquet(out / "group_summary.parquet").iter_rows(named=True)}
    G = sum(delta[codes == g].sum() for g in ("TP-", "TN+", "AP+", "AN-"))
    for g, row in groups.items():
        assert row["n_neurons"] == (codes == g).sum(), g
        assert row["sum_delta"] == pytest.approx(delta[codes == g].sum(), rel=1e-5, abs=1e-9), g
        assert row["share_gross"] == pytest.approx(delta[codes == g].sum() / G, rel=1e-5, abs=1e-9), g
    assert summary["net_reduction"] == pytest.approx(delta.sum(), rel=1e-5)


def test_proj_and_cos_match_the_checkpoint_weights(tiny_gpt2, tmp_path):
    """Independent of the bridge: value vectors read from the HF checkpoint."""
    V = hf_value_vectors(tiny_gpt2)
    L, d_mlp, d_model = V.shape
    rng = np.random.default_rng(2)
    w = rng.normal(size=d_model)
    shutil.copytree(tiny_gpt2, tmp_path / "dpo" / "model")
    act = rng.normal(size=(L, d_mlp))
    out, _ = attribute_on(tmp_path, tiny_gpt2, w, act, act * 0.5)
    neurons = pl.read_parquet(out / "neurons.parquet")
    for l, i in [(0, 0), (L - 1, d_mlp - 1), (1, 7)]:
        row = neurons.filter((pl.col("layer") == l) & (pl.col("neuron") == i)).row(0, named=True)
        v = V[l, i]
        assert row["proj"] == pytest.approx(np.float32(act[l, i]) * v @ w / np.linalg.norm(w), rel=1e-5)
        assert row["cos"] == pytest.approx(v @ w / np.linalg.norm(v) / np.linalg.norm(w), rel=1e-6)
    tokens = pl.read_parquet(out / "neuron_tokens.parquet")
    assert tokens.group_by("layer", "neuron").len()["len"].unique().to_list() == [10]


def test_logit_lens_and_top_prompts_match_the_checkpoint_and_the_record(tiny_gpt2, tmp_path):
    """Logit lens: the tokens that each listed value vector, scaled by ln_f's weight, promotes through
    lm_head, read from the HF checkpoint and decoded by its tokenizer. Top prompts: the prompts with the
    largest recorded base activation of each listed neuron, in order, with both models' activations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = np.random.default_rng(5)
    m, tok = AutoModelForCausalLM.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_gpt2)
    with torch.no_grad():  # a trained ln_f scales each direction differently; random init leaves it at 1
        m.transformer.ln_f.weight.copy_(torch.from_numpy(rng.uniform(0.2, 3.0, m.config.n_embd)))
    base = tmp_path / "base"
    m.save_pretrained(base)
    tok.save_pretrained(base)
    shutil.copytree(base, tmp_path / "dpo" / "model")
    V = hf_value_vectors(base)
    L, d_mlp, d_model = V.shape
    w = rng.normal(size=d_model)
    act = rng.normal(size=(L, d_mlp))
    out, _ = attribute_on(tmp_path, base, w, act, act * 0.5)
    scale, W_U = m.transformer.ln_f.weight.detach().double().numpy(), m.lm_head.weight.detach().double().numpy()

    lens = pl.read_parquet(out / "neuron_tokens.parquet").sort("layer", "neuron", "rank")
    assert lens.select("layer", "neuron").n_unique() >= 50
    for (l, i), rows in lens.group_by("layer", "neuron", maintain_order=True):
        logits = W_U @ (V[l, i] * scale)  # (vocab,)
        top = np.argsort(-logits)[:10]
        assert rows["token"].to_list() == [tok.decode([int(t)]) for t in top]
        np.testing.assert_allclose(rows["logit"], logits[top], rtol=1e-4, atol=1e-6)

    a_p = np.load(tmp_path / "record" / "base_act_prompt.npy").astype(np.float64)  # (P, L, d_mlp)
    a_dpo_p = np.load(tmp_path / "record" / "dpo_act_prompt.npy").astype(np.float64)
    best = pl.read_parquet(out / "neuron_top_prompts.parquet").sort("layer", "neuron", "rank")
    assert best.select("layer", "neuron").n_unique() >= 20
    for (l, i), rows in best.group_by("layer", "neuron", maintain_order=True):
        want = np.argsort(-a_p[:, l, i], kind="stable")[:5]  # ties: the lower prompt_id first
        assert rows["prompt_id"].to_list() == want.tolist()
        np.testing.assert_allclose(rows["act"], a_p[want, l, i])
        np.testing.assert_allclose(rows["act_dpo"], a_dpo_p[want, l, i])


def test_logit_lens_asked_for_more_tokens_than_the_vocabulary_lists_them_all(tiny_gpt2, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_gpt2).vocab_size
    shutil.copytree(tiny_gpt2, tmp_path / "dpo" / "model")
    V = hf_value_vectors(tiny_gpt2)
    act = np.random.default_rng(0).normal(size=V.shape[:2])
    out, _ = attribute_on(tmp_path, tiny_gpt2, np.ones(V.shape[-1]), act, act * 0.5, n_logit_lens=2,
                          top_k_tokens=vocab + 100)
    lens = pl.read_parquet(out / "neuron_tokens.parquet")
    assert (lens.group_by("layer", "neuron").len()["len"] == vocab).all()


def test_proj_dpo_uses_the_dpo_models_own_value_vectors(tiny_gpt2, tmp_path):
    """DPO may rewrite W_out as well as the activations: a copy with one value vector shrunk to a fifth and
    the same activations moves that neuron's proj_dpo alone, by exactly act x (v - v') . w_hat."""
    import torch
    from transformers import AutoModelForCausalLM

    V = hf_value_vectors(tiny_gpt2)
    L, d_mlp, d_model = V.shape
    rng = np.random.default_rng(4)
    w = rng.normal(size=d_model)
    l, i = 1, 5
    m = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        m.transformer.h[l].mlp.c_proj.weight[i] *= 0.2
    m.save_pretrained(tmp_path / "dpo" / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_gpt2 / name, tmp_path / "dpo" / "model")
    act = rng.normal(size=(L, d_mlp))
    out, _ = attribute_on(tmp_path, tiny_gpt2, w, act, act)
    neurons = pl.read_parquet(out / "neurons.parquet")
    row = neurons.filter((pl.col("layer") == l) & (pl.col("neuron") == i)).row(0, named=True)
    a, along = np.float32(act[l, i]), V[l, i] @ w / np.linalg.norm(w)
    assert row["proj_dpo"] == pytest.approx(a * 0.2 * along, rel=1e-5)
    assert row["delta"] == pytest.approx(a * 0.8 * along, rel=1e-5)
    assert row["dact"] == 0 and row["group_code"] == "unchanged"  # method.md: the activation did not change
    others = neurons.filter((pl.col("layer") != l) | (pl.col("neuron") != i))
    assert others["delta"].abs().max() < 1e-6 * abs(row["delta"])
    shares = pl.read_parquet(out / "group_summary.parquet")["share_gross"]
    assert shares.is_nan().all()  # no neuron is in a reducing group: a share of nothing is undefined


def test_planted_dpo_copy_is_recovered_end_to_end(tmp_path):
    """A 'DPO' copy that differs only in the MLP input biases of six chosen last-layer neurons:
    three toxic-aligned neurons are switched off (TP-), three anti-toxic ones switched further on
    (AP+). Record (real generation through the bridge) and attribute must put exactly those six at
    the top of delta, in those groups, with the group sums adding up to the net reduction."""
    from pipeline import record
    from pipeline.config import DataConfig, RecordConfig
    from tests.conftest import PLANTED_ANTI as anti
    from tests.conftest import PLANTED_TOXIC as toxic
    from tests.conftest import save_planted_pair

    base = save_planted_pair(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": {"text": t}, "challenging": True}) + "\n" for t in
                               ["The soup was", "After lunch, my neighbor said that", "Could you fix the", "We will"]))

    rec, out = tmp_path / "record", tmp_path / "out"
    rec.mkdir()
    out.mkdir()
    record.run(rec, device="cpu", model=ModelConfig(path=str(base)), data=DataConfig(prompts=str(prompts)),
               record=RecordConfig(new_tokens=6, batch_size=4), world_dir=None,
               probe_dir=tmp_path / "probe", dpo_dir=tmp_path / "dpo")
    summary = attribute.run(out, device="cpu", model=ModelConfig(path=str(base)), attribute=AttributeConfig(n_bootstrap=50),
                            world_dir=None, probe_dir=tmp_path / "probe", dpo_dir=tmp_path / "dpo", record_dir=rec)
    neurons = pl.read_parquet(out / "neurons.parquet")
    top = neurons.sort("delta_rank").head(6)
    assert set(zip(top["layer"], top["neuron"])) == {(1, i) for i in toxic + anti}
    codes = dict(zip(top["neuron"], top["group_code"]))
    assert all(codes[i] == "TP-" for i in toxic) and all(codes[i] == "AP+" for i in anti)
    unchanged = neurons.filter(pl.col("group_code") == "unchanged")["delta"].sum()
    groups = pl.read_parquet(out / "group_summary.parquet")
    assert groups["sum_delta"].sum() + unchanged == pytest.approx(summary["net_reduction"], rel=1e-9, abs=1e-12)
    assert neurons["delta"].sum() == pytest.approx(summary["net_reduction"], rel=1e-9)
    # Independently, per layer: record's hook_mlp_out . w_hat of base minus DPO (b_out is shared by the pair)
    # is the sum of that layer's deltas, each computed from mean activations and W_out rows.
    by_layer = neurons.group_by("layer").agg(pl.col("delta").sum()).sort("layer")["delta"].to_numpy()
    mlp = np.load(rec / "base_mlp_proj.npy") - np.load(rec / "dpo_mlp_proj.npy")  # (L,)
    np.testing.assert_allclose(by_layer, mlp, rtol=1e-3, atol=1e-5)
    assert abs(mlp[-1]) > 100 * 1e-5  # the planted layer's change is far above the tolerance


def test_stored_numbers_match_checkpoint_and_direction(tiny_run):
    """Cross-check on a real run: proj in the store equals act x (W_out row . w_hat) recomputed from
    the checkpoint on disk and the stored probe direction; prompt-level sums average to the groups."""
    import store
    from pipeline import runner
    from tests.conftest import TINY_WORLD

    cfg, run_id = tiny_run
    world_dir = runner.stage_dir(cfg, "world", runner.cache_keys(cfg)["world"])
    V = hf_value_vectors(world_dir / "model")
    con = store.connect(cfg.run.store)
    w_hat = np.array(con.execute("SELECT direction FROM probe_metrics WHERE run_id = ?", [run_id]).fetchall()[0][0])
    rows = con.execute("SELECT layer, neuron, act, proj, cos FROM neurons WHERE run_id = ? USING SAMPLE 25 ROWS (reservoir, 7)",
                       [run_id]).fetchall()
    for layer, neuron, act, proj, cos in rows:
        v = V[layer, neuron]
        assert proj == pytest.approx(act * v @ w_hat, rel=1e-4, abs=1e-9)
        assert cos == pytest.approx(v @ w_hat / np.linalg.norm(v), rel=1e-4, abs=1e-9)
    by_group = dict(con.execute("""
        SELECT group_code, sum(sum_delta) / ? FROM prompt_groups WHERE run_id = ? GROUP BY group_code""",
                                [TINY_WORLD["n_prompts"], run_id]).fetchall())
    for group, total in con.execute("SELECT group_code, sum_delta FROM group_summary WHERE run_id = ?", [run_id]).fetchall():
        assert by_group[group] == pytest.approx(total, rel=1e-4, abs=1e-6)  # every prompt has T positions


def test_value_vectors_are_taken_to_float64_one_layer_at_a_time():
    """A float64 copy of a large model's whole W_out would double the memory attribute needs (Llama 3 8B: 15 GB
    more); at most the previous layer's copy may still be alive while the next one is made."""
    import weakref

    alive, most = [], []

    class Layer:
        def __init__(self, W):
            self.W = W

        def double(self):
            most.append(sum(ref() is not None for ref in alive))
            copy = self.W.double()
            alive.append(weakref.ref(copy))
            return copy

    W_out = torch.randn(6, 5, 4)
    vw, v_norm = attribute.along([Layer(W) for W in W_out], np.ones(4) / 2)
    assert max(most) <= 1
    np.testing.assert_allclose(vw, W_out.double().sum(-1).numpy() / 2)
    np.testing.assert_allclose(v_norm, W_out.double().norm(dim=-1).numpy())


def test_a_neuron_with_a_zero_value_vector_has_cos_zero_and_is_unchanged():
    W_out = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [-2.0, 0.0]]])  # (L=1, d_mlp=3, d_model=2); neuron 1 is pruned
    cos = attribute.cosines(*attribute.along(W_out, np.array([0.6, 0.8])))
    assert cos == pytest.approx(np.array([[0.6, 0.0, -0.6]]))
    cos = attribute.cosines(*attribute.along(W_out, np.array([1.0, 0.0])))
    assert cos.tolist() == [[1.0, 0.0, -1.0]]
    codes = attribute.group_codes(cos, act=np.array([[1.0, 1.0, 1.0]]), dact=np.array([[0.5, 0.5, -0.5]]))
    assert codes.tolist() == [["TP-", "unchanged", "AP+"]]
