"""The runner's caching: a rerun with nothing changed does nothing; changing one setting reruns that
stage and what depends on it, and nothing else. Uses three fake stages wired like real ones."""

import json
import types

import polars as pl
import pytest

import store
from pipeline import config, runner
from tests.conftest import tiny_config

CALLS: list[str] = []


def fake_stage(name: str, fail: bool = False, layers: bool = False):
    def run(out, *, device, **inputs):
        CALLS.append(name)
        if fail:
            raise KeyboardInterrupt
        (out / "value.txt").write_text(json.dumps({k: str(v) for k, v in inputs.items()}))
        return {"name": name}

    def tables(out):
        if not layers:
            return {}
        return {"layers": pl.DataFrame({"variant": [name], "layer": [0], "mlp_proj": [1.0]})}

    mod = types.ModuleType(f"fake_{name}")
    mod.run, mod.tables, mod.__file__ = run, tables, __file__
    return mod


@pytest.fixture
def fake_pipeline(monkeypatch, tmp_path):
    # a reads [world]; b reads [scorer] and a's result; c reads [model] only.
    monkeypatch.setattr(runner, "STAGES", (
        runner.Stage("a", fake_stage("a"), sections=("world",)),
        runner.Stage("b", fake_stage("b"), sections=("scorer",), deps=("a",)),
        runner.Stage("c", fake_stage("c"), sections=("model",)),
    ))
    monkeypatch.setattr(runner.world, "model_label", lambda cfg: "fake")
    CALLS.clear()
    return tmp_path


def cfg_with(tmp, **scorer):
    raw = {"run": {"cache_dir": str(tmp / "cache"), "store": str(tmp / "s.duckdb")},
           "world": {"seed": 1}, "scorer": {"batch_size": 8} | scorer}
    return config.from_dict(raw)


def test_rerun_with_nothing_changed_does_no_work(fake_pipeline):
    msgs = []
    first = runner.run(cfg_with(fake_pipeline), log=msgs.append)
    assert CALLS == ["a", "b", "c"]
    CALLS.clear()
    second = runner.run(cfg_with(fake_pipeline), log=msgs.append)
    assert CALLS == [] and second == first
    assert any("nothing changed" in m for m in msgs)
    assert store.connect(fake_pipeline / "s.duckdb").execute("SELECT count(*) FROM runs").fetchall()[0][0] == 1


def test_changing_one_setting_reruns_that_stage_and_its_dependents(fake_pipeline):
    runner.run(cfg_with(fake_pipeline), log=lambda *_: None)
    CALLS.clear()
    runner.run(cfg_with(fake_pipeline, batch_size=16), log=lambda *_: None)
    assert CALLS == ["b"]
    CALLS.clear()
    raw = {"run": {"cache_dir": str(fake_pipeline / "cache"), "store": str(fake_pipeline / "s.duckdb")},
           "world": {"seed": 2}, "scorer": {"batch_size": 16}}
    runner.run(config.from_dict(raw), log=lambda *_: None)
    assert CALLS == ["a", "b"]


def test_force_reruns_stage_and_dependents_only(fake_pipeline):
    runner.run(cfg_with(fake_pipeline), log=lambda *_: None)
    CALLS.clear()
    runner.run(cfg_with(fake_pipeline), force={"a"}, log=lambda *_: None)
    assert CALLS == ["a", "b"]


def test_only_runs_one_stage_and_needs_its_inputs(fake_pipeline):
    cfg = cfg_with(fake_pipeline)
    with pytest.raises(config.ConfigError, match="needs stage a cached"):
        runner.run(cfg, only="b", log=lambda *_: None)
    runner.run(cfg, only="a", log=lambda *_: None)
    CALLS.clear()
    assert runner.run(cfg, only="b", log=lambda *_: None) is None
    assert CALLS == ["b"]
    assert not (fake_pipeline / "s.duckdb").exists()


def test_unknown_stage_is_refused(fake_pipeline):
    with pytest.raises(config.ConfigError, match="no stage 'zz'.*a, b, c"):
        runner.run(cfg_with(fake_pipeline), force={"zz"}, log=lambda *_: None)


def test_interrupted_stage_leaves_nothing_cached_and_rerun_resumes(fake_pipeline, monkeypatch):
    stages = list(runner.STAGES)
    stages[1] = runner.Stage("b", fake_stage("b", fail=True), sections=("scorer",), deps=("a",))
    monkeypatch.setattr(runner, "STAGES", tuple(stages))
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg_with(fake_pipeline), log=lambda *_: None)
    assert not (fake_pipeline / "s.duckdb").exists()
    assert [r["state"] for r in runner.status(cfg_with(fake_pipeline))] == ["cached", "to run", "to run"]
    monkeypatch.setattr(runner, "STAGES", tuple(stages[:1]) + (
        runner.Stage("b", fake_stage("b"), sections=("scorer",), deps=("a",)), stages[2]))
    CALLS.clear()
    runner.run(cfg_with(fake_pipeline), log=lambda *_: None)
    assert CALLS == ["b", "c"]


def test_stage_receives_upstream_result_dirs(fake_pipeline):
    cfg = cfg_with(fake_pipeline)
    runner.run(cfg, log=lambda *_: None)
    keys = runner.cache_keys(cfg)
    got = json.loads((runner.stage_dir(cfg, "b", keys["b"]) / "value.txt").read_text())
    assert got["a_dir"] == str(runner.stage_dir(cfg, "a", keys["a"]))
    assert got["scorer"] == repr(cfg.scorer)


def test_real_world_rerun_is_cached_and_writes_no_second_run(tiny_run):
    cfg, run_id = tiny_run
    msgs = []
    assert runner.run(cfg, log=msgs.append) == run_id
    assert any("cached" in m for m in msgs) and any("nothing changed" in m for m in msgs)
    con = store.connect(cfg.run.store)
    assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 1
    world_key = con.execute("SELECT cache_key FROM stages WHERE run_id = ?", [run_id]).fetchall()[0][0]
    assert world_key == runner.cache_keys(cfg)["world"]


def test_world_key_depends_on_world_settings_not_run_name(tmp_path):
    base = runner.cache_keys(tiny_config(tmp_path))["world"]
    assert runner.cache_keys(tiny_config(tmp_path, seed=5))["world"] != base
    renamed = tiny_config(tmp_path)
    renamed.run.name = "other"
    assert runner.cache_keys(renamed)["world"] == base


def test_a_scorer_change_on_the_demo_world_rescores_and_builds_nothing_again(tmp_path):
    """The world generates no scored text that a later stage reads: only its pairs (scored by stage pairs) and the
    continuations (stage score) see the scorer. It used to key the world on [scorer], and every stage reran."""
    base = runner.cache_keys(tiny_config(tmp_path))
    cfg = tiny_config(tmp_path)
    cfg.scorer.backend = "perspective"
    after = runner.cache_keys(cfg)
    assert {s for s in base if base[s] != after[s]} == {"pairs", "score"}


def test_every_key_depends_on_the_package_versions(tmp_path, monkeypatch):
    """Raised pins (a new transformers, trl or better-profanity) make other results: every stage reruns, where all
    of them were reported cached and the store named versions that had not made them."""
    base = runner.cache_keys(tiny_config(tmp_path))
    versions = runner.package_versions()
    monkeypatch.setattr(runner, "package_versions", lambda: versions | {"trl": versions["trl"] + ".post1"})
    bumped = runner.cache_keys(tiny_config(tmp_path))
    assert set(base) == set(bumped) and all(base[s] != bumped[s] for s in base)


class Reads:
    """A config section that notes which of its fields are read."""

    def __init__(self, section):
        self.section, self.names = section, set()

    def __getattr__(self, name):
        self.names.add(name)
        return getattr(self.section, name)


def test_detox_reruns_on_every_intervene_setting_its_held_out_set_reads(tmp_path, tiny_gpt2):
    """detox measures with intervene.load_heldout: each [intervene] field that it reads, in either
    perplexity protocol and with f1_samples, is in detox's key, and changing it reruns detox."""
    from pipeline import intervene, models

    (tmp_path / "heldout.txt").write_text("the river runs past the old mill\nwe cooked rice with beans\n")
    (tmp_path / "samples.jsonl").write_text(json.dumps({"prompt": "the river", "gold": "the river runs"}) + "\n")
    bridge = models.load_bridge(str(tiny_gpt2), "cpu")
    read = set()
    for perplexity in ("passages", "stream"):
        section = Reads(config.InterveneConfig(perplexity=perplexity, perplexity_window=8))
        intervene.load_heldout(bridge, tmp_path / "heldout.txt", section, 2, tmp_path / "samples.jsonl")
        read |= section.names
    assert {"perplexity", "perplexity_window", "n_heldout", "f1_prompt_tokens"} <= read
    assert {f"intervene.{n}" for n in read} == set(intervene.HELDOUT_FIELDS)
    base = runner.cache_keys(tiny_config(tmp_path))
    for name in read:
        cfg = tiny_config(tmp_path)
        value = getattr(cfg.intervene, name)
        setattr(cfg.intervene, name, "stream" if name == "perplexity" else value + 1)
        assert "detox" in changed(base, runner.cache_keys(cfg)), name


def test_two_stages_may_write_rows_of_one_table(fake_pipeline, monkeypatch):
    monkeypatch.setattr(runner, "STAGES", (
        runner.Stage("a", fake_stage("a", layers=True), sections=("world",)),
        runner.Stage("b", fake_stage("b", layers=True), sections=("scorer",), deps=("a",)),
    ))
    run_id = runner.run(cfg_with(fake_pipeline), log=lambda *_: None)
    rows = store.connect(fake_pipeline / "s.duckdb").execute(
        "SELECT variant FROM layers WHERE run_id = ? ORDER BY variant", [run_id]).fetchall()
    assert rows == [("a",), ("b",)]


def real_model_config(tmp, **changes):
    """A real-model config over local files, as the paper's preset is: the real stage list computes its keys."""
    for name in ("probe.csv", "prompts.jsonl", "pairs.jsonl", "heldout.txt"):
        if not (tmp / name).exists():
            (tmp / name).write_text(f"contents of {name}\n")
    (tmp / "model").mkdir(exist_ok=True)
    if not (tmp / "model" / "model.safetensors").exists():
        (tmp / "model" / "model.safetensors").write_bytes(b"weights")
    raw = {"run": {"cache_dir": str(tmp / "cache"), "store": str(tmp / "s.duckdb")},
           "model": {"path": str(tmp / "model")},
           "data": {"probe": str(tmp / "probe.csv"), "prompts": str(tmp / "prompts.jsonl"),
                    "pairs": str(tmp / "pairs.jsonl"), "heldout": str(tmp / "heldout.txt")}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return config.from_dict(raw)


def changed(before: dict, after: dict) -> set[str]:
    return {s for s in before if before[s] != after[s]}


def test_loaded_pairs_and_dpo_ignore_inference_settings(tmp_path):
    base = runner.cache_keys(real_model_config(tmp_path))
    for setting in ({"model__dtype": "bfloat16"}, {"data__max_prompts": 7}, {"data__challenging_only": False},
                    {"pairs__k": 4}):
        after = runner.cache_keys(real_model_config(tmp_path, **setting))
        assert not {"pairs", "dpo"} & changed(base, after), setting
    assert changed(base, runner.cache_keys(real_model_config(tmp_path, model__dtype="bfloat16"))) >= {"probe", "record"}
    self_made = runner.cache_keys(real_model_config(tmp_path, data__pairs="self"))
    assert changed(self_made, runner.cache_keys(real_model_config(tmp_path, data__pairs="self", model__dtype="bfloat16"))) \
        >= {"pairs", "dpo"}


def test_settings_that_change_no_result_are_in_no_key(tmp_path):
    base = runner.cache_keys(real_model_config(tmp_path))
    for setting in ({"scorer__batch_size": 3}, {"scorer__rate_limit": 9.0}, {"scorer__max_retries": 0},
                    {"scorer__cache_dir": str(tmp_path / "answers")}, {"record__processes": 2}, {"run__device": "cpu"},
                    {"run__store": str(tmp_path / "other.duckdb")}, {"dpo__gradient_checkpointing": True},
                    {"scorer__detoxify_model": "unbiased"}, {"scorer__checkpoint": str(tmp_path / "model")}):  # backend not detoxify
        assert not changed(base, runner.cache_keys(real_model_config(tmp_path, **setting))), setting
    assert changed(base, runner.cache_keys(real_model_config(tmp_path, record__batch_size=3))) == {"record", "attribute",
                                                                                                  "intervene", "score"}
    for setting in ({"dpo__lr": 2e-5}, {"dpo__grad_accum": 4}, {"dpo__processes": 4}):  # the rest of [dpo] is keyed
        assert changed(base, runner.cache_keys(real_model_config(tmp_path, **setting))) == {"dpo", "record", "attribute",
                                                                                            "intervene", "score"}, setting


@pytest.mark.parametrize("section, setting, value, reruns", [
    ("record", "max_prompt_tokens", 32, {"record", "attribute", "intervene", "score"}),
    ("record", "eos_ends_text", True, {"record", "attribute", "intervene", "score"}),
    ("model", "bos", "tokenizer", {"probe", "dpo", "record", "attribute", "intervene", "score"}),  # loaded pairs: no text made
])
def test_how_texts_are_cut_and_read_reruns_every_stage_that_reads_them(tmp_path, section, setting, value, reruns):
    base = runner.cache_keys(real_model_config(tmp_path))
    assert changed(base, runner.cache_keys(real_model_config(tmp_path, **{f"{section}__{setting}": value}))) == reruns
    demo = tiny_config(tmp_path)
    setattr(getattr(demo, section), setting, value)
    assert "detox" in changed(runner.cache_keys(tiny_config(tmp_path)), runner.cache_keys(demo))


def test_a_scorer_change_rescores_without_generating_or_retraining(tmp_path):
    """Loaded pairs and the continuations are rescored; nothing is generated again and DPO is not retrained."""
    scorer = {"scorer__backend": "detoxify", "scorer__checkpoint": str(tmp_path / "model")}
    base = runner.cache_keys(real_model_config(tmp_path))
    assert changed(base, runner.cache_keys(real_model_config(tmp_path, **scorer))) == {"pairs", "score"}
    detoxify = runner.cache_keys(real_model_config(tmp_path, **scorer))
    assert changed(detoxify, runner.cache_keys(real_model_config(tmp_path, **scorer, scorer__detoxify_model="unbiased"))) \
        == {"pairs", "score"}
    self_made = runner.cache_keys(real_model_config(tmp_path, data__pairs="self"))
    assert changed(self_made, runner.cache_keys(real_model_config(tmp_path, data__pairs="self", **scorer))) \
        == {"pairs", "dpo", "record", "attribute", "intervene", "score"}  # the scorer picks which sample is chosen


@pytest.mark.parametrize("replaced, reruns", [
    ("pairs.jsonl", {"pairs", "dpo", "record", "attribute", "intervene", "score"}),
    ("probe.csv", {"probe", "record", "attribute", "intervene", "score"}),
    ("heldout.txt", {"intervene", "score"}),
    ("model/model.safetensors", {"probe", "dpo", "record", "attribute", "intervene", "score"}),  # loaded pairs read no model
])
def test_a_file_replaced_at_the_same_path_reruns_what_read_it(tmp_path, replaced, reruns):
    before = runner.cache_keys(real_model_config(tmp_path))
    (tmp_path / replaced).write_text("new contents, another length\n")
    assert changed(before, runner.cache_keys(real_model_config(tmp_path))) == reruns


def test_runs_name_a_local_model_by_its_absolute_path_and_a_hub_model_as_given(tmp_path, monkeypatch):
    """A relative folder ckpt@100 is stored as /.../ckpt@100, which Compare runs does not take for revision 100 of a
    hub model ckpt; a hub name pinned to a revision stays as written; the demo world is described."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt@100").mkdir()
    assert runner.model_label(config.from_dict({"model": {"path": "ckpt@100"}, "world": {}})) == str(tmp_path / "ckpt@100")
    assert runner.model_label(config.from_dict({"model": {"path": "acme/tiny@v2"}, "world": {}})) == "acme/tiny@v2"
    assert runner.model_label(config.from_dict({"world": {}})).startswith("demo world GPT-2")


def test_hidden_files_in_a_model_folder_rerun_nothing(tmp_path):
    """A model cloned from the hub with git keeps .git/ inside, which a fetch rewrites: no loader reads it."""
    before = runner.cache_keys(real_model_config(tmp_path))
    for hidden in (".git/FETCH_HEAD", ".cache/huggingface/download/model.safetensors.metadata", ".gitattributes"):
        (tmp_path / "model" / hidden).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "model" / hidden).write_text("touched\n")
    assert runner.cache_keys(real_model_config(tmp_path)) == before
    (tmp_path / "model" / "config.json").write_text("{}\n")
    assert "probe" in changed(before, runner.cache_keys(real_model_config(tmp_path)))


def test_an_edit_of_a_local_folder_given_as_hf_reruns_what_read_it(tmp_path):
    """hf:FOLDER (load_dataset on local data files) is stamped like a local file; a hub name is not."""
    (tmp_path / "rtp").mkdir()
    (tmp_path / "rtp" / "train.jsonl").write_text("first\n")
    before = runner.cache_keys(real_model_config(tmp_path, data__prompts=f"hf:{tmp_path / 'rtp'}"))
    (tmp_path / "rtp" / "train.jsonl").write_text("second, longer\n")
    after = runner.cache_keys(real_model_config(tmp_path, data__prompts=f"hf:{tmp_path / 'rtp'}"))
    assert changed(before, after) == {"record", "attribute", "intervene", "score"}  # loaded pairs read no prompts
    assert runner._fingerprint("hf:allenai/real-toxicity-prompts") == "hf:allenai/real-toxicity-prompts"
