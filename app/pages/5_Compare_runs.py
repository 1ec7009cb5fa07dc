"""Two runs side by side (two seeds, two betas, two models): do the same groups and neurons carry the reduction?"""

import re

import streamlit as st

import charts
import queries
from common import store_and_run


def repository(model: str) -> str:
    """NAME of a hub model pinned as NAME@REVISION, whose commits (a training checkpoint, a re-upload) keep neuron i
    where it was; a local checkpoint, which a run names by its absolute path (/home/jo@corp/ckpt), is its own."""
    name, at, _ = model.rpartition("@")
    return name if at and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else model


st.set_page_config(page_title="Compare runs · dpo-neurons", layout="wide")
st.title("Compare runs")
path, version, run_a = store_and_run()

runs = queries.runs(path, version)
ids = runs["run_id"].to_list()
names = dict(zip(ids, runs["name"].to_list()))
if len(ids) < 2:
    st.info("The store holds one run; write a second (another seed, beta or model) to compare.")
    st.stop()
others = [r for r in ids if r != run_a]
run_b = st.selectbox("Compare run A (the sidebar's run) with run B", others, format_func=lambda r: f"{r} · {names[r]}")

differ = queries.settings_that_differ(path, version, run_a, run_b)
if differ.height:
    title = f"{differ.height} setting differs" if differ.height == 1 else f"{differ.height} settings differ"
    with st.expander(f"{title} between A and B", expanded=differ.height <= 10):
        st.dataframe(differ.rename({"a": f"A · {names[run_a]}", "b": f"B · {names[run_b]}"}).fill_null("(not recorded)"),
                     hide_index=True, width="stretch")
else:
    st.caption("A and B were made with the same settings (their [run] sections aside).")

shares = queries.group_shares_of(path, version, (run_a, run_b))
if shares.filter(shares["run_id"] == run_a).height == 0 or shares.filter(shares["run_id"] == run_b).height == 0:
    st.info("Both runs need an attribution (the `attribute` stage) to be compared.")
    st.stop()
label = {run_a: f"A · {names[run_a]}", run_b: f"B · {names[run_b]}"}
shares = shares.with_columns(shares["run_id"].replace_strict(label).alias("label"))

st.subheader("Group shares")
st.altair_chart(charts.compare_shares(shares), width="stretch")
st.dataframe(shares.pivot(on="label", index="group_code", values="share_gross"), hide_index=True, width="stretch",
             column_config={v: st.column_config.NumberColumn(format="percent") for v in label.values()})

st.subheader("Top neurons in both runs")
shape_a, shape_b = (queries.neuron_bounds(path, version, r) for r in (run_a, run_b))
if shape_a is None or shape_b is None:
    st.info("One of the runs has no neuron table (its pipeline stopped before `attribute`).")
    st.stop()
if (shape_a["layer_max"], shape_a["n_neurons"]) != (shape_b["layer_max"], shape_b["n_neurons"]):
    st.caption(f"The runs' models differ in shape ({shape_a['n_neurons']:,} against {shape_b['n_neurons']:,} neurons "
               f"in {shape_a['layer_max'] + 1} against {shape_b['layer_max'] + 1} layers): neuron indices do not "
               "correspond, so only the group shares compare.")
    st.stop()
model = dict(zip(ids, runs["model"].to_list()))
repo = {r: repository(m) for r, m in model.items()}
if repo[run_a] == repo[run_b] and model[run_a] != model[run_b]:
    st.caption(f"The runs load two revisions of one model (A: {model[run_a]}, B: {model[run_b]}): neuron i is the "
               "same unit in both, with the weights each revision gives it.")
if repo[run_a] != repo[run_b]:
    # Two models of one shape (gpt2-medium and Pythia-410M: 24 x 4,096) would pair unrelated neurons by index.
    st.caption(f"The runs' base models differ (A: {model[run_a]}, B: {model[run_b]}): neuron i of one is not neuron i "
               "of the other, so only the group shares compare.")
    if not st.checkbox("They are one model under two names (a hub name and a local copy, say): compare neurons anyway"):
        st.stop()
k = st.number_input("k: top neurons by delta in each run", 1, 100_000, 100, step=50)
pairs = queries.top_overlap(path, version, run_a, run_b, int(k))
both = pairs.filter(pairs["top_a"] & pairs["top_b"]).height
n_a, n_b = pairs["top_a"].sum(), pairs["top_b"].sum()
st.markdown(f"**{both:,}** neurons are in both top-{k:,} lists ({both / max(1, min(n_a, n_b)):.0%} overlap; "
            f"Jaccard {both / max(1, pairs.height):.2f}).")
pairs = pairs.with_columns(
    (pairs["top_a"].cast(str) + pairs["top_b"].cast(str)).replace_strict(
        {"truetrue": "both", "truefalse": "A only", "falsetrue": "B only"}).alias("in_top"))
st.altair_chart(charts.delta_agreement(pairs), width="stretch")
st.dataframe(pairs, hide_index=True, width="stretch")
