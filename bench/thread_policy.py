"""The thread policy on the batch run's biggest job: the default validation of the embedded
model with the prompted preamble (880 generated rows), run with all cores fixed and under
:class:`core.threads.AdaptiveThreads`, one after the other, with every policy step logged.

Why: the policy decides the thread count of every generation batch of ``make batch``. On a
quiet machine it should cost little against the best fixed count; a policy that compares
thread counts on unlike batches (a chunk of short answers against one of long ones) drops to
one thread for many batches. Usage: ``python -m bench.thread_policy [OUT.json]``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from core import threads as thread_policy


def run(out: str | None = None) -> dict:
    from core.activations import collect_activations
    from core.controls import shuffled_control
    from core.directions import fit_directions
    from core.formatting import Formatter, get_preamble
    from core.models import load_model
    from core.prompts import builtin_three_way
    from core.validation import run_validation

    lm = load_model("embedded")
    fmt = Formatter(lm.tokenizer, get_preamble("prompted-refusal"))
    h, b = builtin_three_way("harmful"), builtin_three_way("harmless")
    dirs = fit_directions(collect_activations(lm, h.train, formatter=fmt, cache=False),
                          collect_activations(lm, b.train, formatter=fmt, cache=False))
    shuffled = shuffled_control(lm, fmt, dirs, 8, h.train, b.train, seed=0)
    cores = torch.get_num_threads()
    result: dict = {"threads": cores, "load_before": os.getloadavg()[0]}
    answers = {}
    for name, policy in (("fixed", thread_policy.AdaptiveThreads(fixed=cores)), ("adaptive", thread_policy.AdaptiveThreads())):
        log: list[dict] = []
        record = policy.record
        policy.record = lambda n, s, units=1.0, _r=record, _log=log: (_log.append(  # type: ignore[method-assign]
            {"threads": n, "seconds": round(s, 3), "units": units}), _r(n, s, units))[1]
        wall, cpu = time.perf_counter(), time.process_time()
        with thread_policy.using(policy):
            report = run_validation(lm, fmt, dirs, 8, h.test[:40], b.test[:40], n_samples=3, shuffled=shuffled)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        answers[name] = [g["generation"] for g in report.to_dict()["generations"]]
        result[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_per_wall": round(cpu / wall, 2),
                        "summary": policy.summary(), "steps": log}
        print(f"{name}: {wall:.0f} s wall, {cpu:.0f} CPU-s, {policy.summary()['steps_per_thread_count']}", file=sys.stderr)
    result["same_answers"] = answers["fixed"] == answers["adaptive"]
    result["load_after"] = os.getloadavg()[0]
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    r = run(sys.argv[1] if len(sys.argv) > 1 else None)
    print(json.dumps({k: v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "steps"} for k, v in r.items()}))
