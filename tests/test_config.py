import dataclasses
import re
from pathlib import Path

import pytest

from pipeline import config
from pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_demo_config_loads():
    cfg = config.load(ROOT / "configs" / "demo.toml")
    assert cfg.model.path == "world" and cfg.world is not None


@pytest.mark.parametrize("text, pieces", [
    ("[world]\nn_layerz = 3\n", ["c.toml", "[world] n_layerz", "did you mean n_layer"]),
    ("[wrld]\nseed = 1\n", ["c.toml", "unknown section [wrld]", "did you mean world"]),
    ("[world]\nn_layer = 'four'\n", ["c.toml", "[world] n_layer", "must be an integer"]),
    ("[world]\nlr = true\n", ["[world] lr", "must be a number"]),
    ("[run]\ndevice = 'tpu'\n[world]\n", ["[run]", "device must be auto, cpu or cuda"]),
    ("[world]\nd_model = 130\nn_head = 4\n", ["d_model (130) must be divisible by n_head (4)"]),
    ("[model]\npath = 'world'\n", ["needs a [world] section"]),
    ("[world\nseed = 1\n", ["c.toml", "not valid TOML"]),
    ("[scorer]\nbackend = 'perspektive'\n[world]\n", ["[scorer] backend must be one of", "perspective"]),
    ("[dpo]\nbeta = -1.0\n[world]\n", ["[dpo] beta, lr and epochs must be positive"]),
    ("[dpo]\nbatch_size = 0\n[world]\n", ["[dpo] batch_size must be at least 1"]),
    ("[dpo]\nlr_scheduler = 'constant_warmup'\n[world]\n", ["[dpo] lr_scheduler must be one of", "constant_with_warmup"]),
    ("[dpo]\nlr_scheduler = 'constant'\nwarmup_steps = 150\n[world]\n", ["takes no warmup_steps", "constant_with_warmup"]),
    ("[attribute]\nn_bootstrap = 0\n[world]\n", ["[attribute] n_bootstrap must be at least 1"]),
    ("[intervene]\nn_heldout = 0\n[world]\n", ["[intervene] n_heldout must be at least 1"]),
    ("[intervene]\nperplexity = 'windows'\n[world]\n", ["[intervene] perplexity must be passages or stream"]),
    ("[intervene]\nperplexity_window = 1\n[world]\n", ["[intervene] perplexity_window must be at least 2"]),
    ("[intervene]\nperplexity_windows = -1\n[world]\n", ["[intervene] perplexity_windows must be 0 (all)"]),
    ("[pairs]\ntemperature = 0.0\n[world]\n", ["[pairs] temperature must be positive"]),
    ("[probe]\nmax_examples = 1\n[world]\n", ["[probe] max_examples must be at least 4"]),
    ("[world]\ntoxic_fraction = 0.6\n", ["[world]", "toxic_fraction must lie above 0 and at most 0.44"]),
    ("[detox]\nalpha = [1.0, 1.0000001]\n[world]\n", ["[detox] alpha values must differ", "poe_1, poe_1"]),  # one store row each
    ("[dpo]\nlr = nan\n[world]\n", ["[dpo] lr must be a finite number", "nan"]),  # passes lr <= 0, trains to NaN
    ("[scorer]\nrate_limit = inf\n[world]\n", ["[scorer] rate_limit must be a finite number"]),
    ("[detox]\nalpha = [1.0, -inf]\n[world]\n", ["[detox] alpha[1] must be a finite number"]),
    ("[world]\nn_head = 0\n", ["[world] n_head must be at least 1"]),
    ("[world]\nlr = -0.001\n", ["[world] lr must be positive"]),  # AdamW refused it after the corpus was built
    ("[probe]\nseed = -1\n[world]\n", ["[probe] seed must lie in 0 .. 2**32 - 1, got -1"]),  # numpy refused it mid-stage
    ("[dpo]\nseed = 4294967296\n[world]\n", ["[dpo] seed must lie in 0 .. 2**32 - 1"]),
    ("[data]\nheldout = 'self'\n[world]\n", ["[data] heldout = 'self' is for [data] pairs only"]),
    ("[experts]\nmax_examples = 1\n[world]\n", ["[experts] max_examples must be at least 2"]),  # no anti-expert text
    ("[world]\nvocab_size = 100\n", ["[world] vocab_size must be at least 257", "256 bytes and EOS"]),  # BPE made 257
    ("[pairs]\nmargin = -0.1\n[world]\n", ["[pairs] margin must lie in 0 .. 1"]),
    ("[pairs]\nmargin = 1.5\n[world]\n", ["[pairs] margin must lie in 0 .. 1"]),  # no pair kept, after sampling them all
    ("name = 'x'\n[world]\n", ["key name stands before any [section]", "move it under [run]"]),  # was "unknown section [name]"
    ("seed = 3\n[world]\n", ["key seed stands before any [section]", "[world] or [probe]"]),
    ("[model]\npath = 'gpt2-medium@'\n", ["[model]", "'gpt2-medium@' is not NAME@REVISION", "the name alone"]),
])
def test_bad_config_names_key_and_file(tmp_path, text, pieces):
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    for piece in pieces:
        assert piece in msg


def test_a_byte_order_mark_before_the_config_is_read_through(tmp_path):
    """Notepad and PowerShell's Out-File write one; it was "not valid TOML at line 1, column 1", where nothing shows."""
    p = tmp_path / "c.toml"
    p.write_bytes("\ufeff[world]\nseed = 3\n".encode())
    assert config.load(p).world.seed == 3


def test_paths_from_the_home_folder_are_expanded(tmp_path, monkeypatch):
    """`~` was kept as written: a store under ./~/, data files and models not found."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config.load(write(tmp_path, "[run]\nstore = '~/s.duckdb'\ncache_dir = '~/cache'\n[model]\npath = '~/models/gpt2'\n"
                                      "[data]\nprobe = '~/train.csv'\nprompts = '~/rtp.jsonl'\npairs = '~/pairs.jsonl'\n"
                                      "heldout = '~/wiki.txt'\nf1_samples = '~/wiki_samples.jsonl'\n"
                                      "[scorer]\ncheckpoint = '~/detox.ckpt'\n"))
    home = str(tmp_path)
    assert (cfg.run.store, cfg.run.cache_dir, cfg.model.path) == (f"{home}/s.duckdb", f"{home}/cache", f"{home}/models/gpt2")
    assert [getattr(cfg.data, k) for k in ("probe", "prompts", "pairs", "heldout", "f1_samples")] == [
        f"{home}/{name}" for name in ("train.csv", "rtp.jsonl", "pairs.jsonl", "wiki.txt", "wiki_samples.jsonl")]
    assert cfg.scorer.checkpoint == f"{home}/detox.ckpt"
    assert config.load(write(tmp_path, "[model]\npath = 'gpt2-medium'\n[data]\nprompts = 'hf:allenai/real-toxicity-prompts'\n"
                                       "probe = 'world'\npairs = 'world'\nheldout = 'world'\n[world]\n")).model.path == "gpt2-medium"


def test_int_accepted_where_float_expected(tmp_path):
    cfg = config.load(write(tmp_path, "[world]\nlr = 1\n"))
    assert cfg.world.lr == 1.0 and isinstance(cfg.world.lr, float)


def test_cli_config_error_is_one_line_and_nonzero(tmp_path, capsys):
    code = main(["run", "--config", str(write(tmp_path, "[world]\nbogus = 1\n"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "bogus" in err and "\n" not in err


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["status", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_every_field_documented():
    for name in config.SECTIONS:
        for f in dataclasses.fields(config._section_class(name)):
            assert f.metadata.get("help"), f"[{name}] {f.name} has no help"


def test_readme_config_table_is_generated_from_the_dataclasses():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- config-table -->\n(.*?)\n<!-- /config-table -->", readme, re.S)
    assert block, "README.md lacks the generated config table"
    assert block.group(1).strip() == config.help_table().strip(), "run `python -m pipeline docs` to refresh README"


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in config.SECTIONS:
        for f in dataclasses.fields(config._section_class(name)):
            assert f"[{name}] {f.name}" in out


def test_list_keys_are_checked_item_by_item(tmp_path):
    cfg = config.load(write(tmp_path, "[world]\n[intervene]\nablate_top = [5, 10]\npatch_groups = ['TP-', 'TP- AN-']\n"))
    assert cfg.intervene.ablate_top == [5, 10] and cfg.intervene.patch_groups == ["TP-", "TP- AN-"]
    for text, piece in [("ablate_top = 5", "must be a list of integers"),
                        ("ablate_top = [5, 'x']", "[intervene] ablate_top[1] must be an integer"),
                        ("patch_groups = ['TP-', 'XY']", "patch_groups entry 'XY'")]:
        with pytest.raises(config.ConfigError) as e:
            config.load(write(tmp_path, f"[world]\n[intervene]\n{text}\n"))
        assert piece in str(e.value)


def test_set_overrides_keys_as_the_file_would():
    base = config.load(ROOT / "configs" / "gpt2-medium.toml")
    cfg = config.load(ROOT / "configs" / "gpt2-medium.toml",
                      ["data.max_prompts=64", "intervene.ablate_top = [5, 10]", "intervene.perplexity_windows=8",
                       "run.device=cpu", "model.path=/ckpt/a=b", "run.name=2024", "dpo.lr=2e-5", "experts.steps=3"])
    assert cfg.data.max_prompts == 64 and cfg.intervene.ablate_top == [5, 10] and cfg.intervene.perplexity_windows == 8
    assert cfg.run.device == "cpu" and cfg.model.path == "/ckpt/a=b" and cfg.dpo.lr == 2e-5 != base.dpo.lr
    assert cfg.run.name == "2024"  # a string key takes a bare word as written, though TOML reads 2024 as a number
    assert cfg.experts.steps == 3 and base.experts is None  # as a new [experts] table in the file would
    changed = {("data", "max_prompts"), ("intervene", "ablate_top"), ("intervene", "perplexity_windows"), ("run", "device"),
               ("model", "path"), ("run", "name"), ("dpo", "lr")}
    for name, body in base.to_dict().items():
        for key, value in body.items():
            if (name, key) not in changed:
                assert cfg.to_dict()[name][key] == value, f"[{name}] {key}"
    assert "--set data.max_prompts=64" in cfg.source


@pytest.mark.parametrize("assignment, pieces", [
    ("max_prompts=64", ["expected SECTION.KEY=VALUE"]),
    ("data.max_prompts", ["expected SECTION.KEY=VALUE"]),
    ("dat.max_prompts=64", ["unknown section [dat]", "did you mean data"]),
    ("data.max_prompt=64", ["unknown key [data] max_prompt", "did you mean max_prompts"]),
    ("data.max_prompts=many", ["[data] max_prompts must be an integer", "'many'"]),
    ("intervene.perplexity_windows=-1", ["perplexity_windows must be 0 (all)"]),
    ("record.max_prompt_tokens=-1", ["max_prompt_tokens must be 0 (whole prompts)"]),
    ("model.bos=none", ["bos must be transformerlens or tokenizer", "'none'"]),
    ("probe.l2=nan", ["[probe] l2 must be a finite number"]),
])
def test_bad_set_is_a_one_line_error(assignment, pieces):
    with pytest.raises(config.ConfigError) as e:
        config.load(ROOT / "configs" / "demo.toml", [assignment])
    assert "\n" not in str(e.value) and all(p in str(e.value) for p in pieces)


def test_cli_set_reaches_the_cache_keys(tmp_path, capsys):
    demo = str(ROOT / "configs" / "demo.toml")
    keys = {}
    for prompts in ("", "7"):
        extra = ["--set", f"data.max_prompts={prompts}"] if prompts else []
        assert main(["status", "--config", demo, "--set", f"run.cache_dir={tmp_path}", *extra]) == 0
        keys[prompts] = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines())
    assert keys[""]["world"] == keys["7"]["world"] and keys[""]["probe"] == keys["7"]["probe"]
    assert keys[""]["record"] != keys["7"]["record"]  # the prompts are record's input
    assert main(["run", "--config", demo, "--set", "data.max_prompts=x"]) == 2
    assert "[data] max_prompts must be an integer" in capsys.readouterr().err
