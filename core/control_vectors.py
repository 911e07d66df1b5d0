"""Export a refusal direction where people steer: a llama.cpp control vector (GGUF) and the
``steering-vectors`` library's ``{layer: tensor}`` form.

The GGUF file is what ``llama-cli --control-vector[-scaled] FILE [SCALE]`` and repeng's
``ControlVector.import_gguf`` read: architecture ``controlvector``, the string
``controlvector.model_hint`` (the model's ``model_type``, e.g. ``llama``), the integer
``controlvector.layer_count`` (how many direction tensors), and one 1-D float32 tensor
``direction.<i>`` per layer. We add one more string, ``refusal_explorer.metadata`` (JSON
provenance: model fingerprint, method, position, coefficient), which llama.cpp ignores.

Layer convention, checked in llama.cpp's sources (the loader in ``common`` and the graph
builders): ``direction.<i>`` is added to the output of block ``i`` (0-indexed), the same
place :func:`core.steering.add` adds at ``layer=i``; repeng's layer keys mean the same (it
reads ``hidden_states[i + 1]``, the output of block ``i``). llama.cpp rejects ``direction.0``
(it keeps no slot for layer 0), so block 0 cannot be exported; we refuse it with a clear error.

Scale: each tensor is ``coefficient × mean_norm[i] × unit[i]``, so llama.cpp's scale ``s`` adds
``s × coefficient`` in this tool's normalised units (multiples of the layer's mean activation
norm): ``--control-vector-scaled refusal.gguf 0.5`` with the default ``coefficient=1`` is this
tool's "add 0.5" at the exported layer(s); a negative scale steers away from refusal. By default
only the chosen layer is written, which is exactly the single-layer intervention validated here;
writing several layers adds the direction at each of them (a stronger, different intervention).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from core.direction_files import LAYER_CONVENTION, model_meta, tool_version
from core.directions import LayerDirections
from core.errors import DirectionFileError

ARCH = "controlvector"
PROVENANCE_KEY = "refusal_explorer.metadata"
MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass
class ControlVector:
    """A control vector as read back: ``directions[i]`` is added at the output of block ``i``."""

    model_hint: str
    directions: dict[int, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).size)


def _layers(dirs: LayerDirections, layers: int | Iterable[int] | str, allow_zero: bool = False) -> list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise DirectionFileError(f"layers must be a layer index, a list of them, or 'all'; got {layers!r}")
        return [i for i in range(0 if allow_zero else 1, dirs.n_layers) if np.any(dirs.unit[i])]
    wanted = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    out = sorted({dirs.check_layer(int(i)) for i in wanted})
    if not out:
        raise DirectionFileError("no layer given to export")
    if 0 in out and not allow_zero:
        raise DirectionFileError("llama.cpp cannot apply a control vector at layer 0 (its loader rejects direction.0: "
                                 "the output of block 0 has no slot); choose a layer from 1 up")
    return out


def layer_vectors(dirs: LayerDirections, layers: int | Iterable[int] | str, coefficient: float = 1.0,
                  allow_zero: bool = False) -> dict[int, np.ndarray]:
    """``{layer: coefficient × mean_norm[layer] × unit[layer]}`` (float32), the vectors both
    exports write."""
    c = float(coefficient)
    if not math.isfinite(c) or c == 0:
        raise DirectionFileError(f"the coefficient must be a finite non-zero number, got {coefficient!r}")
    return {i: (dirs.direction(i) * np.float32(c * float(dirs.mean_norm[i]))).astype(np.float32)
            for i in _layers(dirs, layers, allow_zero)}


def write_control_vector(
    path: str | Path,
    dirs: LayerDirections,
    layers: int | Iterable[int] | str,
    *,
    model: Any,
    coefficient: float = 1.0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a llama.cpp control vector (see the module docstring for the keys and scale)."""
    import gguf

    m = model_meta(model)
    if m["d_model"] != dirs.d_model:
        raise DirectionFileError(f"the directions have width {dirs.d_model} but {m['name']} has d_model {m['d_model']}")
    vectors = layer_vectors(dirs, layers, coefficient)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    provenance = {"tool": "refusal-circuit-explorer", "tool_version": tool_version(), "model": m,
                  "method": dirs.method, "position": dirs.position, "layers": sorted(vectors),
                  "coefficient": float(coefficient), "scale": "coefficient x the layer's mean activation norm",
                  "layer_convention": LAYER_CONVENTION, **dict(extra or {})}
    writer = gguf.GGUFWriter(str(out), ARCH)
    try:
        writer.add_string(f"{ARCH}.model_hint", m["model_type"] or m["name"])
        writer.add_uint32(f"{ARCH}.layer_count", len(vectors))
        writer.add_string(PROVENANCE_KEY, json.dumps(provenance, ensure_ascii=False, default=str))
        for layer, vec in vectors.items():
            writer.add_tensor(f"direction.{layer}", vec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out


def _field_text(reader: Any, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None or not len(f.parts) or not len(f.data):
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")


def read_control_vector(path: str | Path, *, d_model: int | None = None) -> ControlVector:
    """Read a control vector GGUF back (ours or repeng's / llama.cpp's), checking what
    llama.cpp checks: 1-D float32 ``direction.<i>`` tensors, i ≥ 1, all of one width."""
    p = Path(path)
    name = str(p)
    if not p.is_file():
        raise DirectionFileError(f"control vector not found: {p}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise DirectionFileError(f"{name}: over the {MAX_FILE_BYTES / 1e6:.0f} MB limit for a control vector")
    try:
        import gguf

        reader = gguf.GGUFReader(str(p), "r")
        arch = _field_text(reader, "general.architecture")
        hint = _field_text(reader, f"{ARCH}.model_hint")
        extra = _field_text(reader, PROVENANCE_KEY)
        tensors = [(t.name, t.tensor_type, np.array(t.data), [int(x) for x in t.shape]) for t in reader.tensors]
    except DirectionFileError:
        raise
    except Exception as exc:  # the GGUF parser's own errors on a truncated or foreign file
        raise DirectionFileError(f"{name}: not a readable GGUF file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    if arch != ARCH:
        raise DirectionFileError(f"{name}: a GGUF file of architecture {arch!r}, not a control vector ({ARCH!r})")
    import gguf

    directions: dict[int, np.ndarray] = {}
    for tname, ttype, data, shape in tensors:
        prefix, _, index = tname.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) < 1:
            raise DirectionFileError(f"{name}: tensor {tname!r} is not a direction.<layer> tensor with layer ≥ 1")
        if ttype != gguf.GGMLQuantizationType.F32 or len(shape) != 1:
            raise DirectionFileError(f"{name}: tensor {tname!r} must be 1-D float32")
        directions[int(index)] = np.asarray(data, dtype=np.float32).reshape(-1).copy()
    if not directions:
        raise DirectionFileError(f"{name}: no direction tensors")
    widths = {v.size for v in directions.values()}
    if len(widths) != 1:
        raise DirectionFileError(f"{name}: direction tensors of different widths {sorted(widths)}")
    if d_model is not None and widths != {int(d_model)}:
        raise DirectionFileError(f"{name}: directions of width {widths.pop()} do not fit a model with d_model {d_model}")
    meta: dict[str, Any] = {}
    if extra:
        try:
            parsed = json.loads(extra)
            meta = parsed if isinstance(parsed, dict) else {}
        except (json.JSONDecodeError, RecursionError):
            meta = {}
    return ControlVector(model_hint=hint or "", directions=dict(sorted(directions.items())), meta=meta)


def steering_vectors_form(dirs: LayerDirections, layers: int | Sequence[int] | str, coefficient: float = 1.0) -> dict[int, Any]:
    """``{layer: torch.Tensor}`` for the ``steering-vectors`` library:
    ``SteeringVector(layer_activations=steering_vectors_form(dirs, layer), layer_type="decoder_block")``
    adds the same vectors at the same block outputs as the GGUF export (multiplier 1 =
    ``coefficient`` in normalised units)."""
    import torch

    vectors = layer_vectors(dirs, layers, coefficient, allow_zero=True)  # block 0 is fine there
    return {i: torch.from_numpy(v.copy()) for i, v in vectors.items()}
