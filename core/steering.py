"""Interventions on the residual stream: add / subtract a direction, or ablate it everywhere.

An :class:`Intervention` is a small frozen spec (plain data, serialisable without its vector);
:func:`edits_for` turns a list of them into ``{module name: edit fn}`` for :mod:`core.hooks`,
composing edits that land on the same module in list order. Generation goes through
:mod:`core.generation`, whose decode loop holds the hooks only inside each forward step.

* **add** / **subtract** ``α·v̂`` at the output of block ``layer``, at every position (prompt
  and generated tokens). ``α = coefficient × scale``: with ``normalised=True`` the scale is
  the layer's mean activation norm, so α = 0.5 means "half a typical residual vector" on any
  model; with ``normalised=False`` the scale is 1 and α is in activation units.
* **ablate**: ``h ← h − (h·v̂) v̂`` at the output of the embeddings, of every block *and* of
  every attention and MLP module, at every position, so no component can write the direction back
  (Arditi et al. 2024's directional ablation). ``coefficient`` < 1 ablates partially.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from core.directions import LayerDirections
from core.formatting import Formatter
from core.generation import GenerationStep, generate, generate_stream, next_token_logits
from core.hooks import EditFn
from core.models import LoadedModel

KINDS = ("add", "subtract", "ablate")
# |coefficient| at or above this (in normalised units: multiples of the layer's mean norm)
# is almost surely a slip; we warn instead of refusing, since users may probe breakage.
EXTREME_NORMALISED_COEFFICIENT = 1e3


@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit of the residual stream (see the module docstring)."""

    kind: str
    direction: np.ndarray
    layer: int | None
    coefficient: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown intervention kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        vec = np.asarray(self.direction, dtype=np.float32).reshape(-1)
        if vec.size == 0 or not np.isfinite(vec).all():
            raise ValueError("the direction must be a non-empty finite vector")
        if not np.any(vec):
            raise ValueError("the direction is the zero vector; it has no orientation to steer along")
        object.__setattr__(self, "direction", vec)
        for name in ("coefficient", "scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.kind in ("add", "subtract") and self.layer is None:
            raise ValueError(f"a {self.kind!r} intervention needs a layer")

    @property
    def unit(self) -> np.ndarray:
        return self.direction / np.linalg.norm(self.direction)

    @property
    def magnitude(self) -> float:
        """The norm of the vector added (signed: negative for subtract); for ablation, the strength."""
        if self.kind == "ablate":
            return self.coefficient
        sign = -1.0 if self.kind == "subtract" else 1.0
        return sign * self.coefficient * self.scale

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layer": self.layer,
            "coefficient": self.coefficient,
            "scale": self.scale,
            "magnitude": self.magnitude,
            "direction_norm": float(np.linalg.norm(self.direction)),
            "direction_sha256": hashlib.sha256(self.direction.tobytes()).hexdigest()[:16],
            "d_model": int(self.direction.size),
        }


def _check_coefficient(coefficient: float, normalised: bool, scale: float) -> float:
    c = float(coefficient)
    if not math.isfinite(c):
        raise ValueError(f"the coefficient must be a finite number, got {coefficient!r}")
    in_norms = abs(c) if normalised else (abs(c) / scale if scale > 0 else abs(c))
    if in_norms >= EXTREME_NORMALISED_COEFFICIENT:
        warnings.warn(
            f"coefficient {c:g} is {in_norms:.3g}× the layer's mean activation norm; expect the model's output "
            "to break down (typical useful values are 0.1–2 in normalised units)",
            stacklevel=3,
        )
    return c


def _steer(kind: str, dirs: LayerDirections, layer: int, coefficient: float, normalised: bool) -> Intervention:
    i = dirs.check_layer(layer)
    scale = float(dirs.mean_norm[i]) if normalised else 1.0
    c = _check_coefficient(coefficient, normalised, float(dirs.mean_norm[i]))
    return Intervention(kind, dirs.direction(i), i, c, scale)


def add(dirs: LayerDirections, layer: int, coefficient: float, normalised: bool = True) -> Intervention:
    """+α·v̂ at block ``layer`` (α in multiples of the layer's mean norm if ``normalised``)."""
    return _steer("add", dirs, layer, coefficient, normalised)


def subtract(dirs: LayerDirections, layer: int, coefficient: float, normalised: bool = True) -> Intervention:
    """−α·v̂ at block ``layer``."""
    return _steer("subtract", dirs, layer, coefficient, normalised)


def ablate(dirs_or_vector: LayerDirections | np.ndarray, layer_for_direction: int | None = None, strength: float = 1.0) -> Intervention:
    """Project the direction (of ``layer_for_direction``, or the given vector) out everywhere."""
    if isinstance(dirs_or_vector, LayerDirections):
        if layer_for_direction is None:
            raise ValueError("ablate(dirs, layer): say which layer's direction to ablate")
        vec = dirs_or_vector.direction(layer_for_direction)
    else:
        vec = np.asarray(dirs_or_vector, dtype=np.float32)
    if not math.isfinite(float(strength)):
        raise ValueError(f"the ablation strength must be finite, got {strength!r}")
    return Intervention("ablate", vec, None, float(strength), 1.0)


def random_direction(d: int, seed: int, norm: float = 1.0) -> np.ndarray:
    """A seeded isotropic random vector of the given norm (the control direction)."""
    v = np.random.default_rng(seed).standard_normal(d)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


def random_like(intervention: Intervention, seed: int) -> Intervention:
    """The same intervention along a seeded random direction of equal norm."""
    vec = random_direction(intervention.direction.size, seed, float(np.linalg.norm(intervention.direction)))
    return replace(intervention, direction=vec)


# ---------------------------------------------------------------------------------------
# edit functions
# ---------------------------------------------------------------------------------------
class _Vector:
    """The direction as a tensor, converted once per (device, dtype) of the hidden states."""

    def __init__(self, vec: np.ndarray) -> None:
        self._cpu = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32))
        self._memo: dict[tuple, torch.Tensor] = {}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = self._cpu.to(device=like.device, dtype=like.dtype)
        return t


def _add_fn(vector: np.ndarray) -> EditFn:
    v = _Vector(vector)

    def edit(hidden: torch.Tensor, name: str) -> torch.Tensor:
        return hidden + v.on(hidden)

    return edit


def _ablate_fn(unit: np.ndarray, strength: float) -> EditFn:
    u = _Vector(unit)

    def edit(hidden: torch.Tensor, name: str) -> torch.Tensor:
        vec = u.on(hidden)
        # the projection in float32 at least: bf16 dot products over d terms lose the small remainder
        h32 = hidden.float()
        v32 = vec.float()
        coeff = (h32 @ v32).unsqueeze(-1)
        return (h32 - strength * coeff * v32).to(hidden.dtype)

    return edit


def _compose(first: EditFn, second: EditFn) -> EditFn:
    def edit(hidden: torch.Tensor, name: str) -> torch.Tensor:
        return second(first(hidden, name), name)

    return edit


_POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings")


def embedding_modules(lm: LoadedModel) -> list[str]:
    """Names of the modules that write the residual stream's starting value: the token
    embedding and, where the model has one, a learned absolute position embedding."""
    model = lm.model
    token = model.get_input_embeddings()
    names: list[str] = []
    for name, module in model.named_modules():
        if module is token or (
            isinstance(module, torch.nn.Embedding) and name.split(".")[-1] in _POSITION_EMBEDDING_NAMES
            and module.embedding_dim == lm.d_model
        ):
            names.append(name)
    return names


# Blocks that normalise each sublayer's output before adding it to the residual stream (Gemma 2
# and 3, OLMo 2) call those norms this. (Llama's ``post_attention_layernorm`` is the *pre*-MLP
# norm: the MLP-side post-norm is what tells the two layouts apart.)
_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def residual_writers(lm: LoadedModel) -> list[str]:
    """Per block, the modules whose output is *added* to the residual stream: the attention and
    MLP modules, or, in blocks with post-norms, those norms (Gemma 3 adds
    ``post_attention_layernorm(o_proj(...))``: an edit before the norm is undone by it)."""
    names: list[str] = []
    for block, attn, mlp in zip(lm.block_names, lm.attn_names, lm.mlp_names):
        module = lm.module(block)
        if all(isinstance(getattr(module, n, None), torch.nn.Module) for n in _POST_NORMS):
            names += [f"{block}.{n}" for n in _POST_NORMS]
        else:
            names += [n for n in (attn, mlp) if n]
    return names


def ablation_modules(lm: LoadedModel) -> list[str]:
    """Every module whose output directional ablation edits: the embeddings (so block 0's
    input is clean too; Gemma's embedding module already includes its √d scale), every write
    into the residual stream (:func:`residual_writers`), and every block output."""
    names = [*embedding_modules(lm), *residual_writers(lm), *lm.block_names]
    return list(dict.fromkeys(names))


def edit_sites(lm: LoadedModel, interventions: Sequence[Intervention]) -> dict[str, list[int]]:
    """Per module name, the indices of the interventions that edit its output, in list order
    (ablation: :func:`ablation_modules`; add / subtract: the output of block ``layer``)."""
    sites: dict[str, list[int]] = {}
    for i, iv in enumerate(interventions):
        if iv.direction.size != lm.d_model:
            raise ValueError(f"the direction has {iv.direction.size} dimensions but {lm.name} has d_model {lm.d_model}")
        names = ablation_modules(lm) if iv.kind == "ablate" else [lm.block_names[lm.check_layer(iv.layer)]]
        for name in names:
            sites.setdefault(name, []).append(i)
    return sites


def edit_vector(iv: Intervention) -> np.ndarray:
    """What the edit uses: the float32 vector added (add / subtract), or the unit vector ablated."""
    return (iv.unit if iv.kind == "ablate" else iv.unit * iv.magnitude).astype(np.float32)


def edits_for(lm: LoadedModel, interventions: Sequence[Intervention]) -> dict[str, EditFn]:
    """``{module name: edit fn}`` for :mod:`core.hooks` / :mod:`core.generation`.

    Interventions that touch the same module compose in the order given.
    """
    fns = [_ablate_fn(edit_vector(iv), iv.coefficient) if iv.kind == "ablate" else _add_fn(edit_vector(iv))
           for iv in interventions]
    edits: dict[str, EditFn] = {}
    for name, indices in edit_sites(lm, interventions).items():
        fn = fns[indices[0]]
        for i in indices[1:]:
            fn = _compose(fn, fns[i])
        edits[name] = fn
    return edits


def steered_generate(lm: LoadedModel, formatter: Formatter, prompts: Sequence[str], interventions: Sequence[Intervention], **generate_kwargs) -> list[str]:
    """:func:`core.generation.generate` under the interventions (none = the baseline)."""
    return generate(lm, formatter, prompts, edits=edits_for(lm, interventions) or None, **generate_kwargs)


def steered_stream(lm: LoadedModel, formatter: Formatter, prompts: Sequence[str], interventions: Sequence[Intervention], **kwargs) -> Iterator[GenerationStep]:
    """:func:`core.generation.generate_stream` under the interventions (for the UI)."""
    return generate_stream(lm, formatter, prompts, edits=edits_for(lm, interventions) or None, **kwargs)


def steered_logits(lm: LoadedModel, formatter: Formatter, prompts: Sequence[str], interventions: Sequence[Intervention], **kwargs) -> torch.Tensor:
    """First-response-token logits ``[n, vocab]`` under the interventions."""
    return next_token_logits(lm, formatter, prompts, edits=edits_for(lm, interventions) or None, **kwargs)


# ---------------------------------------------------------------------------------------
# weight orthogonalisation ("abliteration"), the stretch goal
# ---------------------------------------------------------------------------------------
_MLP_OUT_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc_out", "fc2", "w2", "out_proj")


def _output_layer(module: torch.nn.Module, d_model: int, preferred: Sequence[str]) -> torch.nn.Module | None:
    """The submodule that writes ``module``'s output into the residual stream."""
    for name in preferred:
        child = getattr(module, name, None)
        if child is not None and hasattr(child, "weight"):
            return child
    return None


def _orthogonalise_out(layer: torch.nn.Module, u: torch.Tensor) -> None:
    """Make the layer's outputs orthogonal to ``u``: Linear W[out, in], GPT-2 Conv1D W[in, out]."""
    w = layer.weight
    if isinstance(layer, torch.nn.Linear):
        w.sub_(torch.outer(u, u @ w))
    else:  # transformers' Conv1D: y = x @ W + b
        w.sub_(torch.outer(w @ u, u))
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias.sub_((bias @ u) * u)


@torch.no_grad()
def abliterate_model(lm: LoadedModel, direction: np.ndarray) -> torch.nn.Module:
    """A copy of ``lm.model`` whose weights cannot write ``direction`` into the residual stream:
    token (and learned position) embeddings, every attention output projection and every MLP
    output projection are orthogonalised against the unit vector. A tied unembedding is untied
    first (it keeps the original weights). For architectures whose blocks write to the residual
    stream only through those projections (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, GPT-J) this equals runtime
    directional ablation (:func:`ablate`); other architectures are refused with the reason
    (:func:`core.abliteration.check_exact`)."""
    import copy

    from core.abliteration import check_exact

    check_exact(lm.model, lm.name)
    vec = np.asarray(direction, dtype=np.float64).reshape(-1)
    if vec.size != lm.d_model or not np.isfinite(vec).all() or not np.any(vec):
        raise ValueError(f"the direction must be a finite non-zero vector of size d_model={lm.d_model}")
    model = copy.deepcopy(lm.model)
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        out_emb.weight = torch.nn.Parameter(in_emb.weight.detach().clone())
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    u = torch.as_tensor(vec / np.linalg.norm(vec))
    targets: list[torch.nn.Module] = []
    for name in lm.attn_out_names:
        if name is None:
            raise ValueError(f"{lm.name}: no attention output projection found; cannot abliterate this architecture")
        targets.append(model.get_submodule(name))
    for name in lm.mlp_names:
        layer = _output_layer(model.get_submodule(name), lm.d_model, _MLP_OUT_NAMES) if name else None
        if layer is None:
            raise ValueError(f"{lm.name}: no MLP output projection found in {name!r}; cannot abliterate this architecture")
        targets.append(layer)
    for layer in targets:
        _orthogonalise_out(layer, u.to(layer.weight.dtype).to(layer.weight.device))
    for emb in (model.get_submodule(n) for n in embedding_modules(lm)):
        w = emb.weight
        uu = u.to(w.dtype).to(w.device)
        w.sub_(torch.outer(w @ uu, uu))
    return model


def export_abliterated(lm: LoadedModel, direction: np.ndarray, out_dir: str | Path, **card: Any) -> Path:
    """Save :func:`abliterate_model` as a Hugging Face folder (loadable with ``load_model``),
    with a model card beside the weights (``card``: ``layer=``, ``measured=``, ``provenance=``
    for :func:`core.model_card.write_model_card`)."""
    from core.model_card import write_model_card

    model = abliterate_model(lm, direction)  # refuses before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    write_model_card(out, lm, direction, **card)
    return out


# ---------------------------------------------------------------------------------------
# steering any code: a context manager
# ---------------------------------------------------------------------------------------
def steer(lm: LoadedModel, interventions: Intervention | Sequence[Intervention]):
    """A context manager that applies one intervention (or a list, composed in order) to every
    forward pass of ``lm`` inside the ``with`` block, whoever runs it: ``lm.model.generate``,
    :mod:`core.generation`, your own loop. The hooks are placed on entry and removed on exit,
    also when the block raises (it is a :class:`core.hooks.TraceDict` that retains nothing).

    >>> with steer(lm, add(dirs, layer, 0.5)):
    ...     out = lm.model.generate(**inputs)

    The block holds the model's lock (as every trace does): another thread using the same model
    waits until it ends. The activation disk cache does not know about the edit, so pass
    ``cache=False`` to :func:`core.activations.collect_activations` inside the block."""
    from core.hooks import TraceDict

    items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    if not all(isinstance(iv, Intervention) for iv in items):
        raise TypeError("interventions: give an Intervention (add, subtract or ablate) or a list of them")
    edits = edits_for(lm, items)
    return TraceDict(lm.model, list(edits), retain_output=False, edit_output=edits)
