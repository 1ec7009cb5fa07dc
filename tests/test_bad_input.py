"""Bad input through the command line: each case exits non-zero with one line that names the problem
and the fix, and the store that was there before is byte-for-byte the same afterwards. (Config typos:
tests/test_config.py; loaders on their own: tests/test_data.py; prompts longer than the context:
tests/test_record.py.)"""

import errno
import hashlib
import json
import re
import subprocess
import sys
import types

import duckdb
import polars as pl
import pytest

import store
from pipeline import config, runner
from pipeline.__main__ import main


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gens(n):
    return pl.DataFrame({"variant": ["base"] * n, "prompt_id": list(range(n)), "prompt": ["p"] * n,
                         "continuation": ["c"] * n, "toxicity": [0.5] * n, "scorer": ["s==1"] * n})


def a_store(path, n=20):
    return store.write_run(path, run={"name": "prior", "model": "m", "config": {}, "config_hash": "h", "packages": {}},
                           stages=[], tables={"generations": gens(n)})


def toml(path, sections: dict) -> str:
    lines = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cli(args, capsys) -> tuple[int, str]:
    """Exit code and the error line, which must be one line and the last thing printed (progress bars
    of stages that ran before may precede it)."""
    code = main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) <= 1 and (not errors or lines[-1] == errors[0]), lines
    return code, lines[-1] if lines else ""


def world_config(tmp_path, store_path):
    return toml(tmp_path / "c.toml", {"run": {"store": str(store_path), "cache_dir": str(tmp_path / "cache")},
                                      "world": {}})


def truncated(path):
    a_store(path, n=20_000)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 10])


def older_schema(path, monkeypatch):
    a_store(path)  # written with the current schema version; the code below reads the next one
    monkeypatch.setattr(store, "SCHEMA_VERSION", store.SCHEMA_VERSION + 1)


@pytest.mark.parametrize("case, pieces", [
    ("corrupt", ["cannot be opened", "corrupt"]),
    ("truncated", ["cannot be opened", "restore it"]),
    ("older_schema", ["older dpo-neurons", f"schema version {store.SCHEMA_VERSION}", "new store file"]),
    ("locked", ["is open for writing in another process (PID ", "read_only=True"]),
])
def test_unreadable_store_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch, request, case, pieces):
    """locked: a notebook's duckdb.connect(path) opens the store read-write, which locks it; that is not a corrupt file."""
    path = tmp_path / "s.duckdb"
    if case == "corrupt":
        path.write_bytes(b"not a database" * 500)
    elif case == "truncated":
        truncated(path)
    elif case == "locked":
        a_store(path)
        holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(path)!r}); "
                                   "print('open', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "open\n"
        request.addfinalizer(holder.kill)
    else:
        older_schema(path, monkeypatch)
    before = digest(path)
    code, err = cli(["run", "--config", world_config(tmp_path, path)], capsys)
    assert code == 2 and err.startswith("error: ") and str(path) in err
    assert all(p in err for p in pieces), err
    assert not (tmp_path / "cache").exists(), "a stage ran before the store was checked"
    code, err = cli(["export", "--run", "x", "--store", str(path), "--out", str(tmp_path / "share.duckdb")], capsys)
    assert code == 2 and all(p in err for p in pieces)
    assert digest(path) == before and not (tmp_path / "share.duckdb").exists()


def probe_csv(path, rows=40, header="comment_text,toxic", encoding="utf-8"):
    body = "".join(f"sentence number {i} is {'awful' if i % 2 else 'fine'},{i % 2}\n" for i in range(rows))
    path.write_bytes((header + "\n" + body).encode(encoding))
    return str(path)


def prompts_jsonl(path, challenging):
    path.write_text("".join(json.dumps({"prompt": {"text": f"prompt {i}"}, "challenging": challenging}) + "\n"
                            for i in range(5)))
    return str(path)


def real_data(tmp_path) -> dict:
    """[data] of a run on local files in the real formats; pairs self-generated."""
    (tmp_path / "heldout.txt").write_text("".join(f"Passage number {i} is about the weather.\n" for i in range(5)))
    return {"probe": probe_csv(tmp_path / "probe.csv"), "prompts": prompts_jsonl(tmp_path / "p.jsonl", True),
            "pairs": "self", "heldout": str(tmp_path / "heldout.txt")}


def unsupported_checkpoint(path, tokenizer_from) -> str:
    """A tiny CTRL, an architecture transformers knows and TransformerLens' bridge does not."""
    from transformers import AutoTokenizer, CTRLConfig, CTRLLMHeadModel

    CTRLLMHeadModel(CTRLConfig(vocab_size=400, n_embd=16, n_layer=1, n_head=2, dff=32, n_positions=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("bos", ["transformerlens", "tokenizer"])
def test_an_unsupported_architecture_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch, tiny_gpt2, bos):
    """DPO, self-generated pairs and the experts train through transformers, which loads the model; with
    --only dpo, or [model] bos = tokenizer (no BOS question asked of TransformerLens), nothing else would
    notice before DPO had trained it and record failed."""
    monkeypatch.chdir(tmp_path)
    data = real_data(tmp_path)
    path = unsupported_checkpoint(tmp_path / "ctrl", tiny_gpt2)
    refused_before_any_stage(tmp_path, capsys, {"run": {"device": "cpu"}, "model": {"path": path, "bos": bos}, "data": data},
                             {}, [f"model '{path}' has an architecture that TransformerLens' bridge does not support"])


def test_stages_that_train_through_transformers_ask_the_bridge_about_bos(tmp_path, tiny_gpt2):
    """Called on its own (a notebook), bos_prefix refuses an unsupported architecture in one line too."""
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.data import DataError
    from pipeline.models import bos_prefix

    path = unsupported_checkpoint(tmp_path / "ctrl", tiny_gpt2)
    with pytest.raises(DataError, match="architecture that TransformerLens' bridge does not support") as e:
        bos_prefix(AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case, pieces", [
    ("missing_column", ["lacks column(s) toxic", "found: comment_text, label", "needs comma-separated comment_text and toxic"]),
    ("non_utf8", ["is not UTF-8", "re-encode it as UTF-8"]),
    ("no_model", ["could not be loaded", "local HF checkpoint"]),
    ("unsupported_model", ["architecture that TransformerLens' bridge does not support", "choose a model"]),
    ("empty_prompts", ["no usable prompts", "challenging_only = false"]),
])
def test_bad_dataset_or_model_exits_with_one_line_and_store_intact(tmp_path, capsys, tiny_gpt2, case, pieces):
    path = tmp_path / "s.duckdb"
    a_store(path)
    before = digest(path)
    data = real_data(tmp_path)
    model = str(tiny_gpt2)
    if case == "missing_column":
        data["probe"] = probe_csv(tmp_path / "bad.csv", header="comment_text,label")
    elif case == "non_utf8":
        (tmp_path / "latin.csv").write_bytes("comment_text,toxic\ncaf\u00e9 cr\u00e8me,1\n".encode("latin-1"))
        data["probe"] = str(tmp_path / "latin.csv")
    elif case == "no_model":
        model = str(tmp_path / "no-such-model")
    elif case == "unsupported_model":
        model = unsupported_checkpoint(tmp_path / "ctrl", tiny_gpt2)
    else:
        data["prompts"] = prompts_jsonl(tmp_path / "p.jsonl", False)
    cfg = toml(tmp_path / "c.toml", {"run": {"store": str(path), "cache_dir": str(tmp_path / "cache"), "device": "cpu"},
                                     "model": {"path": model}, "data": data, "probe": {"max_examples": 40}})
    code, err = cli(["run", "--config", cfg], capsys)
    assert code == 2 and err.startswith("error: ")
    assert all(p in err for p in pieces), err
    assert digest(path) == before


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["copy", "duckdb", "swap"])
def test_disk_full_during_a_write_leaves_the_store_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "s.duckdb"
    a_store(path)
    before = digest(path)
    if where == "copy":
        monkeypatch.setattr(store.shutil, "copyfile", enospc)
    elif where == "duckdb":  # DuckDB reports a full disk as an IO error of its own
        def insert(con, *args):
            raise duckdb.IOException('Could not write file "s.duckdb.tmp": No space left on device')
        monkeypatch.setattr(store, "_insert", insert)
    else:
        monkeypatch.setattr(store.os, "replace", enospc)
    with pytest.raises(store.StoreError) as e:
        a_store(path)
    assert "the disk is full; free space and rerun" in str(e.value) and "unchanged" in str(e.value)
    assert "\n" not in str(e.value)
    assert digest(path) == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_disk_full_during_export_exits_two_and_writes_nothing(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.duckdb"
    run_id = a_store(path)
    monkeypatch.setattr(store.os, "replace", enospc)
    code, err = cli(["export", "--run", run_id, "--store", str(path), "--out", str(tmp_path / "share.duckdb")], capsys)
    assert code == 2 and "disk is full" in err
    assert [p.name for p in tmp_path.iterdir() if "share" in p.name] == []


def test_disk_full_inside_a_stage_exits_two_with_the_store_intact(tmp_path, capsys, monkeypatch):
    path = tmp_path / "s.duckdb"
    a_store(path)
    before = digest(path)
    fake = types.ModuleType("fake_world")
    fake.run, fake.tables, fake.__file__ = enospc, lambda out: {}, __file__
    monkeypatch.setattr(runner, "STAGES", (runner.Stage("world", fake, sections=("world",)),))
    code, err = cli(["run", "--config", world_config(tmp_path, path)], capsys)
    assert code == 2 and "disk is full" in err and "free space and rerun" in err
    assert digest(path) == before


def test_permission_denied_inside_a_stage_is_one_line_with_the_store_intact(tmp_path, capsys, monkeypatch):
    """A data file of another user, or a .cache made by a container running as root: not a traceback."""
    path = tmp_path / "s.duckdb"
    a_store(path)
    before = digest(path)

    def denied(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/train.csv")

    fake = types.ModuleType("fake_world")
    fake.run, fake.tables, fake.__file__ = denied, lambda out: {}, __file__
    monkeypatch.setattr(runner, "STAGES", (runner.Stage("world", fake, sections=("world",)),))
    code, err = cli(["run", "--config", world_config(tmp_path, path)], capsys)
    assert code == 2 and err.startswith("error: permission denied on /data/train.csv; give this user access"), err
    assert digest(path) == before


@pytest.mark.parametrize("section, pieces", [
    ({"run": {"device": "cuda"}}, ["device = 'cuda'", "no CUDA GPU", "'auto' or 'cpu'"]),
    ({"dpo": {"optimizer": "rmsprp"}}, ["optimizer 'rmsprp' is unknown", "rmsprop"]),
])
def test_missing_gpu_or_unknown_optimizer_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch, section, pieces):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the same on a machine that has a GPU
    refused_before_any_stage(tmp_path, capsys, {"world": {}}, section, pieces)


def test_several_gpus_in_one_process_are_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    """trl refuses to train on the DataParallel that transformers builds when one process sees several GPUs:
    the README's one-GPU command on a machine with more would fail at DPO, after the probe."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    refused_before_any_stage(tmp_path, capsys, {"world": {}}, {},
                             ["stage dpo trains with trl", "sees 2", "accelerate launch", "CUDA_VISIBLE_DEVICES=0"])


def test_a_dpo_for_several_processes_is_not_trained_by_one(tmp_path, capsys, monkeypatch):
    """processes x batch_size pairs a step: one process would train a DPO with a quarter of the pairs a step."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    refused_before_any_stage(tmp_path, capsys, {"world": {}}, {"dpo": {"processes": 4}},
                             ["[dpo] processes = 4", "would train DPO in one process", "accelerate launch --num_processes 4",
                              "--only dpo"])


def test_a_launch_with_another_number_of_processes_than_dpo_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config.load(toml(tmp_path / "c.toml", {"run": {"cache_dir": str(tmp_path / "cache")}, "world": {}}))
    with pytest.raises(config.ConfigError, match=re.escape("runs 2 processes but [dpo] processes = 1: add --set dpo.processes=2")):
        runner.run(cfg, only="dpo", log=lambda *_: None)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("env, pieces", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["asks for bf16 mixed precision", "trains in float32", "--mixed_precision no"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["shards the model with DeepSpeed", "--multi_gpu"]),
    ({"ACCELERATE_USE_FSDP": "True"}, ["shards the model with FSDP", "--multi_gpu"]),
])
def test_an_accelerate_config_that_changes_how_dpo_trains_is_refused(tmp_path, capsys, monkeypatch, env, pieces):
    """accelerate launch passes its saved config to the Trainer through the environment: DPO would train in
    bf16 under an unchanged cache key, or rank 0 would save a shard of the weights."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused_before_any_stage(tmp_path, capsys, {"world": {}}, {}, pieces)


def test_experts_on_several_gpus_in_one_process_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = config.load(toml(tmp_path / "c.toml", {"world": {}, "experts": {}}))
    with pytest.raises(config.ConfigError, match="stage experts trains with trl.*sees 4: run it with CUDA_VISIBLE_DEVICES=0"):
        runner._check_training(cfg, ["experts"])


@pytest.mark.parametrize("change, pieces", [
    ({"run": {"store": "folder"}}, ["[run] store folder is a folder", "folder/dpo_neurons.duckdb"]),
    ({"run": {"store": "a-file/s.duckdb"}}, ["[run] store a-file/s.duckdb: its folder cannot be made", "writable path"]),
    ({"run": {"cache_dir": "a-file"}}, ["[run] cache_dir a-file is a file; give a folder"]),
])
def test_a_store_or_cache_path_that_cannot_be_written_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch,
                                                                                      change, pieces):
    """A store path in no folder failed when the run was written, after every stage."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("")
    refused_before_any_stage(tmp_path, capsys, {"world": {}}, change, pieces)


def refused_before_any_stage(tmp_path, capsys, sections: dict, change: dict, pieces: list[str]) -> None:
    """`run` on sections with change merged in exits 2 with one error line naming pieces, before any
    stage ran and with the store as it was."""
    path = tmp_path / "s.duckdb"
    a_store(path)
    before = digest(path)
    sections = {**sections, "run": {"store": str(path), "cache_dir": str(tmp_path / "cache"), **sections.get("run", {})}}
    for name, body in change.items():
        sections[name] = {**sections.get(name, {}), **body}
    code, err = cli(["run", "--config", toml(tmp_path / "c.toml", sections)], capsys)
    assert code == 2 and err.startswith("error: ") and all(p in err for p in pieces), err
    assert not (tmp_path / "cache").exists(), "a stage ran before the check"
    assert digest(path) == before


@pytest.mark.parametrize("change, pieces", [
    ({"data": {"pairs": "missing-pairs.jsonl"}}, ["[data] pairs file missing-pairs.jsonl not found"]),
    ({"data": {"heldout": "missing.txt"}}, ["[data] heldout file missing.txt not found"]),
    ({"data": {"f1_samples": "wiki_samples.jsonl"}}, ["[data] f1_samples file wiki_samples.jsonl not found"]),
    ({"data": {"f1_samples": "p.jsonl"}}, ["p.jsonl line 1 needs keys prompt and gold"]),
    ({"scorer": {"backend": "perspective"}}, ["PERSPECTIVE_API_KEY", "set it"]),
    ({"scorer": {"backend": "detoxify", "checkpoint": "no.ckpt"}}, ["checkpoint 'no.ckpt' is not a file"]),
    ({"data": {"pairs": "p.jsonl"}}, ["p.jsonl line 1 needs keys prompt, chosen, rejected"]),
    ({"data": {"prompts": "unflagged.jsonl"}}, ["no usable prompts flagged challenging (5 without the flag)",
                                                "challenging_only = false"]),
    ({"data": {"heldout": "p.jsonl"}}, ["p.jsonl is JSONL, but [data] heldout is plain text", "[data] f1_samples"]),
    ({"model": {"path": "no-tokenizer"}}, ["model no-tokenizer has no tokenizer files", "tokenizer.save_pretrained"]),
])
def test_a_missing_or_unreadable_input_of_a_later_stage_is_refused_before_any_stage_runs(tmp_path, capsys, monkeypatch,
                                                                                         tiny_gpt2, change, pieces):
    """Probe would run for hours on a real model before pairs, record or intervene found these. A checkpoint saved
    without its tokenizer loads an empty one that tokenizes every text to nothing, and the run went on."""
    import shutil

    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    data = real_data(tmp_path)
    prompts_jsonl(tmp_path / "unflagged.jsonl", False)
    (tmp_path / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2 / name, tmp_path / "no-tokenizer")
    refused_before_any_stage(tmp_path, capsys, {"run": {"device": "cpu"}, "model": {"path": str(tiny_gpt2)}, "data": data},
                             change, pieces)


def test_a_hub_dataset_of_a_later_stage_is_fetched_before_any_stage_runs(tmp_path, capsys, monkeypatch, tiny_gpt2):
    """A wrong hf: split or name of the held-out text fails now, not after probe, pairs, DPO and record."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    data = {"probe": probe_csv(tmp_path / "probe.csv"), "prompts": prompts_jsonl(tmp_path / "p.jsonl", True),
            "pairs": "self", "heldout": "hf:no-such-owner/no-such-dataset::test"}
    refused_before_any_stage(tmp_path, capsys, {"run": {"device": "cpu"}, "model": {"path": str(tiny_gpt2)}, "data": data},
                             {}, ["[data] heldout = 'hf:no-such-owner/no-such-dataset::test' could not be loaded"])
