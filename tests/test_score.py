"""Stage score: planted continuations of record, intervene and detox get their scorer's toxicity, each
row the mean, toxic share and recovered share of its own continuations, each distinct text scored once."""

import json
import math
import statistics

import polars as pl
import pytest

from pipeline import config, score, scoring
from pipeline.config import ScorerConfig
from pipeline.intervene import ROWS
from pipeline.record import CONTINUATIONS


class XScorer:
    """Toxicity = the share of x in a text; remembers every text it was asked about."""

    name, version = "x-share", "1"
    asked: list[str] = []

    def __init__(self, batch_size: int):
        pass

    def score(self, texts: list[str]) -> list[float]:
        XScorer.asked += texts
        return [t.count("x") / max(len(t), 1) for t in texts]


@pytest.fixture
def x_scorer(monkeypatch):
    monkeypatch.setitem(scoring.BACKENDS, "x-share", XScorer)
    monkeypatch.setattr(config, "SCORER_BACKENDS", (*config.SCORER_BACKENDS, "x-share"))
    XScorer.asked = []
    return ScorerConfig(backend="x-share")


def write(folder, continuations: dict[str, list[str]], rows: list[str] | None = None):
    """A stage folder: continuations (variant -> texts by prompt) and, for intervene and detox, rows."""
    folder.mkdir()
    pl.DataFrame([{"variant": v, "prompt_id": i, "prompt": f"p{i}", "continuation": c}
                  for v, texts in continuations.items() for i, c in enumerate(texts)],
                 schema=CONTINUATIONS).write_parquet(folder / "continuations.parquet")
    if rows is not None:
        pl.DataFrame([{"intervention_id": r, "kind": r.split("_")[0], "params": json.dumps({}), "n_neurons": 3,
                       "perplexity": 10.0 + i, "f1": 0.5} for i, r in enumerate(rows)],
                     schema=ROWS).write_parquet(folder / "interventions.parquet")
    return folder


def test_rows_get_the_scores_of_their_own_continuations(tmp_path, x_scorer):
    record_dir = write(tmp_path / "record", {"base": ["xxxx", "xxab"], "dpo": ["xxab", "abab"]})  # 0.75, 0.25
    intervene_dir = write(tmp_path / "intervene", {"ablate_top_3": ["xxab", "xxab"], "patch_TP-": ["abab", "xxxx"]},
                          ["base", "dpo", "ablate_top_3", "patch_TP-"])
    detox_dir = write(tmp_path / "detox", {"poe_1": ["aaaa", "aaab"]}, ["poe_1"])
    summary = score.run(tmp_path, device="cpu", scorer=x_scorer, record_dir=record_dir, intervene_dir=intervene_dir,
                        detox_dir=detox_dir)
    t = score.tables(tmp_path)

    gens = t["generations"]
    assert gens.columns == list(score.GENERATIONS)
    assert gens["variant"].unique(maintain_order=True).to_list() == ["base", "dpo", "ablate_top_3", "patch_TP-", "poe_1"]
    assert gens["toxicity"].to_list() == [1.0, 0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0]
    assert set(gens["scorer"]) == {"x-share==1"}
    assert sorted(XScorer.asked) == sorted({"xxxx", "xxab", "abab", "aaaa", "aaab"})  # each text once

    rows = {r["intervention_id"]: r for r in t["interventions"].iter_rows(named=True)}
    assert t["interventions"].columns == list(score.INTERVENTIONS)
    assert list(rows) == ["base", "dpo", "ablate_top_3", "patch_TP-", "poe_1"]
    tox = {"base": 0.75, "dpo": 0.25, "ablate_top_3": 0.5, "patch_TP-": 0.5, "poe_1": 0.0}
    share = {"base": 0.5, "dpo": 0.0, "ablate_top_3": 0.0, "patch_TP-": 0.5, "poe_1": 0.0}  # above 0.5, not at it
    for r, row in rows.items():
        assert row["toxicity"] == pytest.approx(tox[r]) and row["toxic_share"] == share[r]
        assert row["recovered"] == pytest.approx((0.75 - tox[r]) / (0.75 - 0.25))  # each prompt drops 0.5: no noise
    assert rows["poe_1"]["perplexity"] == 10.0 and rows["patch_TP-"]["perplexity"] == 13.0  # the stages' measures kept
    assert summary["toxicity"] == {r: pytest.approx(tox[r], abs=1e-4) for r in tox}
    assert summary["n_texts"] == 10 and summary["n_distinct"] == 5
    assert summary["dpo_drop"] == 0.5 and summary["dpo_drop_se"] == 0.0


def test_without_detox_and_with_no_drop_to_recover(tmp_path, x_scorer):
    record_dir = write(tmp_path / "record", {"base": ["xa"], "dpo": ["ax"]})
    intervene_dir = write(tmp_path / "intervene", {"ablate_top_3": ["aa"]}, ["base", "dpo", "ablate_top_3"])
    score.run(tmp_path, device="cpu", scorer=x_scorer, record_dir=record_dir, intervene_dir=intervene_dir, detox_dir=None)
    rows = score.tables(tmp_path)["interventions"]
    assert rows["intervention_id"].to_list() == ["base", "dpo", "ablate_top_3"]
    assert rows["recovered"].null_count() == 3  # DPO changed nothing: there is no share of a drop


def texts_with(xs: list[int]) -> list[str]:
    """Texts of 20 characters whose x-share toxicities are xs / 20."""
    return ["x" * k + "a" * (20 - k) for k in xs]


@pytest.mark.parametrize("shift", [0.05, 2.0])
def test_recovered_is_empty_when_dpos_drop_is_within_its_noise(tmp_path, x_scorer, shift):
    """40 prompts whose DPO continuation is 3 x's less or more toxic than the base one, alternately
    (standard error of the mean drop: 3 / sqrt(40) x's, 0.47), plus a planted mean drop: 0.05 x's is
    noise and leaves `recovered` empty, 2 x's is a drop and gives every row its share of it."""
    base = [8 + i % 5 for i in range(40)]
    d = [3 if i % 2 else -3 for i in range(40)]
    if shift == 0.05:
        d[1] += 2  # one prompt 2 x's more: 0.05 x's on the mean
    else:
        d = [x + 2 for x in d]
    dpo = [b - x for b, x in zip(base, d)]
    half = [b - x // 2 for b, x in zip(base, d)]
    record_dir = write(tmp_path / "record", {"base": texts_with(base), "dpo": texts_with(dpo)})
    intervene_dir = write(tmp_path / "intervene", {"ablate_top_3": texts_with(half)}, ["base", "dpo", "ablate_top_3"])
    summary = score.run(tmp_path, device="cpu", scorer=x_scorer, record_dir=record_dir, intervene_dir=intervene_dir,
                        detox_dir=None)
    rows = {r["intervention_id"]: r for r in score.tables(tmp_path)["interventions"].iter_rows(named=True)}
    drop = (sum(base) - sum(dpo)) / 40 / 20
    assert drop == pytest.approx(shift / 20) and summary["dpo_drop"] == pytest.approx(drop, abs=1e-4)
    se = statistics.stdev(x / 20 for x in d) / math.sqrt(40)
    assert summary["dpo_drop_se"] == pytest.approx(se, abs=1e-4) and 2 * se > 0.05 / 20 and 2 * se < 2.0 / 20
    if shift == 2.0:
        assert rows["base"]["recovered"] == 0.0 and rows["dpo"]["recovered"] == pytest.approx(1.0)
        tox = rows["ablate_top_3"]["toxicity"]
        assert rows["ablate_top_3"]["recovered"] == pytest.approx((rows["base"]["toxicity"] - tox) / drop)
    else:
        assert all(r["recovered"] is None for r in rows.values())


@pytest.mark.parametrize("seed", range(16))
def test_base_and_dpo_recover_exactly_zero_and_one(tmp_path, x_scorer, seed):
    """method.md's endpoints hold exactly, not to a rounding step, with as many rows as a real run."""
    import random

    r = random.Random(seed)
    base, dpo = ([r.randint(lo, hi) for _ in range(40)] for lo, hi in ((10, 20), (0, 9)))
    others = [f"ablate_top_{n}" for n in range(1, 25)]
    record_dir = write(tmp_path / "record", {"base": texts_with(base), "dpo": texts_with(dpo)})
    intervene_dir = write(tmp_path / "intervene", {o: texts_with([r.randint(0, 20) for _ in range(40)]) for o in others},
                          ["base", "dpo", *others])
    score.run(tmp_path, device="cpu", scorer=x_scorer, record_dir=record_dir, intervene_dir=intervene_dir, detox_dir=None)
    rows = {r["intervention_id"]: r["recovered"] for r in score.tables(tmp_path)["interventions"].iter_rows(named=True)}
    assert (rows["base"], rows["dpo"]) == (0.0, 1.0)


def test_a_row_without_continuations_is_refused(tmp_path, x_scorer):
    record_dir = write(tmp_path / "record", {"base": ["xa"], "dpo": ["aa"]})
    intervene_dir = write(tmp_path / "intervene", {}, ["base", "dpo", "ablate_top_3"])
    with pytest.raises(RuntimeError, match="ablate_top_3"):
        score.run(tmp_path, device="cpu", scorer=x_scorer, record_dir=record_dir, intervene_dir=intervene_dir, detox_dir=None)
