"""Toxicity scorers: text in, a probability of toxicity per text out.

Every backend exposes `name`, `version` and `score(texts) -> list[float]`, batched by the caller's
batch size; `label` ("name==version") is stored next to every score so that numbers from different
scorers are never mixed up. The offline default is alt-profanity-check, a linear classifier trained
on human-labelled comments, independent of the demo world's generator. Detoxify and Perspective API
plug in here (real-models issue).
"""

from __future__ import annotations

import importlib.metadata
from typing import Protocol

from tqdm import tqdm

from pipeline.config import ConfigError, ScorerConfig


class Scorer(Protocol):
    name: str
    version: str

    def score(self, texts: list[str]) -> list[float]: ...


class ProfanityCheck:
    name = "profanity-check"

    def __init__(self, batch_size: int = 256):
        from profanity_check import predict_prob

        self._predict = predict_prob
        self.batch_size = batch_size
        self.version = importlib.metadata.version("alt-profanity-check")

    def score(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        batches = range(0, len(texts), self.batch_size)
        for i in tqdm(batches, desc="scoring", unit="batch", leave=False, disable=len(batches) < 4):
            out.extend(float(p) for p in self._predict(texts[i:i + self.batch_size]))
        return out


BACKENDS = {ProfanityCheck.name: ProfanityCheck}


def get_scorer(cfg: ScorerConfig) -> Scorer:
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown scorer backend {cfg.backend!r}; [scorer] backend must be one of {', '.join(BACKENDS)}")
    return BACKENDS[cfg.backend](batch_size=cfg.batch_size)


def label(scorer: Scorer) -> str:
    return f"{scorer.name}=={scorer.version}"
