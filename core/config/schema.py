"""The config's schema: one frozen dataclass per section, with its defaults and ``to_dict``.

Why the defaults are imported, not written here: each is the default of the code that uses it
(the force sweep and its measurement in :mod:`core.validation`, the grid's size in
:mod:`core.selection`, the probe's folds in :mod:`core.directions`, the validation share in
:mod:`core.prompts`), so a config left empty runs exactly what that code runs by default.
Parsing and validation live in :mod:`core.config.validate` and :mod:`core.config.parse`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from core.directions import DEFAULT_PROBE_FOLDS, METHODS  # noqa: F401  (METHODS: the allowed steering.method values)
from core.patching.sites import SITES  # noqa: F401  (the allowed patching.sites values)
from core.prompts import DEFAULT_VALIDATION_FRACTION
from core.selection import (DEFAULT_LAYER_STRIDE, DEFAULT_MAX_KL, DEFAULT_N_PROMPTS, DEFAULT_POSITIONS,
                            DEFAULT_SKIP_LAST_FRACTION)
from core.validation import DEFAULT_FORCE_COEFFICIENTS, DEFAULT_SUBTRACT_COEFFICIENTS

POSITIONS = ("last", "mean")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The batch's force sweep: the measured sweep of core.validation plus 1.0, where that measurement
# overshot into degenerate text, so that a run's report shows the overshoot beside the choice.
DEFAULT_COEFFICIENTS: tuple[float, ...] = (*DEFAULT_FORCE_COEFFICIENTS, 1.0)


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
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION

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
    """``layer: auto`` uses the documented rule of ``core.layer_choice.choose_layer``, fed by an
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
    max_kl: float = DEFAULT_MAX_KL
    skip_last_fraction: float = DEFAULT_SKIP_LAST_FRACTION
    prune: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ProbeConfig:
    folds: int = DEFAULT_PROBE_FOLDS

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
    notes: list[str] = field(default_factory=list)  # what reading them found (duplicates dropped, columns used)

    @property
    def source(self) -> str:
        """Where the prompts came from (the app's name for :attr:`description`)."""
        return self.description

    def counts(self) -> dict[str, int]:
        return {"harmful_train": len(self.harmful_train), "harmless_train": len(self.harmless_train),
                "harmful_val": len(self.harmful_val), "harmless_val": len(self.harmless_val),
                "harmful_test": len(self.harmful_test), "harmless_test": len(self.harmless_test)}

    def summary(self) -> str:
        """``"48+48 train, 16+16 validation, 40+40 test"``."""
        return (f"{len(self.harmful_train)}+{len(self.harmless_train)} train, "
                f"{len(self.harmful_val)}+{len(self.harmless_val)} validation, "
                f"{len(self.harmful_test)}+{len(self.harmless_test)} test")

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.description,
                "harmful_train": self.harmful_train, "harmless_train": self.harmless_train,
                "harmful_val": self.harmful_val, "harmless_val": self.harmless_val,
                "harmful_test": self.harmful_test, "harmless_test": self.harmless_test}

