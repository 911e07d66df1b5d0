"""Which architectures an abliterated (weight-orthogonalised) export is exact for.

Orthogonalising the embeddings and every attention / MLP output projection against a unit
vector u equals runtime directional ablation only when the residual stream is exactly the sum
of those modules' outputs: then every write into it lacks u, and nothing re-creates u before
the next write. Architectures that normalise a block's output *after* ``o_proj`` / ``down_proj``
(Gemma 2 and 3, OLMo 2: a post-norm's elementwise weight puts u back) or normalise the
embeddings before the first block (Bloom) break that, and so may anything not checked here.
The export is therefore allowed only for the architectures listed in :data:`EXACT`, each with
a test that compares the exported model's logits with runtime ablation; the others get an
:class:`~core.errors.AbliterationError` that names the reason.
"""

from __future__ import annotations

from typing import Any

from core.errors import AbliterationError

# model_type -> name; each has a logits-equality test against runtime ablation
EXACT = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "gptj": "GPT-J",
}

_POST_NORM = "normalises after o_proj and down_proj (post-attention and post-feedforward norms put the direction back)"
REFUSED = {
    "gemma2": f"Gemma 2 {_POST_NORM}",
    "gemma3": f"Gemma 3 {_POST_NORM}",
    "gemma3_text": f"Gemma 3 {_POST_NORM}",
    "gemma3n": f"Gemma 3n {_POST_NORM}",
    "gemma3n_text": f"Gemma 3n {_POST_NORM}",
    "olmo2": f"OLMo 2 {_POST_NORM}",
    "bloom": "Bloom normalises the embeddings (word_embeddings_layernorm) before the first block",
}


def model_type(model: Any) -> str:
    """The Hugging Face ``model_type`` of a model (its text model's, for multimodal wrappers)."""
    cfg = getattr(model, "config", None)
    mt = str(getattr(cfg, "model_type", "") or "")
    text = getattr(cfg, "text_config", None)
    if mt not in EXACT and text is not None and getattr(text, "model_type", None):
        return str(text.model_type)
    return mt


def refusal_reason(model_type: str) -> str | None:
    """Why an abliterated export of this ``model_type`` would not equal runtime ablation (None: exact)."""
    if model_type in EXACT:
        return None
    if model_type in REFUSED:
        return REFUSED[model_type]
    return (f"architecture {model_type!r} is not one where the export was checked against runtime ablation "
            f"(checked: {', '.join(EXACT.values())})")


def check_exact(model: Any, name: str = "this model") -> str:
    """The architecture's name if an abliterated export of ``model`` equals runtime ablation;
    otherwise raise :class:`AbliterationError` saying why and what to use instead."""
    mt = model_type(model)
    reason = refusal_reason(mt or type(model).__name__)
    if reason is None:
        return EXACT[mt]
    raise AbliterationError(
        f"{name}: cannot export an abliterated model that behaves like runtime ablation — {reason}; "
        "use runtime ablation (directional ablation during the forward pass) instead"
    )
