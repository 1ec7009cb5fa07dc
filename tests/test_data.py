"""Dataset loaders on small files in each real format, including bad ones (one-line errors)."""

import json

import pytest

from pipeline import data
from pipeline.data import DataError


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return p


def one_line(e):
    assert "\n" not in str(e.value)
    return str(e.value)


def test_jigsaw_csv_balanced_and_labelled(tmp_path):
    rows = "id,comment_text,toxic,severe_toxic\n" + "".join(
        f'{i},"text {i}, with comma",{int(i % 5 == 0)},0\n' for i in range(100)) + '100,"",1,0\n'
    texts, labels = data.load_probe(write(tmp_path, "train.csv", rows), max_examples=40, seed=0)
    assert len(texts) == 40 and sum(labels) == 20
    assert all(t.startswith("text ") for t in texts)


def test_probe_csv_missing_column(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_probe(write(tmp_path, "p.csv", "text,label\na,1\n"), 10, 0)
    assert "comment_text" in one_line(e) and "toxic" in str(e.value)


def test_probe_csv_with_one_class_only(tmp_path):
    with pytest.raises(DataError, match="both toxic and non-toxic"):
        data.load_probe(write(tmp_path, "p.csv", "comment_text,toxic\na,0\nb,0\n"), 10, 0)


def test_rtp_jsonl_challenging_filter_and_limit(tmp_path):
    lines = [{"prompt": {"text": f"p{i}"}, "continuation": {"text": "c"}, "challenging": i % 2 == 0} for i in range(10)]
    path = write(tmp_path, "rtp.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert data.load_prompts(path, True, 100) == ["p0", "p2", "p4", "p6", "p8"]
    assert data.load_prompts(path, False, 3) == ["p0", "p1", "p2"]


def test_empty_prompt_set_is_a_clear_error(tmp_path):
    path = write(tmp_path, "rtp.jsonl", json.dumps({"prompt": {"text": "x"}, "challenging": False}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_prompts(path, True, 10)
    assert "challenging_only = false" in one_line(e)


def test_bad_json_line_names_the_line(tmp_path):
    path = write(tmp_path, "rtp.jsonl", '{"prompt": {"text": "a"}}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        data.load_prompts(path, False, 10)


def test_pairs_jsonl_and_missing_keys(tmp_path):
    good = write(tmp_path, "pairs.jsonl", json.dumps({"prompt": "p", "chosen": " a", "rejected": " b", "extra": 1}) + "\n")
    assert data.load_pairs(good, 10) == [{"prompt": "p", "chosen": " a", "rejected": " b"}]
    bad = write(tmp_path, "bad.jsonl", json.dumps({"prompt": "p", "good": "a"}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_pairs(bad, 10)
    assert "prompt, chosen, rejected" in one_line(e)


def test_wikitext_style_text_skips_headings_and_blanks(tmp_path):
    path = write(tmp_path, "wiki.txt", " = Heading = \n\n Some text here .\n\n = = Sub = = \n More text .\n")
    assert data.load_text(path) == ["Some text here .", "More text ."]
    with pytest.raises(DataError, match="no text lines"):
        data.load_text(write(tmp_path, "empty.txt", "\n \n"))


def test_non_utf8_file_is_a_clear_error(tmp_path):
    path = write(tmp_path, "latin.txt", "caf\u00e9 cr\u00e8me\n", encoding="latin-1")
    with pytest.raises(DataError) as e:
        data.load_text(path)
    assert "not UTF-8" in one_line(e)


def test_resolve_world_and_missing_files(tmp_path):
    assert data.resolve("probe", "world", tmp_path) == tmp_path / "probe.csv"
    with pytest.raises(DataError, match="not found"):
        data.resolve("prompts", str(tmp_path / "nope.jsonl"), None)
    with pytest.raises(DataError, match="builds no world"):
        data.resolve("pairs", "world", None)
    assert data.model_path("gpt2-medium", None) == "gpt2-medium"
    assert data.model_path("world", tmp_path) == str(tmp_path / "model")


def test_unknown_model_is_a_one_line_error(tmp_path):
    from pipeline.models import load_bridge

    with pytest.raises(DataError) as e:
        load_bridge(str(tmp_path / "no-such-model"), "cpu")
    assert "could not be loaded" in one_line(e)


def test_jigsaw_csv_skips_blank_lines_and_unlabelled_rows(tmp_path):
    rows = 'comment_text,toxic\n"you idiot",1\n\n"",0\n"nice day",\n"a fine day",0\n"what a moron",true\n'
    texts, labels = data.load_probe(write(tmp_path, "train.csv", rows), max_examples=10, seed=0)
    assert sorted(zip(texts, labels)) == [("a fine day", 0), ("you idiot", 1)]
    with pytest.raises(DataError) as e:
        data.load_probe(write(tmp_path, "empty.csv", ""), 10, 0)
    assert "comment_text" in one_line(e)


def test_rtp_row_without_prompt_text_is_a_clear_error(tmp_path):
    path = write(tmp_path, "rtp.jsonl", json.dumps({"prompt": {"text": "a"}, "challenging": True}) + "\n"
                 + json.dumps({"prompt": {"toxicity": 0.5}, "challenging": True}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_prompts(path, True, 10)
    assert "prompt" in one_line(e) and "text" in str(e.value)


def test_pairs_with_only_empty_sides_are_a_clear_error(tmp_path):
    path = write(tmp_path, "pairs.jsonl", json.dumps({"prompt": "p", "chosen": "", "rejected": " b"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": " a", "rejected": ""}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_pairs(path, 10)
    assert "no usable pairs" in one_line(e)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_dataset_goes_through_the_same_loaders(hub_cache):
    """hf:NAME is read by datasets.load_dataset, the call a hub name takes; here NAME is a local folder."""
    rtp = hub_cache / "rtp"
    rtp.mkdir()
    lines = [{"filename": "f", "prompt": {"text": f"p{i}", "toxicity": 0.9}, "continuation": {"text": "c"},
              "challenging": i % 2 == 0} for i in range(6)]
    write(rtp, "train.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    path = data.resolve("prompts", f"hf:{rtp}", None)
    assert data.load_prompts(path, True, 100) == ["p0", "p2", "p4"]
    assert data.resolve("prompts", f"hf:{rtp}", None) == path  # written once, then reused

    wiki = hub_cache / "wiki"
    wiki.mkdir()
    write(wiki, "test.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in [" = Title = \n", "\n", " Some text .\n"]))
    assert data.load_text(data.resolve("heldout", f"hf:{wiki}::test", None)) == ["Some text ."]
    with pytest.raises(DataError) as e:
        data.resolve("heldout", f"hf:{rtp}", None)
    assert "no 'text' column" in one_line(e)


def test_unreachable_hub_dataset_is_a_one_line_error(hub_cache):
    with pytest.raises(DataError) as e:
        data.resolve("prompts", "hf:no-such-owner/no-such-dataset", None)
    assert "could not be loaded" in one_line(e) and "local file" in str(e.value)


def test_line_and_paragraph_separators_inside_json_strings_stay_in_the_text(tmp_path):
    # datasets' to_json writes U+2028/U+2029/U+0085 unescaped; they are not line breaks in JSONL
    text = "one\u2028two\u2029three\x85four"
    path = write(tmp_path, "rtp.jsonl", json.dumps({"prompt": {"text": text}}, ensure_ascii=False) + "\r\n")
    assert data.load_prompts(path, False, 10) == [text]


def test_multi_line_quoted_comment_keeps_its_line_break(tmp_path):
    rows = 'comment_text,toxic\n"first line\nsecond line",1\nplain,0\n'
    texts, labels = data.load_probe(write(tmp_path, "train.csv", rows), max_examples=10, seed=0)
    assert dict(zip(texts, labels)) == {"first line\nsecond line": 1, "plain": 0}


def test_lee_et_al_pairs_map_to_prompt_chosen_rejected_without_the_repeated_prompt(tmp_path):
    rows = [{"prompt_text": "The cat", "unpert_gen_text": "The cat sat down.", "pert_gen_text": "The cat is vile.",
             "pert_gen_toks": [1, 2]},
            {"prompt_text": "A", "unpert_gen_text": " fine", "pert_gen_text": " bad"}]
    path = write(tmp_path, "split_0.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert data.load_pairs(path, 10) == [{"prompt": "The cat", "chosen": " sat down.", "rejected": " is vile."},
                                         {"prompt": "A", "chosen": " fine", "rejected": " bad"}]
