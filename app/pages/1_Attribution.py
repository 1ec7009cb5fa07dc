"""Where DPO's toxicity reduction comes from: the eight neuron groups (method.md)."""

import streamlit as st

import charts
import queries
from common import store_and_run

st.set_page_config(page_title="Attribution · dpo-neurons", layout="wide")
st.title("Attribution")
path, version, run_id = store_and_run()

with st.spinner("Loading the attribution..."):
    attr = queries.attribution(path, version, run_id)
    groups = queries.group_summary(path, version, run_id)
if attr is None or groups.height == 0:
    st.info("This run has no attribution yet: its pipeline stopped before the `attribute` stage.")
    st.stop()

tp = groups.filter(groups["group_code"] == "TP-").row(0, named=True)
st.markdown(f"### {tp['share_gross']:.1%} of the reduction comes from dampened toxic neurons (TP-)")
st.caption(f"95% interval over prompts: {tp['ci_low']:.1%} to {tp['ci_high']:.1%}. Share of the gross reduction "
           f"(sum of delta over the four reducing groups, {attr['gross_reduction']:.4f}); the net reduction over all "
           f"{attr['n_neurons']:,} neurons is {attr['net_reduction']:.4f}.")

c = st.columns(4)
probe = queries.probe_metrics(path, version, run_id)
if probe:
    c[0].metric("Probe validation accuracy", f"{probe['val_accuracy']:.1%}", help=f"ROC-AUC {probe['val_roc_auc']:.3f}, "
                f"{probe['n_train']} train / {probe['n_val']} validation texts, layer {probe['layer']} residual.")
tox = queries.toxicity_by_variant(path, version, run_id)
for col, row in zip(c[1:3], tox.iter_rows(named=True)):
    col.metric(f"Toxicity, {row['variant']}", f"{row['toxicity']:.3f}")
c[3].metric("Neurons for 50% of the reduction", f"{attr['n_for_50']:,}")

left, right = st.columns(2)
with left:
    st.subheader("Group shares")
    st.altair_chart(charts.group_shares(groups), width="stretch")
with right:
    st.subheader("Cumulative contribution")
    marks = {"50%": attr["n_for_50"], "75%": attr["n_for_75"], "99%": attr["n_for_99"]}
    st.altair_chart(charts.cumulative(queries.cumulative(path, version, run_id), marks), width="stretch")
    st.caption(" · ".join(f"{k} of the net reduction: {v:,} neurons" for k, v in marks.items()))

st.subheader("Groups")
st.dataframe(groups, hide_index=True, width="stretch",
             column_config={c: st.column_config.NumberColumn(format="percent") for c in ("share_gross", "share_net", "ci_low", "ci_high")})

left, right = st.columns(2)
with left:
    st.subheader("Per layer, by group")
    st.altair_chart(charts.layer_groups(queries.layer_groups(path, version, run_id)), width="stretch")
with right:
    st.subheader("MLP output onto the probe, per layer")
    st.altair_chart(charts.layer_projections(queries.layers(path, version, run_id)), width="stretch")

curve = queries.dpo_curve(path, version, run_id)
if curve.height:
    st.subheader("DPO training")
    st.altair_chart(charts.dpo_curve(curve), width="stretch")
