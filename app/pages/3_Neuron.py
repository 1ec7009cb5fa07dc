"""One neuron: its numbers and rank, its group, the tokens it promotes, and the prompts where it fires."""

import streamlit as st

import charts
import queries
from common import neuron_bounds, store_and_run

st.set_page_config(page_title="Neuron · dpo-neurons", layout="wide")
st.title("Neuron detail")
path, version, run_id = store_and_run()

bounds = neuron_bounds(path, version, run_id)

# A neuron arrives by a click on another page, by a shared link (?run=&layer=&neuron=), or from these inputs.
if "neuron_pick" in st.session_state:
    st.session_state["layer"], st.session_state["neuron"] = st.session_state.pop("neuron_pick")
elif "layer" not in st.session_state and "layer" in st.query_params:
    try:
        st.session_state["layer"] = int(st.query_params["layer"])
        st.session_state["neuron"] = int(st.query_params.get("neuron", 0))
    except ValueError:
        st.session_state.pop("layer", None)
        st.warning("The link's layer and neuron are not whole numbers; showing the top neuron instead.")
    else:
        if not bounds["layer_min"] <= st.session_state["layer"] <= bounds["layer_max"]:
            st.warning(f"The link's layer {st.session_state.pop('layer')} is not in this run (layers "
                       f"{bounds['layer_min']} to {bounds['layer_max']}); showing the top neuron instead.")
if "layer" not in st.session_state:
    top = queries.neurons(path, version, run_id, tuple(charts.REDUCING + charts.INCREASING),
                          (bounds["layer_min"], bounds["layer_max"]), (-1.0, 1.0), 0.0, 1)
    st.session_state["layer"], st.session_state["neuron"] = top["layer"][0], top["neuron"][0]

left, right = st.columns(2)
layer = left.number_input("Layer", bounds["layer_min"], bounds["layer_max"], key="layer")
neuron = right.number_input("Neuron", 0, key="neuron")
st.query_params.update(layer=layer, neuron=neuron)

row = queries.neuron(path, version, run_id, layer, neuron)
if row is None:
    st.error(f"No neuron {neuron} in layer {layer} of this run; neurons of a layer are numbered from 0.")
    st.stop()

st.markdown(f"### L{layer}.N{neuron} · group **{row['group_code']}** · rank {row['delta_rank']:,} of "
            f"{row['n_neurons']:,} by delta")
c = st.columns(6)
c[0].metric("cos", f"{row['cos']:.3f}", help=f"Rank {row['cos_rank']:,} by cos (most toxic-aligned first).")
c[1].metric("act", f"{row['act']:.4f}", help="Mean activation over generated tokens, base model: the neuron's coefficient on "
            "its value vector (on Gemma 2/3 and OLMo 2, whose MLP output passes a norm, the hook's activation over that "
            "norm's RMS; the stage summary of record says act_normed).")
c[2].metric("act_dpo", f"{row['act_dpo']:.4f}", delta=f"{row['act_dpo'] - row['act']:+.4f}", delta_color="off",
            help="Mean activation over generated tokens, DPO model; the arrow is act_dpo - act, that is -dact.")
c[3].metric("proj", f"{row['proj']:.5f}")
c[4].metric("proj_dpo", f"{row['proj_dpo']:.5f}")
c[5].metric("delta", f"{row['delta']:.5f}", help="proj - proj_dpo: positive means this neuron lowered toxicity.")

left, right = st.columns(2)
with left:
    st.subheader("Before and after DPO")
    st.altair_chart(charts.activations(row), width="content")
with right:
    st.subheader("Logit lens")
    tokens = queries.neuron_tokens(path, version, run_id, layer, neuron)
    if tokens.height:
        st.caption("Tokens the neuron's value vector promotes most (v @ W_U after the final layer norm's scale).")
        st.dataframe(tokens, hide_index=True, width="stretch")
    else:
        st.caption("Not stored for this neuron: the logit lens is kept for the top neurons by delta and by cos "
                   "([attribute] n_logit_lens).")

st.subheader("Prompts where it fires most")
prompts = queries.neuron_top_prompts(path, version, run_id, layer, neuron)
if prompts.height:
    st.altair_chart(charts.top_prompt_activations(prompts), width="stretch")
    st.dataframe(prompts, hide_index=True, width="stretch")
else:
    st.caption("Not stored for this neuron: top prompts are kept for the top neurons by delta and by cos "
               "([attribute] n_top_prompt_neurons).")
