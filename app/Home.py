"""Runs in the store and sample generations of their models."""

import altair as alt
import streamlit as st

import queries

st.set_page_config(page_title="dpo-neurons", layout="wide")
st.title("dpo-neurons")
st.caption("How DPO safety fine-tuning reduces toxicity inside a language model, neuron by neuron.")

path = queries.store_path()
try:
    with st.spinner("Reading the store..."):
        version = queries.store_version(path)
        runs = queries.runs(path, version)
except queries.store.StoreError as e:
    st.error(str(e))
    st.stop()

if runs.height == 0:
    st.info(f"The store {path} holds no runs yet. Run `make pipeline` to write one.")
    st.stop()

run_id = st.sidebar.selectbox("Run", runs["run_id"].to_list(),
                              format_func=lambda r: f"{r} · {runs.filter(runs['run_id'] == r)['name'][0]}")
st.sidebar.caption(f"Store: `{path}`")

st.subheader("Runs in the store")
st.dataframe(runs, hide_index=True, use_container_width=True)

run = runs.filter(runs["run_id"] == run_id).row(0, named=True)
st.subheader(f"Run {run_id}")
st.write(f"**Model:** {run['model']}")

world = queries.world_summary(path, version, run_id)
if world:
    c = st.columns(4)
    c[0].metric("Held-out perplexity", f"{float(world['ppl_model']):.1f}",
                help="The demo model's perplexity on held-out neutral sentences.")
    c[1].metric("Unigram perplexity", f"{float(world['ppl_unigram']):.1f}",
                help="Add-one smoothed token frequencies on the same tokens: the floor a model must beat.")
    c[2].metric("Toxic share of corpus", f"{float(world['toxic_fraction']):.0%}")
    c[3].metric("Sample toxicity", f"{float(world['sample_toxicity']):.2f}",
                help=f"Mean toxicity of greedy continuations of challenge prompts ({world['scorer']}).")

with st.expander("Stages of this run"):
    st.dataframe(queries.stages(path, version, run_id), hide_index=True, use_container_width=True)

variants = queries.variants(path, version, run_id)
if variants:
    st.subheader("Sample generations")
    left, right = st.columns(2)
    variant = left.selectbox("Model", variants)
    min_tox = right.slider("Minimum toxicity", 0.0, 1.0, 0.0, 0.05)
    gens = queries.generations(path, version, run_id, variant, min_tox)
    st.caption(f"{gens.height} continuations of challenge prompts, scored by {gens['scorer'][0] if gens.height else 'the scorer'}.")
    st.altair_chart(
        alt.Chart(gens).mark_bar().encode(
            x=alt.X("toxicity:Q", bin=alt.Bin(maxbins=20), title="toxicity"),
            y=alt.Y("count():Q", title="continuations"),
            tooltip=[alt.Tooltip("count():Q", title="continuations")],
        ).properties(height=180),
        use_container_width=True,
    )
    st.dataframe(gens.drop("scorer"), hide_index=True, use_container_width=True,
                 column_config={"toxicity": st.column_config.ProgressColumn("toxicity", min_value=0.0, max_value=1.0)})
