"""Every reader of outside data, fuzzed: whatever the bytes, only the project's own error types
escape, and their message names the file. Small example counts keep the suite fast."""

from __future__ import annotations

import io
import json
import string
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ExplorerError

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz-readers-"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
COLUMN_NAMES = ["prompt", "goal", "Goal", "Behavior", "forbidden_prompt", "label", "type", "target", "id", "text", ""]
cells = st.text(alphabet=string.printable + "éß\u2019\x00", max_size=15)


def _named(exc: BaseException, name: str) -> None:
    assert isinstance(exc, ExplorerError), f"{type(exc).__name__} escaped: {exc}"
    assert name in str(exc), f"the message does not name {name}: {exc}"


def _file(name: str, data: bytes) -> Path:
    path = SCRATCH / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------
# prompt files
# ---------------------------------------------------------------------------------------
def _prompts(data: bytes, name: str, column: str | None = None) -> None:
    import warnings

    from core.prompts import parse_prompt_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = parse_prompt_bytes(data, name, column=column)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            _named(exc, name)
        else:
            assert out and all(isinstance(p, str) and p for p in out)


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["f.txt", "f.csv", "f.jsonl", "f.ndjson", "f.bin"]))
def test_prompt_bytes(data, name):
    _prompts(data, name)


@FUZZ
@given(st.lists(st.sampled_from(COLUMN_NAMES) | cells, min_size=1, max_size=5),
       st.lists(st.lists(cells, max_size=6), max_size=5), st.sampled_from([None, "goal", "nope"]))
def test_prompt_csv_layouts(header, rows, column):
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    _prompts(buf.getvalue().encode("utf-8", "surrogatepass"), "set.csv", column)


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(COLUMN_NAMES) | st.text(max_size=6), json_values, max_size=4)
                | json_values, max_size=5))
def test_prompt_jsonl_layouts(objects):
    _prompts("\n".join(json.dumps(o) for o in objects).encode(), "set.jsonl")


@FUZZ
@given(st.binary(max_size=300) | st.lists(json_values, max_size=4).map(lambda v: "\n".join(map(json.dumps, v)).encode()))
def test_pair_files(data):
    from core.prompts import load_pairs

    try:
        pairs = load_pairs(_file("fuzz-pairs.jsonl", data))
    except Exception as exc:  # noqa: BLE001
        _named(exc, "fuzz-pairs.jsonl")
    else:
        assert all(isinstance(h, str) and isinstance(b, str) for h, b in pairs)


# ---------------------------------------------------------------------------------------
# YAML configs
# ---------------------------------------------------------------------------------------
CONFIG_KEYS = ["models", "prompts", "position", "generation", "steering", "patching", "probe", "name", "source",
               "preamble", "dtype", "harmful", "n_train", "seed", "layer", "coefficients", "folds", "sites"]
config_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.sampled_from(CONFIG_KEYS + ["auto", "last"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(CONFIG_KEYS), inner, max_size=4),
    max_leaves=15,
)


def _config(text: bytes) -> None:
    from core.config import load_config

    path = _file("fuzz-config.yaml", text)
    try:
        load_config(path)
    except Exception as exc:  # noqa: BLE001
        _named(exc, "fuzz-config.yaml")


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_config_text(data):
    _config(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), config_values, max_size=6))
def test_config_structure(data):
    _config(yaml.safe_dump(data, allow_unicode=True).encode())


# ---------------------------------------------------------------------------------------
# direction files and control vectors
# ---------------------------------------------------------------------------------------
MODEL = {"name": "fuzz", "source": "fuzz", "fingerprint": "f" * 64, "n_layers": 3, "d_model": 8}


@pytest.fixture(scope="module")
def valid_files():
    from core.control_vectors import write_control_vector
    from core.direction_files import directions_bytes
    from core.directions import fit_directions

    rng = np.random.default_rng(0)
    h, b = rng.normal(1, 1, (6, 3, 8)), rng.normal(0, 1, (6, 3, 8))
    dirs = fit_directions(h, b, h[:2], b[:2], probe_folds=2)
    gguf = write_control_vector(SCRATCH / "valid.gguf", dirs, "all", model=MODEL).read_bytes()
    return directions_bytes(dirs, model=MODEL, choice=1), gguf


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


def _directions(data: bytes) -> None:
    from core.direction_files import load_directions

    try:
        load_directions(_file("fuzz.safetensors", data), model=MODEL)
    except Exception as exc:  # noqa: BLE001
        _named(exc, "fuzz.safetensors")


@FUZZ
@given(st.binary(max_size=300))
def test_directions_random_bytes(data):
    _directions(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6), st.none() | st.integers(0, 4000))
def test_directions_mutated(valid_files, edits, cut):
    _directions(_mutate(valid_files[0], edits, cut))


@FUZZ
@given(st.dictionaries(st.sampled_from(["format_version", "model", "method", "position", "chosen", "n_train", "n_test",
                                        "probe_folds", "seed", "format"]), json_values, min_size=1, max_size=3))
def test_directions_metadata(valid_files, changes):
    from safetensors.numpy import load, save

    from core.direction_files import META_KEY, parse_directions

    data = valid_files[0]
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + size])["__metadata__"][META_KEY])
    meta.update(changes)
    forged = save(load(data), metadata={META_KEY: json.dumps(meta)})
    try:
        parse_directions(forged, "forged.safetensors")
    except Exception as exc:  # noqa: BLE001
        _named(exc, "forged.safetensors")


def _control_vector(data: bytes) -> None:
    from core.control_vectors import read_control_vector

    try:
        read_control_vector(_file("fuzz.gguf", data), d_model=8)
    except Exception as exc:  # noqa: BLE001
        _named(exc, "fuzz.gguf")


@FUZZ
@given(st.binary(max_size=300))
def test_control_vector_random_bytes(data):
    _control_vector(b"GGUF" + data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6), st.none() | st.integers(0, 2000))
def test_control_vector_mutated(valid_files, edits, cut):
    _control_vector(_mutate(valid_files[1], edits, cut))


# ---------------------------------------------------------------------------------------
# results.json and bundles
# ---------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.just("models"), json_values).map(lambda v: json.dumps(v).encode()))
def test_results_json(data):
    from core.bundle import read_results

    try:
        read_results(_file("results.json", data))
    except Exception as exc:  # noqa: BLE001
        _named(exc, "results.json")


entry_names = st.text(alphabet="ab./\\:..-_ \x00é", min_size=0, max_size=12)


@FUZZ
@given(st.binary(max_size=300) | st.lists(st.tuples(entry_names, st.binary(max_size=30)), max_size=5).map(
    lambda items: _zip_bytes(items)))
def test_bundle(data):
    from core.bundle import open_bundle

    private = SCRATCH / "extract"
    private.mkdir(exist_ok=True)
    path = _file("fuzz-bundle.zip", data)
    old, tempfile.tempdir = tempfile.tempdir, str(private)
    try:
        with open_bundle(path) as b:
            for name in b.names:  # everything it wrote is inside its own folder
                assert (b.folder / name).resolve().is_relative_to(b.folder.resolve())
    except Exception as exc:  # noqa: BLE001
        _named(exc, "fuzz-bundle.zip")
    finally:
        tempfile.tempdir = old
    assert list(private.iterdir()) == []  # extracted in a temporary folder, removed, nothing beside it
    assert {p.name for p in SCRATCH.iterdir()} <= {"extract", "fuzz-bundle.zip", "results.json", "fuzz.gguf", "valid.gguf",
                                                   "fuzz.safetensors", "fuzz-config.yaml", "fuzz-pairs.jsonl"}


def _zip_bytes(items: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in items:
            try:
                zf.writestr(zipfile.ZipInfo(name or "x"), data)
            except (ValueError, UnicodeEncodeError):
                pass
    return buf.getvalue()


def test_config_nested_too_deeply():
    _config(("[" * 3000 + "]" * 3000).encode())
