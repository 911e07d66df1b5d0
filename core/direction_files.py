"""Directions as files: the per-layer refusal directions (and the chosen layer) saved as
``safetensors`` with JSON metadata, so a direction outlives the session that found it.

Why a file of our own and not ``results.json``: the vectors are [L, d] floats that JSON would
round badly, and a direction is only meaningful for the model it was measured on. The metadata
therefore records the model's fingerprint and size, the position and method, the layer
convention, the prompt sets (size and SHA-256 of each), the split rule and the tool version;
:func:`load_directions` refuses a file whose fingerprint or ``d_model`` does not match the model
it is meant for (applying another model's direction is a common and silent mistake).

Layer convention (:data:`LAYER_CONVENTION`): layer ``i`` is the residual stream at the output of
transformer block ``i`` (0-indexed); the embeddings are not a layer. This is also where
:func:`core.steering.add` adds the direction, and what llama.cpp's ``direction.<i>`` means
(see :mod:`core.control_vectors`).

The file holds tensors ``raw``, ``unit`` ([L, d]), ``mean_norm``, ``separation_sigma``,
``separation_in_sample``, ``probe_accuracy``, ``probe_accuracy_std`` ([L]) and ``cosine``
([L, L]), all float32, and one metadata entry ``refusal_explorer`` holding the JSON. Reading
never unpickles anything and turns every malformed input into a
:class:`~core.errors.DirectionFileError` that names the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import struct
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from core.directions import METHODS, LayerDirections
from core.layer_choice import LayerChoice
from core.errors import DirectionFileError

FORMAT = "refusal-explorer-directions"
FORMAT_VERSION = 1
META_KEY = "refusal_explorer"
SUFFIX = ".safetensors"
LAYER_CONVENTION = ("block-output: layer i is the residual stream at the output of transformer block i "
                    "(0-indexed); the embeddings are not a layer")
# A 100-layer, d=16384 model needs 2 x 6.5 MB of vectors plus a 40 kB cosine matrix; 512 MB
# leaves room for anything real while stopping a hostile file before it is read into memory.
MAX_FILE_BYTES = 512 * 1024 * 1024
PER_LAYER = ("mean_norm", "separation_sigma", "separation_in_sample", "probe_accuracy", "probe_accuracy_std")


def tool_version() -> str:
    import core

    return str(getattr(core, "__version__", "unknown"))


def prompt_digest(prompts: Sequence[str]) -> dict[str, Any]:
    """Size and SHA-256 of a prompt list (order matters: it is the list the direction saw)."""
    blob = json.dumps([str(p) for p in prompts], ensure_ascii=False).encode("utf-8")
    return {"n": len(prompts), "sha256": hashlib.sha256(blob).hexdigest()}


def prompt_digests(prompts: Any) -> dict[str, dict[str, Any]]:
    """Digests of every prompt list in ``prompts``: a mapping of name → list, or a dataclass
    such as :class:`core.config.PromptData` (each field that is a list of strings)."""
    if prompts is None:
        return {}
    if is_dataclass(prompts):
        items = {f.name: getattr(prompts, f.name) for f in fields(prompts)}
    else:
        items = dict(prompts)
    return {name: prompt_digest(v) for name, v in items.items()
            if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)}


def model_meta(model: Any) -> dict[str, Any]:
    """What identifies the model: from a :class:`core.models.LoadedModel` or a mapping with
    ``fingerprint``, ``d_model``, ``n_layers`` (and optionally ``name``, ``source``)."""
    if isinstance(model, Mapping):
        get = model.get
        model_type = get("model_type")
    else:
        def get(key, default=None):
            return getattr(model, key, default)
        config = getattr(getattr(model, "model", None), "config", None)
        model_type = getattr(config, "model_type", None)
    return {"name": str(get("name") or "?"), "source": str(get("source") or "?"),
            "fingerprint": str(get("fingerprint") or ""), "n_layers": int(get("n_layers")),
            "d_model": int(get("d_model")), "model_type": None if model_type is None else str(model_type)}


@dataclass
class SavedDirections:
    """What a directions file holds: the directions, the chosen layer and the provenance."""

    dirs: LayerDirections
    layer: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.meta.get("model") or {})

    @property
    def choice(self) -> LayerChoice:
        """The saved choice, or the layer rule on the loaded directions if none was saved."""
        chosen = self.meta.get("chosen") or {}
        if self.layer is None:
            from core.layer_choice import choose_layer

            return choose_layer(self.dirs)
        rule = chosen.get("rule") if isinstance(chosen.get("rule"), str) else "user"
        reason = chosen.get("reason") if isinstance(chosen.get("reason"), str) else f"layer {self.layer}"
        return LayerChoice(self.layer, rule, f"{reason} (loaded from {self.path or 'a saved file'})")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "layer": self.layer, **self.meta}


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------
def _tensors(dirs: LayerDirections) -> dict[str, np.ndarray]:
    out = {"raw": dirs.raw, "unit": dirs.unit, "cosine": dirs.cosine}
    out.update({name: getattr(dirs, name) for name in PER_LAYER})
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


def directions_bytes(
    dirs: LayerDirections,
    *,
    model: Any,
    choice: LayerChoice | int | None = None,
    prompts: Any = None,
    split: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The file's bytes (the Report page offers them as a download; :func:`save_directions`
    writes them). ``prompts``: the prompt lists the directions were fitted and measured on
    (only their sizes and hashes are stored); ``split``: how train and test were drawn."""
    from safetensors.numpy import save

    m = model_meta(model)
    if m["d_model"] != dirs.d_model or m["n_layers"] != dirs.n_layers:
        raise DirectionFileError(f"the directions are [{dirs.n_layers}, {dirs.d_model}] but the model {m['name']} has "
                                 f"{m['n_layers']} layers of width {m['d_model']}; save them with the model they came from")
    if isinstance(choice, LayerChoice):
        chosen = {"layer": dirs.check_layer(choice.layer), "rule": choice.rule, "reason": choice.reason}
    elif choice is not None:
        layer = dirs.check_layer(int(choice))
        chosen = {"layer": layer, "rule": "user", "reason": f"layer {layer} given"}
    else:
        chosen = None
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tool": "refusal-circuit-explorer", "tool_version": tool_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "model": m, "layer_convention": LAYER_CONVENTION,
        "method": dirs.method, "position": dirs.position, "chosen": chosen,
        "n_train": list(dirs.n_train), "n_test": list(dirs.n_test),
        "probe_folds": int(dirs.probe_folds), "seed": int(dirs.seed),
        "prompts": prompt_digests(prompts), "split": dict(split or {}),
        **dict(extra or {}),
    }
    return save(_tensors(dirs), metadata={META_KEY: json.dumps(meta, ensure_ascii=False, default=str)})


def save_directions(path: str | Path, dirs: LayerDirections, **kwargs: Any) -> Path:
    """Write :func:`directions_bytes` to ``path`` (parent folders are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(directions_bytes(dirs, **kwargs))
    return out


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def _header(data: bytes, name: str) -> dict[str, Any]:
    """The safetensors JSON header, parsed by hand so that a broken file gets our message."""
    if len(data) < 8:
        raise DirectionFileError(f"{name}: not a safetensors file (only {len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8 or size > 100 * 1024 * 1024:
        raise DirectionFileError(f"{name}: not a safetensors file (header length {size} does not fit the file)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise DirectionFileError(f"{name}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DirectionFileError(f"{name}: not a safetensors file (its header is not a JSON object)")
    return header


def _meta(header: Mapping[str, Any], name: str) -> dict[str, Any]:
    raw = header.get("__metadata__")
    text = raw.get(META_KEY) if isinstance(raw, dict) else None
    if not isinstance(text, str):
        raise DirectionFileError(f"{name}: a safetensors file, but not a directions file written by this tool "
                                 f"(no '{META_KEY}' metadata); save directions from the Report page or the batch runner")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise DirectionFileError(f"{name}: the '{META_KEY}' metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DirectionFileError(f"{name}: the metadata does not describe a directions file (format {FORMAT!r} expected)")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise DirectionFileError(f"{name}: format version {version!r} is newer than this tool reads ({FORMAT_VERSION}); "
                                 "update Refusal Circuit Explorer")
    return meta


def _int_pair(value: Any, key: str, name: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise DirectionFileError(f"{name}: metadata '{key}' must be two non-negative integers, got {value!r}")
    return int(value[0]), int(value[1])


def _model_block(meta: Mapping[str, Any], name: str) -> dict[str, Any]:
    m = meta.get("model")
    if not isinstance(m, dict):
        raise DirectionFileError(f"{name}: metadata has no 'model' record")
    for key in ("n_layers", "d_model"):
        v = m.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DirectionFileError(f"{name}: metadata model.{key} must be a positive integer, got {v!r}")
    if not isinstance(m.get("fingerprint"), str):
        raise DirectionFileError(f"{name}: metadata model.fingerprint must be a string")
    return m


def parse_directions(data: bytes, name: str = "directions file") -> SavedDirections:
    """:class:`SavedDirections` from a file's bytes (an upload); no model check."""
    from safetensors.numpy import load

    if len(data) > MAX_FILE_BYTES:
        raise DirectionFileError(f"{name}: {len(data) / 1e6:.0f} MB is over the {MAX_FILE_BYTES / 1e6:.0f} MB limit for a directions file")
    meta = _meta(_header(data, name), name)
    model = _model_block(meta, name)
    try:
        tensors = load(bytes(data))
    except Exception as exc:  # the parser's own errors: a truncated or inconsistent file
        raise DirectionFileError(f"{name}: unreadable safetensors data ({' '.join(str(exc).split())[:200]})") from None
    n, d = model["n_layers"], model["d_model"]
    shapes = {"raw": (n, d), "unit": (n, d), "cosine": (n, n), **{k: (n,) for k in PER_LAYER}}
    arrays: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        a = tensors.get(key)
        if a is None:
            raise DirectionFileError(f"{name}: tensor '{key}' is missing")
        if a.dtype != np.float32 or a.shape != shape:
            raise DirectionFileError(f"{name}: tensor '{key}' is {a.dtype} {list(a.shape)}, expected float32 {list(shape)} "
                                     f"(the metadata says {n} layers of width {d})")
        arrays[key] = a
    for key in ("raw", "unit", "mean_norm"):
        if not np.isfinite(arrays[key]).all():
            raise DirectionFileError(f"{name}: tensor '{key}' contains NaN or inf")
    method = meta.get("method")
    if method not in METHODS:
        raise DirectionFileError(f"{name}: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    position = meta.get("position")
    if not (isinstance(position, str) or (isinstance(position, int) and not isinstance(position, bool))):
        raise DirectionFileError(f"{name}: metadata 'position' must be a string or an integer, got {position!r}")
    folds, seed = meta.get("probe_folds", 5), meta.get("seed", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (folds, seed)):
        raise DirectionFileError(f"{name}: metadata 'probe_folds' and 'seed' must be integers")
    dirs = LayerDirections(
        method=method, position=position, raw=arrays["raw"], unit=arrays["unit"], mean_norm=arrays["mean_norm"],
        separation_sigma=arrays["separation_sigma"], separation_in_sample=arrays["separation_in_sample"],
        probe_accuracy=arrays["probe_accuracy"], probe_accuracy_std=arrays["probe_accuracy_std"], cosine=arrays["cosine"],
        n_train=_int_pair(meta.get("n_train"), "n_train", name), n_test=_int_pair(meta.get("n_test"), "n_test", name),
        probe_folds=int(folds), seed=int(seed),
    )
    chosen = meta.get("chosen")
    layer = None
    if chosen is not None:
        value = chosen.get("layer") if isinstance(chosen, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            raise DirectionFileError(f"{name}: metadata chosen.layer must be a layer index 0–{n - 1}, got {value!r}")
        layer = value
    return SavedDirections(dirs=dirs, layer=layer, meta=meta, path=name)


def check_model(saved: SavedDirections, lm: Any) -> None:
    """Refuse directions measured on another model (different width or fingerprint)."""
    want = model_meta(lm)
    have = saved.model
    where = saved.path or "the directions file"
    if have.get("d_model") != want["d_model"] or have.get("n_layers") != want["n_layers"]:
        raise DirectionFileError(
            f"{where} was saved for {have.get('name', '?')} ({have.get('n_layers')} layers, d_model {have.get('d_model')}), "
            f"but the loaded model {want['name']} has {want['n_layers']} layers, d_model {want['d_model']}. "
            "Load the model the directions came from, or compute directions for this one.")
    if have.get("fingerprint") != want["fingerprint"]:
        raise DirectionFileError(
            f"{where} was saved for {have.get('name', '?')} (fingerprint {str(have.get('fingerprint'))[:12]}), but the loaded "
            f"model {want['name']} has fingerprint {want['fingerprint'][:12]}: same size, different weights. "
            "A direction only means something on the model it was measured on; load that model or recompute.")


def load_directions(source: str | Path | bytes, *, model: Any = None, name: str | None = None) -> SavedDirections:
    """Read a directions file (a path, or the bytes of an upload). With ``model`` (a
    :class:`core.models.LoadedModel`), refuse a file saved for another model."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "uploaded directions file"
    else:
        path = Path(source).expanduser()
        label = name or str(path)
        if not path.is_file():
            raise DirectionFileError(f"directions file not found: {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DirectionFileError(f"{label}: {path.stat().st_size / 1e6:.0f} MB is over the {MAX_FILE_BYTES / 1e6:.0f} MB limit")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DirectionFileError(f"{label}: cannot be read ({exc.strerror or exc})") from None
    saved = parse_directions(data, label)
    if model is not None:
        check_model(saved, model)
    return saved
