"""Ablation and activation patching against DPO (paper Table 1 and Fig. 1a)."""

import streamlit as st

import charts
import queries
from common import store_and_run

st.set_page_config(page_title="Interventions · dpo-neurons", layout="wide")
st.title("Interventions")
path, version, run_id = store_and_run()

with st.spinner("Loading the interventions..."):
    table = queries.interventions(path, version, run_id)
if table.height == 0:
    st.info("This run has no interventions: its pipeline stopped before the `intervene` stage.")
    st.stop()

st.caption("Each intervention edits the base model's MLP neurons and is scored like the base and DPO models: "
           "toxicity of greedy continuations of the challenge prompts, perplexity and F1 on held-out text. "
           "`recovered` is the share of DPO's toxicity drop the intervention reproduces.")
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"toxic_share": st.column_config.NumberColumn(format="percent"),
                            "recovered": st.column_config.NumberColumn(format="percent")})

left, right = st.columns(2)
with left:
    st.subheader("Toxicity against perplexity")
    st.altair_chart(charts.toxicity_vs_perplexity(table), width="stretch")
with right:
    st.subheader("Patching sweep")
    sweep = table.filter(table["kind"] == "patch_top")
    if sweep.height:
        st.altair_chart(charts.patching_sweep(sweep, table.filter(table["kind"].is_in(["base", "dpo"]))), width="stretch")
    else:
        st.caption("No patch_top sweep in this run's [intervene] config.")

st.subheader("MLP output onto the probe, per layer")
others = [i for i in table["intervention_id"].to_list() if i not in ("base", "dpo")]
chosen = st.selectbox("Intervention", others)
layers = queries.layers(path, version, run_id)
st.altair_chart(charts.layer_projections(layers.filter(layers["variant"].is_in(["base", "dpo", chosen]))), width="stretch")
