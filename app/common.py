"""What every page starts with: the store, its version, and the run chosen in the sidebar; and the
hand-over of a clicked neuron to the detail page."""

from __future__ import annotations

import streamlit as st

import queries

NEURON_PAGE = "pages/3_Neuron.py"


def store_and_run() -> tuple[str, float, str]:
    """Render the sidebar run picker; stop the page with a clear message when there is nothing to show."""
    path = queries.store_path()
    try:
        version = queries.store_version(path)
        runs = queries.runs(path, version)
    except queries.store.StoreError as e:
        st.error(str(e))
        st.stop()
    if runs.height == 0:
        st.info(f"The store {path} holds no runs yet. Run `make pipeline` to write one.")
        st.stop()
    ids = runs["run_id"].to_list()
    names = dict(zip(ids, runs["name"].to_list()))
    # A shared link names its run (?run=): without it a colleague would see the newest run's neuron of that number.
    linked = st.query_params.get("run")
    if "run_id" not in st.session_state and linked is not None:
        if linked in ids:
            st.session_state["run_id"] = linked
        else:
            st.warning(f"The link's run {linked} is not in this store; showing the newest run instead.")
    if st.session_state.get("run_id") not in ids:
        st.session_state["run_id"] = ids[0]
    run_id = st.sidebar.selectbox("Run", ids, key="run_id", format_func=lambda r: f"{r} · {names[r]}")
    st.query_params["run"] = run_id
    st.sidebar.caption(f"Store: `{path}`")
    return path, version, run_id


def neuron_bounds(path: str, version: float, run_id: str) -> dict:
    """The run's neuron ranges; stop the page with a message when the run has no neuron table."""
    bounds = queries.neuron_bounds(path, version, run_id)
    if bounds is None:
        st.info("This run has no neuron table: its pipeline stopped before the `attribute` stage.")
        st.stop()
    return bounds


def open_neuron(layer: int, neuron: int) -> None:
    """Show one neuron on the detail page (called when a table row or chart point is clicked)."""
    st.session_state["neuron_pick"] = (int(layer), int(neuron))
    st.switch_page(NEURON_PAGE)
