"""Refusal Circuit Explorer core: plain Python (no Streamlit), usable from a notebook.

Typical use::

    from core.models import load_model
    from core.activations import collect_activations
    lm = load_model("embedded")
"""

__version__ = "0.1.0"
