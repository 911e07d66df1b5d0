"""The batch config: defaults, round trips, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from core.config import (
    Config,
    PatchingConfig,
    config_from_dict,
    load_config,
    resolve_prompts,
)
from core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

FULL = {
    "models": [
        {"name": "a", "source": "embedded", "preamble": "prompted-refusal", "dtype": "float32", "device": "cpu"},
        {"name": "b", "source": "embedded-refusal", "preamble": "none"},
        {"name": "c", "source": "/models/x", "preamble": {"system": "Be safe.", "demonstrations": [["hi", "hello"]]}},
    ],
    "prompts": {"harmful": "builtin:harmful", "harmless": "builtin:harmless", "harmful_test": None,
                "harmless_test": None, "n_train": 10, "n_test": 5, "seed": 3},
    "position": -2,
    "generation": {"max_new_tokens": 8, "batch_size": 4, "n_samples": 1},
    "steering": {"layer": 5, "coefficients": [0.5, 1], "subtract_coefficients": [], "normalised": False,
                 "method": "pca", "scan_prompts": 0, "scan_stride": 2},
    "patching": {"pairs": "builtin:pairs", "n_pairs": 3, "sites": ["resid", "head"], "threshold": 0.2,
                 "pair_filter": "relative", "min_gap": 0.5},
    "probe": {"folds": 3},
}


def test_defaults_are_valid_and_complete():
    cfg = config_from_dict({})
    assert cfg == Config()
    assert cfg.models[0].source == "embedded" and cfg.patching is None
    assert config_from_dict({"patching": True}).patching == PatchingConfig()


@pytest.mark.parametrize("data", [{}, FULL, {"patching": True}])
def test_round_trip_dict_and_yaml(data, tmp_path):
    cfg = config_from_dict(data)
    assert config_from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.to_dict() == yaml.safe_load(cfg.to_yaml())


def test_full_config_values():
    cfg = config_from_dict(FULL)
    assert cfg.position == -2
    assert cfg.steering.layer == 5 and cfg.steering.coefficients == (0.5, 1.0) and cfg.steering.subtract_coefficients == ()
    assert cfg.models[2].preamble == {"system": "Be safe.", "demonstrations": [["hi", "hello"]]}
    assert cfg.patching.sites == ("resid", "head")


@pytest.mark.parametrize(
    "data, path, words",
    [
        ({"steering": {"coefficients": [0.5, 1, "abc"]}}, "steering.coefficients[2]", "expected a number, got 'abc'"),
        ({"steering": {"coefs": [1]}}, "steering.coefs", "unknown key"),
        ({"modles": []}, "modles", "did you mean 'models'"),
        ({"models": [{"name": "a", "sorce": "x"}]}, "models[0].sorce", "did you mean 'source'"),
        ({"models": [{"name": "a", "preamble": "nope"}]}, "models[0].preamble", "unknown preset"),
        ({"models": [{"name": "a", "preamble": {"system": "s", "demonstrations": [["only one"]]}}]},
         "models[0].preamble.demonstrations[0]", "[user, assistant]"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "models[1].name", "duplicate"),
        ({"models": [{"name": "a", "dtype": "float8"}]}, "models[0].dtype", "expected one of"),
        ({"models": "embedded"}, "models", "expected a list"),
        ({"prompts": {"n_train": "many"}}, "prompts.n_train", "expected an integer"),
        ({"prompts": {"n_test": 0}}, "prompts.n_test", "at least 1"),
        ({"prompts": {"harmful_test": "x.txt"}}, "prompts.harmless_test", "both"),
        ({"prompts": {"harmful": "builtin:harmless"}}, "prompts.harmful", "unknown built-in"),
        ({"position": 3}, "position", "negative integer"),
        ({"generation": {"max_new_tokens": True}}, "generation.max_new_tokens", "expected an integer"),
        ({"steering": {"layer": "middle"}}, "steering.layer", "auto or an integer"),
        ({"steering": {"normalised": "yes"}}, "steering.normalised", "true or false"),
        ({"steering": {"coefficients": [0.5, -1]}}, "steering.coefficients[1]", "positive"),
        ({"steering": {"coefficients": []}}, "steering.coefficients", "at least one"),
        ({"steering": {"method": "svd"}}, "steering.method", "expected one of"),
        ({"steering": {"scan_stride": 0}}, "steering.scan_stride", "at least 1"),
        ({"patching": {"sites": ["resid", "neurons"]}}, "patching.sites[1]", "expected one of"),
        ({"patching": {"threshold": "high"}}, "patching.threshold", "expected a number"),
        ({"patching": {"pair_filter": "loose"}}, "patching.pair_filter", "expected one of"),
        ({"probe": {"folds": 1}}, "probe.folds", "at least 2"),
        ({"probe": 5}, "probe", "expected a mapping"),
    ],
)
def test_errors_name_the_key_path(data, path, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert words in message
    assert "\n" not in message


def test_load_config_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steering:\n  coefficients: [0.5, 1, abc]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: steering\.coefficients\[2\]: expected a number, got 'abc'"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [\n  - {name: a\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    notutf = tmp_path / "latin1.yaml"
    notutf.write_bytes(b"models: [{name: caf\xe9}]\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(notutf)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    sub = tmp_path / "exp"
    sub.mkdir()
    (sub / "c.yaml").write_text(
        "models: [{name: m, source: ./model}]\nprompts: {harmful: h.txt, harmless: /abs/b.txt}\npatching: {pairs: pairs.jsonl}\n"
    )
    cfg = load_config(sub / "c.yaml")
    assert cfg.models[0].source == str(sub / "model")
    assert cfg.prompts.harmful == str(sub / "h.txt") and cfg.prompts.harmless == "/abs/b.txt"
    assert cfg.patching.pairs == str(sub / "pairs.jsonl")
    assert config_from_dict(cfg.to_dict()) == cfg  # absolute after loading: the round trip is stable


def test_builtin_prompts_use_the_canonical_split():
    from core.prompts import builtin_split

    data = resolve_prompts(config_from_dict({"prompts": {"n_train": 20, "n_test": 10, "seed": 0}}).prompts)
    h, b = builtin_split("harmful", 0), builtin_split("harmless", 0)
    counts = data.counts()
    assert {k: counts[k] for k in ("harmful_train", "harmless_train", "harmful_test", "harmless_test")} == \
        {"harmful_train": 20, "harmless_train": 20, "harmful_test": 10, "harmless_test": 10}
    assert data.harmful_test == h.test[:10]  # the test split is today's, validation or not
    assert counts["harmful_val"] == int(np.ceil(0.25 * len(h.train))) and counts["harmless_val"] == int(np.ceil(0.25 * len(b.train)))
    assert set(data.harmless_train) | set(data.harmless_val) <= set(b.train)  # validation is carved out of train
    assert not set(data.harmless_train) & set(data.harmless_val)
    assert not set(data.harmful_train) & set(data.harmful_test)
    again = resolve_prompts(config_from_dict({"prompts": {"n_train": 20, "n_test": 10, "seed": 0}}).prompts)
    assert again.harmful_val == data.harmful_val  # deterministic


def test_too_small_validation_names_the_setting(tmp_path):
    for name, lines in (("h", "a\nb\nc"), ("b", "d\ne\nf")):
        (tmp_path / f"{name}.txt").write_text(lines)
    cfg = load_config_text(tmp_path, "prompts: {harmful: h.txt, harmless: b.txt, n_train: null, n_test: null}")
    with pytest.raises(ConfigError, match=r"prompts\.validation_fraction: .* validation needs at least 2"):
        resolve_prompts(cfg.prompts)
    with pytest.raises(ConfigError, match=r"prompts\.validation_fraction: must be between 0 and 1"):
        load_config_text(tmp_path, "prompts: {validation_fraction: 0}")


def test_test_files_replace_the_test_split(tmp_path):
    for name, lines in (("h", "a\nb\nc\nk\nl\nm"), ("b", "d\ne\nf\nn\no\np"), ("ht", "g\nh"), ("bt", "i\nj")):
        (tmp_path / f"{name}.txt").write_text(lines)
    cfg = load_config_text(tmp_path, "prompts: {harmful: h.txt, harmless: b.txt, harmful_test: ht.txt, harmless_test: bt.txt, n_train: null, n_test: null, validation_fraction: 0.34}")
    data = resolve_prompts(cfg.prompts)
    assert (data.harmful_test, data.harmless_test) == (["g", "h"], ["i", "j"])  # a test file stays test
    assert len(data.harmful_val) == 3 and len(data.harmful_train) == 3  # validation comes out of train
    assert sorted(data.harmful_train + data.harmful_val) == ["a", "b", "c", "k", "l", "m"]
    too_many = load_config_text(tmp_path, "prompts: {harmful: h.txt, harmless: b.txt, harmful_test: ht.txt, harmless_test: bt.txt, n_train: 5}")
    with pytest.raises(ConfigError, match=r"^prompts\.n_train: asks for 5 harmful train prompts but only 4"):
        resolve_prompts(too_many.prompts)
    leak = load_config_text(tmp_path, "prompts: {harmful: h.txt, harmless: b.txt, harmful_test: h.txt, harmless_test: bt.txt, n_train: null, n_test: null}")
    with pytest.raises(ConfigError, match=r"test prompt\(s\) also appear in train or validation: '[abc]'"):
        resolve_prompts(leak.prompts)


def load_config_text(folder: Path, text: str) -> Config:
    path = folder / "cfg.yaml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("name", ["config.yaml", "seed-models.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "experiments" / name)
    assert cfg.models and cfg.patching is not None
    resolve_prompts(cfg.prompts)
