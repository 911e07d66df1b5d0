"""The thread policy: explicit requests win; otherwise the measured-fastest count is used and
re-checked, so a passing burst of load cannot pin a long job to one thread."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_a_small_step_weighs_only_as_much_as_its_work():
    """The short last batch of a list costs more per unit (fixed per-step costs); it must not
    make the faster count look slower than one that ran full batches."""
    policy = AdaptiveThreads(candidates=(2, 1), reprobe_every=50)
    policy.record(2, 10.0, units=1000)  # two threads: 0.010 s per unit on full batches
    policy.record(1, 16.0, units=1000)  # one thread: 0.016
    policy.record(2, 3.0, units=100)  # a short tail on two threads: 0.030 per unit
    assert policy.choose() == 2
    assert policy.seconds_per_unit[2] < policy.seconds_per_unit[1]


def test_one_slow_first_step_does_not_pin_a_job_to_one_thread():
    """The first step on all cores is often slow (a cold start); the next probe of that count
    must judge it afresh, not averaged with that step."""
    policy = AdaptiveThreads(candidates=(2, 1), reprobe_every=4)
    cost = lambda i, n: 20.0 if i == 0 else (1.0 if n == 2 else 1.8)  # noqa: E731
    used = _drive(policy, cost, 30)
    assert used[:2] == [2, 1] and used[2] == 1  # the cold start made one thread look faster
    first_probe = used.index(2, 2)
    assert used[first_probe + 1] == 2  # the first probe of two threads afterwards wins them back
    assert used[-10:].count(2) >= 7


def test_generation_reports_the_row_steps_it_computed(tiny_models):
    """A generation chunk's units are the rows it decoded step by step, not its prompt count:
    rows that finish early leave the batch, and a chunk of short answers does less work."""
    from core.formatting import Formatter
    from core.generation import generate, generate_stream

    lm = tiny_models["llama"]
    fmt = Formatter(lm.tokenizer, "none")
    prompts = ["hello there", "how are you", "tell me a story"]
    expected, active = 0, len(prompts)
    for step in generate_stream(lm, fmt, prompts, max_new_tokens=6):
        expected, active = expected + active, step.done.count(False)
    policy = AdaptiveThreads(fixed=1)
    seen = []
    record = policy.record
    policy.record = lambda n, seconds, units=1.0: (seen.append(units), record(n, seconds, units))[1]
    with threads.using(policy):
        generate(lm, fmt, prompts, max_new_tokens=6, batch_size=3)
    assert seen == [expected] and expected > len(prompts)


@pytest.mark.parametrize("given", [None, "123"])
def test_importing_core_sets_the_openmp_spin_before_torch_loads(given):
    """The setting counts only if it is in the environment when torch loads: ``import core``
    must set it without loading torch, and keep a value the user set."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | ({"GOMP_SPINCOUNT": given} if given else {})
    code = "import os, sys, core; print('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", given or "10000000"]
