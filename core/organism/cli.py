"""``python -m core.organism`` and the ``refusal-organism`` command: build (once) and describe
the refusal-tuned embedded model, or regenerate the shipped base answers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from core.errors import ExplorerError
from core.organism.answers import write_answers
from core.organism.build import ensure_organism, load_embedded_base, stderr_progress


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    prog = "python -m core.organism" if sys.argv[0].endswith("__main__.py") else None
    parser = argparse.ArgumentParser(prog=prog, description="Build (once) and describe the refusal-tuned embedded model organism.")
    parser.add_argument("--json", action="store_true", help="print the whole card as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the build (default: REFUSAL_THREADS, else measured step by step)")
    parser.add_argument("--write-answers", action="store_true",
                        help="regenerate core/data/organism_answers.json (the base model's answers) and stop")
    args = parser.parse_args(argv)
    if args.write_answers:
        base = load_embedded_base()
        print(f"wrote {write_answers(base, progress=None if args.quiet else stderr_progress)}", file=sys.stderr)
        return 0
    try:
        card = ensure_organism(progress=None if args.quiet else stderr_progress, threads=args.threads)
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) if args.json else card.summary())
    print(f"folder: {card.folder}", file=sys.stderr)
    return 0


