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


def test_a_quiet_machine_stays_on_two_threads_over_steps_of_unlike_cost():
    """Decode steps cost more per row as rows leave (a step has fixed costs the units do not
    fully count), and prefills are another kind of step. Probes compare like with like, so on
    a quiet machine (two threads 1.7x faster on every step) one thread runs only its probes."""
    policy = AdaptiveThreads(candidates=(2, 1))
    used, current = [], []
    for _ in range(30):  # generation batches
        for kind, rows in [("prefill", 64)] + [("decode", r) for r in range(64, 0, -3)]:
            n = policy.choose()
            used.append(n)
            seconds = (0.15 + 0.007 * rows) * (1.0 if n == 2 else 1.7) * (20 if kind == "prefill" else 1)
            policy.record(n, seconds, units=rows * 15 if kind == "prefill" else rows + 8, kind=kind)
            current.append(policy.current)
    assert set(current) == {2}  # one thread was tried, never chosen
    assert 0 < used.count(1) < 0.1 * len(used)


def test_generation_times_each_forward_step_by_kind(tiny_models):
    """Generation reports its prefill (units: tokens) and then each decode step (units: the rows
    still decoding plus the step's fixed cost), so a policy compares neighbouring steps."""
    from core.formatting import Formatter
    from core.generation import DECODE_STEP_ROWS, generate, generate_stream

    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer, "none")
    prompts = ["hello there", "how are you", "tell me a story"]
    expected, active = [], len(prompts)
    for step in generate_stream(lm, fmt, prompts, max_new_tokens=6):
        if step.step:
            expected.append((active + DECODE_STEP_ROWS, "decode"))
        active = step.done.count(False)
    policy = AdaptiveThreads(fixed=1)
    seen = []
    record = policy.record
    policy.record = lambda n, seconds, units=1.0, kind="step": (seen.append((units, kind)), record(n, seconds, units, kind))[1]
    with threads.using(policy):
        generate(lm, fmt, prompts, max_new_tokens=6, batch_size=3)
    assert seen[0][1] == "prefill" and seen[0][0] >= len(prompts) * 2
    assert seen[1:] == expected and len(expected) >= 1
