"""UI-only helpers for the Streamlit app: session state, the sidebar, error display, progress.

Nothing here computes results: pages read widgets, call ``core`` and draw what it returns.
"""
