"""Stage `experts`: an expert and an anti-expert for decoding-time detoxification (MaRCo, Hallinan et
al. 2023), the comparison point for DPO that changes no neuron of the base model.

Both are copies of the base model M fine-tuned with trl.SFTTrainer (plain language modelling) on one
side of the probe dataset, read by the probe stage's loader: the expert on its non-toxic texts, the
anti-expert on its toxic texts. Texts start with BOS, as the prompts do when the experts are used.
Outputs: expert/ and anti/ (HF checkpoints with the tokenizer) and curve.jsonl (step, model, loss).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from pipeline import data as datasets
from pipeline import models
from pipeline.config import DataConfig, ExpertsConfig, ModelConfig

SIDES = {"expert": 0, "anti": 1}  # model folder -> the probe label it learns from


def fine_tune(base_path: str, texts: list[str], out: Path, cfg: ExpertsConfig, device: str,
              bos: str = "transformerlens") -> list[dict]:
    """SFT of a fresh copy of the base model on texts; saves it to out; returns the loss per step."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = models.load_hf(base_path)
    args = SFTConfig(
        max_steps=cfg.steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        seed=cfg.seed,
        **models.trainer_args(out, device),
    )
    # trl appends EOS; the BOS that generation sees is ours to add, where the model has one
    train = Dataset.from_list([{"text": models.bos_prefix(tok, model.config, bos) + t} for t in texts])
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    trainer.train()
    model.config.use_cache = True
    model.save_pretrained(out)
    tok.save_pretrained(out)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    del trainer, model
    models.release_memory()
    return losses


def run(out: Path, *, device: str, model: ModelConfig, data: DataConfig, experts: ExpertsConfig,
        world_dir: Path | None) -> dict:
    texts, labels = datasets.load_probe(datasets.resolve("probe", data.probe, world_dir), experts.max_examples, experts.seed)
    base = datasets.model_path(model.path, world_dir)
    summary: dict = {}
    curve = []
    for name, label in SIDES.items():
        side = [t for t, y in zip(texts, labels) if y == label]
        t0 = time.perf_counter()
        losses = fine_tune(base, side, out / name, experts, device, model.bos)
        curve += [{"model": name} | row for row in losses]
        summary[name] = {"n_texts": len(side), "first_loss": round(losses[0]["loss"], 4),
                         "final_loss": round(losses[-1]["loss"], 4), "seconds": round(time.perf_counter() - t0, 1)}
    with open(out / "curve.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in curve)
    return summary


def tables(out: Path) -> dict[str, pl.DataFrame]:
    return {}  # the loss curves stay in the stage folder; the summary (first and final loss) is in `stages`
