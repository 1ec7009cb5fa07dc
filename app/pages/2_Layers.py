"""Layer by layer: the MLP output's projection onto the probe (paper Fig. 1a) and where each group's
contribution sits (paper Fig. 3)."""

import streamlit as st

import charts
import queries
from common import store_and_run

st.set_page_config(page_title="Layers · dpo-neurons", layout="wide")
st.title("Layers")
path, version, run_id = store_and_run()

layers = queries.layers(path, version, run_id)
by_group = queries.layer_groups(path, version, run_id)
if layers.height == 0 and by_group.height == 0:
    st.info("This run has no per-layer results: its pipeline stopped before the `record` stage.")
    st.stop()

st.subheader("MLP output onto the probe, per layer")
st.caption("Mean over generated tokens of each layer's MLP output . w_hat: the base model, the DPO model and "
           "the interventions you pick (ablations and patches edit the base model's neurons; poe_<alpha> and marco "
           "steer decoding and edit none).")
others = sorted(v for v in layers["variant"].unique().to_list() if v not in ("base", "dpo"))
chosen = st.multiselect("Interventions", others, default=others[:1])
shown = layers.filter(layers["variant"].is_in(["base", "dpo", *chosen]))
st.altair_chart(charts.layer_projections(shown), width="stretch")

if by_group.height:
    st.subheader("Contributions per layer, by group")
    groups = st.multiselect("Groups", charts.REDUCING + charts.INCREASING, default=charts.REDUCING + charts.INCREASING,
                            key="layer_groups")
    picked = by_group.filter(by_group["group_code"].is_in(groups))
    st.altair_chart(charts.layer_groups(picked), width="stretch")
    st.caption("Sum of delta over each group's neurons in each layer; reducing groups are positive, increasing negative. "
               "Groups follow the change of activation (dact) and delta also carries DPO's change of the value vectors, "
               "so a neuron's delta can have the other sign (in the demo run one in ten, carrying 0.6% of |delta|).")
    st.dataframe(picked.pivot(on="group_code", index="layer", values="sum_delta").sort("layer"),
                 hide_index=True, width="stretch")
