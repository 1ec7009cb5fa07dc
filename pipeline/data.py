"""Dataset loading: one loader per real format, used for the demo world's files and real ones alike.

'world' resolves to the file the world stage wrote in that format. Bad input (a missing file, a
missing column, nothing left after filtering) raises DataError with one line naming the file, the
problem and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path

from pipeline.config import ConfigError

HUB = "hf:"
WORLD_FILES = {"probe": "probe.csv", "prompts": "prompts.jsonl", "pairs": "pairs.jsonl", "heldout": "heldout.txt"}


class DataError(ConfigError):
    """A dataset that cannot be used; the message names the file and the fix."""


def resolve(kind: str, value: str, world_dir: Path | None) -> Path:
    """The file behind a [data] entry: the world's, a local file, or a hub dataset written out as one."""
    if value == "world":
        if world_dir is None:
            raise DataError(f"[data] {kind} = 'world' but this config builds no world; add a [world] section or give a file")
        return Path(world_dir) / WORLD_FILES[kind]
    if value.startswith(HUB):
        return from_hub(kind, value)
    return local_file(kind, value)


def local_file(kind: str, value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise DataError(f"[data] {kind} file {path} not found; give an existing file or 'world'")
    return path


def from_hub(kind: str, value: str) -> Path:
    """`hf:NAME[:CONFIG[:SPLIT]]` (split default train), loaded with `datasets.load_dataset` and written
    once to a file in the format of `kind` under the datasets cache, so that one loader reads hub and
    local data alike. NAME may also be a local folder of data files, which is how the tests reach it."""
    import datasets

    name, config, split = (value[len(HUB):].split(":") + ["", ""])[:3]
    out = Path(datasets.config.HF_DATASETS_CACHE) / "dpo-neurons" / (
        re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}_{config}_{split or 'train'}") + Path(WORLD_FILES[kind]).suffix)
    if out.is_file():
        return out
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # the hub raises many types: offline, gated, unknown name or split
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"[data] {kind} = {value!r} could not be loaded ({first}); "
                        "give a local file, or run once where the hub is reachable") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    if kind == "heldout":
        if "text" not in ds.column_names:
            raise DataError(f"[data] heldout = {value!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
        tmp.write_text("".join(t.replace("\n", " ") + "\n" for t in ds["text"]), encoding="utf-8")
    elif kind == "probe":
        ds.to_csv(str(tmp), index=False)
    else:
        ds.to_json(str(tmp), lines=True, force_ascii=False)
    tmp.rename(out)
    return out


def model_path(value: str, world_dir: Path | None) -> str:
    """The base model: the world's checkpoint folder, or a hub name / local path as given."""
    if value == "world":
        if world_dir is None:
            raise DataError("[model] path = 'world' but this config builds no world; add a [world] section")
        return str(Path(world_dir) / "model")
    return value


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None


def _jsonl(path: Path) -> list[dict]:
    rows = []
    # split on "\n" only: splitlines() also breaks at U+2028/U+2029/U+0085, which hub datasets write unescaped
    for n, line in enumerate(_read(path).split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path} line {n} is not valid JSON; fix or remove that line") from None
    return rows


def load_probe(path: Path, max_examples: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels from a Jigsaw-style CSV (comment_text, toxic), balanced by label."""
    reader = csv.DictReader(io.StringIO(_read(path), newline=""))  # keeps newlines inside quoted comments
    missing = {"comment_text", "toxic"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(sorted(missing))}; the probe CSV needs comment_text and toxic")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for row in reader:
        text = (row["comment_text"] or "").strip()
        try:
            label = int(float(row["toxic"]) >= 0.5)
        except (TypeError, ValueError):
            continue
        if text:
            by_label[label].append(text)
    if not by_label[0] or not by_label[1]:
        raise DataError(f"{path} needs both toxic and non-toxic rows with text; found {len(by_label[1])} toxic, {len(by_label[0])} not")
    r = random.Random(seed)
    half = max_examples // 2
    picked = [(t, 1) for t in r.sample(by_label[1], min(half, len(by_label[1])))]
    picked += [(t, 0) for t in r.sample(by_label[0], min(max_examples - len(picked), len(by_label[0])))]
    r.shuffle(picked)
    return [t for t, _ in picked], [y for _, y in picked]


def load_prompts(path: Path, challenging_only: bool, max_prompts: int) -> list[str]:
    """Prompt texts from RealToxicityPrompts-style JSONL ({"prompt": {"text": ...}, "challenging": ...})."""
    prompts = []
    for row in _jsonl(path):
        prompt = row.get("prompt")
        text = prompt.get("text") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise DataError(f"{path}: a row has no prompt text; each line needs {{\"prompt\": {{\"text\": ...}}}}")
        if text.strip() and (row.get("challenging", False) or not challenging_only):
            prompts.append(text)
    if not prompts:
        raise DataError(f"{path} has no usable prompts" + (" flagged challenging; set [data] challenging_only = false" if challenging_only else ""))
    return prompts[:max_prompts]


# Lee et al.'s released pairs (data/toxicity_pairwise/*.jsonl): the unperturbed GPT-2 continuation is
# preferred, the PPLM-steered toxic one rejected; both may repeat the prompt in front.
LEE_FIELDS = {"prompt_text": "prompt", "unpert_gen_text": "chosen", "pert_gen_text": "rejected"}


def load_pairs(path: Path, max_pairs: int) -> list[dict]:
    """Preference pairs from JSONL with prompt, chosen, rejected (or Lee et al.'s prompt_text,
    unpert_gen_text, pert_gen_text)."""
    pairs = []
    for n, r in enumerate(_jsonl(path), 1):
        if set(LEE_FIELDS) <= set(r):
            r = {new: r[old] for old, new in LEE_FIELDS.items()}
            r.update({k: r[k][len(r["prompt"]):] for k in ("chosen", "rejected") if r[k].startswith(r["prompt"])})
        if not {"prompt", "chosen", "rejected"} <= set(r):
            raise DataError(f"{path} row {n} needs keys prompt, chosen, rejected (or prompt_text, unpert_gen_text, "
                            f"pert_gen_text); found {', '.join(sorted(r))}")
        if r["chosen"] and r["rejected"]:  # a pair with an empty side teaches nothing
            pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    if not pairs:
        raise DataError(f"{path} has no usable pairs (prompt, chosen, rejected all non-empty)")
    return pairs[:max_pairs]


def load_text(path: Path) -> list[str]:
    """Non-empty lines of a text file (WikiText-2 style: headings and blank lines are skipped)."""
    lines = [line.strip() for line in _read(path).splitlines()]
    lines = [line for line in lines if line and not line.startswith("=")]
    if not lines:
        raise DataError(f"{path} has no text lines")
    return lines
