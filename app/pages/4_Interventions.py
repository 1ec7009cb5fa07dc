"""Ablation and activation patching against DPO (paper Table 1 and Fig. 1a)."""

import json

import streamlit as st

import charts
import queries
from common import store_and_run

st.set_page_config(page_title="Interventions · dpo-neurons", layout="wide")
st.title("Interventions")
path, version, run_id = store_and_run()

table = queries.interventions(path, version, run_id)
if table.height == 0:
    st.info("This run has no interventions: its pipeline stopped before the `intervene` stage.")
    st.stop()

info = queries.run_info(path, version, run_id)
samples = (json.loads(info["data"]) if info["data"] else {}).get("f1_samples")
# The two F1 protocols give numbers that do not compare: say which one this run's column holds.
f1_help = (f"Token-id F1 on Lee et al.'s samples (`{samples}`), as the reference code scores them: each prompt's "
           "first f1_prompt_tokens tokens and its greedy continuation against the gold, padding left out."
           if samples else "Token-id F1 of a greedy continuation of each held-out passage's first half against its "
                           "second half (the first f1_tokens of each).")
st.caption("Each intervention edits the base model's MLP neurons and is scored like the base and DPO models: "
           "toxicity of greedy continuations of the challenge prompts, perplexity on held-out text and "
           + (f"F1 on the samples in `{samples}`. " if samples else "F1 on held-out passages. ") +
           "`recovered` is the share of DPO's toxicity drop the intervention reproduces, empty where that drop "
           "is within two standard errors of zero. Rows `poe_<alpha>` "
           "(product of experts) and `marco` (MaRCo-style revision) change no neuron: they steer decoding with an "
           "expert and an anti-expert fine-tuned on either side of the probe data.")
st.dataframe(table, hide_index=True, width="stretch",
             column_config={"toxic_share": st.column_config.NumberColumn(format="percent",
                                                                         help="Share of continuations scored above 0.5."),
                            "perplexity": st.column_config.NumberColumn(help="exp of the mean NLL on the held-out text: each passage after BOS, or with [intervene] perplexity = stream the whole file in windows, as the reference code scores WikiText-2."),
                            "f1": st.column_config.NumberColumn(help=f1_help),
                            "recovered": st.column_config.NumberColumn(
                                format="percent", help="(toxicity of base - of this row) / (of base - of dpo); empty where "
                                                       "DPO's drop is within two standard errors of zero.")})
drop = queries.dpo_drop(path, version, run_id)
if drop is not None:
    error = ("one prompt: no standard error" if drop["se"] is None
             else f"± {drop['se']:.4f} standard error, paired over {drop['n_prompts']} prompts")
    st.caption(f"DPO's toxicity drop: {drop['drop']:.4f} ({error}).")
    if table["recovered"].null_count() == table.height:
        st.info("DPO's toxicity drop on this run is within two standard errors of zero, so no share of it is "
                "given: `recovered` is empty. More prompts ([data] max_prompts) narrow the error.")

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

st.subheader("Where expert and anti-expert disagree (MaRCo-style revision)")
revised = queries.revised_continuations(path, version, run_id)
if revised.height == 0:
    st.caption("No revisions in this run: add [experts] and [detox] to its config to run stage `detox`.")
    st.stop()
st.caption("Each token of a base-model continuation, coloured by the Jensen-Shannon divergence (bits) between the "
           "expert's and the anti-expert's next-token distributions where it is predicted; outlined tokens are above "
           "the threshold and masked. A causal LM cannot fill a span in place, so the continuation is kept up to its "
           "first masked token and regenerated from there under the product of experts.")
labels = {(v, p): f"prompt {p} · max JSD {j:.2f} · {n} masked"
          for v, p, j, n in revised.select("variant", "prompt_id", "max_jsd", "n_masked").iter_rows()}
variant, prompt_id = st.selectbox("Continuation (most divergent first)", list(labels), format_func=labels.get)
tokens = queries.revision(path, version, run_id, variant, prompt_id)
st.altair_chart(charts.token_divergence(tokens), width="stretch")
left, right = st.columns(2)
left.markdown(f"**Prompt** {tokens['prompt'][0]}\n\n**Base continuation** {tokens['original'][0]}")
right.markdown(f"**Revised ({variant})** {tokens['revised'][0]}")
