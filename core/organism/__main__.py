"""``python -m core.organism``: see :mod:`core.organism.cli`."""

from core.organism.cli import main

raise SystemExit(main())
