"""Overview: the run's model and data, how much DPO lowers toxicity, and which neuron groups do it."""

import json

import streamlit as st

import charts
import queries
from common import store_and_run

PAIRS_SHOWN = 500

st.set_page_config(page_title="dpo-neurons", layout="wide")
st.title("dpo-neurons")
st.caption("How DPO safety fine-tuning reduces toxicity inside a language model, neuron by neuron.")

path, version, run_id = store_and_run()
info = queries.run_info(path, version, run_id)
world = queries.world_summary(path, version, run_id)
probe = queries.probe_metrics(path, version, run_id)
tox = queries.toxicity_by_variant(path, version, run_id)
attr = queries.attribution(path, version, run_id)
groups = queries.group_summary(path, version, run_id)

st.subheader(f"Run {run_id} · {info['name']}")
data = json.loads(info["data"]) if info["data"] else {}
given = info["probe_direction"]  # a saved probe vector (the paper's released one, say) instead of one fitted here
st.markdown(f"**Model:** {info['model']}  \n**Data:** "
            + (", ".join(f"{k} = `{data[k]}`" for k in ("probe", "prompts", "pairs", "heldout", "f1_samples") if data.get(k))
               or "not recorded")
            + (f"  \n**Probe direction:** `{given}`, given, measured on the probe data" if given else "")
            + f"  \n**Toxicity scorer:** {info['scorer'] or 'not recorded'}")

c = st.columns(4)
if probe:
    c[0].metric("Probe validation accuracy", f"{probe['val_accuracy']:.1%}", help=f"ROC-AUC {probe['val_roc_auc']:.3f}, "
                f"{probe['n_train']} train / {probe['n_val']} validation texts, layer {probe['layer']} residual"
                + (", the given direction above a threshold fitted on the train texts." if given else "."))
for col, row in zip(c[1:3], tox.filter(tox["variant"].is_in(["base", "dpo"])).iter_rows(named=True)):
    col.metric(f"Toxicity, {row['variant']} model", f"{row['toxicity']:.3f}",
               help=f"Mean over {row['n']} continuations ({row['scorer']}); {row['toxic_share']:.0%} above 0.5.")
# R <= 0: DPO did not lower the MLPs' projection onto the probe, and no neurons carry a reduction (n_for_* are 0)
reduced = bool(attr) and attr["net_reduction"] > 0
if attr:
    c[3].metric("Neurons for 50% of the net reduction", f"{attr['n_for_50']:,}" if reduced else "none",
                help=f"of {attr['n_neurons']:,} MLP neurons, largest delta first (the cumulative curve, against R)"
                if reduced else f"R = {attr['net_reduction']:.4f}: DPO did not lower the MLPs' projection onto the probe.")

if attr is None or groups.height == 0:
    st.info("This run has no attribution yet: its pipeline stopped before the `attribute` stage.")
else:
    tp = groups.filter(groups["group_code"] == "TP-").row(0, named=True)
    if attr["gross_reduction"] > 0:
        st.markdown(f"### {tp['share_gross']:.1%} of the reduction comes from dampened toxic neurons (TP-)")
        st.caption(f"95% interval over prompts: {tp['ci_low']:.1%} to {tp['ci_high']:.1%}. Share of the gross reduction "
                   f"(sum of delta over the four reducing groups, {attr['gross_reduction']:.4f}); the net reduction over "
                   f"all {attr['n_neurons']:,} neurons is {attr['net_reduction']:.4f}. The paper finds 31.8% on gpt2-medium.")
    else:  # shares of G are NaN: there is nothing to divide up
        st.markdown("### No gross reduction: the reducing groups (TP-, TN+, AP+, AN-) did not lower toxicity")
        st.caption(f"G, the sum of delta over the four reducing groups, is {attr['gross_reduction']:.4f}, so their shares "
                   f"are empty; the net reduction over all {attr['n_neurons']:,} neurons is {attr['net_reduction']:.4f}.")
    left, right = st.columns(2)
    with left:
        st.subheader("Group shares")
        st.altair_chart(charts.group_shares(groups), width="stretch")
    with right:
        st.subheader("Cumulative contribution")
        if reduced:
            marks = {"50%": attr["n_for_50"], "75%": attr["n_for_75"], "99%": attr["n_for_99"]}
            st.altair_chart(charts.cumulative(queries.cumulative(path, version, run_id), marks), width="stretch")
            st.caption(" · ".join(f"{k} of the net reduction: {v:,} neurons" for k, v in marks.items()))
        else:
            st.info(f"No curve: the net reduction R = {attr['net_reduction']:.4f} is not positive, so DPO did not lower "
                    "the MLPs' projection onto the probe in this run and no neurons carry a reduction. The group sums "
                    "in the table below still show which neurons moved it which way.")
    st.dataframe(groups, hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="percent")
                                for c in ("share_gross", "share_net", "ci_low", "ci_high")})

if world:
    with st.expander("The demo world's model"):
        c = st.columns(4)
        c[0].metric("Held-out perplexity", f"{float(world['ppl_model']):.1f}",
                    help="The demo model's perplexity on held-out neutral sentences.")
        c[1].metric("Unigram perplexity", f"{float(world['ppl_unigram']):.1f}",
                    help="Add-one smoothed token frequencies on the same tokens: the floor a model must beat.")
        c[2].metric("Toxic share of corpus", f"{float(world['toxic_fraction']):.0%}")
        c[3].metric("Parameters", f"{int(world['n_params']):,}",
                    help="Of the demo model, a GPT-2 trained on the world's corpus; its toxicity on the challenge "
                         "prompts is the base model's above.")

curve = queries.dpo_curve(path, version, run_id)
trained_on = queries.pairs_summary(path, version, run_id)
if curve.height or trained_on:
    with st.expander("DPO training"):
        if curve.height:
            st.altair_chart(charts.dpo_curve(curve), width="stretch")
        if trained_on:
            shown = queries.pairs(path, version, run_id, PAIRS_SHOWN)
            st.markdown(f"**{trained_on['n']:,} preference pairs.** Mean toxicity: chosen "
                        f"{trained_on['chosen']:.3f}, rejected {trained_on['rejected']:.3f}; the rejected side is "
                        f"the more toxic in {trained_on['ordered']:.0%} of pairs ({info['scorer'] or 'the scorer'}).")
            if shown.height < trained_on["n"]:
                st.caption(f"The first {shown.height:,} pairs; the SQL page reads all of them (table `pairs`).")
            st.dataframe(shown, hide_index=True, width="stretch")

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

st.subheader("Runs in the store")
st.dataframe(queries.runs(path, version), hide_index=True, width="stretch")
with st.expander("Stages of this run"):
    st.dataframe(queries.stages(path, version, run_id), hide_index=True, width="stretch")
