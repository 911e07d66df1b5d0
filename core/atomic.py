"""Write-then-rename: a reader (another process, the app, a crashed run's next start) sees the
old file or the new one, never half of one.

Why a helper: the cache memo, the organism's cached answers, the shipped answers file and the
reports are all rewritten while something may be reading them; the temporary name carries the
process id so two processes writing the same target do not share a temporary file.
"""

from __future__ import annotations

import os
from pathlib import Path


def temp_sibling(path: str | Path) -> Path:
    """A temporary name next to ``path`` (same folder, so the final rename stays on one disk)."""
    p = Path(path)
    return p.with_name(f"{p.name}.tmp{os.getpid()}")


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and one rename."""
    target = Path(path)
    tmp = temp_sibling(target)
    try:
        tmp.write_text(text, encoding=encoding)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
