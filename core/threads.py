"""CPU thread policy for long jobs: chosen from measured throughput and re-measured as the job runs.

Why: PyTorch's OpenMP threads spin-wait for each other. When other processes keep the cores
busy, one descheduled thread stalls the rest, and two threads can run many times slower than
one (seen on a shared 2-core machine: 16x slower decoding). The old rule read the 1-minute load
average once at the start of a job; a busy moment then pinned a 5-minute job to one thread for
its whole length, and the reading also counted the job's own threads. Here each candidate
thread count is *timed on the job's real steps*, and every ``reprobe_every`` steps the other
counts are tried again, so the choice follows the machine's load.

A probe is judged against the step just before it, on the current count, and only if that step
was of the same kind: steps of one decode loop or one training run cost about the same per unit,
while steps of different jobs do not (a decode step of 2 rows costs far more per row than one of
64; a prefill is not a decode step). Comparing averages over unlike steps once chose one thread
on a quiet machine for minutes (``docs/decisions.md``, "Threads").

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
from typing import Iterator

import torch

ENV = "REFUSAL_THREADS"


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
    """Pick the thread count step by step: the current count runs, and every ``reprobe_every``
    steps each other candidate runs one step and takes over if it did its work at least
    ``margin`` times the current count's seconds per unit on the step just before it (of the
    same ``kind``; see the module doc).

    ``candidates``: thread counts to try (default: all cores, and 1). ``fixed``: always use
    this count (an explicit request; nothing is measured).
    """

    candidates: tuple[int, ...] = ()
    fixed: int | None = None
    reprobe_every: int = 24
    margin: float = 0.9
    current: int | None = None
    seconds_per_unit: dict[int, float] = field(default_factory=dict)  # each count's latest step
    steps: dict[int, int] = field(default_factory=dict)
    _kinds: dict[int, str] = field(default_factory=dict)  # the kind of each count's latest step
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
        return self.current if self.current is not None else self.candidates[0]

    def record(self, threads: int, seconds: float, units: float = 1.0, kind: str = "step") -> None:
        """Account one step of ``units`` work of ``kind`` that took ``seconds`` on ``threads``."""
        rate = seconds / max(units, 1e-9)
        self.steps[threads] = self.steps.get(threads, 0) + 1
        if self._queue and self._queue[0] == threads:  # a probe
            self._queue.pop(0)
            if self.current is None:
                self.current = threads
            elif threads != self.current and self._kinds.get(self.current) == kind:
                if rate < self.margin * self.seconds_per_unit[self.current]:
                    self.current = threads
            elif threads != self.current:  # nothing alike to compare with: probe again soon
                self._since_probe = self.reprobe_every - 1
        else:
            self._since_probe += 1
        self.seconds_per_unit[threads], self._kinds[threads] = rate, kind
        if not self._queue and self._since_probe >= self.reprobe_every and len(self.candidates) > 1:
            self._queue = [n for n in self.candidates if n != self.current]
            self._since_probe = 0

    @contextlib.contextmanager
    def step(self, units: float = 1.0, kind: str = "step") -> Iterator[int]:
        """Run one step on the chosen thread count and time it (yields the count); ``kind``
        names the kind of step (see the module doc)."""
        n = self.choose()
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield n
        finally:
            self.record(n, time.perf_counter() - start, units, kind)
            torch.set_num_threads(old)

    def summary(self) -> dict[str, object]:
        """Steps run per thread count and the latest measured speeds (for cards and logs)."""
        return {
            "policy": f"fixed {self.fixed}" if self.fixed else "measured",
            "current": self.fixed or self.current,
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


def step(units: float = 1.0, kind: str = "step") -> contextlib.AbstractContextManager:
    """One step of work under the active policy (:func:`using`), or a no-op when none is set."""
    return _ACTIVE.step(units, kind) if _ACTIVE is not None else contextlib.nullcontext()
