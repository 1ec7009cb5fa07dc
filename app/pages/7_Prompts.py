"""Prompt by prompt: how DPO's reduction spreads over the challenge prompts, which groups carry it on
each, and whether the probe's reading follows the scorer's."""

import streamlit as st

import charts
import queries
from common import store_and_run

st.set_page_config(page_title="Prompts · dpo-neurons", layout="wide")
st.title("Prompts")
path, version, run_id = store_and_run()

rows = queries.prompts(path, version, run_id)
if rows.height == 0:
    st.info("This run has no per-prompt attribution: its pipeline stopped before the `attribute` stage.")
    st.stop()

st.caption("Each prompt's delta of every neuron, from the mean activations of that prompt's continuation under the "
           "base and the DPO model, summed by group (the rows behind the intervals on the Overview). "
           f"{rows.height:,} prompts; the mean of their net reductions is the run's net reduction.")
left, right = st.columns(2)
with left:
    st.subheader("Group shares across prompts")
    st.altair_chart(charts.prompt_shares(queries.prompt_group_shares(path, version, run_id)), width="stretch")
    st.caption("One box per group: its share of each prompt's gross reduction (quartiles, whiskers at 1.5 times the "
               "interquartile range, prompts beyond them as points; shares past -100% or 200% sit on the edge).")
with right:
    st.subheader("Probe projection against the scorer")
    st.altair_chart(charts.reduction_vs_toxicity(rows), width="stretch")
    st.caption("A prompt to the right had its continuation's projection onto the probe lowered most; one at the top had "
               "its continuation's toxicity, as the scorer reads it, lowered most.")

st.subheader("Prompts, largest net reduction first")
st.dataframe(rows, hide_index=True, width="stretch",
             column_config={"share_tp": st.column_config.NumberColumn("TP- share", format="percent"),
                            "toxicity": st.column_config.ProgressColumn("toxicity", min_value=0.0, max_value=1.0),
                            "toxicity_dpo": st.column_config.ProgressColumn("toxicity_dpo", min_value=0.0, max_value=1.0)})
