"""Fingerprints: what identifies a model's weights, so two models never share a cache entry.

A folder's fingerprint hashes its config (minus volatile fields) and the SHA-256 of each weight
file. Why the memo (``cache/models/file-hashes.json``, keyed by path, size and modification
time): hashing the embedded model's 0.5 GB or Gemma's 1 GB on every load would cost seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.atomic import atomic_write_text
from core.cache import cache_root, stable_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

_HASH_MEMO_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) so large weights are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    memo_key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache_root() / "models" / "file-hashes.json"
    with _HASH_MEMO_LOCK:
        memo: dict[str, str] = {}
        with contextlib.suppress(Exception):
            memo = json.loads(memo_file.read_text())
        if memo_key in memo:
            return memo[memo_key]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        memo[memo_key] = digest.hexdigest()
        with contextlib.suppress(Exception):
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_file, json.dumps(memo))
        return memo[memo_key]


def _config_identity(config: Any) -> dict[str, Any]:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
        data.pop(volatile, None)
    return data


def fingerprint_folder(folder: Path, config: Any) -> str:
    """The fingerprint of a saved model: its config and its weight files' digests."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return stable_hash(_config_identity(config), [(p.name, file_sha256(p)) for p in files])


def fingerprint_state(model: nn.Module) -> str:
    """Fallback fingerprint from the weights in memory (used when no files are known)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
    return stable_hash(_config_identity(model.config), digest.hexdigest())
