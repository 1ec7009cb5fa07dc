"""Filter the neurons by group, layer, alignment and activation; see where they sit and how DPO moved them."""

import io

import streamlit as st

import charts
import queries
from common import neuron_bounds, open_neuron, store_and_run

PRESETS = {
    "all groups": charts.REDUCING + charts.INCREASING,
    "toxic dampened (TP-)": ["TP-"],
    "anti-toxic promoted or released (AP+, AN-)": ["AP+", "AN-"],
    "toxicity-increasing (TP+, TN-, AP-, AN+)": charts.INCREASING,
    "all reducing (TP-, TN+, AP+, AN-)": charts.REDUCING,
}
MAX_POINTS = 5000  # the scatter draws the top rows only: a browser chokes on 100k marks

st.set_page_config(page_title="Neuron groups · dpo-neurons", layout="wide")
st.title("Neuron groups")
path, version, run_id = store_and_run()

bounds = neuron_bounds(path, version, run_id)


def apply_preset():
    st.session_state["groups"] = PRESETS[st.session_state["preset"]]


with st.sidebar:
    st.selectbox("Preset", list(PRESETS), key="preset", on_change=apply_preset)
    st.session_state.setdefault("groups", PRESETS["all groups"])
    groups = st.multiselect("Groups", charts.REDUCING + charts.INCREASING, key="groups")
    lo, hi = bounds["layer_min"], bounds["layer_max"]
    layers = st.slider("Layers", lo, hi, (lo, hi)) if hi > lo else (lo, hi)
    cos = st.slider("cos (alignment with the probe)", -1.0, 1.0, (-1.0, 1.0), 0.01)
    min_abs_act = st.number_input("Minimum |act|", 0.0, value=0.0, format="%.4f",
                                  help="Base-model mean activation over generated tokens.")
    top_n = st.number_input("Top N by |delta|", 1, bounds["n_neurons"], min(1000, bounds["n_neurons"]), step=100)

rows = queries.neurons(path, version, run_id, tuple(groups), tuple(layers), tuple(cos), min_abs_act, int(top_n))
n_match = rows["n_match"][0] if rows.height else 0
rows = rows.drop("n_match")
st.markdown(f"**{n_match:,}** of {bounds['n_neurons']:,} neurons pass the filters; showing the top **{rows.height:,}** "
            f"by |delta|, which sum to delta = {rows['delta'].sum():.4f}.")
if rows.height == 0:
    st.stop()

left, right = st.columns(2)
with left:
    st.subheader("cos against delta")
    st.caption("Click a point to open the neuron." + (f" Top {MAX_POINTS:,} rows drawn." if rows.height > MAX_POINTS else ""))
    clicked = st.altair_chart(charts.cos_vs_delta(rows.head(MAX_POINTS)), width="stretch", on_select="rerun",
                              key="scatter")
    picked = clicked.selection.get("neuron", []) if clicked else []
    if picked:
        open_neuron(picked[0]["layer"], picked[0]["neuron"])
with right:
    st.subheader("proj before and after DPO")
    st.caption("Each neuron of the top 500 by |delta|: a segment from proj (base) to proj_dpo (dot at the DPO end).")
    st.altair_chart(charts.proj_segments(rows.head(500)), width="stretch")

st.subheader("Neurons")
st.caption("Click a row to open the neuron; click a column header to sort.")
table = st.dataframe(rows, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row",
                     key="neuron_table")
if table.selection.rows:
    row = rows.row(table.selection.rows[0], named=True)
    open_neuron(row["layer"], row["neuron"])

name = f"neurons-{run_id}"
left, right = st.columns(2)
left.download_button("Download CSV", rows.write_csv(), f"{name}.csv", "text/csv")
parquet = io.BytesIO()
rows.write_parquet(parquet)
right.download_button("Download Parquet", parquet.getvalue(), f"{name}.parquet", "application/vnd.apache.parquet")
