"""Ad-hoc read-only SQL against the store: one query at a time, capped in rows, time and memory."""

import json

import polars as pl
import streamlit as st

import queries
from common import store_and_run


def csv_of(frame: pl.DataFrame) -> str:
    """CSV holds no lists or structs (probe_metrics.direction, range(3)): those cells are written as JSON."""
    return frame.with_columns(pl.Series(c, [json.dumps(v, default=str) for v in frame[c].to_list()], dtype=pl.String)
                              for c, t in frame.schema.items() if t.is_nested()).write_csv()


st.set_page_config(page_title="SQL · dpo-neurons", layout="wide")
st.title("SQL")
path, version, run_id = store_and_run()

st.caption(f"One read-only query ({queries.store.console.QUERY_FORMS}) over the store's tables. Results stop at "
           f"{queries.SQL_MAX_ROWS:,} rows and queries at {queries.SQL_TIMEOUT_S} s; files, extensions, "
           "ATTACH, COPY and settings are out of reach. For anything else open the store file in your own "
           "DuckDB client.")

editor, schema_column = st.columns([3, 1])
with schema_column:
    st.subheader("Schema")
    st.dataframe(queries.schema(path, version), hide_index=True, width="stretch", height=560)

with editor:
    # Without a key the editor resets to the new run's example when the sidebar's run changes.
    sql = st.text_area("Query", value=queries.example_sql(run_id), height=220)
    if st.button("Run", type="primary"):
        with st.spinner("Running the query..."):
            try:
                st.session_state["sql_result"] = queries.user_sql(path, sql)
            except (queries.store.SqlRefused, queries.store.StoreError) as refused:  # StoreError: the file was swapped
                st.session_state["sql_result"] = str(refused)
    # Kept in the session so that the download button's rerun shows the same result without running again.
    outcome = st.session_state.get("sql_result")
    if isinstance(outcome, str):
        st.error(outcome)
    elif outcome is not None:
        frame, truncated = outcome
        if truncated:
            st.warning(f"The result was truncated at {queries.SQL_MAX_ROWS:,} rows; aggregate, filter or add a "
                       "LIMIT to see the rest.")
        st.caption(f"{frame.height:,} rows")
        st.dataframe(frame, hide_index=True, width="stretch")
        st.download_button("Download CSV", csv_of(frame), file_name="query.csv", mime="text/csv")
