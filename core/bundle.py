"""The reproducible bundle: one ``.zip`` holding everything a run needs to be checked and rerun
— the config (rerunnable with ``python -m core.batch``), the directions file and control vector,
``results.json``, the Markdown and HTML reports (with their charts), the package versions, and a
``MANIFEST.json`` listing every file with its size and SHA-256. The batch runner writes
``bundle.zip`` into its output folder; the Report page's "Everything (.zip)" is the same format.

Opening a bundle (:func:`open_bundle`) is guarded, because a zip is outside data: it is
extracted into a fresh temporary folder; entries with absolute names, ``..`` parts, backslashes
or drive letters, links, duplicates, too many entries or too many bytes (also when the zip's
declared sizes lie) are refused with a :class:`~core.errors.BundleError`; nothing is unpickled
(results are JSON, directions safetensors). :func:`read_results` is the guarded reader of a
``results.json`` on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from core.errors import BundleError

FORMAT = "refusal-explorer-bundle"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
VERSIONS = "versions.json"
MAX_ZIP_BYTES = 512 * 1024 * 1024
MAX_ENTRIES = 2000
MAX_ENTRY_BYTES = 512 * 1024 * 1024
MAX_TOTAL_BYTES = 1024 * 1024 * 1024
MAX_RESULTS_BYTES = 64 * 1024 * 1024
# what a bundle folder holds (the batch runner's output folder); anything else there is left out
BUNDLED_SUFFIXES = (".json", ".md", ".html", ".svg", ".yaml", ".yml", ".safetensors", ".gguf", ".jsonl", ".txt", ".csv")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            out[name] = dist.version
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def bundle_bytes(files: Mapping[str, bytes | str]) -> bytes:
    """A bundle (zip bytes) of ``{archive name: content}``, plus ``versions.json`` (every
    installed package) and ``MANIFEST.json``."""
    entries = {name: (data.encode("utf-8") if isinstance(data, str) else bytes(data)) for name, data in files.items()}
    for name in entries:
        _check_name(name, "the bundle being written")
    entries.setdefault(VERSIONS, (json.dumps(_versions(), indent=1) + "\n").encode())
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "files": {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in sorted(entries.items())}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in sorted(entries.items()):
            zf.writestr(name, data)
        zf.writestr(MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return buf.getvalue()


def folder_files(folder: str | Path) -> dict[str, bytes]:
    """The bundle-worthy files under ``folder`` (reports, charts, results, direction files)."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix.lower() in BUNDLED_SUFFIXES and p.name != "bundle.zip"}


def write_bundle(out_dir: str | Path, config_yaml: str, name: str = "bundle.zip") -> Path:
    """Zip the output folder's files and the config into ``out_dir/bundle.zip``."""
    out = Path(out_dir)
    files: dict[str, bytes | str] = dict(folder_files(out))
    files["config.yaml"] = config_yaml
    path = out / name
    path.write_bytes(bundle_bytes(files))
    return path


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def _bounded_bytes(source: str | Path | bytes, name: str | None, default: str, what: str, limit: int) -> tuple[bytes, str]:
    """The bytes of an uploaded or named file of at most ``limit``, and its label for messages."""
    if isinstance(source, (bytes, bytearray)):
        data, label = bytes(source), name or default
    else:
        path = Path(source)
        label = name or str(path)
        if not path.is_file():
            raise BundleError(f"{what} not found: {path}")
        if path.stat().st_size > limit:
            raise BundleError(f"{label}: over the {limit // 2**20} MB limit for a {what}")
        data = path.read_bytes()
    if len(data) > limit:
        raise BundleError(f"{label}: over the {limit // 2**20} MB limit for a {what}")
    return data, label


def read_results(source: str | Path | bytes, name: str | None = None) -> dict[str, Any]:
    """A ``results.json`` as a dict, or a :class:`BundleError` naming the file."""
    data, label = _bounded_bytes(source, name, "results.json", "results file", MAX_RESULTS_BYTES)
    try:
        results = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BundleError(f"{label}: not UTF-8 text, so not a results.json") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise BundleError(f"{label}: not valid JSON{where}") from None
    if not isinstance(results, dict) or not isinstance(results.get("models"), list):
        raise BundleError(f"{label}: not a results file of this tool (a JSON object with a 'models' list expected)")
    if not all(isinstance(m, dict) for m in results["models"]):
        raise BundleError(f"{label}: every element of 'models' must be an object")
    return results


def _check_name(name: str, where: str) -> PurePosixPath:
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{where}: refused entry {name!r} (absolute or non-portable name)")
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".") for p in parts) or not parts:
        raise BundleError(f"{where}: refused entry {name!r} (it would write outside the bundle's folder)")
    return PurePosixPath(*parts)


@dataclass
class Bundle:
    """An opened bundle: its extracted files live in ``folder`` (delete with :meth:`close`)."""

    folder: Path
    manifest: dict[str, Any]
    results: dict[str, Any] | None
    names: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path | None:
        p = self.folder / "config.yaml"
        return p if p.is_file() else None

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _extract(zf: zipfile.ZipFile, label: str, dest: Path) -> list[str]:
    infos = zf.infolist()
    if len(infos) > MAX_ENTRIES:
        raise BundleError(f"{label}: {len(infos)} entries, over the limit of {MAX_ENTRIES}")
    seen: set[str] = set()
    total = 0
    names = []
    for info in infos:
        if info.is_dir():
            continue
        rel = _check_name(info.filename, label)
        key = rel.as_posix().casefold()
        if key in seen:
            raise BundleError(f"{label}: entry {info.filename!r} appears twice")
        seen.add(key)
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits (writestr) = a plain file
            raise BundleError(f"{label}: entry {info.filename!r} is a link or special file; refused")
        if info.file_size > MAX_ENTRY_BYTES:
            raise BundleError(f"{label}: entry {info.filename!r} is {info.file_size} bytes, over the per-file limit")
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):  # count real bytes: the declared size may lie
                written += len(chunk)
                total += len(chunk)
                if written > MAX_ENTRY_BYTES or total > MAX_TOTAL_BYTES:
                    raise BundleError(f"{label}: entry {info.filename!r} unpacks to more than the size limit")
                out.write(chunk)
        names.append(rel.as_posix())
    return names


def open_bundle(source: str | Path | bytes, name: str | None = None) -> Bundle:
    """Extract a bundle into a new temporary folder and read its manifest and results."""
    data, label = _bounded_bytes(source, name, "bundle.zip", "bundle", MAX_ZIP_BYTES)
    dest = Path(tempfile.mkdtemp(prefix="refusal-bundle-"))
    try:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = _extract(zf, label, dest)
        except BundleError:
            raise
        except Exception as exc:  # zipfile's own errors on hostile input are many (BadZipFile, IndexError, ...)
            raise BundleError(f"{label}: not a readable zip file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
        manifest: dict[str, Any] = {}
        if MANIFEST in names:
            manifest = _read_json(dest / MANIFEST, f"{label}: {MANIFEST}")
            if manifest.get("format") != FORMAT:
                raise BundleError(f"{label}: {MANIFEST} does not describe a bundle of this tool")
            files = manifest.get("files")
            if isinstance(files, dict):
                for fname, info in files.items():
                    if fname in names and isinstance(info, dict) and isinstance(info.get("sha256"), str):
                        digest = hashlib.sha256((dest / fname).read_bytes()).hexdigest()
                        if digest != info["sha256"]:
                            raise BundleError(f"{label}: {fname} does not match its checksum in {MANIFEST}; the bundle was altered")
        results = read_results(dest / "results.json", f"{label}: results.json") if "results.json" in names else None
        return Bundle(dest, manifest, results, names)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BundleError(f"{label}: not valid JSON") from None
    if not isinstance(value, dict):
        raise BundleError(f"{label}: expected a JSON object")
    return value
