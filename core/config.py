"""The batch config: a YAML file that says which models, prompts and analyses to run.

Why a schema of our own instead of "whatever YAML parses": a typo (``coeficients``) or a
string where a number belongs would otherwise surface as a crash minutes into a run, or worse
be silently ignored. :func:`load_config` rejects unknown keys and wrong types up front with a
:class:`~core.errors.ConfigError` whose message names the key path, e.g.
``steering.coefficients[2]: expected a number, got 'abc'``.

:meth:`Config.to_dict` writes back a dict that :func:`config_from_dict` turns into an equal
:class:`Config`, so the app can export the exact config of an analysis and the batch runner
reruns it. Every key has a default; the smallest valid config is ``{}`` (the embedded model with
the prompted-refusal preamble on the built-in prompts).

Relative file paths (prompt files, pair files, model folders written as ``./x`` or ``../x``)
are resolved against the config file's folder, so a config travels with its data.

Example (all keys)::

    models:
      - {name: smollm2-prompted, source: embedded, preamble: prompted-refusal, dtype: auto}
    prompts: {harmful: builtin:harmful, harmless: builtin:harmless, harmful_test: null,
              harmless_test: null, n_train: 64, n_test: 40, seed: 0, validation_fraction: 0.25}
    position: last                  # last | mean | a negative int (-2 = second-to-last token)
    generation: {max_new_tokens: 48, batch_size: 16, n_samples: 4}
    steering: {layer: auto, coefficients: [0.25, 0.5, 0.75, 1.0], subtract_coefficients: [0.5],
               normalised: true, method: diff-in-means, scan_prompts: 16, scan_stride: 1}
    patching: {pairs: builtin:pairs, n_pairs: 20, sites: [resid, attn, mlp], threshold: 0.1,
               pair_filter: relative, min_gap: 0.0, fdr: 0.05}
    probe: {folds: 5}
    judge: substring                # or llm:<model source>: a chat model labels each answer
    selection: {enabled: true, positions: 2, layer_stride: 4, n_prompts: 32, max_kl: 0.1,
                skip_last_fraction: 0.2, prune: true}
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from core.errors import ConfigError
from core.formatting import PRESETS
from core.selection import DEFAULT_LAYER_STRIDE, DEFAULT_N_PROMPTS, DEFAULT_POSITIONS

POSITIONS = ("last", "mean")
DTYPES = ("auto", "float32", "bfloat16", "float16")
METHODS = ("diff-in-means", "pca", "probe")
SITES = ("resid", "attn", "mlp", "head")
DEFAULT_COEFFICIENTS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_SUBTRACT_COEFFICIENTS = (0.5,)


# ---------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model to analyse. ``preamble`` is a preset name or a dict {system, demonstrations}."""

    name: str
    source: str = "embedded"
    preamble: str | dict = "prompted-refusal"
    dtype: str = "auto"
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        pre = self.preamble if isinstance(self.preamble, str) else _copy_preamble(self.preamble)
        return {"name": self.name, "source": self.source, "preamble": pre, "dtype": self.dtype, "device": self.device}


@dataclass(frozen=True)
class PromptsConfig:
    """Where prompts come from. Built-in sets use their canonical train/test split
    (:func:`core.prompts.builtin_split`); files are split 70/30 with ``seed``; ``*_test`` files
    replace the test split (the whole main file is then train). ``validation_fraction`` of the
    train part becomes the validation split (it chooses position, layer and coefficients; the
    test split only reports). ``n_train``/``n_test`` take the first n of each class (``None`` = all)."""

    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    harmful_test: str | None = None
    harmless_test: str | None = None
    n_train: int | None = 64
    n_test: int | None = 40
    seed: int = 0
    validation_fraction: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 48
    batch_size: int = 16
    n_samples: int = 4  # sample generations kept per model for the report

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SteeringConfig:
    """``layer: auto`` uses the documented rule of ``core.directions.choose_layer``, fed by an
    ablation screen (``core.validation.scan_layers``) on ``scan_prompts`` *train* prompts per
    class (0 = no screen: best held-out separation). ``coefficients`` are the force sweep
    (+α·v on harmless prompts), ``subtract_coefficients`` the −α·v sweep on harmful prompts;
    ``normalised`` coefficients are in units of the layer's mean activation norm."""

    layer: str | int = "auto"
    coefficients: tuple[float, ...] = DEFAULT_COEFFICIENTS
    subtract_coefficients: tuple[float, ...] = DEFAULT_SUBTRACT_COEFFICIENTS
    normalised: bool = True
    method: str = "diff-in-means"
    scan_prompts: int = 16
    scan_stride: int = 1  # screen every k-th candidate layer (2 halves the screen's cost)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "coefficients": list(self.coefficients),
                "subtract_coefficients": list(self.subtract_coefficients), "normalised": self.normalised,
                "method": self.method, "scan_prompts": self.scan_prompts, "scan_stride": self.scan_stride}


@dataclass(frozen=True)
class PatchingConfig:
    pairs: str = "builtin:pairs"
    n_pairs: int | None = 20
    sites: tuple[str, ...] = ("resid", "attn", "mlp")
    threshold: float = 0.1
    # which pairs count: strict = the harmful run refuses (score > 0) and the harmless one does not;
    # relative = only the harmful run scores higher; none = keep all (core.patching require_behaviour).
    # relative by default: under the prompted-refusal preamble no built-in pair's harmful prompt scores
    # above 0 at the first token (0 of 61, python -m bench.patching_gaps), so strict kept no pair there
    pair_filter: str = "relative"
    min_gap: float = 0.0
    fdr: float = 0.05  # false-discovery rate of the critical list (Benjamini–Hochberg)

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "n_pairs": self.n_pairs, "sites": list(self.sites), "threshold": self.threshold,
                "pair_filter": self.pair_filter, "min_gap": self.min_gap, "fdr": self.fdr}

    @property
    def require_behaviour(self) -> bool | str:
        return {"strict": True, "relative": "relative", "none": False}[self.pair_filter]


@dataclass(frozen=True)
class SelectionConfig:
    """The position × layer candidate grid scored on validation prompts (``core.selection``).
    ``positions``: how many post-instruction tokens, counted from the last (0 = all);
    ``layer_stride``: score every k-th layer; ``n_prompts``: validation prompts per class;
    ``prune``: skip the ablation of candidates whose induce score already fails (same winner)."""

    enabled: bool = True
    positions: int = DEFAULT_POSITIONS  # sized to stay within a minute on a 2-core CPU (docs/decisions.md)
    layer_stride: int = DEFAULT_LAYER_STRIDE
    n_prompts: int = DEFAULT_N_PROMPTS
    max_kl: float = 0.1
    skip_last_fraction: float = 0.2
    prune: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ProbeConfig:
    folds: int = 5

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Config:
    models: tuple[ModelSpec, ...] = (ModelSpec("smollm2-135m-instruct"),)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    position: str | int = "last"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    patching: PatchingConfig | None = None
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    judge: str = "substring"  # substring | llm:<model source> (core.llm_judge.make_judge)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`config_from_dict` turns back into an equal Config."""
        return {
            "models": [m.to_dict() for m in self.models],
            "prompts": self.prompts.to_dict(),
            "position": self.position,
            "generation": self.generation.to_dict(),
            "steering": self.steering.to_dict(),
            "patching": self.patching.to_dict() if self.patching is not None else None,
            "probe": self.probe.to_dict(),
            "selection": self.selection.to_dict(),
            "judge": self.judge,
        }

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)


def _copy_preamble(p: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "name" in p:
        out["name"] = p["name"]
    out["system"] = p.get("system")
    out["demonstrations"] = [list(d) for d in p.get("demonstrations", [])]
    return out


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


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not valid UTF-8; save the config as UTF-8") from None
    except RecursionError:  # e.g. thousands of nested brackets: no config looks like that
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    try:
        return config_from_dict(data, base_dir=p.parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


# ---------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------
@dataclass
class PromptData:
    """The prompt lists an analysis uses, and where they came from (for the report). Train fits,
    validation chooses, test only reports."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_test: list[str]
    harmless_test: list[str]
    description: str
    harmful_val: list[str] = field(default_factory=list)
    harmless_val: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"harmful_train": len(self.harmful_train), "harmless_train": len(self.harmless_train),
                "harmful_val": len(self.harmful_val), "harmless_val": len(self.harmless_val),
                "harmful_test": len(self.harmful_test), "harmless_test": len(self.harmless_test)}


def _split_source(source: str, seed: int):
    from core.prompts import builtin_split, load_prompt_set, split_prompts

    if source.startswith("builtin:"):
        return builtin_split(source.split(":", 1)[1], seed)
    return split_prompts(load_prompt_set(source), seed=seed)


def _take(prompts: list[str], n: int | None, path: str, what: str) -> list[str]:
    if n is None:
        return list(prompts)
    if n > len(prompts):
        raise _fail(path, f"asks for {n} {what} prompts but only {len(prompts)} are available; lower it or add prompts")
    return list(prompts[:n])


def resolve_prompts(cfg: PromptsConfig) -> PromptData:
    """Train, validation and test prompts per class. Built-in sets use their canonical split (the
    one the organism was trained on, so its test prompts are unseen); files are split 70/30 by
    ``seed``; ``*_test`` files replace the test split, and the main files are then the train pool.
    Validation is ``validation_fraction`` of the train pool (:func:`core.prompts.carve_validation`);
    a test prompt that also appears in train or validation is refused, named."""
    from core.errors import SplitError
    from core.prompts import carve_validation, check_disjoint, load_prompt_set

    if cfg.harmful_test is not None and cfg.harmless_test is not None:
        h_train, b_train = load_prompt_set(cfg.harmful), load_prompt_set(cfg.harmless)
        h_test, b_test = load_prompt_set(cfg.harmful_test), load_prompt_set(cfg.harmless_test)
        how = "test prompts from separate files"
    else:
        hs, bs = _split_source(cfg.harmful, cfg.seed), _split_source(cfg.harmless, cfg.seed)
        h_train, h_test, b_train, b_test = hs.train, hs.test, bs.train, bs.test
        how = f"70/30 split, seed {cfg.seed}" + (" (canonical built-in split)" if cfg.harmful.startswith("builtin:") else "")
    try:
        h_train, h_val = carve_validation(h_train, cfg.validation_fraction, cfg.seed,
                                          setting="prompts.validation_fraction", label="harmful train")
        b_train, b_val = carve_validation(b_train, cfg.validation_fraction, cfg.seed,
                                          setting="prompts.validation_fraction", label="harmless train")
    except SplitError as exc:
        raise ConfigError(str(exc)) from None
    how += f"; validation = {cfg.validation_fraction:g} of train (seeded)"
    data = PromptData(
        harmful_train=_take(h_train, cfg.n_train, "prompts.n_train", "harmful train"),
        harmless_train=_take(b_train, cfg.n_train, "prompts.n_train", "harmless train"),
        harmful_test=_take(h_test, cfg.n_test, "prompts.n_test", "harmful test"),
        harmless_test=_take(b_test, cfg.n_test, "prompts.n_test", "harmless test"),
        description=f"harmful: {cfg.harmful}; harmless: {cfg.harmless}; {how}",
        harmful_val=h_val,
        harmless_val=b_val,
    )
    test_label = {"harmful": cfg.harmful_test or f"{cfg.harmful} (test split)",
                  "harmless": cfg.harmless_test or f"{cfg.harmless} (test split)"}
    try:
        check_disjoint({test_label["harmful"]: data.harmful_test, test_label["harmless"]: data.harmless_test},
                       {"harmful train": h_train, "harmless train": b_train,
                        "harmful validation": h_val, "harmless validation": b_val})
    except SplitError as exc:
        raise _fail("prompts", str(exc)) from None
    return data
