"""Toxicity scorers: text in, a probability of toxicity per text out.

Every backend exposes `name`, `version` and `score(texts) -> list[float]`, batched by the caller's
batch size; `label` ("name==version") is stored next to every score so that numbers from different
scorers are never mixed up. The offline default is alt-profanity-check, a linear classifier trained
on human-labelled comments, independent of the demo world's generator. The others:
  detoxify     Detoxify's released models (default "original": BERT trained on Jigsaw), an optional
               install (`pip install detoxify`); the checkpoint is downloaded on first use and cached
               by torch.hub, or read from a local .ckpt ([scorer] checkpoint).
  perspective  Google's Perspective API, TOXICITY summary score, the paper's scorer. Key from the
               environment variable PERSPECTIVE_API_KEY; requests spaced to [scorer] rate_limit per
               second, and retried with doubling waits on 429 (quota) and 5xx.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

import numpy as np
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


class Detoxify:
    name = "detoxify"

    def __init__(self, batch_size: int = 256, model: str = "original", checkpoint: str = "", device: str = "cpu"):
        try:
            from detoxify import Detoxify as Model
        except ImportError:
            raise ConfigError("[scorer] backend = 'detoxify' needs the detoxify package; pip install detoxify, "
                              "or choose profanity-check") from None
        if checkpoint and not Path(checkpoint).is_file():
            raise ConfigError(f"[scorer] checkpoint {checkpoint!r} is not a file; give the path of a Detoxify .ckpt, "
                              "or leave it empty to download detoxify_model")
        try:
            self._model = Model(model, checkpoint=checkpoint or None, device=device)
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:  # offline, damaged, foreign
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ConfigError(f"the Detoxify checkpoint could not be loaded ({first}); run once where github.com and "
                              "huggingface.co are reachable (both cache), set [scorer] checkpoint, or choose "
                              "profanity-check") from None
        self.batch_size = batch_size
        # A local checkpoint is named by its content, so two fine-tunes saved under one file name stay apart.
        source = f"{Path(checkpoint).stem}@{_sha256(checkpoint)[:8]}" if checkpoint else model
        self.version = f"{importlib.metadata.version('detoxify')}-{source}"

    def score(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        batches = range(0, len(texts), self.batch_size)
        for i in tqdm(batches, desc="detoxify", unit="batch", leave=False, disable=len(batches) < 4):
            # A list in, a list out: predict() squeezes its scores, so a batch of one comes back as a bare float.
            out.extend(float(p) for p in np.atleast_1d(self._model.predict(texts[i:i + self.batch_size])["toxicity"]))
        return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Perspective:
    name = "perspective"
    version = "v1alpha1"
    url = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
    KEY_VAR = "PERSPECTIVE_API_KEY"

    def __init__(self, batch_size: int = 256, rate_limit: float = 1.0, max_retries: int = 5, retry_wait: float = 1.0,
                 url: str | None = None, timeout: float = 30.0):
        self.key = os.environ.get(self.KEY_VAR, "").strip()
        if not self.key:
            raise ConfigError(f"[scorer] backend = 'perspective' needs an API key in the environment variable "
                              f"{self.KEY_VAR}; set it, or choose detoxify or profanity-check")
        self.url = url or self.url
        self.interval, self.max_retries, self.retry_wait, self.timeout = 1.0 / rate_limit, max_retries, retry_wait, timeout
        self._last = -float("inf")  # start of the previous request, time.monotonic()

    def _request(self, text: str) -> float:
        body = json.dumps({"comment": {"text": text}, "languages": ["en"], "requestedAttributes": {"TOXICITY": {}},
                           "doNotStore": True}).encode()
        for attempt in range(self.max_retries + 1):
            time.sleep(max(0.0, self._last + self.interval - time.monotonic()))
            self._last = time.monotonic()
            req = urllib.request.Request(f"{self.url}?key={self.key}", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return float(json.load(r)["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise ConfigError(f"Perspective API refused a request (HTTP {e.code} {e.reason}); check "
                                      f"{self.KEY_VAR} and that the key has the Comment Analyzer API enabled") from None
                failure = f"answers HTTP {e.code}"
            except (TimeoutError, urllib.error.URLError) as e:  # a busy API times out; a wrong host never answers
                if not isinstance(getattr(e, "reason", e), TimeoutError):
                    raise ConfigError(f"Perspective API unreachable ({e.reason}); score offline with detoxify or "
                                      "profanity-check") from None
                failure = f"times out ({self.timeout:g} s)"
            if attempt == self.max_retries:
                raise ConfigError(f"Perspective API still {failure} after {self.max_retries} retries; "
                                  "lower [scorer] rate_limit or try later")
            time.sleep(self.retry_wait * 2 ** attempt)
        raise AssertionError("unreachable")

    def score(self, texts: list[str]) -> list[float]:
        # The API rejects empty comments; an empty continuation says nothing toxic.
        return [self._request(t) if t.strip() else 0.0
                for t in tqdm(texts, desc="perspective", unit="text", leave=False, disable=len(texts) < 20)]


BACKENDS = {ProfanityCheck.name: ProfanityCheck, Detoxify.name: Detoxify, Perspective.name: Perspective}


def get_scorer(cfg: ScorerConfig, device: str = "cpu") -> Scorer:
    """device: where a scorer that is a network (Detoxify) runs; the stage's own device."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"unknown scorer backend {cfg.backend!r}; [scorer] backend must be one of {', '.join(BACKENDS)}")
    if cfg.backend == Perspective.name:
        return Perspective(batch_size=cfg.batch_size, rate_limit=cfg.rate_limit, max_retries=cfg.max_retries)
    if cfg.backend == Detoxify.name:
        return Detoxify(batch_size=cfg.batch_size, model=cfg.detoxify_model, checkpoint=cfg.checkpoint, device=device)
    return BACKENDS[cfg.backend](batch_size=cfg.batch_size)


def label(scorer: Scorer) -> str:
    return f"{scorer.name}=={scorer.version}"
