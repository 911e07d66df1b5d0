"""Validating a parsed config into :class:`~core.config.schema.Config`: unknown keys and wrong
types are refused up front, each message naming the key path and what to write instead, e.g.
``steering.coefficients[2]: expected a number, got 'abc'``."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Mapping

from core.config.schema import (DTYPES, METHODS, POSITIONS, SITES, Config, GenerationConfig, ModelSpec, PatchingConfig,
                                ProbeConfig, PromptsConfig, SelectionConfig, SteeringConfig)
from core.errors import ConfigError
from core.formatting import PRESETS


# ---------------------------------------------------------------------------------------
# validation helpers: each names the key path in its message
# ---------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}" if path else message)


def _mapping(value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected a mapping (key: value), got {_show(value)}")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(allowed)}"
            raise _fail(_join(path, str(key)), f"unknown key{hint}")
    return dict(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _str(value: Any, path: str, *, choices: tuple[str, ...] | None = None, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"expected a string, got {_show(value)}")
    if not allow_empty and not value.strip():
        raise _fail(path, "expected a non-empty string")
    if choices is not None and value not in choices:
        raise _fail(path, f"expected one of {', '.join(choices)}, got {_show(value)}")
    return value


def _int(value: Any, path: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _fail(path, f"expected an integer{' or null' if allow_none else ''}, got {_show(value)}")
    if minimum is not None and value < minimum:
        raise _fail(path, f"must be at least {minimum}, got {value}")
    return int(value)


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"expected a number, got {_show(value)}")
    if not math.isfinite(value):
        raise _fail(path, f"expected a finite number, got {value}")
    return float(value)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {_show(value)}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _fail(path, f"expected a list, got {_show(value)}")
    return list(value)


def _path_like(value: Any, path: str, base: Path | None, *, allow_none: bool = False, builtin: tuple[str, ...] = ()) -> str | None:
    """A prompt/pair source: ``builtin:...`` or a file path (relative paths against ``base``)."""
    if value is None and allow_none:
        return None
    text = _str(value, path)
    if text.startswith("builtin:"):
        if text not in builtin:
            raise _fail(path, f"unknown built-in {_show(text)}; choose {' or '.join(builtin) or 'a file path'}")
        return text
    return _resolve(text, base)


def _resolve(text: str, base: Path | None) -> str:
    p = Path(text).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return str(p)


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------
def _preamble(value: Any, path: str) -> str | dict:
    if isinstance(value, str):
        if value not in PRESETS:
            raise _fail(path, f"unknown preset {_show(value)}; choose one of {', '.join(PRESETS)} or give {{system, demonstrations}}")
        return value
    data = _mapping(value, path, ("name", "system", "demonstrations"))
    out: dict[str, Any] = {}
    if "name" in data:
        out["name"] = _str(data["name"], _join(path, "name"))
    system = data.get("system")
    out["system"] = None if system is None else _str(system, _join(path, "system"), allow_empty=True)
    demos = []
    for i, demo in enumerate(_list(data.get("demonstrations", []), _join(path, "demonstrations"))):
        p = f"{path}.demonstrations[{i}]"
        if isinstance(demo, Mapping):
            d = _mapping(demo, p, ("user", "assistant"))
            if set(d) != {"user", "assistant"}:
                raise _fail(p, "expected both 'user' and 'assistant'")
            pair = [d["user"], d["assistant"]]
        else:
            pair = _list(demo, p)
            if len(pair) != 2:
                raise _fail(p, f"expected [user, assistant], got {len(pair)} item(s)")
        demos.append([_str(pair[0], p + "[0]"), _str(pair[1], p + "[1]")])
    out["demonstrations"] = demos
    return out


def _models(value: Any, base: Path | None) -> tuple[ModelSpec, ...]:
    if value is None:
        return Config().models
    items = _list(value, "models")
    if not items:
        raise _fail("models", "expected at least one model")
    specs: list[ModelSpec] = []
    for i, item in enumerate(items):
        path = f"models[{i}]"
        if isinstance(item, str):  # shorthand: just a source
            item = {"source": item}
        data = _mapping(item, path, ("name", "source", "preamble", "dtype", "device"))
        source = _str(data.get("source", "embedded"), _join(path, "source"))
        if source.startswith((".", "~")):
            source = _resolve(source, base)
        name = _str(data["name"], _join(path, "name")) if "name" in data else _default_name(source)
        specs.append(ModelSpec(
            name=name,
            source=source,
            preamble=_preamble(data.get("preamble", "prompted-refusal"), _join(path, "preamble")),
            dtype=_str(data.get("dtype", "auto"), _join(path, "dtype"), choices=DTYPES),
            device=_str(data.get("device", "auto"), _join(path, "device")),
        ))
    names = [s.name for s in specs]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise _fail(f"models[{i}].name", f"duplicate model name {_show(n)}; give each model a unique name")
    return tuple(specs)


def _default_name(source: str) -> str:
    return Path(source.rstrip("/")).name or source


def _prompts(value: Any, base: Path | None) -> PromptsConfig:
    keys = ("harmful", "harmless", "harmful_test", "harmless_test", "n_train", "n_test", "seed", "validation_fraction")
    data = _mapping(value, "prompts", keys)
    d = PromptsConfig()
    cfg = PromptsConfig(
        harmful=_path_like(data.get("harmful", d.harmful), "prompts.harmful", base, builtin=("builtin:harmful",)),
        harmless=_path_like(data.get("harmless", d.harmless), "prompts.harmless", base, builtin=("builtin:harmless",)),
        harmful_test=_path_like(data.get("harmful_test"), "prompts.harmful_test", base, allow_none=True),
        harmless_test=_path_like(data.get("harmless_test"), "prompts.harmless_test", base, allow_none=True),
        n_train=_int(data.get("n_train", d.n_train), "prompts.n_train", minimum=2, allow_none=True),
        n_test=_int(data.get("n_test", d.n_test), "prompts.n_test", minimum=1, allow_none=True),
        seed=_int(data.get("seed", d.seed), "prompts.seed", minimum=0),
        validation_fraction=_number(data.get("validation_fraction", d.validation_fraction), "prompts.validation_fraction"),
    )
    if not 0 < cfg.validation_fraction < 1:
        raise _fail("prompts.validation_fraction", f"must be between 0 and 1 (a fraction of the train prompts), got {cfg.validation_fraction:g}")
    if (cfg.harmful_test is None) != (cfg.harmless_test is None):
        missing = "prompts.harmless_test" if cfg.harmless_test is None else "prompts.harmful_test"
        raise _fail(missing, "give both harmful_test and harmless_test, or neither")
    return cfg


def _position(value: Any) -> str | int:
    if isinstance(value, str):
        if value in POSITIONS:
            return value
        try:
            value = int(value)
        except ValueError:
            raise _fail("position", f"expected last, mean or a negative integer, got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value >= 0:
        raise _fail("position", f"expected last, mean or a negative integer, got {_show(value)}")
    return value


def _generation(value: Any) -> GenerationConfig:
    data = _mapping(value, "generation", ("max_new_tokens", "batch_size", "n_samples"))
    d = GenerationConfig()
    return GenerationConfig(
        max_new_tokens=_int(data.get("max_new_tokens", d.max_new_tokens), "generation.max_new_tokens", minimum=1),
        batch_size=_int(data.get("batch_size", d.batch_size), "generation.batch_size", minimum=1),
        n_samples=_int(data.get("n_samples", d.n_samples), "generation.n_samples", minimum=0),
    )


def _steering(value: Any) -> SteeringConfig:
    data = _mapping(value, "steering", ("layer", "coefficients", "subtract_coefficients", "normalised", "method",
                                           "scan_prompts", "scan_stride"))
    d = SteeringConfig()
    layer = data.get("layer", d.layer)
    if layer != "auto":
        if isinstance(layer, str):
            raise _fail("steering.layer", f"expected auto or an integer, got {_show(layer)}")
        layer = _int(layer, "steering.layer")
    return SteeringConfig(
        layer=layer,
        coefficients=_coefficients(data.get("coefficients", list(d.coefficients)), "steering.coefficients", allow_empty=False),
        subtract_coefficients=_coefficients(data.get("subtract_coefficients", list(d.subtract_coefficients)),
                                            "steering.subtract_coefficients", allow_empty=True),
        scan_prompts=_int(data.get("scan_prompts", d.scan_prompts), "steering.scan_prompts", minimum=0),
        scan_stride=_int(data.get("scan_stride", d.scan_stride), "steering.scan_stride", minimum=1),
        normalised=_bool(data.get("normalised", d.normalised), "steering.normalised"),
        method=_str(data.get("method", d.method), "steering.method", choices=METHODS),
    )


def _coefficients(value: Any, path: str, *, allow_empty: bool) -> tuple[float, ...]:
    coefs = [_number(c, f"{path}[{i}]") for i, c in enumerate(_list(value, path))]
    if not coefs and not allow_empty:
        raise _fail(path, "expected at least one coefficient")
    for i, c in enumerate(coefs):
        if c <= 0:
            raise _fail(f"{path}[{i}]", f"must be positive (the sign comes from add/subtract), got {c:g}")
    return tuple(coefs)


def _patching(value: Any, base: Path | None) -> PatchingConfig | None:
    if value is None or value is False:
        return None
    if value is True:
        return PatchingConfig()
    data = _mapping(value, "patching", ("pairs", "n_pairs", "sites", "threshold", "pair_filter", "min_gap", "fdr"))
    d = PatchingConfig()
    sites = _list(data.get("sites", list(d.sites)), "patching.sites")
    site_list = tuple(_str(s, f"patching.sites[{i}]", choices=SITES) for i, s in enumerate(sites))
    if not site_list:
        raise _fail("patching.sites", f"expected at least one of {', '.join(SITES)}")
    fdr = _number(data.get("fdr", d.fdr), "patching.fdr")
    if not 0 < fdr < 1:
        raise _fail("patching.fdr", f"expected a false-discovery rate between 0 and 1 (e.g. 0.05), got {fdr:g}")
    return PatchingConfig(
        pairs=_path_like(data.get("pairs", d.pairs), "patching.pairs", base, builtin=("builtin:pairs",)),
        n_pairs=_int(data.get("n_pairs", d.n_pairs), "patching.n_pairs", minimum=1, allow_none=True),
        sites=tuple(dict.fromkeys(site_list)),
        threshold=_number(data.get("threshold", d.threshold), "patching.threshold"),
        pair_filter=_str(data.get("pair_filter", d.pair_filter), "patching.pair_filter", choices=("strict", "relative", "none")),
        min_gap=_number(data.get("min_gap", d.min_gap), "patching.min_gap"),
        fdr=fdr,
    )


def _probe(value: Any) -> ProbeConfig:
    data = _mapping(value, "probe", ("folds",))
    return ProbeConfig(folds=_int(data.get("folds", ProbeConfig.folds), "probe.folds", minimum=2))


def _selection(value: Any) -> SelectionConfig:
    d = SelectionConfig()
    if value is False:
        return SelectionConfig(enabled=False)
    data = _mapping(value, "selection", tuple(d.to_dict()))
    cfg = SelectionConfig(
        enabled=_bool(data.get("enabled", d.enabled), "selection.enabled"),
        positions=_int(data.get("positions", d.positions), "selection.positions", minimum=0),
        layer_stride=_int(data.get("layer_stride", d.layer_stride), "selection.layer_stride", minimum=1),
        n_prompts=_int(data.get("n_prompts", d.n_prompts), "selection.n_prompts", minimum=2),
        max_kl=_number(data.get("max_kl", d.max_kl), "selection.max_kl"),
        skip_last_fraction=_number(data.get("skip_last_fraction", d.skip_last_fraction), "selection.skip_last_fraction"),
        prune=_bool(data.get("prune", d.prune), "selection.prune"),
    )
    if not 0 <= cfg.skip_last_fraction < 1:
        raise _fail("selection.skip_last_fraction", f"must be in [0, 1), got {cfg.skip_last_fraction:g}")
    if cfg.max_kl < 0:
        raise _fail("selection.max_kl", f"must be at least 0, got {cfg.max_kl:g}")
    return cfg


TOP_KEYS = ("models", "prompts", "position", "generation", "steering", "patching", "probe", "selection", "judge")


def config_from_dict(data: Any, base_dir: str | Path | None = None) -> Config:
    """Validate a parsed config; relative paths resolve against ``base_dir``."""
    base = Path(base_dir).resolve() if base_dir is not None else None
    top = _mapping(data, "", TOP_KEYS)
    cfg = Config(
        models=_models(top.get("models"), base),
        prompts=_prompts(top.get("prompts"), base),
        position=_position(top.get("position", "last")),
        generation=_generation(top.get("generation")),
        steering=_steering(top.get("steering")),
        patching=_patching(top.get("patching"), base),
        probe=_probe(top.get("probe")),
        selection=_selection(top.get("selection")),
        judge=_judge(top.get("judge", "substring")),
    )
    return cfg


def _judge(value: Any) -> str:
    text = _str(value, "judge")
    if text != "substring" and not (text.startswith("llm:") and text[4:].strip()):
        raise _fail("judge", f"expected substring or llm:<model source> (e.g. llm:embedded), got {_show(value)}")
    return text
