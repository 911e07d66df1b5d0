"""Benchmarks (``make bench``). ``core`` is imported first, as the app and the batch runner do,
so that its setting of how torch's threads wait holds here too (it counts only before torch loads)."""

import core  # noqa: F401
