"""Every Altair chart of the app. Functions take polars frames from queries.py and return charts."""

from __future__ import annotations

import altair as alt
import polars as pl

REDUCING = ["TP-", "TN+", "AP+", "AN-"]
INCREASING = ["TP+", "TN-", "AP-", "AN+"]
GROUP_COLORS = alt.Scale(domain=REDUCING + INCREASING,
                         range=["#d62728", "#ff9896", "#1f77b4", "#aec7e8", "#8c564b", "#c49c94", "#7f7f7f", "#c7c7c7"])


def group_shares(groups: pl.DataFrame) -> alt.Chart:
    """Share of the gross reduction per group, with the bootstrap 95% interval; increasing groups
    are negative (DPO's balance)."""
    base = alt.Chart(groups).encode(y=alt.Y("group_code:N", sort=REDUCING + INCREASING, title="group"))
    bars = base.mark_bar().encode(
        x=alt.X("share_gross:Q", axis=alt.Axis(format="%"), title="share of gross reduction"),
        color=alt.Color("group_code:N", scale=GROUP_COLORS, legend=None),
        tooltip=["group_code", "effect", "n_neurons", alt.Tooltip("sum_delta:Q", format=".4f"),
                 alt.Tooltip("share_gross:Q", format=".1%"), alt.Tooltip("share_net:Q", format=".1%"),
                 alt.Tooltip("ci_low:Q", format=".1%"), alt.Tooltip("ci_high:Q", format=".1%")],
    )
    whiskers = base.mark_rule(color="black").encode(x="ci_low:Q", x2="ci_high:Q")
    return (bars + whiskers).properties(height=260)


def cumulative(curve: pl.DataFrame, marks: dict[str, int]) -> alt.Chart:
    """Running share of the net reduction over neurons sorted by delta, with the 50/75/99% counts."""
    line = alt.Chart(curve).mark_line().encode(
        x=alt.X("delta_rank:Q", scale=alt.Scale(type="log"), title="neurons, sorted by delta (log)"),
        y=alt.Y("cum_share:Q", axis=alt.Axis(format="%"), title="share of net reduction"),
        tooltip=["delta_rank", alt.Tooltip("cum_share:Q", format=".1%")],
    )
    rules = alt.Chart(pl.DataFrame({"label": list(marks), "n": list(marks.values())})).mark_rule(strokeDash=[4, 4]).encode(
        x="n:Q", tooltip=["label", "n"])
    return (line + rules).properties(height=260)


def layer_groups(frame: pl.DataFrame) -> alt.Chart:
    """Per-layer contributions stacked by group (paper Fig. 3)."""
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("layer:O"), y=alt.Y("sum_delta:Q", title="sum of delta"),
        color=alt.Color("group_code:N", scale=GROUP_COLORS, title="group"),
        tooltip=["layer", "group_code", "n_neurons", alt.Tooltip("sum_delta:Q", format=".4f")],
    ).properties(height=260)


def layer_projections(frame: pl.DataFrame) -> alt.Chart:
    """Per-layer MLP output projected onto the probe, per model (paper Fig. 1a)."""
    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X("layer:O"), y=alt.Y("mlp_proj:Q", title="MLP output . w_hat"), color=alt.Color("variant:N", title="model"),
        tooltip=["variant", "layer", alt.Tooltip("mlp_proj:Q", format=".4f")],
    ).properties(height=260)


def dpo_curve(frame: pl.DataFrame) -> alt.Chart:
    long = frame.unpivot(index="step", on=["loss", "reward_margin"], variable_name="metric")
    return alt.Chart(long).mark_line().encode(
        x="step:Q", y=alt.Y("value:Q", title=None), color=alt.Color("metric:N", title=None),
        tooltip=["step", "metric", alt.Tooltip("value:Q", format=".4f")],
    ).properties(height=200)


def toxicity_histogram(gens: pl.DataFrame) -> alt.Chart:
    return alt.Chart(gens).mark_bar().encode(
        x=alt.X("toxicity:Q", bin=alt.Bin(extent=[0, 1], step=0.05), scale=alt.Scale(domain=[0, 1]), title="toxicity"),
        y=alt.Y("count():Q", title="continuations"),
        tooltip=[alt.Tooltip("count():Q", title="continuations")],
    ).properties(height=180)


def toxicity_vs_perplexity(frame: pl.DataFrame) -> alt.Chart:
    """Each intervention's trade-off; the base and DPO models are the two ends of the scale."""
    return alt.Chart(frame).mark_point(filled=True, size=80).encode(
        x=alt.X("perplexity:Q", scale=alt.Scale(zero=False, type="log"), title="perplexity (log)"),
        y=alt.Y("toxicity:Q", scale=alt.Scale(domain=[0, 1])), color=alt.Color("kind:N"),
        tooltip=["intervention_id", "n_neurons", alt.Tooltip("toxicity:Q", format=".3f"),
                 alt.Tooltip("perplexity:Q", format=".2f"), alt.Tooltip("f1:Q", format=".3f"),
                 alt.Tooltip("recovered:Q", format=".0%")],
    ).properties(height=300)


def patching_sweep(sweep: pl.DataFrame, levels: pl.DataFrame) -> alt.Chart:
    """Toxicity as the top-N neurons by delta are patched to post-DPO levels, against the base and DPO lines."""
    line = alt.Chart(sweep).mark_line(point=True).encode(
        x=alt.X("n_neurons:Q", scale=alt.Scale(type="log"), title="neurons patched (top by delta, log)"),
        y=alt.Y("toxicity:Q", scale=alt.Scale(domain=[0, 1])),
        tooltip=["n_neurons", alt.Tooltip("toxicity:Q", format=".3f"), alt.Tooltip("recovered:Q", format=".0%")],
    )
    rules = alt.Chart(levels).mark_rule(strokeDash=[4, 4]).encode(
        y="toxicity:Q", color=alt.Color("intervention_id:N", title="model"), tooltip=["intervention_id", "toxicity"])
    return (line + rules).properties(height=300)


NEURON_TOOLTIP = ["layer", "neuron", "group_code", alt.Tooltip("cos:Q", format=".3f"), alt.Tooltip("act:Q", format=".4f"),
                  alt.Tooltip("act_dpo:Q", format=".4f"), alt.Tooltip("delta:Q", format=".5f"), "delta_rank"]


def cos_vs_delta(rows: pl.DataFrame) -> alt.Chart:
    """Each neuron's alignment against its contribution to the reduction; clicking selects one (layer, neuron)."""
    pick = alt.selection_point(name="neuron", fields=["layer", "neuron"], on="click")
    return alt.Chart(rows).mark_circle(size=30, opacity=0.7).encode(
        x=alt.X("cos:Q", title="cos(v, w)"), y=alt.Y("delta:Q", title="delta = proj - proj_dpo"),
        color=alt.Color("group_code:N", scale=GROUP_COLORS, title="group"), tooltip=NEURON_TOOLTIP,
    ).add_params(pick).properties(height=320)


def proj_segments(rows: pl.DataFrame) -> alt.Chart:
    """How DPO moved each neuron's projection (paper Fig. 2c): proj -> proj_dpo, neurons ordered by |delta|."""
    ranked = rows.with_row_index("rank", offset=1)
    base = alt.Chart(ranked).encode(x=alt.X("rank:Q", title="neurons, by |delta|"),
                                    color=alt.Color("group_code:N", scale=GROUP_COLORS, title="group"),
                                    tooltip=NEURON_TOOLTIP + [alt.Tooltip("proj:Q", format=".5f"),
                                                              alt.Tooltip("proj_dpo:Q", format=".5f")])
    segments = base.mark_rule().encode(y=alt.Y("proj:Q", title="proj (base) -> proj_dpo"), y2="proj_dpo:Q")
    ends = base.mark_circle(size=12).encode(y="proj_dpo:Q")
    return (segments + ends).properties(height=320)


def activations(row: dict) -> alt.Chart:
    """One neuron's mean activation and projection before and after DPO."""
    frame = pl.DataFrame({"model": ["base", "dpo", "base", "dpo"], "quantity": ["act", "act", "proj", "proj"],
                          "value": [row["act"], row["act_dpo"], row["proj"], row["proj_dpo"]]})
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("model:N", title=None), y=alt.Y("value:Q", title=None), color=alt.Color("model:N", legend=None),
        column=alt.Column("quantity:N", title=None), tooltip=["model", "quantity", alt.Tooltip("value:Q", format=".5f")],
    ).properties(width=120, height=200).resolve_scale(y="independent")


def top_prompt_activations(frame: pl.DataFrame) -> alt.Chart:
    """The neuron's activation on its top prompts, base against DPO."""
    long = frame.select("rank", "prompt_id", "act", "act_dpo").unpivot(index=["rank", "prompt_id"], variable_name="model")
    return alt.Chart(long).mark_bar().encode(
        x=alt.X("rank:O", title="prompt (by base activation)"), xOffset="model:N", y=alt.Y("value:Q", title="mean activation"),
        color=alt.Color("model:N"), tooltip=["prompt_id", "model", alt.Tooltip("value:Q", format=".4f")],
    ).properties(height=220)


def compare_shares(frame: pl.DataFrame) -> alt.Chart:
    """Group shares of two runs side by side."""
    return alt.Chart(frame).mark_bar().encode(
        y=alt.Y("group_code:N", sort=REDUCING + INCREASING, title="group"), yOffset="label:N",
        x=alt.X("share_gross:Q", axis=alt.Axis(format="%"), title="share of gross reduction"),
        color=alt.Color("label:N", title="run"),
        tooltip=["label", "group_code", "n_neurons", alt.Tooltip("share_gross:Q", format=".1%"),
                 alt.Tooltip("ci_low:Q", format=".1%"), alt.Tooltip("ci_high:Q", format=".1%")],
    ).properties(height=320)


def delta_agreement(frame: pl.DataFrame) -> alt.Chart:
    """delta of the same neuron in two runs, for the union of their top neurons."""
    return alt.Chart(frame).mark_circle(size=30, opacity=0.7).encode(
        x=alt.X("delta_a:Q", title="delta, run A"), y=alt.Y("delta_b:Q", title="delta, run B"),
        color=alt.Color("in_top:N", title="in the top k of"),
        tooltip=["layer", "neuron", "rank_a", "rank_b", "group_a", "group_b",
                 alt.Tooltip("delta_a:Q", format=".5f"), alt.Tooltip("delta_b:Q", format=".5f")],
    ).properties(height=320)


def token_divergence(tokens: pl.DataFrame) -> alt.Chart:
    """A continuation's tokens in reading order, each cell coloured by the expert/anti-expert JS
    divergence at the position that predicts it; masked tokens are outlined."""
    base = alt.Chart(tokens).encode(x=alt.X("position:O", title="token position", axis=alt.Axis(labelAngle=0)))
    cells = base.mark_rect().encode(
        color=alt.Color("jsd:Q", scale=alt.Scale(scheme="orangered", domain=[0, 1]), title="JSD (bits)"),
        stroke=alt.condition("datum.masked", alt.value("black"), alt.value(None)), strokeWidth=alt.value(2),
        tooltip=["position", "token", alt.Tooltip("jsd:Q", format=".3f"), "masked", "regenerated"],
    )
    text = base.mark_text(fontSize=12).encode(text="token:N")
    return (cells + text).properties(height=70)


def prompt_shares(frame: pl.DataFrame) -> alt.Chart:
    """How each group's share of the gross reduction varies over prompts (one box per group). Tukey
    whiskers: a prompt whose gross reduction is near zero gives shares far out, drawn as points, and
    those beyond -100% or 200% at the edge."""
    return alt.Chart(frame).mark_boxplot(extent=1.5).encode(
        y=alt.Y("group_code:N", sort=REDUCING + INCREASING, title="group"),
        x=alt.X("share_gross:Q", axis=alt.Axis(format="%"), title="share of the prompt's gross reduction",
                scale=alt.Scale(domain=[-1, 2], clamp=True)),
        color=alt.Color("group_code:N", scale=GROUP_COLORS, legend=None),
    ).properties(height=260)


def reduction_vs_toxicity(frame: pl.DataFrame) -> alt.Chart:
    """Per prompt: how far DPO lowered the probe projection against how far it lowered the scorer's toxicity."""
    drop = frame.with_columns(toxicity_drop=pl.col("toxicity") - pl.col("toxicity_dpo"))
    return alt.Chart(drop).mark_circle(size=30, opacity=0.6).encode(
        x=alt.X("net_reduction:Q", title="net reduction of the probe projection (sum of delta)"),
        y=alt.Y("toxicity_drop:Q", title="toxicity, base - DPO"),
        color=alt.Color("share_tp:Q", scale=alt.Scale(scheme="reds", domain=[0, 1]), title="TP- share"),
        tooltip=["prompt_id", "prompt", alt.Tooltip("net_reduction:Q", format=".4f"), alt.Tooltip("share_tp:Q", format=".1%"),
                 alt.Tooltip("toxicity:Q", format=".3f"), alt.Tooltip("toxicity_dpo:Q", format=".3f")],
    ).properties(height=300)
