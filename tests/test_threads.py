"""The thread policy: explicit requests win; otherwise the measured-fastest count is used and
re-checked, so a passing burst of load cannot pin a long job to one thread."""

from __future__ import annotations

import pytest
import torch

from core import threads
from core.threads import AdaptiveThreads, requested_threads


def test_explicit_requests_win(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert requested_threads(None) is None and requested_threads("auto") is None
    assert requested_threads(3) == 3
    monkeypatch.setenv(threads.ENV, "2")
    assert requested_threads(None) == 2 and requested_threads(1) == 1
    assert AdaptiveThreads.from_request(None).fixed == 2
    monkeypatch.setenv(threads.ENV, "lots")
    with pytest.raises(ValueError, match="REFUSAL_THREADS"):
        requested_threads(None)
    with pytest.raises(ValueError, match="at least 1"):
        requested_threads(0)


def _drive(policy: AdaptiveThreads, cost, n_steps: int) -> list[int]:
    """Feed the policy synthetic step times: ``cost(step, threads)`` seconds per unit."""
    used = []
    for i in range(n_steps):
        n = policy.choose()
        used.append(n)
        policy.record(n, cost(i, n), units=1.0)
    return used


def test_follows_the_faster_count_and_rechecks_when_load_changes():
    policy = AdaptiveThreads(candidates=(2, 1), reprobe_every=5)
    # a busy spell first (2 threads spin-wait: 6x slower), then a quiet machine (2 threads 1.8x faster)
    cost = lambda i, n: (6.0 if n == 2 else 1.0) if i < 20 else (0.55 if n == 2 else 1.0)  # noqa: E731
    used = _drive(policy, cost, 60)
    assert used[:2] == [2, 1]  # each candidate timed once
    assert used[2:20].count(1) > used[2:20].count(2)  # busy: mostly one thread
    assert used[40:].count(2) > used[40:].count(1)  # quiet again: back to two threads
    assert policy.summary()["steps_per_thread_count"] == {"1": used.count(1), "2": used.count(2)}


def test_step_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    policy = AdaptiveThreads(fixed=1)
    with policy.step(units=4) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before and policy.steps == {1: 1}
    with threads.using(policy):
        with threads.step(2):
            assert torch.get_num_threads() == 1
    assert policy.steps == {1: 2}
    with threads.step(2):  # no active policy: nothing changes
        assert torch.get_num_threads() == before
