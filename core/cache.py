"""Array cache on disk (diskcache under ``cache/activations``), keyed by strings.

Why this shape: values are stored as raw ``.npy`` bytes written with ``allow_pickle=False``
and keys are strings, so nothing read back from disk is ever unpickled (a cache folder from
elsewhere cannot execute code). The cache is size-bounded (least-recently-stored entries are
evicted), a corrupted entry is deleted and reported as a miss, and a folder that cannot be
written falls back to an in-memory cache with a warning instead of failing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SIZE_LIMIT = 2 * 1024**3  # 2 GB

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Where the runtime cache lives: ``$REFUSAL_CACHE_DIR`` or ``<repo>/cache``."""
    return Path(os.environ.get("REFUSAL_CACHE_DIR") or REPO_ROOT / "cache")


def stable_hash(*parts: Any, length: int = 32) -> str:
    """A short hex digest of JSON-serialisable parts; the same parts always give the same key."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def array_to_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def bytes_to_array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


class UnsafeCacheEntry(Exception):
    """A cache row that would need unpickling or points outside the cache folder."""


def _safe_disk_class():
    """A diskcache ``Disk`` that never unpickles and never touches files outside its folder.

    Why: diskcache unpickles values (and keys) whose row says "pickle"; a cache folder copied
    from elsewhere could carry such a row and run code on ``get``. We only ever store bytes
    under string keys, so anything else is refused (and the row deleted as corrupt). File
    names are checked to stay inside the folder, so a crafted row cannot read or delete other
    files either.
    """
    import diskcache
    from diskcache.core import MODE_PICKLE

    class SafeDisk(diskcache.Disk):
        def _inside(self, filename: str | None) -> None:
            if filename is None:
                return
            root = os.path.realpath(self._directory)
            full = os.path.realpath(os.path.join(root, filename))
            if os.path.commonpath([root, full]) != root or full == root:
                raise UnsafeCacheEntry(f"cache entry points outside the cache folder: {filename!r}")

        def get(self, key, raw):
            if not raw:
                raise UnsafeCacheEntry("refusing to unpickle a cache key")
            return super().get(key, raw)

        def fetch(self, mode, filename, value, read):
            if mode == MODE_PICKLE:
                raise UnsafeCacheEntry("refusing to unpickle a cache value")
            self._inside(filename)
            return super().fetch(mode, filename, value, read)

        def remove(self, file_path):
            try:
                self._inside(file_path)
            except UnsafeCacheEntry:
                return
            return super().remove(file_path)

    return SafeDisk


class ArrayCache:
    """A string-keyed cache of numpy arrays; see the module docstring for the guarantees."""

    def __init__(self, directory: str | Path | None = None, size_limit: int = DEFAULT_SIZE_LIMIT):
        self.directory = Path(directory) if directory is not None else cache_root() / "activations"
        self.size_limit = int(size_limit)
        self.hits = 0
        self.misses = 0
        self.warning: str | None = None
        self._memory: dict[str, bytes] | None = None
        self._disk = None
        self._guard = threading.Lock()
        try:
            import diskcache

            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
            self._disk = diskcache.Cache(
                str(self.directory),
                size_limit=self.size_limit,
                eviction_policy="least-recently-stored",
                disk=_safe_disk_class(),
            )
        except Exception as exc:  # read-only folder, full disk, broken sqlite file ...
            self.warning = (
                f"Activation cache folder {self.directory} is not usable ({exc}); "
                "using an in-memory cache for this session instead."
            )
            warnings.warn(self.warning, RuntimeWarning, stacklevel=2)
            self._memory = {}

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def get(self, key: str) -> np.ndarray | None:
        blob = self._memory.get(key) if self._memory is not None else self._disk_get(key)
        if blob is None:
            self.misses += 1
            return None
        try:
            array = bytes_to_array(blob)
        except Exception:  # truncated or foreign bytes: drop the entry, recompute
            self.delete(key)
            self.misses += 1
            return None
        self.hits += 1
        return array

    def _disk_get(self, key: str) -> bytes | None:
        try:
            value = self._disk.get(key, default=None)
        except Exception:
            self.delete(key)
            return None
        return value if isinstance(value, bytes) else None

    def set(self, key: str, array: np.ndarray) -> None:
        blob = array_to_bytes(array)
        if self._memory is not None:
            with self._guard:
                self._memory[key] = blob
            return
        try:
            self._disk.set(key, blob)
        except Exception as exc:
            self.warning = f"Could not write to the activation cache ({exc}); results are not cached."
            warnings.warn(self.warning, RuntimeWarning, stacklevel=2)

    def delete(self, key: str) -> None:
        if self._memory is not None:
            self._memory.pop(key, None)
            return
        try:
            self._disk.delete(key)
        except Exception:
            pass

    def clear(self) -> None:
        if self._memory is not None:
            self._memory.clear()
        else:
            self._disk.clear()

    def __len__(self) -> int:
        return len(self._memory) if self._memory is not None else len(self._disk)

    def volume(self) -> int:
        """Bytes used (approximate for the in-memory fallback)."""
        if self._memory is not None:
            return sum(len(v) for v in self._memory.values())
        return int(self._disk.volume())


_DEFAULT: dict[str, ArrayCache] = {}
_DEFAULT_GUARD = threading.Lock()


def default_cache() -> ArrayCache:
    """One shared :class:`ArrayCache` per cache folder (per process)."""
    directory = str(cache_root() / "activations")
    with _DEFAULT_GUARD:
        if directory not in _DEFAULT:
            _DEFAULT[directory] = ArrayCache(directory)
        return _DEFAULT[directory]
