"""Stage `world`: the embedded demo world, built from a seed on the CPU.

Outputs, in the formats of the real datasets so that later stages read both through one loader:
  model/         a GPT-2 (transformers.GPT2LMHeadModel) and its byte-level BPE tokenizer, HF format
  corpus.txt     the pretraining sentences, one per line
  heldout.txt    neutral held-out sentences (the WikiText-2 stand-in, for perplexity and F1)
  probe.csv      comment_text,toxic (the Jigsaw shape)
  prompts.jsonl  {"prompt": {"text"}, "challenging"} (the RealToxicityPrompts shape)
  pairs.jsonl    {"prompt", "chosen", "rejected"} (the pairwise DPO data shape)
  samples.jsonl  greedy continuations of challenge prompts by the trained model, to read (stage record scores
                 the base model's continuations of every challenge prompt; a scorer here would tie the world's
                 cache key to [scorer], and a scorer change would rebuild the world and rerun everything)
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from pathlib import Path

import polars as pl
import torch
from tqdm import tqdm

from pipeline import corpus
from pipeline.config import ConfigError, WorldConfig

EOS = "<|endoftext|>"


def model_label(cfg: WorldConfig) -> str:
    return f"demo world GPT-2 ({cfg.n_layer} layers, d_model {cfg.d_model}, seed {cfg.seed})"


def build_texts(cfg: WorldConfig) -> dict:
    """Every text of the world, from independent seeded streams (one per dataset)."""
    lexicon = corpus.toxic_lexicon(cfg.n_toxic_words, cfg.seed)
    stream = {name: random.Random(f"{cfg.seed}/{name}") for name in ("corpus", "heldout", "probe", "prompts", "pairs")}

    rows = [corpus.sentence(stream["corpus"], lexicon, cfg.toxic_fraction) for _ in range(cfg.n_sentences)]
    # Held out means unseen: perplexity and F1 on sentences the model was trained on would flatter it.
    seen, heldout = {text for text, _ in rows}, []
    for _ in range(100 * cfg.n_heldout):
        text = corpus.neutral_sentence(stream["heldout"])
        if text not in seen:
            heldout.append(text)
            if len(heldout) == cfg.n_heldout:
                break
    else:
        raise ConfigError(f"[world] no {cfg.n_heldout} held-out sentences outside a corpus of {cfg.n_sentences}; lower n_heldout")

    r = stream["probe"]
    probe = []
    for i in range(cfg.n_probe):
        if i % 2:  # balanced: toxic frame sentences against neutral frames and everyday sentences
            prefix, cont, toxic = corpus.frame_sentence(r, lexicon, corpus.Frame(r.choice(corpus.FRAMES).template, 1.0))
            probe.append((prefix + cont, 1))
        elif r.random() < 0.5:
            prefix, cont, _ = corpus.frame_sentence(r, lexicon, corpus.Frame(r.choice(corpus.FRAMES).template, 0.0))
            probe.append((prefix + cont, 0))
        else:
            probe.append((corpus.neutral_sentence(r), 0))

    r = stream["prompts"]
    prompts = []
    for i in range(cfg.n_prompts + cfg.n_prompts // 4):
        frame = r.choice(corpus.CHALLENGING if i < cfg.n_prompts else corpus.MILD)
        prefix, cont, _ = corpus.frame_sentence(r, lexicon, frame)
        prompts.append({"prompt": {"text": prefix}, "continuation": {"text": cont},
                        "challenging": frame.heat >= corpus.CHALLENGE_HEAT})

    # Pairs come from the mild frames only, so DPO is judged on challenge templates it never trained on,
    # as the paper's pairs come from WikiText prompts, apart from RealToxicityPrompts.
    r = stream["pairs"]
    pairs = []
    for _ in range(cfg.n_pairs):
        frame = r.choice(corpus.MILD)
        prefix, target = corpus.frame_prefix(frame, r)
        pairs.append({"prompt": prefix,
                      "chosen": " " + corpus.neutral_predicate(r, target) + ".",
                      "rejected": " " + corpus.toxic_predicate(r, lexicon, target) + "."})
    return {"lexicon": lexicon, "corpus": rows, "heldout": heldout, "probe": probe, "prompts": prompts, "pairs": pairs}


def train_tokenizer(lines: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def pack(ids: list[list[int]], eos: int, n_ctx: int) -> torch.Tensor:
    """Blocks of n_ctx tokens, each starting with EOS (GPT-2's BOS) at a sentence start, so that the
    model sees text exactly as TransformerLens feeds it (prepend_bos) and as prompts begin."""
    blocks, cur = [], [eos]
    for sent in ids:
        cur += sent + [eos]
        if len(cur) >= n_ctx:
            blocks.append(cur[:n_ctx])
            cur = [eos]
    return torch.tensor(blocks)  # (N, n_ctx)


def pretrain(model, blocks: torch.Tensor, cfg: WorldConfig, device: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, cfg.train_steps // 20)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.train_steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    bar = tqdm(range(cfg.train_steps), desc="pretraining", unit="step")
    for step in bar:
        idx = torch.randint(len(blocks), (cfg.batch_size,), generator=g)
        x = blocks[idx].to(device)  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def perplexities(model, tok, train_ids: list[list[int]], texts: list[str], device: str) -> tuple[float, float]:
    """(model, unigram) perplexity on the same held-out tokens: each sentence after EOS, plus its EOS.
    The unigram model is add-one smoothed token frequencies of the training corpus."""
    eos = tok.eos_token_id
    counts = Counter(t for s in train_ids for t in s)
    counts[eos] += len(train_ids)
    total = sum(counts.values()) + len(tok)
    nll_model = nll_uni = n = 0.0
    for i in range(0, len(texts), 64):
        batch = [[eos] + tok.encode(t) + [eos] for t in texts[i:i + 64]]
        width = max(map(len, batch))
        x = torch.tensor([b + [eos] * (width - len(b)) for b in batch], device=device)
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch], device=device)
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)  # (B, T-1, V)
        tgt = x[:, 1:]
        keep = mask[:, 1:].bool()
        nll_model -= logp.gather(-1, tgt[..., None])[..., 0][keep].sum().item()
        for t in tgt[keep].tolist():
            nll_uni -= math.log((counts[t] + 1) / total)
        n += keep.sum().item()
    return math.exp(nll_model / n), math.exp(nll_uni / n)


@torch.no_grad()
def greedy_continuations(model, tok, prompts: list[str], max_new_tokens: int, device: str, batch_size: int = 32) -> list[str]:
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok([tok.bos_token + p for p in prompts[i:i + batch_size]], return_tensors="pt", padding=True).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def run(out: Path, *, world: WorldConfig, device: str = "cpu") -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = world
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    texts = build_texts(cfg)
    sentences = [s for s, _ in texts["corpus"]]

    (out / "corpus.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text("\n".join(texts["heldout"]) + "\n", encoding="utf-8")
    with open(out / "probe.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["comment_text", "toxic"])
        w.writerows(texts["probe"])
    _write_jsonl(out / "prompts.jsonl", texts["prompts"])
    _write_jsonl(out / "pairs.jsonl", texts["pairs"])

    tok = train_tokenizer(sentences, cfg.vocab_size)
    train_ids = tok(sentences)["input_ids"]
    blocks = pack(train_ids, tok.eos_token_id, cfg.n_ctx)
    if not len(blocks):
        raise ConfigError(f"[world] a corpus of n_sentences = {cfg.n_sentences} fills no block of n_ctx = {cfg.n_ctx} tokens; raise "
                          "n_sentences or lower n_ctx")
    challenge = [p["prompt"]["text"] for p in texts["prompts"] if p["challenging"]][:cfg.n_samples]
    longest = max((len(ids) for ids in tok([EOS + p for p in challenge])["input_ids"]), default=0)
    if longest + cfg.sample_tokens > cfg.n_ctx:  # found before pretraining, not after
        raise ConfigError(f"[world] sample_tokens = {cfg.sample_tokens} after a prompt of {longest} tokens exceed n_ctx = "
                          f"{cfg.n_ctx}; lower sample_tokens, or raise n_ctx or vocab_size (a smaller vocabulary makes longer prompts)")

    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tok), n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_inner=4 * cfg.d_model, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )).to(device)
    losses = pretrain(model, blocks, cfg, device)
    ppl_model, ppl_unigram = perplexities(model, tok, train_ids, texts["heldout"], device)

    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")

    conts = greedy_continuations(model, tok, challenge, cfg.sample_tokens, device)
    _write_jsonl(out / "samples.jsonl", [{"prompt_id": i, "prompt": p, "continuation": c}
                                         for i, (p, c) in enumerate(zip(challenge, conts))])
    toxic_share = sum(t for _, t in texts["corpus"]) / len(texts["corpus"])
    return {
        "n_sentences": len(sentences),
        "toxic_fraction": round(toxic_share, 4),
        "n_toxic_words": len(texts["lexicon"]),
        "vocab_size": len(tok),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_tokens": cfg.train_steps * cfg.batch_size * cfg.n_ctx,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "ppl_model": round(ppl_model, 3),
        "ppl_unigram": round(ppl_unigram, 3),
    }


def tables(out: Path) -> dict[str, pl.DataFrame]:
    """Nothing: the world's own samples are a sanity check (summary and samples.jsonl); the store's
    generations come from stage record, for both models on all challenge prompts."""
    return {}
