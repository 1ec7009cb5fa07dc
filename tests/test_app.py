"""The app's first page, driven through Streamlit's AppTest on a real store."""

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

import store
from tests.conftest import TINY_WORLD

ROOT = Path(__file__).resolve().parents[1]
HOME = str(ROOT / "app" / "Home.py")


@pytest.fixture
def two_run_store(tiny_run, tmp_path, monkeypatch):
    """The tiny world's store plus a second run whose generations all score 0.9."""
    cfg, run_id = tiny_run
    path = tmp_path / "s.duckdb"
    shutil.copyfile(cfg.run.store, path)
    frame = pl.DataFrame({"variant": ["base"] * 3, "prompt_id": [0, 1, 2], "prompt": ["a", "b", "c"],
                          "continuation": ["x", "y", "z"], "toxicity": [0.9] * 3, "scorer": ["s==1"] * 3})
    other = store.write_run(path, run={"name": "second", "model": "m2", "config": {}, "config_hash": "h2",
                                       "packages": {}}, stages=[], tables={"generations": frame})
    monkeypatch.setenv("STORE", str(path))
    return run_id, other


def table_with(at: AppTest, column: str):
    """The first table on the page that has this column."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_every_cached_query_shows_a_spinner_while_it_runs():
    """Pages call the cached queries bare: the cache's spinner is what a reader sees while one runs."""
    import ast

    tree = ast.parse((ROOT / "app" / "queries.py").read_text())
    spinners = {}
    for f in tree.body:
        for d in getattr(f, "decorator_list", []):
            if isinstance(d, ast.Call) and ast.unparse(d.func) == "st.cache_data":
                spinners[f.name] = next(ast.unparse(k.value) for k in d.keywords if k.arg == "show_spinner")
    assert len(spinners) > 20 and set(spinners.values()) == {"SPINNER"}


def test_home_lists_runs_and_samples(two_run_store):
    first, second = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert not at.exception
    assert set(table_with(at, "created_at")["run_id"]) == {first, second}
    assert at.sidebar.selectbox[0].value == second  # newest first
    assert table_with(at, "continuation").shape[0] == 3


def test_picking_a_run_shows_its_model_and_samples(two_run_store):
    first, _ = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.sidebar.selectbox[0].set_value(first).run()
    assert not at.exception
    assert any("demo world" in m.value for m in at.markdown)
    assert [m.label for m in at.metric][-4:-2] == ["Held-out perplexity", "Unigram perplexity"]
    assert table_with(at, "continuation").shape[0] == TINY_WORLD["n_prompts"]


def test_home_shows_the_pairs_dpo_trained_on(two_run_store):
    first, second = two_run_store
    path = os.environ["STORE"]
    (n, chosen, rejected), = sql("SELECT count(*), avg(chosen_toxicity), avg(rejected_toxicity) FROM pairs "
                                 "WHERE run_id = ?", [first])
    assert n == TINY_WORLD["n_pairs"]
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.sidebar.selectbox[0].set_value(first).run()
    assert not at.exception
    assert table_with(at, "rejected").shape[0] == n
    text = next(m.value for m in at.markdown if "preference pairs" in m.value)
    assert f"**{n:,} preference pairs.**" in text and f"chosen {chosen:.3f}, rejected {rejected:.3f}" in text

    many = pl.DataFrame({"pair_id": range(700), "prompt": ["p"] * 700, "chosen": ["c"] * 700, "rejected": ["r"] * 700,
                         "chosen_toxicity": [0.1] * 700, "rejected_toxicity": [0.9] * 700})
    big = store.write_run(path, run={"name": "many pairs", "model": "m3", "config": {}, "config_hash": "h3",
                                     "packages": {}}, stages=[], tables={"pairs": many})
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert at.sidebar.selectbox[0].value == big
    assert table_with(at, "rejected")["pair_id"].to_list() == list(range(500))
    assert any("**700 preference pairs.**" in m.value and "more toxic in 100%" in m.value for m in at.markdown)
    at.sidebar.selectbox[0].set_value(second).run()
    assert not any("preference pairs" in m.value for m in at.markdown)  # a run without the stage shows none


def test_home_says_when_the_probe_direction_was_given(two_run_store):
    """A run whose w came from [probe] direction (Lee et al.'s probe.pt, say) says so; a fitted one does not."""
    path = os.environ["STORE"]
    given = store.write_run(path, run={"name": "given probe", "model": "m4", "config": {"probe": {"direction": "ckpt/probe.pt"}},
                                       "config_hash": "h4", "packages": {}}, stages=[], tables={})
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert at.sidebar.selectbox[0].value == given and not at.exception
    assert any("**Probe direction:** `ckpt/probe.pt`, given" in m.value for m in at.markdown)
    at.sidebar.selectbox[0].set_value(two_run_store[0]).run()
    assert not any("Probe direction" in m.value for m in at.markdown)


def test_home_draws_no_cumulative_curve_when_dpo_did_not_lower_the_projection(tiny_run, tmp_path, monkeypatch, app_on_path):
    """R <= 0 (a DPO that raised the MLPs' projection onto the probe): n_for_* are 0 and cum_share NaN, and the page
    says why instead of "1 neuron carries 50%" and an upside-down curve; with G = 0 too, instead of "nan%"."""
    cfg, run_id = tiny_run
    path = tmp_path / "up.duckdb"
    shutil.copyfile(cfg.run.store, path)
    con = store.connect(path)
    tables = {t: con.sql(f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = ?", params=[run_id]).pl()
              for t in ("neurons", "group_summary", "attribution")}
    con.close()
    tables["neurons"] = tables["neurons"].with_columns(pl.lit(float("nan")).alias("cum_share"))
    tables["attribution"] = tables["attribution"].with_columns(pl.lit(-0.25).alias("net_reduction"),
                                                               pl.lit(0.0).alias("gross_reduction"),
                                                               *(pl.lit(0).alias(f"n_for_{f}") for f in (50, 75, 99)))
    tables["group_summary"] = tables["group_summary"].with_columns(
        *(pl.lit(float("nan")).alias(c) for c in ("share_gross", "ci_low", "ci_high")))  # shares of G = 0
    up = store.write_run(path, run={"name": "up", "model": "m", "config": {}, "config_hash": "up", "packages": {}},
                         stages=[], tables=tables)
    monkeypatch.setenv("STORE", str(path))
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert at.sidebar.selectbox[0].value == up and not at.exception
    assert next(m for m in at.metric if m.label == "Neurons for 50% of the net reduction").value == "none"
    assert any("No curve: the net reduction R = -0.2500 is not positive" in i.value for i in at.info)
    assert not any("of the net reduction:" in c.value for c in at.caption)
    assert any("No gross reduction" in m.value for m in at.markdown) and not any("nan%" in m.value for m in at.markdown)
    at.sidebar.selectbox[0].set_value(run_id).run()
    assert not at.info and any("50% of the net reduction:" in c.value for c in at.caption)


def test_toxicity_filter_changes_the_table(two_run_store):
    first, _ = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60).run()
    at.sidebar.selectbox[0].set_value(first).run()
    n_all = table_with(at, "continuation").shape[0]
    at.slider[0].set_value(0.5).run()
    shown = table_with(at, "continuation")
    assert shown.shape[0] < n_all and (shown["toxicity"] >= 0.5).all()


def test_missing_store_shows_an_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("STORE", str(tmp_path / "none.duckdb"))
    at = AppTest.from_file(HOME, default_timeout=30).run()
    assert not at.exception
    assert "make pipeline" in at.error[0].value


PAGES = ROOT / "app" / "pages"


@pytest.fixture
def app_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "app"))  # as `streamlit run app/Home.py` does for its pages


def open_page(page: str, run_id: str, **state) -> AppTest:
    """A page as it renders with run_id picked in the sidebar (and any other session state given)."""
    at = AppTest.from_file(page, default_timeout=60)
    at.session_state["run_id"] = run_id
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def sql(query: str, params: list) -> list[tuple]:
    con = store.connect(os.environ["STORE"])
    try:
        return con.execute(query, params).fetchall()
    finally:
        con.close()


def _chart_tables(chart) -> list:
    import pyarrow as pa

    payloads = [d.data.data for d in chart.proto.datasets] + ([chart.proto.data.data] if chart.proto.data.data else [])
    return [pa.ipc.open_stream(p).read_all() for p in payloads]


def chart_rows(at: AppTest, index: int, column: str) -> list:
    """The values of one column in a chart's data, read back from its Arrow payloads."""
    tables = _chart_tables(at.get("vega_lite_chart")[index])
    return [v for t in tables if column in t.column_names for v in t.column(column).to_pylist()]


def chart_with(at: AppTest, column: str) -> int:
    """The index of the first chart on the page whose data has this column."""
    charts = at.get("vega_lite_chart")
    return next(i for i, c in enumerate(charts) if any(column in t.column_names for t in _chart_tables(c)))


def test_overview_headline_is_the_stored_tp_share(two_run_store):
    first, _ = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60)
    at.session_state["run_id"] = first
    at.run()
    assert not at.exception
    headline = next(m.value for m in at.markdown if "dampened toxic neurons (TP-)" in m.value)
    (tp,), = sql("SELECT share_gross FROM group_summary WHERE run_id = ? AND group_code = 'TP-'", [first])
    assert headline.startswith(f"### {tp:.1%}")
    groups = at.dataframe[0].value
    assert set(groups["group_code"]) == {"TP-", "TN+", "AP+", "AN-", "TP+", "TN-", "AP-", "AN+"}
    assert (groups["ci_low"] <= groups["ci_high"]).all()
    assert len(at.get("vega_lite_chart")) >= 3


def test_cumulative_curve_keeps_the_top_and_samples_the_whole_tail(two_run_store, app_on_path):
    """Thinned to 40 points of the tiny run's neurons: ranks 1..20 all, then every step-th rank to the last, so
    no stretch of the curve is drawn as a straight line over more than one step."""
    import queries

    first, _ = two_run_store
    (total,), = sql("SELECT n_neurons FROM attribution WHERE run_id = ?", [first])
    ranks = queries.cumulative(os.environ["STORE"], 0.0, first, max_points=40)["delta_rank"].to_list()
    step = total // 20
    assert total > 40 * 10
    assert ranks[:20] == list(range(1, 21)) and ranks[-1] == total
    assert max(b - a for a, b in zip(ranks, ranks[1:])) <= step
    assert len(ranks) <= 20 + total // step + 1


def test_overview_without_attribution_says_so(two_run_store):
    _, second = two_run_store
    at = AppTest.from_file(HOME, default_timeout=60)
    at.session_state["run_id"] = second
    at.run()
    assert not at.exception
    assert "no attribution" in at.info[0].value


GROUPS_PAGE = str(PAGES / "1_Neuron_groups.py")


def test_neuron_groups_presets_and_filters_change_the_table(two_run_store, app_on_path):
    first, _ = two_run_store
    at = open_page(GROUPS_PAGE, first)
    assert not at.exception
    everything = at.dataframe[0].value
    assert len(set(everything["group_code"])) > 2

    at.sidebar.selectbox(key="preset").set_value("toxic dampened (TP-)").run()
    tp = at.dataframe[0].value
    (n_tp,), = sql("SELECT count(*) FROM neurons WHERE run_id = ? AND group_code = 'TP-'", [first])
    assert set(tp["group_code"]) == {"TP-"} and len(tp) == min(n_tp, 1000)
    assert any(f"**{n_tp:,}**" in m.value for m in at.markdown)
    assert (tp["delta"].abs().diff().dropna() <= 1e-12).all()  # sorted by |delta|, largest first

    at.sidebar.selectbox(key="preset").set_value("toxicity-increasing (TP+, TN-, AP-, AN+)").run()
    assert set(at.dataframe[0].value["group_code"]) <= {"TP+", "TN-", "AP-", "AN+"}
    # delta uses the DPO value vectors, so a neuron whose activation barely moved can carry either sign;
    # the groups taken together must still increase toxicity.
    assert at.dataframe[0].value["delta"].sum() < 0

    at.sidebar.selectbox(key="preset").set_value("all groups").run()
    at.sidebar.slider[0].set_value((1, 1)).run()
    assert set(at.dataframe[0].value["layer"]) == {1}
    at.sidebar.number_input[1].set_value(7).run()
    top7 = at.dataframe[0].value
    expected = sql("SELECT neuron FROM neurons WHERE run_id = ? AND layer = 1 ORDER BY abs(delta) DESC LIMIT 7", [first])
    assert top7["neuron"].tolist() == [n for n, in expected]
    assert [b.label for b in at.get("download_button")] == ["Download CSV", "Download Parquet"]


def test_neuron_groups_min_activation_and_cos_filters(two_run_store, app_on_path):
    first, _ = two_run_store
    at = open_page(GROUPS_PAGE, first)
    at.sidebar.slider[1].set_value((0.0, 1.0)).run()
    assert (at.dataframe[0].value["cos"] >= 0).all()
    at.sidebar.number_input[0].set_value(0.05).run()
    shown = at.dataframe[0].value
    (n,), = sql("SELECT count(*) FROM neurons WHERE run_id = ? AND cos >= 0 AND abs(act) >= 0.05", [first])
    assert (shown["act"].abs() >= 0.05).all() and len(shown) == min(n, 1000)


def test_prompts_page_adds_up_to_the_run_and_shows_both_models(two_run_store, app_on_path):
    """Per-prompt deltas come from per-prompt means; as every prompt has T positions, their mean gives the
    net reduction attribute computed from the means over all prompts."""
    first, second = two_run_store
    at = open_page(str(PAGES / "7_Prompts.py"), first)
    assert not at.exception
    rows = table_with(at, "net_reduction")
    assert len(rows) == TINY_WORLD["n_prompts"] and rows["net_reduction"].is_monotonic_decreasing
    (net,), = sql("SELECT net_reduction FROM attribution WHERE run_id = ?", [first])
    assert rows["net_reduction"].mean() == pytest.approx(net, rel=1e-5)
    gens = dict(((v, i), (c, t)) for v, i, c, t in sql(
        "SELECT variant, prompt_id, continuation, toxicity FROM generations WHERE run_id = ?", [first]))
    for r in rows.head(5).itertuples():
        assert (r.continuation, r.toxicity) == gens[("base", r.prompt_id)]
        assert (r.continuation_dpo, r.toxicity_dpo) == gens[("dpo", r.prompt_id)]

    at = open_page(str(PAGES / "7_Prompts.py"), second)  # a run without attribution
    assert not at.exception and "before the `attribute` stage" in at.info[0].value


def test_prompts_page_on_planted_per_prompt_sums(two_run_store, app_on_path):
    """Prompt 0: TP- 2 and AP+ 2 reduce, AP- -1 increases (net 3, gross 4, TP- share 50%). Prompt 1: its
    reducing groups add up to -0.5 (groups are fixed by the means over all prompts, so this happens on
    real models): no share. Prompt 2: TN+ alone."""
    import queries  # app/, on the path as for the pages

    planted = [(0, 0, "TP-", 2.0), (0, 1, "AP+", 2.0), (0, 0, "AP-", -1.0), (1, 0, "TP-", -1.0), (1, 1, "AN-", 0.5),
               (2, 1, "TN+", 1.0)]
    groups = pl.DataFrame(planted, schema=["prompt_id", "layer", "group_code", "sum_delta"], orient="row")
    gens = pl.DataFrame({"variant": ["base"] * 3 + ["dpo"] * 3, "prompt_id": [0, 1, 2] * 2, "prompt": ["a", "b", "c"] * 2,
                         "continuation": ["x0", "x1", "x2", "y0", "y1", "y2"], "toxicity": [0.9, 0.8, 0.7, 0.1, 0.2, 0.3],
                         "scorer": ["s==1"] * 6})
    run = store.write_run(os.environ["STORE"], run={"name": "planted", "model": "m", "config": {}, "config_hash": "h4",
                                                    "packages": {}}, stages=[],
                          tables={"prompt_groups": groups, "generations": gens})
    at = open_page(str(PAGES / "7_Prompts.py"), run)
    assert not at.exception
    rows = table_with(at, "net_reduction")
    assert rows["prompt_id"].tolist() == [0, 2, 1]
    assert rows["net_reduction"].tolist() == pytest.approx([3.0, 1.0, -0.5])
    assert rows["gross_reduction"].tolist() == pytest.approx([4.0, 1.0, -0.5])
    assert rows["share_tp"].isna().tolist() == [False, False, True]
    assert rows["share_tp"].tolist()[:2] == pytest.approx([0.5, 0.0])
    assert rows["continuation"].tolist() == ["x0", "x2", "x1"] and rows["toxicity_dpo"].tolist() == [0.1, 0.3, 0.2]
    shares = queries.prompt_group_shares(os.environ["STORE"], 0.0, run)
    assert sorted(shares.select("prompt_id", "group_code", "share_gross").rows()) == \
        [(0, "AP+", 0.5), (0, "AP-", -0.25), (0, "TP-", 0.5), (2, "TN+", 1.0)]  # prompt 1 has no gross reduction


def test_layers_page_interventions_and_groups(two_run_store, app_on_path):
    first, _ = two_run_store
    at = open_page(str(PAGES / "2_Layers.py"), first)
    assert not at.exception
    picker = at.multiselect[0]
    picker.set_value(picker.options[-2:]).run()
    assert set(chart_rows(at, 0, "variant")) == {"base", "dpo", *picker.options[-2:]}
    at.multiselect[1].set_value(["TP-"]).run()
    assert set(chart_rows(at, 1, "group_code")) == {"TP-"}
    assert at.dataframe[0].value.columns.tolist() == ["layer", "TP-"]


NEURON_PAGE = str(PAGES / "3_Neuron.py")


def test_neuron_page_shows_the_picked_neuron(two_run_store, app_on_path):
    first, _ = two_run_store
    (layer, neuron, group, rank), = sql("SELECT layer, neuron, group_code, delta_rank FROM neurons "
                                         "WHERE run_id = ? AND delta_rank = 2", [first])
    at = open_page(NEURON_PAGE, first, neuron_pick=(layer, neuron))
    assert not at.exception
    assert at.number_input(key="layer").value == layer and at.number_input(key="neuron").value == neuron
    title = next(m.value for m in at.markdown if m.value.startswith("### L"))
    assert f"L{layer}.N{neuron}" in title and group in title and f"rank {rank:,}" in title
    tokens = sql("SELECT token FROM neuron_tokens WHERE run_id = ? AND layer = ? AND neuron = ? ORDER BY rank",
                 [first, layer, neuron])
    assert at.dataframe[0].value["token"].tolist() == [t for t, in tokens]
    assert at.dataframe[1].value["prompt"].notna().all()

    (other,), = sql("SELECT neuron FROM neurons WHERE run_id = ? AND layer = ? AND delta_rank > 1000 LIMIT 1", [first, layer])
    at.number_input(key="neuron").set_value(other).run()
    (cos,), = sql("SELECT cos FROM neurons WHERE run_id = ? AND layer = ? AND neuron = ?", [first, layer, other])
    assert at.metric[0].value == f"{cos:.3f}"
    assert any("Not stored for this neuron" in c.value for c in at.caption)


def test_neuron_page_refuses_a_neuron_that_does_not_exist(two_run_store, app_on_path):
    first, _ = two_run_store
    at = open_page(NEURON_PAGE, first, neuron_pick=(0, 10**6))
    assert not at.exception
    assert "No neuron 1000000 in layer 0" in at.error[0].value


def test_neuron_page_opens_a_shared_link_and_refuses_a_bad_one(two_run_store, app_on_path):
    first, _ = two_run_store
    (layer, neuron), = sql("SELECT layer, neuron FROM neurons WHERE run_id = ? AND delta_rank = 5", [first])
    (top_layer, top_neuron), = sql("SELECT layer, neuron FROM neurons WHERE run_id = ? AND delta_rank = 1", [first])
    (n_layers,), = sql("SELECT count(DISTINCT layer) FROM neurons WHERE run_id = ?", [first])
    for link, shown, warning in [({"layer": layer, "neuron": neuron}, (layer, neuron), None),
                                 ({"layer": "x", "neuron": 1}, (top_layer, top_neuron), "not whole numbers"),
                                 ({"layer": n_layers, "neuron": 1}, (top_layer, top_neuron), f"layer {n_layers} is not in")]:
        at = AppTest.from_file(NEURON_PAGE, default_timeout=60)
        at.session_state["run_id"] = first
        at.query_params.update({k: str(v) for k, v in link.items()})
        at.run()
        assert not at.exception, link
        assert (at.number_input(key="layer").value, at.number_input(key="neuron").value) == shown, link
        warnings = [w.value for w in at.warning]
        assert (any(warning in w for w in warnings) if warning else not warnings), link


def test_a_shared_link_opens_its_own_run_not_the_newest(two_run_store, app_on_path):
    """A colleague opening ?run=&layer=&neuron= in a new session sees that run's neuron, and the URL of any page
    names the run it shows; a run the store lacks is said so."""
    first, second = two_run_store  # second is the newest, the sidebar's default
    (layer, neuron), = sql("SELECT layer, neuron FROM neurons WHERE run_id = ? AND delta_rank = 5", [first])
    at = AppTest.from_file(NEURON_PAGE, default_timeout=60)
    at.query_params.update(run=first, layer=str(layer), neuron=str(neuron))
    at.run()
    assert not at.exception and not at.warning
    assert at.sidebar.selectbox[0].value == first and at.query_params["run"] == first
    assert (at.number_input(key="layer").value, at.number_input(key="neuron").value) == (layer, neuron)
    at = AppTest.from_file(str(PAGES / "1_Neuron_groups.py"), default_timeout=60)
    at.query_params.update(run="20000101-000000-abcdef")
    at.run()
    assert any("run 20000101-000000-abcdef is not in this store" in w.value for w in at.warning)
    assert at.sidebar.selectbox[0].value == second and at.query_params["run"] == second


@pytest.fixture
def compare_store(tiny_run, tmp_path, monkeypatch):
    """The tiny run plus a planted second run: the same neurons with the top 3 by delta moved to the end of
    the ranking, so its top k shares exactly k - 3 neurons with the first run's top k."""
    _, run_id = tiny_run
    return run_id, second_run(tiny_run, tmp_path, monkeypatch, "shifted",
                              lambda n: n.with_columns(((pl.col("delta_rank") - 4) % n.height + 1).alias("delta_rank")))


def second_run(tiny_run, tmp_path, monkeypatch, name: str, edit, model: str | None = None) -> str:
    """A copy of the tiny run's store (STORE points at it; made once per test, so that runs add up) with a run
    `name` whose neurons are edit(the tiny run's neurons) and whose group shares are the tiny run's; of the tiny
    run's model unless `model` is given."""
    cfg, run_id = tiny_run
    path = tmp_path / "c.duckdb"
    if not path.exists():
        shutil.copyfile(cfg.run.store, path)
    con = store.connect(path)
    neurons = con.sql("SELECT * EXCLUDE (run_id) FROM neurons WHERE run_id = ?", params=[run_id]).pl()
    groups = con.sql("SELECT * EXCLUDE (run_id) FROM group_summary WHERE run_id = ?", params=[run_id]).pl()
    (same,), = con.execute("SELECT model FROM runs WHERE run_id = ?", [run_id]).fetchall()
    con.close()
    monkeypatch.setenv("STORE", str(path))
    return store.write_run(path, run={"name": name, "model": model or same, "config": {}, "config_hash": name, "packages": {}},
                           stages=[], tables={"neurons": edit(neurons), "group_summary": groups})


def test_compare_runs_overlap_of_top_neurons(compare_store, app_on_path):
    first, second = compare_store
    at = open_page(str(PAGES / "5_Compare_runs.py"), first)
    assert not at.exception
    at.selectbox[0].set_value(second).run()
    assert set(chart_rows(at, 0, "label")) == {"A · tiny", "B · shifted"}
    for k in (10, 50):
        at.number_input[0].set_value(k).run()
        assert any(m.value.startswith(f"**{k - 3:,}** neurons are in both top-{k:,} lists") for m in at.markdown)
        assert len(at.dataframe[-1].value) == k + 3


def test_compare_runs_of_two_models_of_one_shape_pair_neurons_only_when_asked(tiny_run, tmp_path, monkeypatch, app_on_path):
    """gpt2-medium and Pythia-410M are both 24 x 4,096: matching shapes do not make neuron i the same neuron."""
    _, run_id = tiny_run
    other = second_run(tiny_run, tmp_path, monkeypatch, "other model", lambda n: n, model="EleutherAI/pythia-410m")
    at = open_page(str(PAGES / "5_Compare_runs.py"), run_id)
    at.selectbox[0].set_value(other).run()
    assert not at.exception
    assert any("base models differ" in c.value and "EleutherAI/pythia-410m" in c.value for c in at.caption)
    assert not any("neurons are in both" in m.value for m in at.markdown)
    at.checkbox[0].check().run()
    assert any(m.value.startswith("**100** neurons are in both top-100 lists") for m in at.markdown)


def test_compare_runs_pairs_neurons_of_two_revisions_of_one_model(tiny_run, tmp_path, monkeypatch, app_on_path):
    """NAME@REVISION: two commits of one repository pair their neurons by index without being asked, and say so;
    another repository pinned to a revision is another model, and so is a local folder with @ in its path."""
    runs = {m: second_run(tiny_run, tmp_path, monkeypatch, m, lambda n: n, model=m)
            for m in ("acme/tiny@" + "1" * 40, "acme/tiny@v2", "acme/other@v2", "/home/jo@corp/a", "/home/jo@corp/b")}
    at = open_page(str(PAGES / "5_Compare_runs.py"), runs["acme/tiny@" + "1" * 40])
    at.selectbox[0].set_value(runs["acme/tiny@v2"]).run()
    assert not at.exception and not at.checkbox
    assert any("two revisions of one model" in c.value and "acme/tiny@v2" in c.value for c in at.caption)
    assert any(m.value.startswith("**100** neurons are in both top-100 lists") for m in at.markdown)
    at.selectbox[0].set_value(runs["acme/other@v2"]).run()
    assert any("base models differ" in c.value for c in at.caption)
    assert not any("neurons are in both" in m.value for m in at.markdown)
    at = open_page(str(PAGES / "5_Compare_runs.py"), runs["/home/jo@corp/a"])
    at.selectbox[0].set_value(runs["/home/jo@corp/b"]).run()
    assert any("base models differ" in c.value for c in at.caption) and at.checkbox


def test_compare_runs_lists_the_settings_that_differ(tiny_run, tmp_path, monkeypatch, app_on_path):
    """Runs written from the tiny run's config with two settings changed (and its name, which is no setting of the
    result): the page lists exactly those two, with each run's value; the same config again lists none."""
    cfg, run_id = tiny_run
    path = tmp_path / "c.duckdb"
    shutil.copyfile(cfg.run.store, path)
    monkeypatch.setenv("STORE", str(path))
    (config,), = sql("SELECT config FROM runs WHERE run_id = ?", [run_id])
    config = json.loads(config)
    edited = json.loads(json.dumps(config))
    edited["model"]["bos"], edited["record"]["max_prompt_tokens"], edited["run"]["name"] = "tokenizer", 32, "other"
    runs = {name: store.write_run(path, run={"name": name, "model": "m", "config": c, "config_hash": name, "packages": {}},
                                  stages=[], tables={}) for name, c in (("edited", edited), ("same", config))}
    at = open_page(str(PAGES / "5_Compare_runs.py"), run_id)
    at.selectbox[0].set_value(runs["edited"]).run()
    assert not at.exception and at.expander[0].label == "2 settings differ between A and B"
    assert at.dataframe[0].value.values.tolist() == [["model.bos", json.dumps(config["model"]["bos"]), '"tokenizer"'],
                                                     ["record.max_prompt_tokens", json.dumps(config["record"]["max_prompt_tokens"]), "32"]]
    at.selectbox[0].set_value(runs["same"]).run()
    assert "A and B were made with the same settings (their [run] sections aside)." in [c.value for c in at.caption]
    assert not at.expander


def test_compare_runs_of_different_shapes_compares_group_shares_only(tiny_run, tmp_path, monkeypatch, app_on_path):
    _, run_id = tiny_run
    other = second_run(tiny_run, tmp_path, monkeypatch, "one layer", lambda n: n.filter(pl.col("layer") == 0))
    at = open_page(str(PAGES / "5_Compare_runs.py"), run_id)
    at.selectbox[0].set_value(other).run()
    assert not at.exception
    assert any("differ in shape" in c.value for c in at.caption)
    assert not any("neurons are in both" in m.value for m in at.markdown)
    assert set(chart_rows(at, 0, "label")) == {"A · tiny", "B · one layer"}


def test_interventions_page_says_why_recovered_is_empty(tmp_path, monkeypatch, app_on_path):
    """A planted run whose DPO drop is noise (stage score left recovered NULL): the page gives the drop
    with its error and says why the column is empty; one prompt has no error to give."""
    path = tmp_path / "noise.duckdb"
    monkeypatch.setenv("STORE", str(path))
    gens = pl.DataFrame({"variant": ["base", "dpo"] * 2, "prompt_id": [0, 0, 1, 1], "prompt": ["a", "a", "b", "b"],
                         "continuation": ["w", "x", "y", "z"], "toxicity": [0.5, 0.2, 0.2, 0.4], "scorer": ["s==1"] * 4})
    rows = pl.DataFrame({"intervention_id": ["base", "dpo"], "kind": ["base", "dpo"], "params": ["{}"] * 2,
                         "n_neurons": [0, 0], "toxicity": [0.35, 0.3], "toxic_share": [0.0, 0.0], "perplexity": [20.0, 21.0],
                         "f1": [0.1, 0.1], "recovered": pl.Series([None, None], dtype=pl.Float64)})
    run_ids = [store.write_run(path, run={"name": f"noise{n}", "model": "m", "config": {}, "config_hash": f"n{n}", "packages": {}},
                               stages=[{"stage": "score", "cache_key": "k", "seconds": 1.0,
                                        "summary": {"dpo_drop": 0.05, "dpo_drop_se": se}}],
                               tables={"generations": gens.head(2 * n), "interventions": rows})
               for n, se in [(2, 0.25), (1, None)]]
    at = open_page(str(ROOT / "app" / "pages" / "4_Interventions.py"), run_ids[0])
    assert not at.exception
    assert "DPO's toxicity drop: 0.0500 (± 0.2500 standard error, paired over 2 prompts)." in [c.value for c in at.caption]
    assert "within two standard errors of zero" in at.info[0].value
    at = open_page(str(ROOT / "app" / "pages" / "4_Interventions.py"), run_ids[1])
    assert "DPO's toxicity drop: 0.0500 (one prompt: no standard error)." in [c.value for c in at.caption]


def test_interventions_page_names_the_f1_protocol_of_the_run(two_run_store, app_on_path):
    """F1 on Lee et al.'s samples counts the prompt's tokens and does not compare with F1 on passage halves:
    the page and the overview say which one a run used."""
    path = os.environ["STORE"]
    rows = pl.DataFrame({"intervention_id": ["base", "dpo"], "kind": ["base", "dpo"], "params": ["{}"] * 2,
                         "n_neurons": [0, 0], "toxicity": [0.4, 0.2], "toxic_share": [0.0, 0.0], "perplexity": [20.0, 21.0],
                         "f1": [0.19, 0.2], "recovered": [0.0, 1.0]})
    run = store.write_run(path, run={"name": "samples", "model": "m", "config": {"data": {"f1_samples": "data/wiki_samples.jsonl"}},
                                     "config_hash": "f1", "packages": {}}, stages=[], tables={"interventions": rows})
    page = str(ROOT / "app" / "pages" / "4_Interventions.py")
    at = open_page(page, run)
    assert not at.exception and "F1 on the samples in `data/wiki_samples.jsonl`." in at.caption[0].value
    assert "F1 on held-out passages." in open_page(page, two_run_store[0]).caption[0].value
    at = AppTest.from_file(HOME, default_timeout=60).run()
    assert at.sidebar.selectbox[0].value == run and any("f1_samples = `data/wiki_samples.jsonl`" in m.value for m in at.markdown)


def test_interventions_page_table_and_layer_choice(two_run_store, app_on_path):
    first, second = two_run_store
    at = open_page(str(ROOT / "app" / "pages" / "4_Interventions.py"), first)
    assert not at.exception
    table = at.dataframe[0].value
    assert table["intervention_id"].tolist()[:2] == ["base", "dpo"]
    assert table["recovered"].tolist()[:2] == [0.0, 1.0]
    (drop, se, n), = sql("""SELECT avg(b.toxicity - d.toxicity), stddev_samp(b.toxicity - d.toxicity) / sqrt(count(*)),
                               count(*) FROM generations b JOIN generations d USING (run_id, prompt_id)
                        WHERE run_id = ? AND b.variant = 'base' AND d.variant = 'dpo'""", [first])
    assert f"DPO's toxicity drop: {drop:.4f} (± {se:.4f} standard error, paired over {n} prompts)." in [c.value for c in at.caption]
    assert not at.info

    picker = at.main.selectbox[0]
    other = picker.options[-1]
    picker.set_value(other).run()
    assert set(chart_rows(at, chart_with(at, "mlp_proj"), "variant")) == {"base", "dpo", other}
    at.session_state["run_id"] = second
    at.run()
    assert "no interventions" in at.info[0].value
