"""The arithmetic floor of the jobs that the speed goals time.

Why: three goals are wall-clock seconds on a 2-core CPU (the organism build, the default batch
run, a slider release on the Steering page). A timing says how long a job took. The
floating-point operations of its linear layers, divided by this CPU's best measured rate for a
matrix product, say how long the job must take at least, whatever the code around the
products does. Where that floor is above a goal, no engineering of the same job meets the goal
on this machine; only a smaller job (fewer prompts, tokens, conditions) or a faster machine
can. Where it is well below, the difference is overhead worth hunting.

What is counted: every ``nn.Linear`` call (the loader's :class:`~core.packed_linear.PackedLinear`
included), two operations per multiply-add, and in training the backward pass exactly for a
linear layer (the input's gradient and the weight's gradient each cost what the forward
costs, when they are needed). Attention scores, norms, activations and the rest are not
counted, so the floor is a lower bound. Blocks that do not run (a replayed prefill) are not
counted, as they cost nothing.

    python -m bench.floors                      # all three jobs (about 30 min: one default batch run)
    python -m bench.floors --only steer,organism

Results go to ``bench/results.json`` under ``floors``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent

# (rows, in, out) of the products these jobs run most: the MLP and attention projections of the
# embedded model and its unembedding, at decode-batch, prefill and training row counts.
PEAK_SHAPES: tuple[tuple[int, int, int], ...] = tuple(
    (rows, i, o) for rows in (64, 192, 512, 2048) for i, o in ((576, 1536), (1536, 576), (576, 576), (576, 49152))
)


class LinearFlops:
    """Counts the floating-point operations of every ``nn.Linear`` call while active, by stage.

    ``with LinearFlops() as count: ...; count.by_stage`` -> ``{stage: flops}``; ``count.during(name)``
    attributes the calls inside it to ``name`` (stages nest: the innermost wins)."""

    def __init__(self) -> None:
        self.by_stage: dict[str, float] = defaultdict(float)
        self.stage = "other"
        self._handle = None

    def __enter__(self) -> "LinearFlops":
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._count)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @contextlib.contextmanager
    def during(self, stage: str) -> Iterator[None]:
        previous, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = previous

    def _count(self, module: nn.Module, args: tuple, output: object) -> None:
        if not isinstance(module, nn.Linear) or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        flops = 2.0 * (x.numel() // module.in_features) * module.in_features * module.out_features
        if torch.is_grad_enabled():  # backward: the weight's gradient and the input's, each a forward's worth
            flops *= 1 + bool(module.weight.requires_grad) + bool(x.requires_grad)
        self.by_stage[self.stage] += flops

    @property
    def total(self) -> float:
        return float(sum(self.by_stage.values()))


def gemm_peak(repeats: int = 15) -> dict:
    """This CPU's best float32 rate for the products these jobs run (GFLOPS), at torch's thread
    count: the best of ``repeats`` timings of each shape in :data:`PEAK_SHAPES`, through
    ``F.linear`` and through the loader's packed copy (up to 1.5 s of timings per shape). The
    floor assumes the best rate seen over all shapes, so it errs low, never high."""
    from core.packed_linear import PackedLinear

    torch.manual_seed(0)
    shapes: dict[str, float] = {}
    with torch.inference_mode():
        for rows, i, o in PEAK_SHAPES:
            x = torch.randn(rows, i)
            plain = nn.Linear(i, o, bias=False)
            packed = PackedLinear(i, o, bias=False)
            packed.weight = plain.weight
            packed.eval()
            for name, fn in (("linear", lambda: torch.nn.functional.linear(x, plain.weight)), ("packed", lambda: packed(x))):
                fn()
                times, spent = [], 0.0
                while len(times) < repeats and spent < 1.5:  # the big unembedding products: fewer repeats
                    times.append(_seconds(fn))
                    spent += times[-1]
                best = min(times)
                shapes[f"{rows}x{i}x{o} {name}"] = 2.0 * rows * i * o / best / 1e9
    best_shape = max(shapes, key=shapes.get)
    return {"gflops": shapes[best_shape], "shape": best_shape, "threads": torch.get_num_threads(),
            "by_shape": {k: round(v, 1) for k, v in shapes.items()}}


def _seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _report(count: LinearFlops, gflops: float, seconds: dict[str, float] | None = None) -> dict:
    """Per stage: the counted TFLOP, the floor at ``gflops``, and (given) the measured seconds."""
    out = {}
    for stage, flops in sorted(count.by_stage.items()):
        row = {"tflop": round(flops / 1e12, 3), "floor_s": round(flops / gflops / 1e9, 2)}
        if seconds and stage in seconds:
            row["measured_s"] = round(seconds[stage], 2)
        out[stage] = row
    out["total"] = {"tflop": round(count.total / 1e12, 3), "floor_s": round(count.total / gflops / 1e9, 2)}
    return out


@contextlib.contextmanager
def temporary_cache(share_models: bool = False) -> Iterator[Path]:
    """An empty runtime cache (``REFUSAL_CACHE_DIR``) for the block, as on a fresh clone.
    ``share_models``: its ``models`` folder is the repository's, so converted models and a built
    organism are not made again (the batch); otherwise nothing is shared (an organism build:
    load its base model before entering)."""
    old = os.environ.get("REFUSAL_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        if share_models:
            models = REPO / "cache" / "models"
            models.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "models").symlink_to(models.resolve())
        os.environ["REFUSAL_CACHE_DIR"] = tmp
        try:
            yield Path(tmp)
        finally:
            if old is None:
                os.environ.pop("REFUSAL_CACHE_DIR", None)
            else:
                os.environ["REFUSAL_CACHE_DIR"] = old


def floor_batch(gflops: float, config_path: str = "experiments/config.yaml") -> dict:
    """The default batch run (every model, every stage), counted per model and stage. Run as
    ``make batch`` runs it, on an empty activation cache; the organism must be built already
    (the goal times the run with the organism built)."""
    import core.analysis as analysis
    import core.batch as batch
    from core.config import load_config

    config = load_config(REPO / config_path)
    count = LinearFlops()
    model = {"name": "?"}
    run_model, stage = batch.run_model, analysis.Stopwatch.stage

    def counted_run_model(spec, *args, **kwargs):
        model["name"] = spec.name
        return run_model(spec, *args, **kwargs)

    @contextlib.contextmanager
    def counted_stage(self, name):
        with count.during(f"{model['name']}/{name}"), stage(self, name):
            yield

    batch.run_model, analysis.Stopwatch.stage = counted_run_model, counted_stage
    try:
        with temporary_cache(share_models=True) as tmp, count:
            t = time.perf_counter()
            results = batch.run(config, out_dir=tmp / "out", stream=sys.stderr)
            wall = time.perf_counter() - t
    finally:
        batch.run_model, analysis.Stopwatch.stage = run_model, stage
    seconds = {f"{m['name']}/{k}": v for m in results["models"] for k, v in m["timings"].items() if k != "total"}
    return {"stages": _report(count, gflops, seconds), "measured_s": round(wall, 1),
            "goal": "≤ 240 s (four rows)", "models": [m["name"] for m in results["models"]]}


def floor_organism(gflops: float) -> dict:
    """A fresh build of the default organism (answers, frozen blocks and teacher, training,
    held-out evaluation), counted per step."""
    import core.organism.build as build
    from core.models import load_model
    from core.organism import DEFAULT_RECIPE

    base = load_model("embedded", dtype="float32", device="cpu")
    count = LinearFlops()
    originals = {"training_data": build.training_data, "train": build.train, "evaluate_organism": build.evaluate_organism}

    def counted(step: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            with count.during(step):
                return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(build, name, counted(name, fn))
    try:
        with temporary_cache() as tmp, count:
            card = build.build_organism(base, DEFAULT_RECIPE, tmp / "organism")
    finally:
        for name, fn in originals.items():
            setattr(build, name, fn)
    t = card.timings
    seconds = {"training_data": t["data_seconds"], "train": t["train_seconds"], "evaluate_organism": t["eval_seconds"]}
    return {"stages": _report(count, gflops, seconds), "measured_s": t["total_seconds"],
            "goal": "≤ 90 s (answers, teacher, training, evaluation)"}


def floor_steer(gflops: float, layers: tuple[int, ...] = (4, 8, 15, 22)) -> dict:
    """A slider release on the Steering page, as ``bench.run``'s ``steer_latency`` times it: the
    preamble prompt's unedited prefill kept, then an add edit at each layer; counted up to the
    first steered token (the prefill above the edit and the last position's unembedding)."""
    import numpy as np

    from core.formatting import PRESETS, Formatter
    from core.generation import generate_stream
    from core.live import Stream, paired_streams
    from core.models import load_model
    from core.prefill_reuse import PrefillMemo
    from core.prompts import builtin_split
    from core.steering import Intervention

    lm = load_model("embedded", dtype="auto", device="cpu")
    prompt = builtin_split("harmless").test[0]
    unit = np.random.default_rng(0).standard_normal(lm.d_model).astype(np.float32)
    unit /= np.linalg.norm(unit)
    out: dict = {"dtype": str(lm.dtype).replace("torch.", ""), "goal": "≤ 0.3 s (batch 1)"}
    for preset in ("prompted-refusal", "none"):
        fmt = Formatter(lm.tokenizer, PRESETS[preset])
        memo = PrefillMemo()
        for _ in generate_stream(lm, fmt, [prompt], max_new_tokens=1, prefills=memo):
            pass
        count = LinearFlops()
        seconds = {}
        with count:
            for layer in layers:
                iv = Intervention("add", unit, layer, coefficient=0.75, scale=1.0)
                with count.during(f"{preset}/release at L{layer}"):
                    t = time.perf_counter()
                    steps = paired_streams(lm, fmt, prompt, iv, layer=layer, scale=1.0, baseline=Stream(done=True),
                                           max_new_tokens=8, prefills=memo)
                    next(steps)
                    seconds[f"{preset}/release at L{layer}"] = time.perf_counter() - t
                    steps.close()
        out.update(_report(count, gflops, seconds))
        out.pop("total")
    return out


FLOORS: dict[str, Callable[[float], dict]] = {"steer": floor_steer, "organism": floor_organism, "batch": floor_batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(FLOORS))
    parser.add_argument("--gflops", type=float, help="use this rate instead of measuring one (e.g. from a quiet run)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(FLOORS)
    unknown = [n for n in names if n not in FLOORS]
    if unknown:
        parser.error(f"--only: unknown job(s) {', '.join(unknown)}; use some of {', '.join(FLOORS)}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    floors = results.get("floors", {})
    if args.gflops:
        floors["peak"] = {"gflops": args.gflops, "shape": "given on the command line"}
    else:
        floors["peak"] = gemm_peak() | {"load_before": os.getloadavg()[0]}
    gflops = floors["peak"]["gflops"]
    print(f"[floors] peak {gflops:.1f} GFLOPS ({floors['peak']['shape']})", file=sys.stderr, flush=True)
    for name in names:
        print(f"[floors] {name} …", file=sys.stderr, flush=True)
        floors[name] = FLOORS[name](gflops) | {"gflops": gflops,
                                               "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        print(json.dumps(floors[name], indent=1), file=sys.stderr, flush=True)
    results["floors"] = floors
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
