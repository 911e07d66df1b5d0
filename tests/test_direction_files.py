"""Directions as files and control-vector exports, on tiny real-architecture models."""

import json

import numpy as np
import pytest

from core.control_vectors import layer_vectors, read_control_vector, steering_vectors_form, write_control_vector
from core.direction_files import (
    FORMAT, LAYER_CONVENTION, directions_bytes, load_directions, prompt_digest, save_directions,
)
from core.layer_choice import choose_layer
from core.errors import DirectionFileError, ExplorerError
from core.steering import add, steered_generate
from test_steering import HARMFUL, HARMLESS, tiny_dirs_for


@pytest.fixture(scope="module")
def llama_dirs(tiny_models):
    lm = tiny_models["llama"]
    fmt, dirs = tiny_dirs_for(lm)
    return lm, fmt, dirs


def test_save_load_round_trip_gives_identical_steering(llama_dirs, tmp_path):
    lm, fmt, dirs = llama_dirs
    choice = choose_layer(dirs, layer=1)
    prompts = {"harmful_train": HARMFUL, "harmless_train": HARMLESS}
    path = save_directions(tmp_path / "d.safetensors", dirs, model=lm, choice=choice, prompts=prompts,
                           split={"rule": "all train", "seed": 0})
    saved = load_directions(path, model=lm)
    for name in ("raw", "unit", "mean_norm", "cosine", "separation_in_sample", "probe_accuracy"):
        assert np.array_equal(getattr(saved.dirs, name), getattr(dirs, name), equal_nan=True), name
    assert (saved.dirs.method, saved.dirs.position, saved.dirs.n_train) == (dirs.method, dirs.position, dirs.n_train)
    assert saved.layer == 1 and saved.choice.layer == 1
    meta = saved.meta
    assert meta["format"] == FORMAT and meta["layer_convention"] == LAYER_CONVENTION
    assert meta["model"]["fingerprint"] == lm.fingerprint and meta["model"]["d_model"] == lm.d_model
    assert meta["prompts"]["harmful_train"] == prompt_digest(HARMFUL) and meta["prompts"]["harmful_train"]["n"] == 4
    assert meta["split"]["rule"] == "all train" and meta["tool_version"]
    original = steered_generate(lm, fmt, HARMLESS[:2], [add(dirs, 1, 4.0)], max_new_tokens=6)
    loaded = steered_generate(lm, fmt, HARMLESS[:2], [add(saved.dirs, saved.layer, 4.0)], max_new_tokens=6)
    baseline = steered_generate(lm, fmt, HARMLESS[:2], [], max_new_tokens=6)
    assert loaded == original
    assert original != baseline  # the steering does something, so equality means something


def test_direction_for_another_model_is_refused(llama_dirs, tiny_models, tmp_path):
    lm, _, dirs = llama_dirs
    data = directions_bytes(dirs, model=lm, choice=1)
    other = tiny_models["neox"]
    with pytest.raises(DirectionFileError, match="another model|d_model|fingerprint") as err:
        load_directions(data, model=other, name="mine.safetensors")
    assert "mine.safetensors" in str(err.value)
    # same size, other weights: the fingerprint decides
    same_size = {"name": "twin", "fingerprint": "0" * 64, "n_layers": lm.n_layers, "d_model": lm.d_model}
    with pytest.raises(DirectionFileError, match="fingerprint"):
        load_directions(data, model=same_size, name="mine.safetensors")
    assert load_directions(data, model=lm).layer == 1


def test_not_a_directions_file(tmp_path):
    from safetensors.numpy import save

    path = tmp_path / "plain.safetensors"
    path.write_bytes(save({"x": np.zeros(3, dtype=np.float32)}))
    with pytest.raises(DirectionFileError, match="plain.safetensors.*not a directions file"):
        load_directions(path)
    with pytest.raises(DirectionFileError, match="not found"):
        load_directions(tmp_path / "missing.safetensors")


def test_control_vector_gguf_reads_back(llama_dirs, tmp_path):
    import gguf

    lm, _, dirs = llama_dirs
    path = write_control_vector(tmp_path / "refusal.gguf", dirs, [1, 2], model=lm, coefficient=0.5)
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = reader.get_field("controlvector.layer_count")
    assert int(count.parts[count.data[0]][0]) == 2
    hint = reader.get_field("controlvector.model_hint")
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2"]
    cv = read_control_vector(path, d_model=lm.d_model)
    for layer in (1, 2):
        expected = dirs.direction(layer) * 0.5 * dirs.mean_norm[layer]
        assert np.allclose(cv.directions[layer], expected, rtol=1e-6, atol=1e-7)
    assert cv.meta["model"]["fingerprint"] == lm.fingerprint and cv.meta["layers"] == [1, 2]
    with pytest.raises(DirectionFileError, match="d_model"):
        read_control_vector(path, d_model=lm.d_model + 1)


def test_control_vector_matches_runtime_add(llama_dirs):
    """The exported vector is what core.steering.add adds at that block (same convention)."""
    lm, _, dirs = llama_dirs
    iv = add(dirs, 2, 0.5)
    vec = layer_vectors(dirs, 2, 0.5)[2]
    assert iv.layer == 2
    assert np.allclose(iv.unit * iv.magnitude, vec, rtol=1e-6, atol=1e-7)


def test_control_vector_layer_zero_refused(llama_dirs, tmp_path):
    lm, _, dirs = llama_dirs
    with pytest.raises(DirectionFileError, match="layer 0"):
        write_control_vector(tmp_path / "x.gguf", dirs, 0, model=lm)
    all_layers = write_control_vector(tmp_path / "all.gguf", dirs, "all", model=lm)
    assert sorted(read_control_vector(all_layers).directions) == list(range(1, dirs.n_layers))
    sv = steering_vectors_form(dirs, [0, 1])
    assert sorted(sv) == [0, 1] and tuple(sv[0].shape) == (lm.d_model,)


def test_foreign_gguf_is_not_a_control_vector(tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ExplorerError, match="model.gguf.*not a control vector"):
        read_control_vector(path)


def test_abliterated_export_has_a_model_card(llama_dirs, tmp_path):
    from core.steering import export_abliterated

    lm, _, dirs = llama_dirs
    v = dirs.direction(1)
    measured = {"harmful refusal after ablation": "12 % [5–25] (n=40)"}
    folder = export_abliterated(lm, v, tmp_path / "abl", layer=1, measured=measured, provenance={"method": dirs.method})
    card = (folder / "README.md").read_text()
    facts = json.loads((folder / "abliteration.json").read_text())
    assert lm.source in card and "12 % [5–25] (n=40)" in card and "layer where it was found | 1" in card
    assert facts["source_model"]["fingerprint"] == lm.fingerprint
    assert facts["direction"]["layer_found"] == 1 and facts["direction"]["d_model"] == lm.d_model
    assert facts["created"][:4].isdigit()
