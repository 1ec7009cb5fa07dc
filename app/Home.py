"""Runs in the store, what each run's models generate, and how toxic it is."""

import streamlit as st

import charts
import queries
from common import store_and_run

st.set_page_config(page_title="dpo-neurons", layout="wide")
st.title("dpo-neurons")
st.caption("How DPO safety fine-tuning reduces toxicity inside a language model, neuron by neuron.")

path, version, run_id = store_and_run()
runs = queries.runs(path, version)

st.subheader("Runs in the store")
st.dataframe(runs, hide_index=True, width="stretch")

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

tox = queries.toxicity_by_variant(path, version, run_id)
if tox.height:
    cols = st.columns(tox.height)
    for col, row in zip(cols, tox.iter_rows(named=True)):
        col.metric(f"Toxicity, {row['variant']} model", f"{row['toxicity']:.3f}",
                   help=f"Mean over {row['n']} continuations ({row['scorer']}); {row['toxic_share']:.0%} above 0.5.")

with st.expander("Stages of this run"):
    st.dataframe(queries.stages(path, version, run_id), hide_index=True, width="stretch")

variants = queries.variants(path, version, run_id)
if variants:
    st.subheader("Generations")
    left, right = st.columns(2)
    variant = left.selectbox("Model", variants)
    min_tox = right.slider("Minimum toxicity", 0.0, 1.0, 0.0, 0.05)
    gens = queries.generations(path, version, run_id, variant, min_tox)
    st.caption(f"{gens.height} continuations of challenge prompts, scored by {gens['scorer'][0] if gens.height else 'the scorer'}.")
    st.altair_chart(charts.toxicity_histogram(gens), width="stretch")
    st.dataframe(gens.drop("scorer"), hide_index=True, width="stretch",
                 column_config={"toxicity": st.column_config.ProgressColumn("toxicity", min_value=0.0, max_value=1.0)})
