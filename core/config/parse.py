"""Reading a config: the YAML file (:func:`load_config`) and the prompt lists it names
(:func:`resolve_prompts`: train, validation and test per class)."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.config.schema import Config, PromptData, PromptsConfig
from core.config.validate import _fail, config_from_dict
from core.errors import ConfigError


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
