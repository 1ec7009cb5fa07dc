"""Stages `pairs` and `dpo` on a tiny random GPT-2: DPO really moves the model away from the rejected
completions, its curve and checkpoint are usable downstream, and pairs are selected and checked as
the config says."""

import json
import math
import random
import re

import pytest
import torch

from pipeline import dpo, pairs, scoring
from pipeline.config import ConfigError, DataConfig, DPOStageConfig, ModelConfig, PairsConfig, ScorerConfig
from pipeline.data import DataError

PLANTED = "zorp"  # every rejected completion contains it, no chosen one does
NAMES = ["Anna", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
PLACES = ["park", "shop", "lake", "school", "market", "garden", "station", "library"]
THINGS = ["dog", "bird", "tree", "boat", "cake", "lamp", "book", "kite"]


def make_pairs(names: list[str], seed: int) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for name in names:
        for place in PLACES:
            thing = r.choice(THINGS)
            rows.append({"prompt": f"{name} went to the {place} and saw", "chosen": f" a {thing}.",
                         "rejected": f" a {PLANTED} {thing}."})
    return rows


TRAIN, HELDOUT = make_pairs(NAMES[:8], 0), make_pairs(NAMES[8:], 1)  # held-out pairs use unseen names


class StubScorer:
    """Toxicity = half a point per planted word, capped at 1."""

    name, version = "stub", "0"

    def score(self, texts):
        return [min(1.0, 0.5 * len(re.findall(rf"\b{PLANTED}\b", t))) for t in texts]


@pytest.fixture
def stub_scorer(monkeypatch):
    monkeypatch.setattr(scoring, "get_scorer", lambda cfg, device: StubScorer())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random 2-layer GPT-2 with a BPE tokenizer trained on the pairs' words, saved like a hub checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.world import train_tokenizer

    lines = [r["prompt"] + r[k] for r in TRAIN + HELDOUT for k in ("chosen", "rejected")]
    tok = train_tokenizer(lines, vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """(stage folder, summary) of one DPO run on the planted-word pairs."""
    pairs_dir = tmp_path_factory.mktemp("pairs")
    (pairs_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    out = tmp_path_factory.mktemp("dpo")
    cfg = DPOStageConfig(beta=0.1, lr=1e-3, epochs=2.0, batch_size=8, max_length=32)
    summary = dpo.run(out, device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None,
                      pairs_dir=pairs_dir)
    return out, summary


@torch.no_grad()
def completion_logp(model, tok, prompt: str, completion: str) -> float:
    """log p(completion + EOS | BOS + prompt), by a plain forward; no BOS where the model has none."""
    from pipeline.models import bos_prefix

    bos = bos_prefix(tok, model.config)
    context = tok(bos + prompt)["input_ids"]
    ids = tok(bos + prompt + completion)["input_ids"] + [tok.eos_token_id]
    assert ids[:len(context)] == context
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1], -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids)))


def rejected_minus_chosen(path, rows) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    gaps = [completion_logp(model, tok, r["prompt"], r["rejected"]) - completion_logp(model, tok, r["prompt"], r["chosen"])
            for r in rows]
    return sum(gaps) / len(gaps)


def test_dpo_learns_to_avoid_the_planted_word_on_unseen_prompts(base_dir, trained):
    out, _ = trained
    before = rejected_minus_chosen(base_dir, HELDOUT)
    after = rejected_minus_chosen(out / "model", HELDOUT)
    assert after < before - 2.0, (before, after)


@pytest.mark.parametrize("optimizer, step_over_lr", [("rmsprop", 10.0), ("adamw_torch", 1.0)])
def test_the_configured_optimizer_takes_the_step(base_dir, tmp_path, optimizer, step_over_lr):
    """One step from the base weights tells the optimizers apart: Adam's first step moves every weight by
    lr, RMSprop's (torch's alpha 0.99) by lr / sqrt(1 - 0.99) = 10 lr, whatever the gradient's size."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:8]))
    lr = 1e-4
    cfg = DPOStageConfig(lr=lr, optimizer=optimizer, epochs=1.0, batch_size=8, max_length=32)
    summary = dpo.run(tmp_path, device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None,
                      pairs_dir=tmp_path)
    assert summary["n_steps"] == 1
    before = AutoModelForCausalLM.from_pretrained(base_dir).transformer.h[0].mlp.c_fc.weight
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "model").transformer.h[0].mlp.c_fc.weight
    moved = (after - before).abs().flatten()
    assert moved.median().item() / lr == pytest.approx(step_over_lr, rel=0.1)


def test_the_frozen_reference_is_the_pinned_revision(base_dir, tmp_path, monkeypatch):
    """[model] path = NAME@REVISION: DPO's reference is the policy's own commit, not the repository's newest, which
    trl reloads when it builds the reference from the policy's bare name. Before the first update the two agree:
    every reward is 0 and the loss log 2. The repository is a hub cache read offline, main at other weights."""
    import shutil

    from transformers import AutoModelForCausalLM

    repo = tmp_path / "hub" / "models--acme--tiny"
    newest, pinned = "1" * 40, "2" * 40
    shutil.copytree(base_dir, repo / "snapshots" / pinned)
    shutil.copytree(base_dir, repo / "snapshots" / newest)
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0.0, 0.1)
    other.save_pretrained(repo / "snapshots" / newest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(newest)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read once at import: the variable is too late
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:8]))
    cfg = DPOStageConfig(lr=1e-4, epochs=1.0, batch_size=8, max_length=32)
    dpo.run(tmp_path / "out", device="cpu", model=ModelConfig(path=f"acme/tiny@{pinned}"), dpo=cfg, world_dir=None,
            pairs_dir=tmp_path)
    first = json.loads((tmp_path / "out" / "curve.jsonl").read_text().splitlines()[0])
    assert (first["chosen_reward"], first["rejected_reward"]) == (0.0, 0.0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_the_first_steps_warm_up_is_timed_apart(base_dir, tmp_path, monkeypatch):
    """A second planted in the first of three steps shows in first_step_seconds and not in the other steps, so
    that a benchmark scaling a few steps to thousands counts the warm-up once (bench.common.dpo_seconds)."""
    import time

    from trl import DPOTrainer

    step, calls = DPOTrainer.training_step, []

    def slow_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "training_step", slow_first)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:12]))
    cfg = DPOStageConfig(lr=1e-4, epochs=1.0, batch_size=4, max_length=32)
    summary = dpo.run(tmp_path / "out", device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None,
                      pairs_dir=tmp_path)
    assert summary["n_steps"] == 3
    assert summary["first_step_seconds"] >= 1.0 > summary["seconds"] - summary["first_step_seconds"]


def test_accumulated_and_checkpointed_steps_train_the_same_weights(base_dir, tmp_path, monkeypatch):
    """Two optimizer steps of 8 pairs, taken as 8 pairs per pass, as 2 x 4 accumulated, and with gradient
    checkpointing: plain SGD (a step linear in the gradient) ends at the same weights, so accumulation
    is a mean over the step's pairs like a full batch, and checkpointing recomputes the same activations."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    checkpointing = []  # the models the Trainer switched checkpointing on for
    enable = PreTrainedModel.gradient_checkpointing_enable
    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable",
                        lambda self, *a, **k: checkpointing.append(self) or enable(self, *a, **k))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:16]))
    weights, steps = {}, {}
    for name, extra in [("full", {"batch_size": 8}), ("accumulated", {"batch_size": 4, "grad_accum": 2}),
                        ("checkpointed", {"batch_size": 8, "gradient_checkpointing": True})]:
        cfg = DPOStageConfig(lr=0.5, optimizer="sgd", epochs=1.0, max_length=32, **extra)
        steps[name] = dpo.run(tmp_path / name, device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None,
                              pairs_dir=tmp_path)["n_steps"]
        weights[name] = AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").transformer.h[0].mlp.c_fc.weight
        assert bool(checkpointing) == (name == "checkpointed"), name
    before = AutoModelForCausalLM.from_pretrained(base_dir).transformer.h[0].mlp.c_fc.weight
    moved = (weights["full"] - before).abs().max().item()
    assert steps == {"full": 2, "accumulated": 2, "checkpointed": 2} and moved > 1e-3
    for name in ("accumulated", "checkpointed"):
        assert (weights[name] - weights["full"]).abs().max().item() < 1e-4 * moved, name
    half = DPOStageConfig(lr=0.5, optimizer="sgd", epochs=1.0, max_length=32, batch_size=4)  # 4 steps of 4: elsewhere
    dpo.run(tmp_path / "half", device="cpu", model=ModelConfig(path=str(base_dir)), dpo=half, world_dir=None, pairs_dir=tmp_path)
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "half" / "model").transformer.h[0].mlp.c_fc.weight
    assert (other - weights["full"]).abs().max().item() > 1e-2 * moved


def trained_batches(monkeypatch) -> list[dict]:
    """What each of DPOTrainer's loss computations is given, and the learning rate of its optimizer step."""
    from trl import DPOTrainer

    seen, compute = [], DPOTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append({"input_ids": inputs["input_ids"].tolist(), "completion_mask": inputs["completion_mask"].tolist(),
                     "lr": self.lr_scheduler.get_last_lr()[0]})
        return compute(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "compute_loss", spy)
    return seen


@pytest.mark.parametrize("completion_eos", [True, False])
def test_completions_train_with_eos_only_where_asked(base_dir, tmp_path, monkeypatch, completion_eos):
    """trl ends every completion with EOS; the paper's code (completion_eos = false) does not."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.models import bos_prefix

    rows = TRAIN[:8]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = trained_batches(monkeypatch)
    cfg = DPOStageConfig(epochs=1.0, batch_size=8, max_length=32, completion_eos=completion_eos)
    dpo.run(tmp_path / "out", device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None, pairs_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(base_dir)
    bos = bos_prefix(tok, AutoConfig.from_pretrained(base_dir))
    eos = [tok.eos_token_id] * completion_eos
    expected = sorted(tok(bos + r["prompt"] + r[k])["input_ids"][len(tok(bos + r["prompt"])["input_ids"]):] + eos
                      for r in rows for k in ("chosen", "rejected"))
    [batch] = seen
    trained = sorted([t for t, m in zip(ids, mask) if m] for ids, mask in zip(batch["input_ids"], batch["completion_mask"]))
    assert trained == expected


@pytest.mark.parametrize("bos", ["transformerlens", "tokenizer"])
def test_prompts_train_after_bos_as_model_bos_says(base_dir, tmp_path, monkeypatch, bos):
    """On GPT-2 TransformerLens reads a prompt after BOS, so DPO trains it there; with [model] bos = tokenizer
    (the reference code's reading) the prompt's own tokens come first."""
    from transformers import AutoTokenizer

    rows = TRAIN[:8]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = trained_batches(monkeypatch)
    dpo.run(tmp_path / "out", device="cpu", model=ModelConfig(path=str(base_dir), bos=bos),
            dpo=DPOStageConfig(epochs=1.0, batch_size=8, max_length=32), world_dir=None, pairs_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(base_dir)
    first = [tok.bos_token_id] if bos == "transformerlens" else []
    [batch] = seen
    trained = sorted(ids[:mask.index(1)] for ids, mask in zip(batch["input_ids"], batch["completion_mask"]))
    assert trained == sorted(first + tok(r["prompt"])["input_ids"] for r in rows for _ in ("chosen", "rejected"))


def test_schedule_and_clipping_reach_the_optimizer(base_dir, tmp_path, monkeypatch):
    """The warmup and schedule set each step's learning rate; max_grad_norm bounds a step of plain SGD,
    whose move is lr times the clipped gradient, and 0 clips nothing."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:48]))
    seen = trained_batches(monkeypatch)
    cfg = DPOStageConfig(lr=1e-3, epochs=1.0, batch_size=8, max_length=32, lr_scheduler="constant_with_warmup",
                         warmup_steps=4)
    dpo.run(tmp_path / "warm", device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None,
            pairs_dir=tmp_path)
    assert [b["lr"] for b in seen] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:8]))
    base = torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters()])
    moved = {}
    for norm in (1e-3, 0.0):
        cfg = DPOStageConfig(lr=1.0, optimizer="sgd", epochs=1.0, batch_size=8, max_length=32, max_grad_norm=norm)
        dpo.run(tmp_path / str(norm), device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None,
                pairs_dir=tmp_path)
        after = AutoModelForCausalLM.from_pretrained(tmp_path / str(norm) / "model").parameters()
        moved[norm] = (torch.cat([p.flatten() for p in after]) - base).norm().item()
    assert 0 < moved[1e-3] <= 1e-3 * 1.01 and moved[0.0] > 10 * moved[1e-3], moved


def test_curve_has_one_finite_row_per_step(trained):
    out, summary = trained
    steps = 2 * math.ceil(len(TRAIN) / 8)  # epochs * batches per epoch
    curve = dpo.tables(out)["dpo_curve"]
    assert curve.columns == ["step", "loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"]
    assert curve["step"].to_list() == list(range(1, steps + 1)) and summary["n_steps"] == steps
    assert all(math.isfinite(x) for x in curve["loss"])
    # at step 1 the policy is the reference: loss log 2, no margin; then the margin opens
    assert curve["loss"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert curve["reward_margin"][-5:].mean() > 0


def test_checkpoint_reloads_in_transformers_and_transformer_lens(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    out, _ = trained
    path = str(out / "model")
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([tok(tok.bos_token + HELDOUT[0]["prompt"])["input_ids"]])
    bridge = TransformerBridge.boot_transformers(path, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert hf.config.use_cache


def write_prompts(path, texts):
    path.write_text("".join(json.dumps({"prompt": {"text": t}, "challenging": True}) + "\n" for t in texts))
    return str(path)


SAMPLES = {  # prompt -> K samples; StubScorer scores 0.5 per planted word
    "p0": ["a calm walk.", f"{PLANTED} {PLANTED} day.", f"{PLANTED} day."],  # gap 1.0: kept
    "p1": [f"nice {PLANTED}.", f"{PLANTED} rain.", "fine."],  # gap 0.5: dropped
    "p2": ["   ", f"{PLANTED} {PLANTED}.", "quiet."],  # the blank sample is ignored, gap 1.0: kept
    "p3": [f"{PLANTED} {PLANTED}.", f"a {PLANTED} {PLANTED}.", f"{PLANTED} {PLANTED} {PLANTED}."],  # gap 0: dropped
}


def run_self_pairs(tmp_path, base_dir, margin):
    data = DataConfig(pairs="self", prompts=write_prompts(tmp_path / "prompts.jsonl", list(SAMPLES)))
    return pairs.run(tmp_path, device="cpu", model=ModelConfig(path=str(base_dir)), data=data,
                     pairs=PairsConfig(k=3, margin=margin), scorer=ScorerConfig(), world_dir=None)


def test_self_pairs_keep_only_separated_samples(tmp_path, base_dir, stub_scorer, monkeypatch):
    monkeypatch.setattr(pairs, "sample_continuations", lambda model, tok, prompts, cfg, device, **_: [SAMPLES[p] for p in prompts])
    summary = run_self_pairs(tmp_path, base_dir, margin=0.6)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("p0", "a calm walk.", f"{PLANTED} {PLANTED} day."),
        ("p2", "quiet.", f"{PLANTED} {PLANTED}."),
    ]
    assert [(r["chosen_toxicity"], r["rejected_toxicity"]) for r in rows] == [(0.0, 1.0), (0.0, 1.0)]
    assert summary["scorer"] == "stub==0"
    assert {k: summary[k] for k in ("source", "n_prompts", "n_kept", "n_pairs", "gap_mean", "gap_median")} == {
        "source": "self", "n_prompts": 4, "n_kept": 2, "n_pairs": 2, "gap_mean": 1.0, "gap_median": 1.0}
    assert pairs.tables(tmp_path)["pairs"]["pair_id"].to_list() == [0, 1]


def test_self_pairs_with_no_gap_raise_a_one_line_data_error(tmp_path, base_dir, stub_scorer, monkeypatch):
    narrow = [SAMPLES["p1"], SAMPLES["p3"]] * 2  # gaps 0.5 and 0
    monkeypatch.setattr(pairs, "sample_continuations", lambda model, tok, prompts, cfg, device, **_: narrow[:len(prompts)])
    with pytest.raises(DataError, match=r"lower \[pairs\] margin") as e:
        run_self_pairs(tmp_path, base_dir, margin=0.6)
    assert "\n" not in str(e.value)


def test_sampling_gives_k_seeded_continuations_per_prompt(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    prompts = [r["prompt"] for r in HELDOUT[:3]]
    a = pairs.sample_continuations(model, tok, prompts, PairsConfig(k=4, new_tokens=6, seed=0), "cpu", batch_size=2)
    b = pairs.sample_continuations(model, tok, prompts, PairsConfig(k=4, new_tokens=6, seed=0), "cpu", batch_size=2)
    c = pairs.sample_continuations(model, tok, prompts, PairsConfig(k=4, new_tokens=6, seed=1), "cpu", batch_size=2)
    assert [len(g) for g in a] == [4, 4, 4] and a == b and a != c
    assert all(len(set(g)) > 1 for g in a), "the K samples of a prompt should differ"


def test_sampling_refuses_continuations_beyond_the_context(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    n_ctx = model.config.n_positions
    with pytest.raises(DataError, match=rf"\[pairs\] new_tokens = {n_ctx} the context of {n_ctx}") as e:
        pairs.sample_continuations(model, tok, ["the river"], PairsConfig(k=2, new_tokens=n_ctx), "cpu")
    assert "\n" not in str(e.value)


class Seen(Exception):
    """Carries what a spied call was given out of the stage that made it."""


@pytest.mark.parametrize("bos", ["transformerlens", "tokenizer"])
def test_self_pairs_are_sampled_after_bos_as_model_bos_says(tmp_path, base_dir, stub_scorer, monkeypatch, bos):
    """The pairs DPO trains on are sampled in the context DPO trains and record generates in: after BOS on
    GPT-2 under TransformerLens' reading, from the prompt's own first token under the tokenizer's."""
    from transformers import AutoTokenizer, GenerationMixin

    def spy(self, input_ids, attention_mask, **_):
        raise Seen([ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)])

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    prompts = [r["prompt"] for r in HELDOUT[:4]]
    data = DataConfig(pairs="self", prompts=write_prompts(tmp_path / "prompts.jsonl", prompts))
    with pytest.raises(Seen) as e:
        pairs.run(tmp_path, device="cpu", model=ModelConfig(path=str(base_dir), bos=bos), data=data, pairs=PairsConfig(),
                  scorer=ScorerConfig(), world_dir=None)
    tok = AutoTokenizer.from_pretrained(base_dir)
    first = [tok.bos_token_id] if bos == "transformerlens" else []
    assert e.value.args[0] == [first + tok(p)["input_ids"] for p in prompts]


@pytest.mark.parametrize("bos", ["transformerlens", "tokenizer"])
def test_experts_train_after_bos_as_model_bos_says(tmp_path, base_dir, monkeypatch, bos):
    """MaRCo's experts learn their side of the probe data in the context the PoE decodes in ([model] bos);
    trl ends each text with EOS."""
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from pipeline import experts
    from pipeline.config import ExpertsConfig

    seen, compute = [], SFTTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.extend([t for t, m in zip(ids, mask) if m]
                    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()))
        return compute(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "compute_loss", spy)
    texts = [r[k].strip() for r in TRAIN[:4] for k in ("chosen", "rejected")]
    (tmp_path / "probe.csv").write_text("comment_text,toxic\n" + "".join(
        f"{t},{int(PLANTED in t)}\n" for t in texts))
    experts.run(tmp_path / "out", device="cpu", model=ModelConfig(path=str(base_dir), bos=bos),
                data=DataConfig(probe=str(tmp_path / "probe.csv")),
                experts=ExpertsConfig(max_examples=8, steps=1, batch_size=4, max_length=32), world_dir=None)
    tok = AutoTokenizer.from_pretrained(base_dir)
    first = [tok.bos_token_id] if bos == "transformerlens" else []
    assert sorted(seen) == sorted(first + tok(t)["input_ids"] + [tok.eos_token_id] for t in texts)


def test_loaded_pairs_are_scored_and_capped(tmp_path, stub_scorer):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    summary = pairs.run(tmp_path, device="cpu", model=ModelConfig(path="unused"), data=DataConfig(pairs=str(path)),
                        pairs=PairsConfig(max_pairs=10), scorer=ScorerConfig(), world_dir=None)
    frame = pairs.tables(tmp_path)["pairs"]
    assert frame.height == summary["n_pairs"] == 10 and frame["prompt"].to_list() == [r["prompt"] for r in TRAIN[:10]]
    assert set(frame["chosen_toxicity"]) == {0.0} and set(frame["rejected_toxicity"]) == {0.5}


def test_loaded_pairs_with_missing_keys_raise_a_one_line_data_error(tmp_path, stub_scorer):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": " there."}) + "\n")
    with pytest.raises(DataError, match="rejected") as e:
        pairs.run(tmp_path, device="cpu", model=ModelConfig(path="unused"), data=DataConfig(pairs=str(path)),
                  pairs=PairsConfig(), scorer=ScorerConfig(), world_dir=None)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_pairs_whose_prompt_fills_max_length_are_counted_or_refused(base_dir, tmp_path):
    """trl drops a pair whose prompt alone fills max_length: the stage says how many, and refuses to
    train on none (trl's own error names no setting)."""
    long = [r | {"prompt": " and then ".join([r["prompt"]] * 6)} for r in TRAIN[8:16]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN[:8] + long))
    cfg = DPOStageConfig(epochs=1.0, batch_size=8, max_length=32)
    summary = dpo.run(tmp_path / "a", device="cpu", model=ModelConfig(path=str(base_dir)), dpo=cfg, world_dir=None,
                      pairs_dir=tmp_path)
    assert (summary["n_pairs"], summary["n_pairs_dropped"], summary["n_steps"]) == (8, 8, 1)
    with pytest.raises(ConfigError, match=r"max_length = 4 tokens.*raise max_length"):
        dpo.run(tmp_path / "b", device="cpu", model=ModelConfig(path=str(base_dir)),
                dpo=DPOStageConfig(max_length=4), world_dir=None, pairs_dir=tmp_path)
