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


def test_probe_csv_with_a_label_column_twice(tmp_path):
    rows = "comment_text,toxic,toxic\n" + "".join(f"text {i},{i % 2},{1 - i % 2}\n" for i in range(8))
    with pytest.raises(DataError) as e:  # it read the last toxic column: every label flipped, without a word
        data.load_probe(write(tmp_path, "p.csv", rows), 10, 0)
    assert "has toxic more than once in its header" in one_line(e)


def test_probe_csv_with_one_class_only(tmp_path):
    with pytest.raises(DataError, match="two toxic and two non-toxic"):
        data.load_probe(write(tmp_path, "p.csv", "comment_text,toxic\na,0\nb,0\n"), 10, 0)
    with pytest.raises(DataError, match="found 1 toxic, 2 not"):  # one toxic row can be trained on or validated, not both
        data.load_probe(write(tmp_path, "p.csv", "comment_text,toxic\na,0\nb,0\nc,1\n"), 10, 0)


def test_rtp_jsonl_challenging_filter_and_limit(tmp_path):
    lines = [{"prompt": {"text": f"p{i}"}, "continuation": {"text": "c"}, "challenging": i % 2 == 0} for i in range(10)]
    path = write(tmp_path, "rtp.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert data.load_prompts(path, True, 100) == ["p0", "p2", "p4", "p6", "p8"]
    assert data.load_prompts(path, False, 3) == ["p0", "p1", "p2"]


def test_lees_challenge_prompts_file_loads_without_the_challenging_filter(tmp_path):
    """Lee et al.'s challenge_prompts.jsonl, the paper's 1,199 prompts: one {"prompt": text} per line, no flag
    (README: Running the paper's setup)."""
    path = write(tmp_path, "challenge_prompts.jsonl", "".join(json.dumps({"prompt": f"So I told him {i}"}) + "\n" for i in range(3)))
    assert data.load_prompts(path, False, 1200) == [f"So I told him {i}" for i in range(3)]
    with pytest.raises(DataError) as e:
        data.load_prompts(path, True, 1200)
    assert "challenging_only = false" in one_line(e)


def test_empty_prompt_set_is_a_clear_error(tmp_path):
    path = write(tmp_path, "rtp.jsonl", json.dumps({"prompt": {"text": "x"}, "challenging": False}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_prompts(path, True, 10)
    assert "challenging_only = false" in one_line(e)


def test_prompts_all_empty_are_not_told_to_drop_the_challenging_filter(tmp_path):
    """Setting challenging_only = false cannot help prompts that have no text."""
    path = write(tmp_path, "rtp.jsonl", json.dumps({"prompt": {"text": " "}, "challenging": True}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_prompts(path, True, 10)
    assert "no usable prompts (all 1 are empty)" in one_line(e) and "challenging_only" not in one_line(e)
    with pytest.raises(DataError) as e:
        data.load_prompts(write(tmp_path, "none.jsonl", "\n"), True, 10)
    assert "no usable prompts (it holds none)" in one_line(e)


def test_a_jsonl_given_as_held_out_text_points_to_f1_samples(tmp_path):
    """Lee et al.'s wiki_samples.jsonl given as [data] heldout would have its JSON lines scored as passages."""
    samples = write(tmp_path, "wiki_samples.jsonl", "".join(json.dumps({"prompt": f"p{i}", "gold": "g"}) + "\n" for i in range(3)))
    for load in (data.load_text, data.load_entries):
        with pytest.raises(DataError) as e:
            load(samples)
        assert "is JSONL, but [data] heldout is plain text" in one_line(e) and "[data] f1_samples" in one_line(e)
    # text that merely starts with a brace, or holds one JSON line among passages, is text
    text = write(tmp_path, "braces.txt", '{"a": 1}\nA passage about the weather.\n')
    assert data.load_text(text) == ['{"a": 1}', "A passage about the weather."]


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


def test_lees_f1_samples_load_in_file_order_and_bad_lines_are_named(tmp_path):
    rows = [{"prompt": "The river", "gold": "The river runs past the mill", "id": 3}, {"prompt": " B", "gold": " B c"}]
    good = write(tmp_path, "wiki_samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert data.load_f1_samples(good) == [("The river", "The river runs past the mill"), (" B", " B c")]
    for line, pieces in [({"prompt": "a", "text": "b"}, ["line 2", "needs keys prompt and gold", "found prompt, text"]),
                         ({"prompt": "a", "gold": "  "}, ["line 2", "gold is empty", "remove that line"]),
                         ({"prompt": ["a"], "gold": "b"}, ["line 2", "prompt is list"])]:
        bad = write(tmp_path, "bad.jsonl", json.dumps(rows[0]) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(DataError) as e:
            data.load_f1_samples(bad)
        assert all(p in one_line(e) for p in pieces), (line, str(e.value))
    with pytest.raises(DataError) as e:
        data.load_f1_samples(write(tmp_path, "empty.jsonl", "\n\n"))
    assert "no F1 samples" in one_line(e)


def test_wikitext_style_text_skips_headings_and_blanks(tmp_path):
    path = write(tmp_path, "wiki.txt", " = Heading = \n\n Some text here .\n\n = = Sub = = \n More text .\n")
    assert data.load_text(path) == ["Some text here .", "More text ."]
    with pytest.raises(DataError, match="no text lines"):
        data.load_text(write(tmp_path, "empty.txt", "\n \n"))
    # the stream perplexity's entries keep headings and blank lines, and the file's last newline ends a line
    assert data.load_entries(path) == [" = Heading = \n", "", " Some text here .\n", "", " = = Sub = = \n", " More text .\n"]
    with pytest.raises(DataError, match="no text lines"):
        data.load_entries(write(tmp_path, "empty.txt", "\n \n"))


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
    rows = 'comment_text,toxic\n"you idiot",1\n\n"",0\n"nice day",\n"a fine day",0\n"what a moron",true\n"calm",0\n'
    texts, labels = data.load_probe(write(tmp_path, "train.csv", rows), max_examples=10, seed=0)
    assert sorted(zip(texts, labels)) == [("a fine day", 0), ("calm", 0), ("what a moron", 1), ("you idiot", 1)]
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
    wiki2 = hub_cache / "wiki2"  # WikiText-2's entries as the hub has them: the stream perplexity joins them exactly
    wiki2.mkdir()
    entries = ["", " = Title = \n", "", " Some text .\n", " More , text . \n"]
    write(wiki2, "test.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in entries))
    assert data.load_entries(data.resolve("heldout", f"hf:{wiki2}::test", None)) == entries
    with pytest.raises(DataError) as e:
        data.resolve("heldout", f"hf:{rtp}", None)
    assert "no 'text' column" in one_line(e)


def test_a_hub_dataset_pinned_to_a_revision_is_loaded_at_it(hub_cache, monkeypatch):
    """hf:NAME@REVISION hands the revision to load_dataset, and each revision is written to its own file: a
    file written for the newest rows is not read back for a pinned commit. (datasets reads no hub snapshot
    offline, so the hub stands in here as a function of name and revision.)"""
    import datasets

    calls = []

    def load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        rows = [{"prompt": {"text": f"{revision or 'newest'} {i}"}, "challenging": True} for i in range(2)]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    newest = data.load_prompts(data.resolve("prompts", "hf:acme/rtp", None), True, 10)
    pinned = data.load_prompts(data.resolve("prompts", "hf:acme/rtp@v1.2:default:train", None), True, 10)
    assert (newest, pinned) == (["newest 0", "newest 1"], ["v1.2 0", "v1.2 1"])
    assert calls == [("acme/rtp", None, "train", None), ("acme/rtp", "default", "train", "v1.2")]
    with pytest.raises(DataError) as e:
        data.resolve("prompts", "hf:acme/rtp@", None)
    assert "names no dataset" in one_line(e) and "hf:NAME[@REVISION]" in one_line(e)


def test_hub_comments_keep_their_carriage_returns_and_labels(hub_cache):
    """A Jigsaw-style hub dataset whose comment holds a lone carriage return: written out and read back, every
    row keeps its text and its label."""
    jigsaw = hub_cache / "jigsaw"
    jigsaw.mkdir()
    rows = [{"id": "a", "comment_text": "You are an idiot\rreally", "toxic": 1, "severe_toxic": 0},
            {"id": "b", "comment_text": "Shut up,\r\nloser", "toxic": 1, "severe_toxic": 0},
            {"id": "c", "comment_text": "Nice day", "toxic": 0, "severe_toxic": 1},
            {"id": "d", "comment_text": "Fresh bread", "toxic": 0, "severe_toxic": 0}]
    write(jigsaw, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    texts, labels = data.load_probe(data.resolve("probe", f"hf:{jigsaw}", None), 100, 0)
    assert sorted(zip(texts, labels)) == sorted((r["comment_text"], r["toxic"]) for r in rows)


def test_hub_files_are_named_by_what_they_hold(hub_cache):
    """hf:X/a and hf:X_a share a readable name; an edit of a local folder given as hf: is read afresh."""
    for folder, text in (("X/a", "from X/a"), ("X_a", "from X_a")):
        (hub_cache / folder).mkdir(parents=True)
        write(hub_cache / folder, "test.jsonl", json.dumps({"text": text}) + "\n")
    a, b = (data.resolve("heldout", f"hf:{hub_cache / f}::test", None) for f in ("X/a", "X_a"))
    assert data.load_text(a) == ["from X/a"] and data.load_text(b) == ["from X_a"]
    write(hub_cache / "X/a", "test.jsonl", json.dumps({"text": "edited"}) + "\n")
    assert data.load_text(data.resolve("heldout", f"hf:{hub_cache / 'X/a'}::test", None)) == ["edited"]


def test_errors_in_a_hub_dataset_name_its_hf_value_not_only_the_cached_file(hub_cache):
    """The converted file lives in the datasets cache; the user wrote hf:NAME, so the error names that."""
    comments = hub_cache / "comments"
    comments.mkdir()
    write(comments, "train.csv", "text,label\nhello,0\n")
    for _ in range(2):  # the second resolve finds the file already written
        with pytest.raises(DataError) as e:
            data.load_probe(data.resolve("probe", f"hf:{comments}", None), 100, 0)
        msg = one_line(e)
        assert msg.startswith(f"hf:{comments} (cached as ") and "lacks column(s) comment_text, toxic" in msg


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
    rows = 'comment_text,toxic\n"first line\nsecond line",1\nplain,0\nrude,1\nfine,0\n'
    texts, labels = data.load_probe(write(tmp_path, "train.csv", rows), max_examples=10, seed=0)
    assert dict(zip(texts, labels)) == {"first line\nsecond line": 1, "plain": 0, "rude": 1, "fine": 0}


def test_lee_et_al_pairs_map_to_prompt_chosen_rejected_without_the_repeated_prompt(tmp_path):
    rows = [{"prompt_text": "The cat", "unpert_gen_text": "The cat sat down.", "pert_gen_text": "The cat is vile.",
             "pert_gen_toks": [1, 2]},
            {"prompt_text": "A", "unpert_gen_text": " fine", "pert_gen_text": " bad"}]
    path = write(tmp_path, "split_0.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert data.load_pairs(path, 10) == [{"prompt": "The cat", "chosen": " sat down.", "rejected": " is vile."},
                                         {"prompt": "A", "chosen": " fine", "rejected": " bad"}]


def test_labels_read_as_written_and_bad_ones_named(tmp_path):
    """Hub datasets written out as CSV say True/False; Jigsaw's unintended-bias scores are fractions."""
    rows = "comment_text,toxic\na,True\nb,False\nc,yes\nd,no\ne,0.7\nf,0.2\ng,1.0\nh,0.0\n"
    texts, labels = data.load_probe(write(tmp_path, "p.csv", rows), 10, 0)
    assert sorted(zip(texts, labels)) == [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 1), ("f", 0), ("g", 1), ("h", 0)]
    for bad in ("nan", "2", "-1", "toxic!"):
        with pytest.raises(DataError) as e:
            data.load_probe(write(tmp_path, "p.csv", rows + f"x,{bad}\n"), 10, 0)
        assert "line 10" in one_line(e) and repr(bad) in str(e.value)


def test_byte_order_mark_and_gzip_are_read_through_and_zip_is_named(tmp_path):
    import gzip
    import zipfile

    csv_text = "comment_text,toxic\na,1\nb,1\nc,0\nd,0\n"
    assert len(data.load_probe(write(tmp_path, "bom.csv", "\ufeff" + csv_text), 10, 0)[0]) == 4  # Excel's "CSV UTF-8"
    jsonl = json.dumps({"prompt": {"text": "p"}, "challenging": True}) + "\n"
    assert data.load_prompts(write(tmp_path, "bom.jsonl", "\ufeff" + jsonl), True, 10) == ["p"]
    assert data.load_text(write(tmp_path, "bom.txt", "\ufeff = Heading =\nbody\n")) == ["body"]
    assert data.load_prompts(write(tmp_path, "rtp.jsonl.gz", gzip.compress(jsonl.encode())), True, 10) == ["p"]
    with zipfile.ZipFile(tmp_path / "train.csv.zip", "w") as z:
        z.writestr("train.csv", csv_text)
    with pytest.raises(DataError) as e:
        data.load_probe(tmp_path / "train.csv.zip", 10, 0)
    assert "zip archive; unzip it" in one_line(e)


def test_csv_with_an_unbalanced_quote_names_the_line(tmp_path):
    rows = 'comment_text,toxic\na,1\nb,0\n"broken,1\n' + "".join(f"text {i} " * 20 + ",0\n" for i in range(2000))
    with pytest.raises(DataError) as e:
        data.load_probe(write(tmp_path, "p.csv", rows), 10, 0)
    assert "unbalanced quote" in one_line(e)


def test_missing_column_says_what_was_found(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_probe(write(tmp_path, "p.csv", "id,comment_text,target\n1,a,0.8\n"), 10, 0)
    assert "found: id, comment_text, target" in one_line(e) and "rename" in str(e.value)
    with pytest.raises(DataError) as e:
        data.load_probe(write(tmp_path, "p.csv", "comment_text;toxic\na;1\n"), 10, 0)
    assert "found: comment_text;toxic" in one_line(e) and "comma-separated" in str(e.value)


@pytest.mark.parametrize("line", ["null", "[1, 2]", '"text"', "5"])
def test_jsonl_line_that_is_not_an_object_is_named(tmp_path, line):
    for load in (lambda p: data.load_prompts(p, False, 10), lambda p: data.load_pairs(p, 10)):
        with pytest.raises(DataError) as e:
            load(write(tmp_path, "x.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n"))
        assert "line 2" in one_line(e) and "not an object" in str(e.value)


def test_a_json_array_file_says_how_to_convert_it(tmp_path):
    path = write(tmp_path, "pairs.json", json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}], indent=1))
    with pytest.raises(DataError) as e:
        data.load_pairs(path, 10)
    assert "jq -c" in one_line(e)


def test_pairs_need_text_on_both_sides_and_different_texts(tmp_path):
    good = {"prompt": "p", "chosen": " kind", "rejected": " rude"}
    rows = [good, {"prompt": "p", "chosen": " same", "rejected": " same"}, {"prompt": "p", "chosen": "  ", "rejected": " x"}]
    path = write(tmp_path, "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_pairs(path, 10) == [good]
    for bad in ({"prompt": "p", "chosen": 5, "rejected": "x"}, {"prompt": None, "chosen": "a", "rejected": "x"},
                {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "x"},
                {"prompt_text": "p", "unpert_gen_text": None, "pert_gen_text": "p x"}):
        with pytest.raises(DataError) as e:
            data.load_pairs(write(tmp_path, "bad.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n"), 10)
        assert "line 2" in one_line(e) and "must be text" in str(e.value)


def test_challenging_written_as_a_string_is_read_as_meant(tmp_path):
    rows = [{"prompt": {"text": "a"}, "challenging": "false"}, {"prompt": {"text": "b"}, "challenging": "True"},
            {"prompt": {"text": "c"}, "challenging": None}, {"prompt": {"text": "d"}, "challenging": 1}]
    path = write(tmp_path, "rtp.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_prompts(path, True, 10) == ["b", "d"]
    with pytest.raises(DataError) as e:
        data.load_prompts(write(tmp_path, "bad.jsonl", json.dumps({"prompt": {"text": "a"}, "challenging": "maybe"})), True, 10)
    assert "line 1" in one_line(e) and "'maybe'" in str(e.value)


def test_a_folder_or_an_empty_hub_name_is_named(tmp_path):
    with pytest.raises(DataError) as e:
        data.resolve("probe", str(tmp_path), None)
    assert "is a folder" in one_line(e)
    with pytest.raises(DataError) as e:
        data.resolve("prompts", "hf:", None)
    assert "names no dataset" in one_line(e)


def test_only_whole_headings_are_skipped(tmp_path):
    path = write(tmp_path, "wiki.txt", " = Valkyria Chronicles = \n = = Gameplay = = \n= 5 apples were sold .\nbody\r\n")
    assert data.load_text(path) == ["= 5 apples were sold .", "body"]


def test_bzip2_and_xz_are_read_through_and_other_binary_formats_are_named(tmp_path):
    """The fix each names: what a researcher gets from Kaggle, the hub's parquet export or a spreadsheet."""
    import bz2
    import lzma
    import zipfile

    import polars as pl

    jsonl = json.dumps({"prompt": {"text": "p"}, "challenging": True}) + "\n"
    assert data.load_prompts(write(tmp_path, "rtp.jsonl.bz2", bz2.compress(jsonl.encode())), True, 10) == ["p"]
    assert data.load_prompts(write(tmp_path, "rtp.jsonl.xz", lzma.compress(jsonl.encode())), True, 10) == ["p"]
    with pytest.raises(DataError) as e:
        data.load_prompts(write(tmp_path, "cut.jsonl.xz", lzma.compress(jsonl.encode())[:-8]), True, 10)
    assert "damaged xz file" in one_line(e)
    with pytest.raises(DataError) as e:
        data.load_prompts(write(tmp_path, "rtp.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"\0" * 20), True, 10)
    assert "zstd-compressed; decompress it" in one_line(e)
    pl.DataFrame({"comment_text": ["a", "b"], "toxic": [1, 0]}).write_parquet(tmp_path / "train.parquet")
    with pytest.raises(DataError) as e:
        data.load_probe(tmp_path / "train.parquet", 10, 0)
    assert "is a Parquet file; write it out as CSV or JSONL" in one_line(e)
    with zipfile.ZipFile(tmp_path / "train.xlsx", "w") as z:  # what every .xlsx starts with
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(DataError) as e:
        data.load_probe(tmp_path / "train.xlsx", 10, 0)
    assert "is an Excel or other Office file; save it as CSV (UTF-8)" in one_line(e)
