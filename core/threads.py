"""CPU thread policy for long jobs: chosen from measured throughput and re-measured as the job runs.

Why: PyTorch's OpenMP threads spin-wait for each other. When other processes keep the cores
busy, one descheduled thread stalls the rest, and two threads can run many times slower than
one (seen on a shared 2-core machine: 16x slower decoding). The old rule read the 1-minute load
average once at the start of a job; a busy moment then pinned a 5-minute job to one thread for
its whole length, and the reading also counted the job's own threads. Here each candidate
thread count is *timed on the job's real steps*, the fastest per unit of work is kept, and the
others are re-tried every ``reprobe_every`` steps, so the choice follows the machine's load.

An explicit count always wins: ``--threads N`` on the command lines, or the environment
variable ``REFUSAL_THREADS`` (a number, or ``auto`` for this policy).

Use it around the steps of a loop::

    policy = AdaptiveThreads()
    for batch in batches:
        with policy.step(units=n_tokens):
            ...
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

import torch

ENV = "REFUSAL_THREADS"

# A step's work: a number known when it starts, or a callable read when it ends (a decoding
# loop only knows afterwards how many row-steps it computed).
Units = Union[float, Callable[[], float]]


def requested_threads(explicit: int | str | None = None, name: str = "threads") -> int | None:
    """The thread count a user asked for: ``explicit`` (a command-line flag called ``name`` in
    error messages) first, then the ``REFUSAL_THREADS`` environment variable; None (or ``auto``)
    means: measure (this module)."""
    for value, where in ((explicit, name), (os.environ.get(ENV), ENV)):
        if value is None or str(value).strip().lower() in ("", "auto"):
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number or auto, got {value!r}") from None
        if n < 1:
            raise ValueError(f"{where}: must be at least 1, got {n}")
        return n
    return None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` intra-op threads (None: leave as is)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class AdaptiveThreads:
    """Pick the thread count with the best measured seconds per unit of work, step by step.

    ``candidates``: thread counts to try (default: all cores, and 1). ``fixed``: always use
    this count (an explicit request; nothing is measured). A candidate's speed is its recent
    seconds over its recent units, each step's share decaying by ``smoothing`` per later step:
    one slow step (a neighbour's burst) is not decisive, a change of load is followed within a
    few steps, and a small step (the short last batch of a list, whose fixed per-step costs
    make each unit dear) moves the figure only as much as its work weighs.
    """

    candidates: tuple[int, ...] = ()
    fixed: int | None = None
    reprobe_every: int = 24
    smoothing: float = 0.5
    seconds_per_unit: dict[int, float] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    _work: dict[int, tuple[float, float]] = field(default_factory=dict)  # decayed (seconds, units)
    _queue: list[int] = field(default_factory=list)
    _since_probe: int = 0

    def __post_init__(self) -> None:
        if not self.candidates:
            cores = max(1, torch.get_num_threads())
            self.candidates = (cores, 1) if cores > 1 else (1,)
        self._queue = list(self.candidates)

    @classmethod
    def from_request(cls, explicit: int | str | None = None) -> "AdaptiveThreads":
        """The policy for an explicit request (``--threads``/``REFUSAL_THREADS``), else measured."""
        n = requested_threads(explicit)
        return cls(fixed=n) if n else cls()

    def choose(self) -> int:
        """The thread count for the next step."""
        if self.fixed:
            return self.fixed
        if self._queue:
            return self._queue[0]
        return min(self.candidates, key=lambda n: self.seconds_per_unit.get(n, float("inf")))

    def record(self, threads: int, seconds: float, units: float = 1.0) -> None:
        """Account one step of ``units`` work that took ``seconds`` on ``threads`` threads."""
        probe = bool(self._queue) and self._queue[0] == threads
        # a probe's figure replaces the count's old one: that is from before the last
        # ``reprobe_every`` steps, and one slow step then (a cold start) must not outvote it
        old_seconds, old_units = (0.0, 0.0) if probe else self._work.get(threads, (0.0, 0.0))
        work = (self.smoothing * old_seconds + seconds, self.smoothing * old_units + max(units, 1e-9))
        self._work[threads] = work
        self.seconds_per_unit[threads] = work[0] / work[1]
        self.steps[threads] = self.steps.get(threads, 0) + 1
        if probe:
            self._queue.pop(0)
            return
        self._since_probe += 1
        if self._since_probe >= self.reprobe_every and len(self.candidates) > 1:
            best = self.choose()
            self._queue = [n for n in self.candidates if n != best]
            self._since_probe = 0

    @contextlib.contextmanager
    def step(self, units: Units = 1.0) -> Iterator[int]:
        """Run one step on the chosen thread count and time it (yields the count). ``units`` may
        be a callable, read when the step ends: the work a step really did, which is what makes
        two steps on different thread counts comparable."""
        n = self.choose()
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield n
        finally:
            seconds = time.perf_counter() - start
            self.record(n, seconds, float(units() if callable(units) else units))
            torch.set_num_threads(old)

    def summary(self) -> dict[str, object]:
        """Steps run per thread count and the last measured speeds (for cards and logs)."""
        return {
            "policy": f"fixed {self.fixed}" if self.fixed else "measured",
            "steps_per_thread_count": {str(k): v for k, v in sorted(self.steps.items())},
            "seconds_per_unit": {str(k): round(v, 6) for k, v in sorted(self.seconds_per_unit.items())},
        }


_ACTIVE: AdaptiveThreads | None = None


@contextlib.contextmanager
def using(policy: AdaptiveThreads | None) -> Iterator[AdaptiveThreads | None]:
    """Make ``policy`` the one that :func:`step` consults in this process (the batch runner
    sets it for a whole run; loops deep in ``core`` then follow it without a parameter)."""
    global _ACTIVE
    old, _ACTIVE = _ACTIVE, policy
    try:
        yield policy
    finally:
        _ACTIVE = old


def step(units: Units = 1.0) -> contextlib.AbstractContextManager:
    """One step of work under the active policy (:func:`using`), or a no-op when none is set."""
    return _ACTIVE.step(units) if _ACTIVE is not None else contextlib.nullcontext()
