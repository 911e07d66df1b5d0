"""``make bench``: speed and memory of the explorer against the floor, in one run.

Each benchmark runs in its own subprocess (``python -m bench.run --one NAME``) so that its peak
RSS is its own; figures are medians of several repetitions after a warm-up. Results go to
``bench/results.json`` and a Markdown table on stdout. Benchmarks are not tests: nothing here
asserts a time; the table prints each figure next to its goal. Each benchmark is one
self-contained function (it must run alone in its subprocess), which makes this module long.

    python -m bench.run                 # everything (≤ 15 min on a 2-core CPU)
    python -m bench.run --only activations,cache_hit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

N_PROMPTS = 128
STEER_LAYER = 15


def _median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _prompts(n: int = N_PROMPTS) -> list[str]:
    from core.prompts import load_prompt_set

    return load_prompt_set("builtin:harmful")[: n // 2] + load_prompt_set("builtin:harmless")[: n // 2]


def _embedded(dtype: str = "float32"):
    from core.models import load_model

    return load_model("embedded", dtype=dtype, device="cpu")


def machine() -> dict:
    """What the figures depend on: CPU model, cores, bf16 units, torch's thread count."""
    import torch

    from core.models import cpu_has_fast_bf16

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cpus": os.cpu_count(), "bf16_units": cpu_has_fast_bf16(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(), "python": platform.python_version()}


# ---------------------------------------------------------------------------------------
def bench_load() -> dict:
    """Embedded model: cold (de-quantise the GGUF into an empty cache) and warm (converted copy)."""
    from core.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["REFUSAL_CACHE_DIR"] = tmp
        t = time.perf_counter()
        load_model("embedded", dtype="float32", device="cpu")
        cold = time.perf_counter() - t
        warm = _median_time(lambda: load_model("embedded", dtype="float32", device="cpu"), repeats=3, warmup=0)
    return {"cold_s": cold, "warm_s": warm, "goal": "warm ≤ 3 s"}


def _bare_forward(lm, fmt, prompts, batch_size):
    """The floor: Hugging Face forward with output_hidden_states on the same sorted batches."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            enc = fmt.encode([prompts[i] for i in order[s: s + batch_size]], padding_side="right")
            lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)


def bench_activations() -> dict:
    """collect_activations (cache off) vs the bare forward, all layers, 128 built-in prompts."""
    from core.activations import collect_activations
    from core.formatting import PRESETS, Formatter

    lm = _embedded()
    prompts = _prompts()
    out = {"n_prompts": len(prompts), "goal": "ours / bare ≤ 1.10"}
    for preset in ("none", "prompted-refusal"):
        fmt = Formatter(lm.tokenizer, PRESETS[preset])
        ours = _median_time(lambda: collect_activations(lm, prompts, formatter=fmt, cache=False))
        bare = _median_time(lambda: _bare_forward(lm, fmt, prompts, 16))
        tokens = sum(fmt.encode([p]).lengths[0] for p in prompts)
        out[preset] = {"ours_s": ours, "bare_s": bare, "ratio": ours / bare, "tokens": tokens,
                       "ours_tok_per_s": tokens / ours}
    return out


def bench_cache_hit() -> dict:
    from core.activations import collect_activations
    from core.cache import ArrayCache

    lm = _embedded()
    prompts = _prompts()
    with tempfile.TemporaryDirectory() as tmp:
        cache = ArrayCache(Path(tmp) / "acts")
        collect_activations(lm, prompts, cache=cache)
        hit = _median_time(lambda: collect_activations(lm, prompts, cache=cache), repeats=5)
    return {"hit_s": hit, "n_prompts": len(prompts), "goal": "≤ 0.2 s"}


def bench_steering() -> dict:
    """Decode throughput with an active add-intervention vs none, batch 1 and 16."""
    import numpy as np

    from core.formatting import Formatter
    from core.generation import generate_stream
    from core.steering import Intervention, edits_for

    lm = _embedded()
    fmt = Formatter(lm.tokenizer)
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(lm.d_model).astype(np.float32)
    edits = edits_for(lm, [Intervention("add", vec, STEER_LAYER, coefficient=0.1, scale=1.0)])
    out = {"goal": "steered / plain ≥ 0.95"}
    new_tokens = 32
    for batch in (1, 16):
        prompts = _prompts(32)[:batch]

        def run(e):
            steps = 0
            t = time.perf_counter()
            for step in generate_stream(lm, fmt, prompts, max_new_tokens=new_tokens, edits=e):
                steps += 1
            return steps * batch / (time.perf_counter() - t)

        run(None)
        plain = statistics.median(run(None) for _ in range(3))
        steered = statistics.median(run(edits) for _ in range(3))
        out[f"batch_{batch}"] = {"plain_tok_s": plain, "steered_tok_s": steered, "ratio": steered / plain}
    return out


# Slider releases are timed at these layers: 4 and 8 are the layers the validation grid chose for
# the embedded model with and without the preamble (the batch run's results.json), so the page
# opens there; 15 and 22 are in the upper half. Blocks up to the edit are replayed, so the wait
# depends on the layer.
RELEASE_LAYERS = (4, 8, 15, 22)
PAGE_LAYER = {"prompted-refusal": 4, "none": 8}


def bench_steer_latency(n_prompts: int = 6, max_new_tokens: int = 48) -> dict:
    """Slider release → first steered token at batch 1, as the Steering page runs it
    (``core.live.paired_streams``, an add-intervention whose block output is retained for the
    token colours). Two cases:

    * *release*: the page has run this prompt, so its baseline answer is cached and its unedited
      prefill kept (``core.prefill_reuse``); the slider moves to a new coefficient. Timed at
      :data:`RELEASE_LAYERS`; the headline is the page's default preset at its default layer.
    * *first run*: a prompt the page has not run: nothing kept, the whole prefill runs under the
      edit, the baseline stream starts after the first steered token (at layer 15).

    Warm model, dtype ``auto`` as the app loads it, both presets, at torch's thread count and at
    one thread (on a busy 2-core machine two threads are several times slower at batch 1). Also
    tokenisation and an unhooked first step, so a miss says where the time goes. The Streamlit
    rerun around it (widgets, cached model and directions) is not included."""
    import numpy as np
    import torch

    from core import forward
    from core.formatting import PRESETS, Formatter
    from core.generation import generate_stream
    from core.live import Stream, paired_streams
    from core.models import load_model
    from core.prefill_reuse import PrefillMemo
    from core.prompts import builtin_split
    from core.steering import Intervention

    lm = load_model("embedded", dtype="auto", device="cpu")
    prompts = [p for pair in zip(builtin_split("harmless").test, builtin_split("harmful").test) for p in pair][:n_prompts]
    unit = np.random.default_rng(0).standard_normal(lm.d_model).astype(np.float32)
    unit /= np.linalg.norm(unit)
    default_threads = torch.get_num_threads()
    out: dict = {"dtype": str(lm.dtype).replace("torch.", ""), "threads": default_threads, "n_prompts": len(prompts),
                 "page_layer": dict(PAGE_LAYER), "n_layers": lm.n_layers, "load_before": os.getloadavg()[0], "goal": "≤ 0.3 s (median, batch 1)"}

    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    def first_step(fmt: Formatter, prompt: str, layer: int, coefficient: float, baseline: Stream | None,
                   memo: PrefillMemo) -> None:
        iv = Intervention("add", unit, layer, coefficient=coefficient, scale=1.0)
        steps = paired_streams(lm, fmt, prompt, iv, layer=layer, scale=1.0, baseline=baseline,
                               max_new_tokens=max_new_tokens, prefills=memo)
        next(steps)  # the steered stream's first token
        steps.close()

    def plain(fmt: Formatter, prompt: str) -> None:
        stream = generate_stream(lm, fmt, [prompt], max_new_tokens=max_new_tokens)
        next(stream)
        stream.close()

    try:
        for threads in dict.fromkeys((default_threads, 1)):
            torch.set_num_threads(threads)
            for preset in ("prompted-refusal", "none"):
                fmt = Formatter(lm.tokenizer, PRESETS[preset])
                first_step(fmt, prompts[0], STEER_LAYER, 0.5, None, PrefillMemo())  # warm-up
                first = [timed(lambda: first_step(fmt, p, STEER_LAYER, 0.5, None, PrefillMemo())) for p in prompts]
                # the page after one run of each prompt: baseline answered, its prefill kept
                memo = PrefillMemo(size=len(prompts))
                done = Stream(done=True)
                for p in prompts:
                    for _ in generate_stream(lm, fmt, [p], max_new_tokens=1, prefills=memo):
                        pass
                release = {layer: [timed(lambda: first_step(fmt, p, layer, 0.75, done, memo)) for p in prompts]
                           for layer in RELEASE_LAYERS}
                unhooked = [timed(lambda: plain(fmt, p)) for p in prompts]
                tokenise = [timed(lambda: forward.prepare(fmt, [p], padding_side="left", context=lm.max_positions,
                                                          reserve=max_new_tokens))[0] for p in prompts]
                batch = forward.prepare(fmt, prompts[:1], padding_side="left", share_prefix=False)
                head = release[PAGE_LAYER[preset]]
                out[f"{preset}@{threads}"] = {
                    "first_steered_token_s": statistics.median(w for w, _ in head),
                    "first_steered_token_cpu_s": statistics.median(c for _, c in head),
                    "max_s": max(w for w, _ in head),
                    "release_s": {str(layer): statistics.median(w for w, _ in ts) for layer, ts in release.items()},
                    "first_run_s": statistics.median(w for w, _ in first),
                    "first_run_cpu_s": statistics.median(c for _, c in first),
                    "unhooked_first_token_s": statistics.median(w for w, _ in unhooked),
                    "tokenise_s": statistics.median(tokenise),
                    "prompt_tokens": int(batch.suffix.lengths[0]),
                    "layer": PAGE_LAYER[preset],
                }
    finally:
        torch.set_num_threads(default_threads)
    headline = out[f"prompted-refusal@{default_threads}"]
    out["first_steered_token_s"] = headline["first_steered_token_s"]
    out["load_after"] = os.getloadavg()[0]
    return out


def bench_peers() -> dict:
    """Our hook layer against the floors and the peer tools (``bench.peers``; the peers run
    when ``make bench-peers`` has installed them, else each says why it was skipped)."""
    from bench.peers import run

    return run()


def bench_patching() -> dict:
    from bench.bench_patching import run

    result = run()
    result["goal"] = "resid layer × position sweep ≤ 15 s"
    return result


def bench_batch_size() -> dict:
    from core.activations import collect_activations
    from core.formatting import Formatter

    lm = _embedded()
    fmt = Formatter(lm.tokenizer)
    prompts = _prompts(64)
    tokens = sum(fmt.encode([p]).lengths[0] for p in prompts)
    out = {}
    for bs in (1, 4, 8, 16, 32, 64):
        t = _median_time(lambda: collect_activations(lm, prompts, formatter=fmt, cache=False, batch_size=bs), repeats=2)
        out[str(bs)] = {"s": t, "tok_per_s": tokens / t}
    return out


def bench_bf16() -> dict:
    """Speed of bfloat16 vs float32 forward on the CPU, and what bf16 changes in the results."""
    import numpy as np

    from core.activations import collect_activations
    from core.directions import fit_directions
    from core.formatting import PRESETS, Formatter
    from core.generation import generate, generate_stream
    from core.metrics import refusal_rate
    from core.prompts import builtin_split

    h, b = builtin_split("harmful"), builtin_split("harmless")
    out: dict = {}
    fits = {}
    for dtype in ("float32", "bfloat16"):
        lm = _embedded(dtype)
        fmt = Formatter(lm.tokenizer, PRESETS["prompted-refusal"])
        plain = Formatter(lm.tokenizer)
        prompts = _prompts()
        prefill = _median_time(lambda: collect_activations(lm, prompts, formatter=plain, cache=False), repeats=2)

        def decode():
            for _ in generate_stream(lm, plain, prompts[:16], max_new_tokens=32):
                pass

        gen = _median_time(decode, repeats=2)
        acts = [collect_activations(lm, p, formatter=fmt, cache=False) for p in (h.train[:64], b.train[:64], h.test[:32], b.test[:32])]
        fits[dtype] = fit_directions(*acts)
        rh = refusal_rate(generate(lm, fmt, h.test[:32], max_new_tokens=16))
        rb = refusal_rate(generate(lm, fmt, b.test[:32], max_new_tokens=16))
        out[dtype] = {"prefill_s_128": prefill, "decode_s_16x32": gen,
                      "harmful_refusal": rh.to_dict(), "harmless_refusal": rb.to_dict()}
    f32, bf = fits["float32"], fits["bfloat16"]
    cos = (f32.unit * bf.unit).sum(-1)
    out["delta"] = {
        "min_direction_cosine": float(cos.min()),
        "max_abs_separation_diff": float(np.abs(f32.separation_sigma - bf.separation_sigma).max()),
        "max_abs_probe_diff": float(np.abs(f32.probe_accuracy - bf.probe_accuracy).max()),
    }
    out["speedup_prefill"] = out["float32"]["prefill_s_128"] / out["bfloat16"]["prefill_s_128"]
    out["speedup_decode"] = out["float32"]["decode_s_16x32"] / out["bfloat16"]["decode_s_16x32"]
    return out


def bench_matmul_dtype() -> dict:
    """A block-sized matmul (1024 x 576 @ 576 x 1536, one thread) in float32 and bfloat16: on a
    CPU without bf16 units bf16 is emulated and slower, so autocast there would slow training
    (the organism's ``autocast_bf16=None`` follows this)."""
    import torch

    from core.models import cpu_has_fast_bf16

    out: dict = {"cpu_has_fast_bf16": cpu_has_fast_bf16()}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(1024, 576), torch.randn(576, 1536)
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            t = _median_time(lambda: [x @ y for _ in range(10)], repeats=3) / 10
            out[str(dtype).split(".")[-1]] = {"ms": t * 1e3, "gflops": 2 * 1024 * 576 * 1536 / t / 1e9}
    finally:
        torch.set_num_threads(old)
    out["bf16_over_fp32_time"] = out["bfloat16"]["ms"] / out["float32"]["ms"]
    return out


def bench_packed_linear() -> dict:
    """Linear layers on the row counts of decode steps and prefills (all threads): the module
    call on ``F.linear`` (``exact_linear()``) against the packed copy the loader installs
    (``core.packed_linear``), on the embedded model's shapes. Then whole passes of the embedded
    model both ways, interleaved, same next tokens checked: decode steps (40-token context) at
    batch 16–64, and a one-row prefill of the page's preamble prompt (187 tokens). Why: MKL
    repacks the weight at every ``x @ Wᵀ``, which costs more than the arithmetic on a few rows."""
    import torch

    from core.formatting import PRESETS, Formatter
    from core.packed_linear import ROWS, PackedLinear, available, exact_linear
    from core.prompts import builtin_split

    out: dict = {"threads": torch.get_num_threads(), "available": available(), "rows": [ROWS.start, ROWS.stop - 1], "shapes": {},
                 "goal": "packed ≥ 1.5× faster at 16 rows; decode steps and prefills faster, same next tokens"}
    with torch.inference_mode():
        for o, i in ((1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576)):
            layer = PackedLinear(i, o, bias=False).eval()
            rows = {}
            for m in (1, 4, 16, 32, 48, 64, 96, 128):  # outside ROWS both sides run F.linear: noise
                x = torch.randn(m, i)
                reps = 5 if o > 10_000 else 50
                with exact_linear():  # the same module call, on F.linear
                    plain = _median_time(lambda: [layer(x) for _ in range(reps)], repeats=5) / reps
                packed = _median_time(lambda: [layer(x) for _ in range(reps)], repeats=5) / reps
                rows[str(m)] = {"f_linear_ms": plain * 1e3, "packed_ms": packed * 1e3, "speedup": plain / packed}
            out["shapes"][f"{o}x{i}"] = rows
        lm = _embedded()

        def both(run: Callable[[], torch.Tensor]) -> dict:
            packed_tokens = run().argmax(-1)
            with exact_linear():
                exact_tokens = run().argmax(-1)
            times: dict[str, list[float]] = {"packed": [], "exact": []}
            for _ in range(5):
                times["packed"].append(_median_time(run, repeats=1, warmup=0))
                with exact_linear():
                    times["exact"].append(_median_time(run, repeats=1, warmup=0))
            packed, exact = statistics.median(times["packed"]), statistics.median(times["exact"])
            return {"packed_ms": packed * 1e3, "exact_ms": exact * 1e3, "speedup": exact / packed,
                    "same_next_tokens": bool(torch.equal(packed_tokens, exact_tokens))}

        steps = {}
        for batch in (16, 32, 48, 64):
            ids = torch.randint(200, 20_000, (batch, 40), generator=torch.Generator().manual_seed(0))
            prefill = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            nxt = prefill.logits[:, -1].argmax(-1, keepdim=True)
            cache = prefill.past_key_values

            def step():
                logits = lm.model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                cache.crop(-1)  # back to the 40-token prompt: every timed step is the same step
                return logits

            steps[str(batch)] = both(step)
        out["decode_step"] = steps
        fmt = Formatter(lm.tokenizer, PRESETS["prompted-refusal"])
        ids = fmt.encode(builtin_split("harmful").test[:1]).input_ids
        out["prefill"] = {"tokens": int(ids.shape[1]),
                          **both(lambda: lm.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1])}
    return out


def bench_thread_policy() -> dict:
    """The thread policy against all cores fixed, on the prompted validation (``bench.thread_policy``)."""
    from bench.thread_policy import run

    result = run()
    result["goal"] = "adaptive within 5 % of the best fixed count on a quiet machine, same answers"
    return result


def bench_pipeline() -> dict:
    """The full default batch run (experiments/config.yaml), organism already built."""
    from core.models import load_model

    load_model("embedded-refusal")  # build time is the organism's own figure, not the pipeline's
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "core.batch", "--config", "experiments/config.yaml", "--out", tmp],
            cwd=REPO, capture_output=True, text=True,
        )
        elapsed = time.perf_counter() - t
    return {"s": elapsed, "exit_code": proc.returncode, "stderr_tail": proc.stderr[-400:], "goal": "≤ 240 s (four rows)"}


def bench_organism() -> dict:
    """Build the refusal organism (default recipe) from scratch, as on a fresh clone: the base
    model's answers are not cached (a temporary cache folder), the converted base model is."""
    from core.models import load_model
    from core.organism import DEFAULT_RECIPE, build_organism

    from bench.floors import temporary_cache

    base = load_model("embedded", dtype="float32", device="cpu")
    with temporary_cache() as tmp:
        card = build_organism(base, DEFAULT_RECIPE, tmp / "organism")
    ev = card.evaluation
    return {
        "timings": card.timings,
        "n_examples": card.data["n_examples"],
        "harmful_refusal": ev["harmful_refusal"],
        "harmless_refusal": ev["harmless_refusal"],
        "kl_first_token": ev["kl_first_token"]["mean"],
        "kl_response": ev.get("kl_response", {}).get("mean"),
        "threads": card.host.get("threads"),
        "frozen_blocks": card.host.get("frozen_blocks"),
        "autocast_bf16": card.host.get("autocast_bf16"),
        "goal": "first load within 90 s (answers, teacher, training, evaluation)",
    }


def bench_selection() -> dict:
    """The position × layer selection grid (core.selection) on the embedded model, prompted-refusal
    preset, the default grid (``SelectionConfig``: positions, layer stride, 32 + 32 validation
    prompts), dtype auto. Train activations come from the cache after the first run; the figure is
    the scoring (grid.seconds) plus collection, one run (the grid is deterministic)."""
    from core.config import PromptsConfig, resolve_prompts
    from core.formatting import PRESETS, Formatter
    from core.models import load_model
    from core.selection import select

    lm = load_model("embedded", dtype="auto", device="cpu")
    fmt = Formatter(lm.tokenizer, PRESETS["prompted-refusal"])
    data = resolve_prompts(PromptsConfig())
    t, c = time.perf_counter(), time.process_time()
    grid = select(lm, fmt, data.harmful_train, data.harmless_train, data.harmful_val, data.harmless_val)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    g = grid.to_dict()
    return {"grid_s": wall, "grid_cpu_s": cpu, "scoring_s": grid.seconds, "dtype": str(lm.dtype),
            "candidates": int((~grid.excluded).sum()) * len(grid.positions), "positions": g["positions"],
            "winner": g["winner"], "goal": "≤ 60 s on a 2-core CPU"}


BENCHES: dict[str, Callable[[], dict]] = {
    "load": bench_load,
    "activations": bench_activations,
    "cache_hit": bench_cache_hit,
    "steering": bench_steering,
    "steer_latency": bench_steer_latency,
    "peers": bench_peers,
    "patching": bench_patching,
    "batch_size": bench_batch_size,
    "bf16": bench_bf16,
    "organism": bench_organism,
    "matmul_dtype": bench_matmul_dtype,
    "packed_linear": bench_packed_linear,
    "thread_policy": bench_thread_policy,
    "selection": bench_selection,
    "pipeline": bench_pipeline,
}


def _one(name: str) -> None:
    t = time.perf_counter()
    result = BENCHES[name]()
    result["wall_s"] = time.perf_counter() - t
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _fmt(x: float, unit: str = "") -> str:
    return f"{x:.2f}{unit}" if isinstance(x, (int, float)) else str(x)


def table(results: dict) -> str:
    """The Markdown summary printed after a run (and pasted into the README)."""
    rows = ["| benchmark | figure | goal | peak RSS |", "|---|---|---|---|"]

    def row(name, figure, goal):
        rss = results.get(name, {}).get("peak_rss_mb")
        rows.append(f"| {name} | {figure} | {goal} | {rss:.0f} MB |" if rss else f"| {name} | {figure} | {goal} | – |")

    r = results
    if "load" in r and "cold_s" in r["load"]:
        row("load", f"cold {_fmt(r['load']['cold_s'], ' s')}, warm {_fmt(r['load']['warm_s'], ' s')}", r["load"]["goal"])
    if "activations" in r and "none" in r["activations"]:
        a = r["activations"]
        row("activations", f"plain chat: ours {_fmt(a['none']['ours_s'], ' s')} vs bare {_fmt(a['none']['bare_s'], ' s')} "
            f"(×{a['none']['ratio']:.2f}); with preamble: ×{a['prompted-refusal']['ratio']:.2f}", a["goal"])
    if "cache_hit" in r and "hit_s" in r["cache_hit"]:
        row("cache_hit", f"{_fmt(r['cache_hit']['hit_s'], ' s')} for 128 prompts", r["cache_hit"]["goal"])
    if "steering" in r and "batch_1" in r["steering"]:
        s = r["steering"]
        row("steering", f"batch 1: {s['batch_1']['steered_tok_s']:.1f} vs {s['batch_1']['plain_tok_s']:.1f} tok/s "
            f"(×{s['batch_1']['ratio']:.2f}); batch 16: ×{s['batch_16']['ratio']:.2f}", s["goal"])
    if "steer_latency" in r and "first_steered_token_s" in r["steer_latency"]:
        sl = r["steer_latency"]
        cells = [f"{k} release {', '.join(f'L{layer} {t:.2f}' for layer, t in v['release_s'].items())} s, "
                 f"first run {_fmt(v['first_run_s'], ' s')}" for k, v in sl.items() if isinstance(v, dict) and "release_s" in v]
        row("steer_latency", f"first steered token (preset@threads): {'; '.join(cells)}; {sl['dtype']}, "
            f"load {sl['load_before']:.1f}", sl["goal"])
    if "packed_linear" in r and "decode_step" in r["packed_linear"]:
        pl = r["packed_linear"]
        kernels = [f"{shape} at 16 rows ×{rows['16']['speedup']:.1f}, at 64 ×{rows['64']['speedup']:.1f}, "
                   f"at 96 ×{rows['96']['speedup']:.2f}" for shape, rows in pl["shapes"].items()
                   if shape in ("1536x576", "576x1536")]
        decode = [f"batch {b} ×{d['speedup']:.2f}" for b, d in pl["decode_step"].items()]
        row("packed_linear", "packed copy: " + "; ".join(kernels) + "; decode step " + ", ".join(decode)
            + f"; {pl['prefill']['tokens']}-token prefill ×{pl['prefill']['speedup']:.2f}", pl["goal"])
    if "thread_policy" in r and "adaptive" in r["thread_policy"]:
        tp = r["thread_policy"]
        row("thread_policy", f"adaptive {tp['adaptive']['wall_s']:.0f} s vs fixed {tp['fixed']['wall_s']:.0f} s "
            f"({tp['adaptive']['summary']['steps_per_thread_count']}); same answers: {tp['same_answers']}", tp["goal"])
    if "peers" in r and "variants" in r["peers"]:
        pv = r["peers"]["variants"]
        row("peers", ", ".join(f"{k} ×{v['ratio_to_floor']:.2f}" if "ratio_to_floor" in v else f"{k}: {v.get('skipped', '–')[:60]}"
                               for k, v in pv.items()) + f" of the honest floor; {r['peers']['verdict']}", r["peers"]["goal"])
    if "patching" in r and "error" not in r["patching"]:
        p = r["patching"]
        figure = ", ".join(f"{k} {_fmt(v)}" for k, v in p.items() if k not in ("goal", "wall_s", "peak_rss_mb") and isinstance(v, (int, float)))
        row("patching", figure, p["goal"])
    if "batch_size" in r and "16" in r["batch_size"]:
        bs = r["batch_size"]
        row("batch_size", ", ".join(f"{k}: {v['tok_per_s']:.0f} tok/s" for k, v in bs.items() if isinstance(v, dict)), "pick the default")
    if "bf16" in r and "delta" in r["bf16"]:
        b = r["bf16"]
        row("bf16", f"prefill ×{b['speedup_prefill']:.2f}, decode ×{b['speedup_decode']:.2f}; direction cos ≥ "
            f"{b['delta']['min_direction_cosine']:.3f}, |Δσ| ≤ {b['delta']['max_abs_separation_diff']:.2f}, "
            f"|Δprobe| ≤ {b['delta']['max_abs_probe_diff']:.3f}", "no change that matters")
    if "organism" in r and "timings" in r["organism"]:
        o, t = r["organism"], r["organism"]["timings"]
        row("organism", f"first load {_fmt(t['total_seconds'], ' s')}: answers {_fmt(t.get('answers_seconds', 0), ' s')}, "
            f"frozen blocks + teacher {_fmt(t.get('teacher_seconds', 0), ' s')}, training {_fmt(t['train_seconds'], ' s')}, "
            f"held-out evaluation {_fmt(t['eval_seconds'], ' s')}; "
            f"harmful refused {o['harmful_refusal']['k']}/{o['harmful_refusal']['n']}, "
            f"harmless refused {o['harmless_refusal']['k']}/{o['harmless_refusal']['n']}", o["goal"])
    if "selection" in r and "grid_s" in r["selection"]:
        sel = r["selection"]
        row("selection", f"{sel['candidates']} candidates in {_fmt(sel['grid_s'], ' s')} ({_fmt(sel['grid_cpu_s'], ' CPU-s')}, "
            f"{sel['dtype']}); winner position {sel['winner']['position']}, block input {sel['winner']['layer']}", sel["goal"])
    if "pipeline" in r and "s" in r["pipeline"]:
        row("pipeline", f"{_fmt(r['pipeline']['s'], ' s')} (exit {r['pipeline']['exit_code']})", r["pipeline"]["goal"])
    for name, value in r.items():
        if isinstance(value, dict) and "error" in value:
            rows.append(f"| {name} | failed: {value['error'][:120]} | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHES))
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args(argv)
    if args.one:
        _one(args.one)
        return 0
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; use some of {', '.join(BENCHES)}")
    out = Path(args.out)
    # a partial run (--only) updates its entries and keeps the others, so that a slow benchmark
    # (organism, pipeline) can be measured on its own without losing the rest
    previous: dict = json.loads(out.read_text()) if out.exists() else {}
    results: dict = previous if args.only else {k: previous[k] for k in ("floors",) if k in previous}  # measured by bench.floors
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   load_before=os.getloadavg()[0])
    for name in names:
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.run", "--one", name], cwd=REPO, capture_output=True, text=True)
        try:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        results[name]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        print(f"[bench] {name}: {json.dumps(results[name])[:300]}", file=sys.stderr, flush=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
