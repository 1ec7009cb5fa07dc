"""Dataset loading: one loader per real format, used for the demo world's files and real ones alike.

'world' resolves to the file the world stage wrote in that format. Bad input (a missing file, a
missing column, nothing left after filtering) raises DataError with one line naming the file, the
problem and the fix.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import math
import random
import re
from pathlib import Path

from pipeline.config import ConfigError, hub_revision

HUB = "hf:"
# Version of the files from_hub writes: raised when a kind's file changes (2: heldout lines lost the
# trailing space each entry's newline left; 3: every probe field quoted), so a file an older version cached is
# written afresh
HUB_FORMAT = 3
WORLD_FILES = {"probe": "probe.csv", "prompts": "prompts.jsonl", "pairs": "pairs.jsonl", "heldout": "heldout.txt"}
_FROM_HUB: dict[Path, str] = {}  # file written by from_hub -> the hf: value it came from


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
    if path.is_dir():
        raise DataError(f"[data] {kind} = {value!r} is a folder; give the data file inside it")
    if not path.is_file():
        raise DataError(f"[data] {kind} file {path} not found; give an existing file or 'world'")
    return path


def stamp(path: Path) -> list:
    """[name within path, size, mtime] of a file, or of every file in a folder but hidden ones: a file replaced
    at the same path changes it. A model cloned with git keeps .git/ inside, which a fetch touches, and what
    transformers and load_dataset read is never hidden."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(path).parts)) if path.is_dir() else [path]
    return [[str(f.relative_to(path)) if path.is_dir() else "", f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def local_hub_folder(value: str) -> Path | None:
    """The local folder that an `hf:NAME` value names, where NAME is one (load_dataset reads it then)."""
    name = value[len(HUB):].split(":")[0] if value.startswith(HUB) else ""
    return Path(name) if name and Path(name).is_dir() else None


def from_hub(kind: str, value: str) -> Path:
    """`hf:NAME[@REVISION][:CONFIG[:SPLIT]]` (split default train, revision the newest), loaded with
    `datasets.load_dataset` and written once to a file in the format of `kind` under the datasets cache, so
    that one loader reads hub and local data alike. NAME may also be a local folder of data files, which
    is how the tests reach it."""
    import datasets

    name, config, split = (value[len(HUB):].split(":") + ["", ""])[:3]
    name, revision = hub_revision(name)
    if not name or revision == "":
        raise DataError(f"[data] {kind} = {value!r} names no dataset; write hf:NAME[@REVISION][:CONFIG[:SPLIT]]")
    # Named by what it holds: the readable part alone would give hf:a/b and hf:a_b one file, and a local
    # folder's file would outlive an edit of the folder.
    local = local_hub_folder(value)
    held = hashlib.sha256(json.dumps([kind, value, local and [str(local.resolve()), stamp(local)]]).encode()).hexdigest()[:12]
    out = Path(datasets.config.HF_DATASETS_CACHE) / "dpo-neurons" / f"v{HUB_FORMAT}" / (
        re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}_{config}_{split or 'train'}_{held}") + Path(WORLD_FILES[kind]).suffix)
    _FROM_HUB[out] = value
    if out.is_file():
        return out
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", revision=revision)
    except Exception as e:  # the hub raises many types: offline, gated, unknown name or split
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"[data] {kind} = {value!r} could not be loaded ({first}); "
                        "give a local file, or run once where the hub is reachable") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".partial")
    if kind == "heldout":
        if "text" not in ds.column_names:
            raise DataError(f"[data] heldout = {value!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
        # one line per entry, its closing newline dropped, so that load_entries gives the entries back
        tmp.write_text("".join(t.removesuffix("\n").replace("\n", " ") + "\n" for t in ds["text"]), encoding="utf-8")
    elif kind == "probe":
        # pandas quotes a field with a newline but not one with a lone carriage return, which ends a CSV row
        ds.to_csv(str(tmp), index=False, quoting=csv.QUOTE_ALL)
    else:
        ds.to_json(str(tmp), lines=True, force_ascii=False)
    tmp.rename(out)
    return out


def _name(path: Path) -> str:
    """A data file as errors name it: a hub dataset by its hf: value, whose file the user never wrote."""
    return f"{_FROM_HUB[path]} (cached as {path})" if path in _FROM_HUB else str(path)


def model_path(value: str, world_dir: Path | None) -> str:
    """The base model: the world's checkpoint folder, or a hub name / local path as given."""
    if value == "world":
        if world_dir is None:
            raise DataError("[model] path = 'world' but this config builds no world; add a [world] section")
        return str(Path(world_dir) / "model")
    return value


def _read(path: Path) -> str:
    """The file's text: UTF-8, with or without the byte-order mark that Excel and Windows tools write;
    gzip-, bzip2- and xz-compressed files (.jsonl.gz as datasets are shipped) are read through."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{_name(path)} is a damaged gzip file ({e}); download it again") from None
    elif raw[:3] == b"BZh":
        try:
            raw = bz2.decompress(raw)
        except (OSError, ValueError) as e:
            raise DataError(f"{_name(path)} is a damaged bzip2 file ({e}); download it again") from None
    elif raw[:6] == b"\xfd7zXZ\x00":
        try:
            raw = lzma.decompress(raw)
        except lzma.LZMAError as e:
            raise DataError(f"{_name(path)} is a damaged xz file ({e}); download it again") from None
    elif raw[:4] == b"\x28\xb5\x2f\xfd":
        raise DataError(f"{_name(path)} is zstd-compressed; decompress it (zstd -d) and give the file inside")
    elif raw[:4] == b"PAR1":
        raise DataError(f"{_name(path)} is a Parquet file; write it out as CSV or JSONL (polars: "
                        "pl.read_parquet(path).write_csv(...) or .write_ndjson(...)), or give its hub dataset as hf:NAME")
    elif raw[:4] == b"PK\x03\x04" and b"[Content_Types].xml" in raw[:4096]:
        raise DataError(f"{_name(path)} is an Excel or other Office file; save it as CSV (UTF-8) and give that")
    elif raw[:4] == b"PK\x03\x04":
        raise DataError(f"{_name(path)} is a zip archive; unzip it and give the file inside")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{_name(path)} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None


def _lines(text: str) -> list[str]:
    # split on "\n" only: splitlines() also breaks at U+2028/U+2029/U+0085, which hub datasets write unescaped
    return [line.removesuffix("\r") for line in text.split("\n")]


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line."""
    rows = []
    for n, line in enumerate(_lines(_read(path)), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                hint = " (a JSON array converts to JSONL with jq -c '.[]')" if n == 1 and line.lstrip().startswith("[") else ""
                raise DataError(f"{_name(path)} line {n} is not valid JSON; fix or remove that line{hint}") from None
            if not isinstance(row, dict):
                raise DataError(f"{_name(path)} line {n} is a JSON {type(row).__name__}, not an object; JSONL needs one "
                                "object per line (a JSON array converts with jq -c '.[]')")
            rows.append((n, row))
    return rows


_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0", ""}


def _label(value: str) -> int | None:
    """0/1 from a label cell: 0/1, a probability in [0, 1] (>= 0.5 is toxic), or true/false/yes/no;
    None for an empty cell (an unlabelled row)."""
    text = (value or "").strip().lower()
    if not text:
        return None
    if text in ("true", "yes"):
        return 1
    if text in ("false", "no"):
        return 0
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not 0.0 <= x <= 1.0:  # NaN too
        raise ValueError(value)
    return int(x >= 0.5)


def load_probe(path: Path, max_examples: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels from a Jigsaw-style CSV (comment_text, toxic), balanced by label."""
    reader = csv.DictReader(io.StringIO(_read(path), newline=""))  # keeps newlines inside quoted comments
    missing = {"comment_text", "toxic"} - set(reader.fieldnames or [])
    if missing:
        found = ", ".join(reader.fieldnames or []) or "nothing"
        hint = "; Jigsaw's unintended-bias file calls it target: rename that column" if "target" in (reader.fieldnames or []) else ""
        raise DataError(f"{_name(path)} lacks column(s) {', '.join(sorted(missing))} (found: {found[:200]}); the probe CSV needs "
                        f"comma-separated comment_text and toxic{hint}")
    twice = sorted({c for c in ("comment_text", "toxic") if reader.fieldnames.count(c) > 1})
    if twice:  # DictReader would silently read the last of them
        raise DataError(f"{_name(path)} has {' and '.join(twice)} more than once in its header; keep one column of each name")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    try:
        for row in reader:
            text = (row["comment_text"] or "").strip()
            try:
                label = _label(row["toxic"])
            except ValueError:
                raise DataError(f"{_name(path)} line {reader.line_num}: toxic = {row['toxic']!r} is not a label; give 0/1, "
                                "a probability in [0, 1] or true/false") from None
            if text and label is not None:
                by_label[label].append(text)
    except csv.Error as e:  # an unbalanced quote swallows the rest of the file into one field
        raise DataError(f"{_name(path)} line {reader.line_num} is not valid CSV ({e}); look for an unbalanced quote") from None
    if len(by_label[0]) < 2 or len(by_label[1]) < 2:
        raise DataError(f"{_name(path)} needs at least two toxic and two non-toxic rows with text, to train and validate the "
                        f"probe; found {len(by_label[1])} toxic, {len(by_label[0])} not")
    r = random.Random(seed)
    half = max_examples // 2
    picked = [(t, 1) for t in r.sample(by_label[1], min(half, len(by_label[1])))]
    picked += [(t, 0) for t in r.sample(by_label[0], min(max_examples - len(picked), len(by_label[0])))]
    r.shuffle(picked)
    return [t for t, _ in picked], [y for _, y in picked]


def load_prompts(path: Path, challenging_only: bool, max_prompts: int) -> list[str]:
    """Prompt texts from RealToxicityPrompts-style JSONL ({"prompt": {"text": ...}, "challenging": ...})."""
    prompts, unflagged, empty = [], 0, 0
    for n, row in _jsonl(path):
        prompt = row.get("prompt")
        text = prompt.get("text") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise DataError(f"{_name(path)} line {n} has no prompt text; each line needs {{\"prompt\": {{\"text\": ...}}}}")
        challenging = row.get("challenging")
        if isinstance(challenging, str) and challenging.strip().lower() in _TRUE | _FALSE:
            challenging = challenging.strip().lower() in _TRUE
        if challenging not in (None, True, False, 0, 1):
            raise DataError(f"{_name(path)} line {n}: challenging = {challenging!r}; give true, false or leave it out")
        if not text.strip():
            empty += 1
        elif challenging or not challenging_only:
            prompts.append(text)
        else:
            unflagged += 1
    if not prompts:
        if unflagged:
            raise DataError(f"{_name(path)} has no usable prompts flagged challenging ({unflagged} without the flag); set [data] "
                            "challenging_only = false, or flag them \"challenging\": true")
        raise DataError(f"{_name(path)} has no usable prompts ({f'all {empty} are empty' if empty else 'it holds none'}); "
                        "each line needs {\"prompt\": {\"text\": ...}} with non-empty text")
    return prompts[:max_prompts]


# Lee et al.'s released pairs (data/toxicity_pairwise/*.jsonl): the unperturbed GPT-2 continuation is
# preferred, the PPLM-steered toxic one rejected; both may repeat the prompt in front.
LEE_FIELDS = {"prompt_text": "prompt", "unpert_gen_text": "chosen", "pert_gen_text": "rejected"}


def load_pairs(path: Path, max_pairs: int) -> list[dict]:
    """Preference pairs from JSONL with prompt, chosen, rejected (or Lee et al.'s prompt_text,
    unpert_gen_text, pert_gen_text)."""
    pairs = []
    for n, r in _jsonl(path):
        lee = set(LEE_FIELDS) <= set(r)
        if lee:
            r = {new: r[old] for old, new in LEE_FIELDS.items()}
        if not {"prompt", "chosen", "rejected"} <= set(r):
            raise DataError(f"{_name(path)} line {n} needs keys prompt, chosen, rejected (or prompt_text, unpert_gen_text, "
                            f"pert_gen_text); found {', '.join(sorted(r))}")
        wrong = [k for k in ("prompt", "chosen", "rejected") if not isinstance(r[k], str)]
        if wrong:
            raise DataError(f"{_name(path)} line {n}: {', '.join(wrong)} must be text, not {type(r[wrong[0]]).__name__} (chat "
                            "messages included); write each as one string")
        if lee:
            r.update({k: r[k][len(r["prompt"]):] for k in ("chosen", "rejected") if r[k].startswith(r["prompt"])})
        # a pair with an empty side, or the same text on both, teaches nothing
        if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]:
            pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    if not pairs:
        raise DataError(f"{_name(path)} has no usable pairs (prompt, chosen, rejected non-empty, chosen != rejected)")
    return pairs[:max_pairs]


def load_f1_samples(path: Path) -> list[tuple[str, str]]:
    """(prompt, gold) of every line of a JSONL in Lee et al.'s wiki_samples.jsonl format ({"prompt": ..., "gold": ...}).
    An empty one is refused rather than skipped: the reference code scores every line."""
    samples = []
    for n, r in _jsonl(path):
        if not {"prompt", "gold"} <= set(r):
            raise DataError(f"{_name(path)} line {n} needs keys prompt and gold (Lee et al.'s wiki_samples.jsonl); found "
                            f"{', '.join(sorted(r)) or 'none'}")
        for key in ("prompt", "gold"):
            if not isinstance(r[key], str) or not r[key].strip():
                raise DataError(f"{_name(path)} line {n}: {key} is {'empty' if isinstance(r[key], str) else type(r[key]).__name__}; "
                                "give it as non-empty text or remove that line")
        samples.append((r["prompt"], r["gold"]))
    if not samples:
        raise DataError(f"{_name(path)} has no F1 samples; each line needs {{\"prompt\": ..., \"gold\": ...}}")
    return samples


def _not_jsonl(path: Path, lines: list[str]) -> None:
    """Refuses a JSONL given as plain text (Lee et al.'s wiki_samples.jsonl as [data] heldout, say): its JSON
    lines would be scored as passages."""
    rows = [line for line in lines if line.strip()]
    if not rows or not rows[0].lstrip().startswith("{"):
        return
    for line in rows:
        try:
            if not isinstance(json.loads(line), dict):
                return
        except json.JSONDecodeError:
            return
    raise DataError(f"{_name(path)} is JSONL, but [data] heldout is plain text, one passage per line (WikiText-2); a "
                    "JSONL of {prompt, gold} goes in [data] f1_samples")


def load_entries(path: Path) -> list[str]:
    """The file's lines as WikiText-2's hub entries are, for the reference code's perplexity text
    ("\n\n".join of them): a line with text keeps its newline, a blank line is empty, headings stay."""
    lines = _lines(_read(path))
    _not_jsonl(path, lines)
    if lines and lines[-1] == "":  # the newline that ends the file ends the last line
        lines.pop()
    entries = [line + "\n" if line.strip() else "" for line in lines]
    if not any(entries):
        raise DataError(f"{_name(path)} has no text lines")
    return entries


def load_text(path: Path) -> list[str]:
    """Non-empty lines of a text file (WikiText-2 style: headings, " = Title = ", and blank lines are skipped)."""
    lines = [line.strip() for line in _lines(_read(path))]
    _not_jsonl(path, lines)
    lines = [line for line in lines if line and not (line.startswith("=") and line.endswith("="))]
    if not lines:
        raise DataError(f"{_name(path)} has no text lines")
    return lines
