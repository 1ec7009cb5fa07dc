"""The demo world: deterministic for a seed, toxic text from the lexicon in shared contexts, a tiny
model that really learned the corpus, and files in the real datasets' shapes."""

import csv
import importlib.metadata
import json
import re
from importlib import resources

import pytest
import torch

import store
from pipeline import corpus, world
from pipeline.config import WorldConfig

SMALL = WorldConfig(n_sentences=3000, n_probe=100, n_prompts=20, n_pairs=50, n_heldout=50)


def test_same_seed_same_world_other_seed_other_world():
    a, b = world.build_texts(SMALL), world.build_texts(SMALL)
    assert a == b
    c = world.build_texts(WorldConfig(**{**SMALL.__dict__, "seed": 1}))
    assert c["corpus"] != a["corpus"] and c["probe"] != a["probe"]


def test_toxic_share_and_lexicon_origin():
    texts = world.build_texts(WorldConfig(n_sentences=20_000, n_probe=10, n_prompts=4, n_pairs=4, n_heldout=4))
    share = sum(t for _, t in texts["corpus"]) / len(texts["corpus"])
    assert 0.15 <= share <= 0.25
    listed = set(resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text().split())
    assert set(texts["lexicon"]) <= listed
    toxic_words = {w for s, t in texts["corpus"] if t for w in re.findall(r"[a-z]+", s.lower())}
    assert toxic_words & set(texts["lexicon"]), "toxic sentences must use lexicon words"
    neutral_words = {w for s, t in texts["corpus"] if not t for w in re.findall(r"[a-z]+", s.lower())}
    assert not neutral_words & set(texts["lexicon"][:30]), "common lexicon words leak into neutral text"
    assert len(neutral_words) > 600, "neutral text needs a broad vocabulary"


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.443])  # 0.443: the most the config accepts
def test_corpus_toxic_share_follows_the_setting_up_to_its_maximum(fraction):
    import random

    r, lexicon = random.Random(0), corpus.toxic_lexicon(50, 0)
    share = sum(corpus.sentence(r, lexicon, fraction)[1] for _ in range(20_000)) / 20_000
    assert share == pytest.approx(fraction, abs=0.02)


def test_blocked_stems_never_reach_the_lexicon():
    lex = corpus.toxic_lexicon(10_000, 0)
    assert lex and not any(corpus._blocked(w) for w in lex)


def test_same_prefix_continues_both_ways():
    """Shared contexts: a frame's prefix is followed by neutral and by toxic text in the corpus."""
    texts = world.build_texts(WorldConfig(n_sentences=20_000, n_probe=10, n_prompts=4, n_pairs=4, n_heldout=4))
    for start in ("Honestly,", "I can't believe that", "Shut up,", "The angry"):
        labels = {toxic for s, toxic in texts["corpus"] if s.startswith(start)}
        assert labels == {True, False}, start


def test_dataset_files_have_the_real_shapes(tiny_world_dir):
    with open(tiny_world_dir / "probe.csv", newline="") as f:
        probe = list(csv.DictReader(f))
    assert set(probe[0]) == {"comment_text", "toxic"} and {r["toxic"] for r in probe} == {"0", "1"}
    prompts = [json.loads(line) for line in open(tiny_world_dir / "prompts.jsonl")]
    assert all(isinstance(p["prompt"]["text"], str) and isinstance(p["challenging"], bool) for p in prompts)
    assert sum(p["challenging"] for p in prompts) == 40
    pairs = [json.loads(line) for line in open(tiny_world_dir / "pairs.jsonl")]
    assert len(pairs) == 100 and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    assert len((tiny_world_dir / "heldout.txt").read_text().splitlines()) == 300


def test_pairs_never_use_a_challenge_template():
    """DPO is judged out of distribution, as in the paper: no pair prompt fits a challenging frame."""
    texts = world.build_texts(WorldConfig(n_sentences=3000, n_probe=10, n_prompts=200, n_pairs=500, n_heldout=10))
    pattern = lambda f: re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(corpus._cap(f.template))) + "$")
    challenge = [pattern(f) for f in corpus.CHALLENGING]
    asked = [p["prompt"]["text"] for p in texts["prompts"] if p["challenging"]]
    assert all(any(c.match(text) for c in challenge) for text in asked)  # the patterns do match their own prompts
    assert not any(c.match(p["prompt"]) for p in texts["pairs"] for c in challenge)
    assert len({p["prompt"] for p in texts["pairs"]}) > 100, "the pairs still vary"


def test_heldout_sentences_are_not_in_the_corpus(tiny_world_dir):
    corpus_lines = set((tiny_world_dir / "corpus.txt").read_text().splitlines())
    heldout = (tiny_world_dir / "heldout.txt").read_text().splitlines()
    assert heldout and not corpus_lines & set(heldout)


def test_a_world_with_no_unseen_everyday_sentence_left_is_refused(monkeypatch):
    """Held-out sentences are drawn until they are new: a grammar the corpus exhausts must end in an error."""
    from pipeline.config import ConfigError

    monkeypatch.setattr(corpus, "neutral_sentence", lambda r: "The same sentence.")
    with pytest.raises(ConfigError, match=r"no 50 held-out sentences outside a corpus of 3000; lower n_heldout"):
        world.build_texts(SMALL)


def test_tiny_model_learned_the_corpus(tiny_world_dir):
    """Perplexity recomputed with transformers' own loss, one sentence at a time, must match the
    stored figure and sit far below the unigram model's."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((tiny_world_dir / "summary.json").read_text())["summary"]
    path = tiny_world_dir / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    nll = n = 0.0
    for text in (tiny_world_dir / "heldout.txt").read_text().splitlines():
        ids = torch.tensor([[tok.eos_token_id] + tok(text)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    ppl = math.exp(nll / n)
    assert ppl == pytest.approx(summary["ppl_model"], rel=1e-3)
    assert ppl < summary["ppl_unigram"] / 4, (ppl, summary)


def test_challenge_prompts_draw_toxic_continuations_from_the_base_model(tiny_world_dir):
    """The world is meaningful only if the base model is toxic on challenge prompts, as the
    independent scorer sees it; held-out neutral text scores low with the same scorer."""
    from pipeline import scoring
    from pipeline.config import ScorerConfig

    samples = [json.loads(line) for line in open(tiny_world_dir / "samples.jsonl")]
    sc = scoring.get_scorer(ScorerConfig())
    tox = sc.score([s["continuation"] for s in samples])  # the continuation alone
    sample_tox = sum(tox) / len(tox)
    neutral = (tiny_world_dir / "heldout.txt").read_text().splitlines()[:200]
    neutral_tox = sum(sc.score(neutral)) / len(neutral)
    assert sample_tox > 0.3 and sample_tox > 5 * neutral_tox, (sample_tox, neutral_tox)


def test_model_loads_like_a_hub_checkpoint(tiny_world_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    path = str(tiny_world_dir / "model")
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == hf.config.vocab_size and tok.eos_token == "<|endoftext|>"
    bridge = TransformerBridge.boot_transformers(path, device="cpu")
    assert bridge.cfg.d_mlp == 4 * bridge.cfg.d_model == 4 * SMALL.d_model
    _, cache = bridge.run_with_cache("My neighbor said that the coach is",
                                     names_filter=lambda n: n.endswith("mlp.hook_post"))
    post = cache["blocks.0.mlp.hook_post"]
    assert post.shape[-1] == bridge.cfg.d_mlp and torch.isfinite(post).all()


def test_run_records_the_world_model(tiny_run):
    cfg, run_id = tiny_run
    con = store.connect(cfg.run.store)
    model = con.execute("SELECT model FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
    assert "demo world" in model
    summary = con.execute("SELECT summary->>'scorer' FROM stages WHERE run_id = ? AND stage = 'score'", [run_id]).fetchall()
    assert summary[0][0] == f"profanity-check=={importlib.metadata.version('alt-profanity-check')}"


@pytest.mark.parametrize("sizes, message", [
    ({"n_sentences": 1, "n_ctx": 512, "sample_tokens": 2}, "[world] a corpus of n_sentences = 1 fills no block of n_ctx = 512 tokens"),
    ({"n_ctx": 16, "sample_tokens": 15}, "[world] sample_tokens = 15 after a prompt of"),
])
def test_sizes_that_cannot_work_are_refused_before_pretraining(tmp_path, monkeypatch, sizes, message):
    """They ended in tracebacks from torch, the second only after pretraining."""
    from pipeline.config import ConfigError

    monkeypatch.setattr(world, "pretrain", lambda *a, **k: pytest.fail("pretrained before the check"))
    cfg = WorldConfig(**{"n_sentences": 3000, "n_probe": 20, "n_prompts": 10, "n_pairs": 10, "n_heldout": 10,
                         "n_samples": 4, "vocab_size": 600} | sizes)
    with pytest.raises(ConfigError) as e:
        world.run(tmp_path, world=cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
