"""Shared fixtures: tiny real-architecture models on disk, an isolated cache, the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import core  # noqa: F401  (before any test imports torch: core sets how torch's threads wait)

REPO = Path(__file__).resolve().parent.parent

ARCHS = ("gpt2", "neox", "llama")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests never write to the repo's cache/ (except the embedded model's converted copy)."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("REFUSAL_CACHE_DIR")
    os.environ["REFUSAL_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("REFUSAL_CACHE_DIR", None)
    else:
        os.environ["REFUSAL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from tiny_models import build

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build(arch, root / arch) for arch in (*ARCHS, "gptj")}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    from core.models import load_model

    return {arch: load_model(str(path), dtype="float32", device="cpu") for arch, path in tiny_dirs.items()}


@pytest.fixture(params=ARCHS)
def tiny(request, tiny_models):
    """Each tiny architecture in turn (GPT-2, GPT-NeoX, Llama)."""
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct (converted copy kept in the repo's cache/)."""
    from core.models import load_model

    old = os.environ.get("REFUSAL_CACHE_DIR")
    os.environ["REFUSAL_CACHE_DIR"] = str(REPO / "cache")
    try:
        return load_model("embedded", dtype="float32", device="cpu")
    finally:
        os.environ["REFUSAL_CACHE_DIR"] = old or ""


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer, read from the GGUF file (fast; no model weights)."""
    from transformers import AutoTokenizer

    from core.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
