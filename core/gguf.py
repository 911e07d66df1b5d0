"""GGUF files made into plain Hugging Face folders, once, under ``cache/models/``.

Why: transformers de-quantises a GGUF file on every load (~15 s for the embedded model), so the
result is saved as a normal folder named by the file's digest and the converter version; later
loads read that folder. The folder's tokenizer is declared as the generic fast class
(``TokenizersBackend``, built straight from ``tokenizer.json``): a model-specific class such as
``GemmaTokenizer`` rebuilds its 262k-token vocabulary in Python on every load (10–18 s for
Gemma-3-270M, measured in docs/decisions.md), for the same tokens.

Why ``tokenizer.json`` is rewritten compact (:func:`compact_tokenizer_file`): parsing that file is
most of a warm load, and the tokenizers library reads BPE merges written as ``"a b"`` strings
without indentation faster than the ``["a", "b"]`` pairs it saves by default (Gemma-3-270M's
515k merges: 1.5 → 1.2 CPU-s on the shared machine, docs/decisions.md). The rewrite is kept only
when the library builds exactly the same tokenizer from it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.atomic import atomic_write_text, temp_sibling
from core.cache import cache_root
from core.errors import ModelLoadError
from core.fingerprints import WEIGHT_SUFFIXES, file_sha256
from core.loader import FAST_TOKENIZER_CLASS, short_message
from core.progress import Progress

# bump when the converted folder changes: older folders are converted again, never misread.
# 2: the tokenizer is saved as the fast class with its padding side (was the GGUF's own class)
# 3: tokenizer.json is written compact (merges as "a b" strings, no indentation)
CONVERTER_VERSION = "3"
# versions whose folders differ from this one only in how tokenizer.json is written: such a
# folder is rewritten into the current version in seconds (weights hard-linked, not copied)
# instead of de-quantising the GGUF again. Empty it when a version changes anything else.
REWRITE_ONLY_FROM: tuple[str, ...] = ("2",)


def _convert_gguf(gguf: Path, target: Path, progress: Progress | None) -> None:
    """De-quantise a GGUF file once into a plain Hugging Face folder.

    ``save_pretrained`` refuses a model loaded from GGUF, so the model is rebuilt from its
    config (without ``quantization_config``) and the de-quantised state dict loaded into it.
    """
    from filelock import FileLock
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return
        if progress:
            progress(0.05, f"De-quantising {gguf.name} (once: 15 s for the embedded model, 90 s for Gemma-3-270M)…")
        kwargs = dict(gguf_file=gguf.name)
        with metadata_read_once():
            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
                loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
            except Exception as exc:
                raise ModelLoadError(
                    f"transformers cannot load {gguf.name}: {short_message(exc).rstrip('.')}. GGUF loading supports "
                    "llama, mistral, qwen2, gpt2, phi3, falcon, bloom, t5 … architectures."
                ) from exc
            config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
        if progress:
            progress(0.7, "Saving the converted copy under cache/models/ …")
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        rebuilt.load_state_dict(loaded.state_dict(), strict=False)
        rebuilt.tie_weights()
        tmp = temp_sibling(target)
        shutil.rmtree(tmp, ignore_errors=True)
        rebuilt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        declare_fast_tokenizer(tmp, tokenizer)
        compact_tokenizer_file(tmp / "tokenizer.json")
        (tmp / "source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf), "converter": CONVERTER_VERSION})
        )
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)


@contextlib.contextmanager
def metadata_read_once():
    """Within this block transformers parses each GGUF file's metadata once, not once per call.

    Why: a conversion loads the file's tokenizer, its config (twice) and its weights, and
    transformers parses the whole metadata for each (Gemma-3-270M's 262k tokens and 515k merges,
    read value by value from a memory map): four parses were most of Gemma's conversion
    (docs/decisions.md, "GGUF conversion: the metadata parsed once"). Parsing only reads the
    file, so one ``GGUFReader`` per file serves every call, and a metadata-only result is reused
    (as a copy: callers edit what they get). Nothing is cached beyond the block."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    real_reader, real_load = gguf.GGUFReader, gguf_utils.load_gguf_checkpoint
    readers: dict[tuple, Any] = {}
    parsed: dict[str, Any] = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    def load(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return real_load(path, return_tensors, *args, **kwargs)
        if str(path) not in parsed:
            parsed[str(path)] = real_load(path, False)
        return copy.deepcopy(parsed[str(path)])

    gguf.GGUFReader, gguf_utils.load_gguf_checkpoint = reader, load
    try:
        yield
    finally:
        gguf.GGUFReader, gguf_utils.load_gguf_checkpoint = real_reader, real_load


def declare_fast_tokenizer(folder: Path, tokenizer: Any) -> None:
    """Make a saved tokenizer load as the generic fast class, keeping what its own class set
    by default (the padding and truncation sides: ``GemmaTokenizer`` pads on the left)."""
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = FAST_TOKENIZER_CLASS
    config["padding_side"] = tokenizer.padding_side
    config["truncation_side"] = tokenizer.truncation_side
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def compact_tokenizer_file(path: Path) -> bool:
    """Rewrite a saved ``tokenizer.json`` without indentation and with BPE merges as ``"a b"``
    strings (see the module docstring); True when the file was rewritten.

    Merges stay pairs when any part holds a space (the string form would be ambiguous), and the
    file is left alone unless the library serialises the rewritten and the original tokenizer
    identically (same vocabulary, merge ranks, added tokens, normalizer … so the same ids)."""
    from tokenizers import Tokenizer

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    model = data.get("model") if isinstance(data, dict) else None
    merges = model.get("merges") if isinstance(model, dict) and model.get("type") == "BPE" else None
    if isinstance(merges, list) and all(
        isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) and " " not in p for p in m) for m in merges
    ):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    compact = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    if compact == text or Tokenizer.from_str(compact).to_str() != Tokenizer.from_str(text).to_str():
        return False
    atomic_write_text(path, compact)
    return True


def existing_conversion(stem: str, digest: str, progress: Progress | None = None) -> Path | None:
    """The converted folder of a GGUF file (its name without suffix, its SHA-256) when it exists
    or can be rewritten from a :data:`REWRITE_ONLY_FROM` version's folder, without the GGUF;
    None when the GGUF must be converted."""
    target = converted_folder_name(stem, digest)
    if (target / "config.json").is_file():
        return target
    for version in REWRITE_ONLY_FROM:
        previous = converted_folder_name(stem, digest, version)
        if (previous / "config.json").is_file():
            if progress:
                progress(0.05, f"Rewriting the tokenizer file of {previous.name} (once)…")
            _rewrite_from(previous, target)
            return target
    return None


def _rewrite_from(previous: Path, target: Path) -> None:
    """Make ``target`` from an older version's folder: weight files hard-linked (copied where the
    disk cannot link), the rest copied, then ``tokenizer.json`` compacted. The old folder is left
    as it was: something may still be reading it."""
    from filelock import FileLock

    def link_or_copy(src: str, dst: str) -> None:
        if Path(src).suffix in WEIGHT_SUFFIXES:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copy2(src, dst)

    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return
        tmp = temp_sibling(target)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(previous, tmp, copy_function=link_or_copy)
        compact_tokenizer_file(tmp / "tokenizer.json")
        source_file = tmp / "source.json"
        source = json.loads(source_file.read_text()) if source_file.is_file() else {}
        source.update(converter=CONVERTER_VERSION, rewritten_from=previous.name)
        atomic_write_text(source_file, json.dumps(source))
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)


def converted_gguf_folder(gguf: Path, progress: Progress | None = None) -> Path:
    """The cached, de-quantised copy of ``gguf`` (converted on first use)."""
    digest = file_sha256(gguf)
    ready = existing_conversion(gguf.stem, digest, progress)
    if ready is not None:
        return ready
    target = converted_folder_name(gguf.stem, digest)
    _convert_gguf(gguf, target, progress)
    return target


def converted_folder_name(stem: str, digest: str, version: str = CONVERTER_VERSION) -> Path:
    """Where the conversion of a GGUF file (its name without suffix, its SHA-256) is cached."""
    return cache_root() / "models" / f"{stem}-{digest[:16]}-v{version}"
