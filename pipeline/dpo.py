"""Stage `dpo`: the DPO copy M' of the base model, trained with trl.DPOTrainer on the stage's pairs.

The reference policy is the base model: a second, frozen copy loaded from the same checkpoint and revision.
Outputs: model/ (M' and its tokenizer, HF format, readable by transformers and TransformerLens) and
curve.jsonl, one row per optimizer step with the loss and the implicit rewards trl logs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import torch

from pipeline import data as datasets
from pipeline import models
from pipeline.config import ConfigError, DPOStageConfig, ModelConfig

# trl's log keys -> dpo_curve columns
CURVE = {"loss": "loss", "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
         "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward"}


def preference_dataset(pairs_file: Path, bos: str):
    from datasets import Dataset

    rows = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    # Prompts start with BOS where the model has one, as in generation, the world's pretraining and
    # TransformerLens (models.bos_prefix): DPO must move the model in the context where it is measured.
    return Dataset.from_list([{"prompt": bos + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                              for r in rows])


def without_eos(example: dict, eos: int) -> dict:
    """A tokenized pair without the EOS that trl 1.16 appends to every completion (it has no switch for it)."""
    return {k: example[k][:-1] if example[k][-1:] == [eos] else example[k] for k in ("chosen_ids", "rejected_ids")}


def check_optimizer(name: str) -> None:
    from transformers.training_args import OptimizerNames

    if name not in {o.value for o in OptimizerNames}:
        raise ConfigError(f"[dpo] optimizer {name!r} is unknown to transformers; use e.g. rmsprop or adamw_torch")


def run(out: Path, *, device: str, model: ModelConfig, dpo: DPOStageConfig, world_dir: Path | None,
        pairs_dir: Path) -> dict:
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class FirstStep(TrainerCallback):
        """When the first optimizer step ends. It carries the warm-up (on a GPU some seconds of kernel choice and
        first allocations), which a benchmark that times a few steps must not scale to thousands."""

        at: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.at is None:
                if args.device.type == "cuda":  # the step's kernels are queued, not yet run
                    torch.cuda.synchronize(args.device)
                self.at = time.perf_counter()

    check_optimizer(dpo.optimizer)
    path = datasets.model_path(model.path, world_dir)
    policy, tok = models.load_hf(path)
    args = DPOConfig(
        beta=dpo.beta,
        learning_rate=dpo.lr,
        optim=dpo.optimizer,
        lr_scheduler_type=dpo.lr_scheduler,
        warmup_steps=dpo.warmup_steps,
        max_grad_norm=dpo.max_grad_norm,
        num_train_epochs=dpo.epochs,
        per_device_train_batch_size=dpo.batch_size,
        gradient_accumulation_steps=dpo.grad_accum,
        max_length=dpo.max_length,
        seed=dpo.seed,
        **models.trainer_args(out, device) | {"activation_checkpointing": dpo.gradient_checkpointing},
    )
    pairs = preference_dataset(pairs_dir / "pairs.jsonl", models.bos_prefix(tok, policy.config, model.bos))
    # The frozen reference is the base model loaded again. trl would reload it from the policy's config, which
    # names the repository without the revision a NAME@REVISION path pins: its newest weights, not the policy's.
    # Straight onto the device, the policy first: two float32 copies on the host at once would double its peak.
    policy.to(args.device)
    reference, _ = models.load_hf(path, str(args.device))
    first = FirstStep()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs, processing_class=tok,
                         callbacks=[first])
    dropped = len(pairs) - len(trainer.train_dataset)  # trl drops a pair whose prompt alone fills max_length
    if dropped == len(pairs):
        raise ConfigError(f"every pair's prompt fills [dpo] max_length = {dpo.max_length} tokens, so no pair is left to "
                          "train on; raise max_length")
    if not dpo.completion_eos:  # train() builds its batches from this attribute
        trainer.train_dataset = trainer.train_dataset.map(without_eos, fn_kwargs={"eos": tok.eos_token_id})
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    if not trainer.is_world_process_zero():  # under accelerate launch the main process saves and reports
        return {}

    policy.config.use_cache = True  # the Trainer turned the KV cache off for training; M' generates like M
    policy.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    curve = [{"step": h["step"]} | {col: h.get(key) for key, col in CURVE.items()}
             for h in trainer.state.log_history if "loss" in h]
    with open(out / "curve.jsonl", "w", encoding="utf-8") as f:
        for row in curve:
            f.write(json.dumps(row) + "\n")
    return {
        "n_pairs": len(trainer.train_dataset),
        "n_pairs_dropped": dropped,
        "n_steps": trainer.state.global_step,
        "final_loss": round(curve[-1]["loss"], 4),
        "final_reward_margin": round(curve[-1]["reward_margin"], 4),
        "seconds": round(seconds, 2),
        "first_step_seconds": round(first.at - t0, 2),
    }


def tables(out: Path) -> dict[str, pl.DataFrame]:
    schema = {"step": pl.Int32} | {col: pl.Float64 for col in CURVE.values()}
    return {"dpo_curve": pl.read_ndjson(out / "curve.jsonl", schema=schema)}
