"""Our hook layer side by side with the tools a user would otherwise pick, on the same job:
last-token residual activations at every layer for the same prompts, fp32, embedded model.

    make bench-peers                      # installs the peers into .venv-peers, then runs this
    python -m bench.peers                 # whatever is installed; a missing peer is reported, not fatal
    python -m bench.peers --rounds 7 --threads 1 --only ours,floor,bare

Variants (each a separate worker process, so imports, allocator state and peak RSS are its own):

* ``ours`` — ``core.activations.collect_activations`` (cache off), the code the app runs;
* ``floor`` — the honest floor: the decoder blocks only (no unembedding), the same length-sorted
  batches, and the shared chat-template prefix run once as ours does: everything ours computes,
  with no hook layer around it;
* ``floor_full`` — blocks only and length-sorted, but every prompt from its first token;
* ``bare`` — the forward a user would write: the whole model with ``output_hidden_states=True``
  on the prompts in their given order;
* ``transformer_lens`` — TransformerLens ``run_with_cache`` (its TransformerBridge over the same
  Hugging Face model; ``names_filter`` keeps only ``hook_resid_post``);
* ``nnsight`` — nnsight ``LanguageModel.trace`` saving every block's output.

The peers and the floors get the same tokens (our formatter's chat template), the same batch
size and the same length-sorted batches (what the peer gets is the batching, not our prefix
reuse or early stop); the bare forward keeps the given order. Workers start once, warm up,
then are timed in interleaved rounds (a rotating order ABC…, BCA…, …) so drift on a shared
machine falls on every variant alike; figures are medians over rounds. Each worker's
activations are compared with ours, so a faster variant that computes something else shows.
Peers run under ``.venv-peers/bin/python`` when it exists (``make bench-peers`` builds it on
top of ``.venv`` with every shared package pinned), ours and the floors under this interpreter.
The worker side and the driver side share this one module (over 400 lines) so that their line
protocol and the variants' definitions are written once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.run import machine

REPO = Path(__file__).resolve().parent.parent
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
BATCH_SIZE = 16
VARIANTS = ("ours", "floor", "floor_full", "bare", "transformer_lens", "nnsight")
PEERS = ("transformer_lens", "nnsight")
GOAL = "ours ≤ 1.02 × the honest floor and ahead of both peers"
Runner = Callable[[], np.ndarray]


# ---------------------------------------------------------------------------------------
# workers: each builds one runner returning [n_prompts, n_layers, d_model] in prompt order
# ---------------------------------------------------------------------------------------
def _prompts(n: int) -> list[str]:
    from core.prompts import load_prompt_set

    return load_prompt_set("builtin:harmful")[: n // 2] + load_prompt_set("builtin:harmless")[: n - n // 2]


def _sorted_batches(prompts: list[str]) -> list[list[int]]:
    """Longest first in batches of BATCH_SIZE: the order ``collect_activations`` uses."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[s: s + BATCH_SIZE] for s in range(0, len(order), BATCH_SIZE)]


def _given_batches(prompts: list[str]) -> list[list[int]]:
    return [list(range(s, min(len(prompts), s + BATCH_SIZE))) for s in range(0, len(prompts), BATCH_SIZE)]


def _last_rows(hidden: Any, lengths: Any) -> Any:
    """[batch, d] at each row's last real token of a right-padded [batch, seq, d] tensor."""
    import torch

    return hidden[torch.arange(hidden.shape[0]), torch.as_tensor(lengths) - 1]


def _gather(n: int, batches: list[list[int]], per_batch: Callable[[list[int]], Any]) -> np.ndarray:
    """Run ``per_batch(indices) -> [batch, n_layers, d]`` over ``batches`` into prompt order."""
    out: np.ndarray | None = None
    for idx in batches:
        acts = per_batch(idx).float().numpy()
        if out is None:
            out = np.empty((n, *acts.shape[1:]), dtype=np.float32)
        out[idx] = acts
    assert out is not None
    return out


def _runner_ours(lm: Any, fmt: Any, prompts: list[str]) -> tuple[Runner, dict]:
    from core.activations import collect_activations

    return (lambda: collect_activations(lm, prompts, formatter=fmt, cache=False, batch_size=BATCH_SIZE)), {}


def _runner_floor(lm: Any, fmt: Any, prompts: list[str], share_prefix: bool) -> tuple[Runner, dict]:
    """The decoder (``model.model``: embeddings, blocks, final norm; no unembedding) on the
    batches ours uses, its shared prefix computed once per call as ours does."""
    import torch

    from core import forward

    decoder = lm.model.model

    @torch.inference_mode()
    def run() -> np.ndarray:
        prefixes: dict = {}

        def one(idx: list[int]) -> Any:
            batch = forward.prepare(fmt, [prompts[i] for i in idx], padding_side="right", share_prefix=share_prefix)
            suffix, p, n = batch.suffix, batch.prefix_len, batch.size
            kwargs: dict[str, Any] = {}
            mask = suffix.attention_mask
            if p:
                key = tuple(batch.prefix_ids[0].tolist())
                if key not in prefixes:
                    prefixes[key] = decoder(input_ids=batch.prefix_ids, use_cache=True).past_key_values
                cache = copy.deepcopy(prefixes[key])
                cache.batch_repeat_interleave(n)
                kwargs["past_key_values"] = cache
                mask = torch.cat([mask.new_ones((n, p)), mask], dim=-1)
            positions = (suffix.attention_mask.cumsum(-1) - 1).clamp(min=0) + p
            out = decoder(input_ids=suffix.input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=bool(p), output_hidden_states=True, **kwargs)
            return torch.stack([_last_rows(h, suffix.lengths) for h in out.hidden_states[1:]], dim=1)

        return _gather(len(prompts), _sorted_batches(prompts), one)

    return run, {"last_layer_is_normed": True}


def _runner_bare(lm: Any, fmt: Any, prompts: list[str]) -> tuple[Runner, dict]:
    import torch

    @torch.inference_mode()
    def run() -> np.ndarray:
        def one(idx: list[int]) -> Any:
            enc = fmt.encode([prompts[i] for i in idx], padding_side="right")
            out = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
            return torch.stack([_last_rows(h, enc.lengths) for h in out.hidden_states[1:]], dim=1)

        return _gather(len(prompts), _given_batches(prompts), one)

    return run, {"last_layer_is_normed": True}


def _runner_transformer_lens(lm: Any, fmt: Any, prompts: list[str]) -> tuple[Runner, dict]:
    import torch
    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory(prefix="bench-peers-model-") as model_dir:  # it reads a config by name
        lm.model.config.save_pretrained(model_dir)
        lm.tokenizer.save_pretrained(model_dir)
        bridge = TransformerBridge.boot_transformers(model_dir, hf_model=lm.model, tokenizer=lm.tokenizer,
                                                     device="cpu", dtype=torch.float32)
    names = [f"blocks.{i}.hook_resid_post" for i in range(lm.n_layers)]

    @torch.inference_mode()
    def run() -> np.ndarray:
        def one(idx: list[int]) -> Any:
            enc = fmt.encode([prompts[i] for i in idx], padding_side="right")
            _, cache = bridge.run_with_cache(enc.input_ids, attention_mask=enc.attention_mask, names_filter=names)
            return torch.stack([_last_rows(cache[n], enc.lengths) for n in names], dim=1)

        return _gather(len(prompts), _sorted_batches(prompts), one)

    version = getattr(transformer_lens, "__version__", None) or _dist_version("transformer-lens")
    return run, {"version": version, "api": "TransformerBridge.boot_transformers + run_with_cache"}


def _runner_nnsight(lm: Any, fmt: Any, prompts: list[str]) -> tuple[Runner, dict]:
    import nnsight
    import torch
    from nnsight import LanguageModel

    model = LanguageModel(lm.model, tokenizer=lm.tokenizer)
    layers = model.model.layers

    @torch.inference_mode()
    def run() -> np.ndarray:
        def one(idx: list[int]) -> Any:
            enc = fmt.encode([prompts[i] for i in idx], padding_side="right")
            saved: list = []  # filled inside the trace: nnsight runs its body apart from this frame
            with model.trace({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}):
                saved.extend(layer.output.save() for layer in layers)
            hidden = [s[0] if isinstance(s, tuple) else s for s in saved]
            return torch.stack([_last_rows(h, enc.lengths) for h in hidden], dim=1)

        return _gather(len(prompts), _sorted_batches(prompts), one)

    return run, {"version": getattr(nnsight, "__version__", None) or _dist_version("nnsight"), "api": "LanguageModel.trace"}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _worker(name: str, n_prompts: int, threads: int) -> None:
    """Load, warm up, then answer ``run`` / ``dump PATH`` / ``quit`` lines on stdin with JSON."""
    import torch

    torch.set_num_threads(threads)
    from core.formatting import PRESETS, Formatter
    from core.models import load_model

    t = time.perf_counter()
    lm = load_model("embedded", dtype="float32", device="cpu")
    fmt = Formatter(lm.tokenizer, PRESETS["none"])
    prompts = _prompts(n_prompts)
    if name == "ours":
        run, info = _runner_ours(lm, fmt, prompts)
    elif name in ("floor", "floor_full"):
        run, info = _runner_floor(lm, fmt, prompts, share_prefix=name == "floor")
    elif name == "bare":
        run, info = _runner_bare(lm, fmt, prompts)
    elif name == "transformer_lens":
        run, info = _runner_transformer_lens(lm, fmt, prompts)
    elif name == "nnsight":
        run, info = _runner_nnsight(lm, fmt, prompts)
    else:
        raise ValueError(f"unknown variant {name!r}: use one of {', '.join(VARIANTS)}")
    acts = run()  # warm-up
    info.update(ready=True, setup_s=time.perf_counter() - t, threads=torch.get_num_threads(), shape=list(acts.shape))
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            t, c = time.perf_counter(), time.process_time()
            acts = run()
            print(json.dumps({"s": time.perf_counter() - t, "cpu_s": time.process_time() - c}), flush=True)
        elif cmd == "dump":
            np.save(arg, acts)
            print(json.dumps({"dumped": arg}), flush=True)
        elif cmd == "quit":
            print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
            return


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------
class Worker:
    """One variant's process; ``ask`` sends a line and reads one JSON answer."""

    def __init__(self, name: str, n_prompts: int, threads: int) -> None:
        self.name = name
        python = str(PEERS_PYTHON) if name in PEERS and PEERS_PYTHON.exists() else sys.executable
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [python, "-m", "bench.peers", "--worker", name, "--n-prompts", str(n_prompts), "--threads", str(threads)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        self.info = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        self.proc.wait()
        self.log.seek(0)
        lines = [x for x in self.log.read().strip().splitlines() if x.strip()]
        return {"error": (lines or ["no output"])[-1][:300]}

    def ask(self, line: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        answer = self.ask("quit") if self.proc.poll() is None else {}
        self.proc.wait(timeout=60)
        return answer


def _not_installed(name: str) -> str | None:
    """Why a peer cannot run here, or None."""
    module = {"transformer_lens": "transformer_lens", "nnsight": "nnsight"}.get(name)
    if module is None:
        return None
    python = str(PEERS_PYTHON) if PEERS_PYTHON.exists() else sys.executable
    probe = subprocess.run([python, "-c", f"import importlib.util,sys; sys.exit(importlib.util.find_spec('{module}') is None)"],
                           cwd=REPO, capture_output=True)
    if probe.returncode:
        return f"{module} is not installed (run `make bench-peers`, which installs bench/requirements-peers.txt into .venv-peers)"
    return None


def run(variants: tuple[str, ...] = VARIANTS, rounds: int = 5, n_prompts: int = 80, threads: int | None = None) -> dict:
    """Start every variant's worker, time them in interleaved rounds, compare their outputs."""
    import torch

    threads = threads or torch.get_num_threads()
    result: dict[str, Any] = {"n_prompts": n_prompts, "batch_size": BATCH_SIZE, "dtype": "float32", "threads": threads,
                              "rounds": rounds, "machine": machine(), "load_before": list(os.getloadavg()),
                              "goal": GOAL, "variants": {}}
    workers: dict[str, Worker] = {}
    for name in variants:
        reason = _not_installed(name)
        if reason:
            result["variants"][name] = {"skipped": reason}
            continue
        print(f"[peers] starting {name} …", file=sys.stderr, flush=True)
        w = Worker(name, n_prompts, threads)
        if "error" in w.info:
            result["variants"][name] = {"skipped": f"could not load or run: {w.info['error']}"}
            w.close()
            continue
        workers[name] = w
        result["variants"][name] = dict(w.info)
    names = list(workers)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            answer = workers[name].ask("run")
            times[name].append(answer["s"])
            cpu[name].append(answer["cpu_s"])
        print(f"[peers] round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s ({cpu[n][-1]:.2f} CPU-s)" for n in names),
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dumps = {}
        for name in names:
            path = str(Path(tmp) / f"{name}.npy")
            workers[name].ask(f"dump {path}")
            dumps[name] = np.load(path)
        ref = dumps.get("ours")
        for name in names:
            v = result["variants"][name]
            v.update(workers[name].close())
            v["median_s"] = statistics.median(times[name])
            v["median_cpu_s"] = statistics.median(cpu[name])
            v["times_s"] = times[name]
            if ref is not None and name != "ours":
                a, b = dumps[name], ref
                if v.get("last_layer_is_normed"):  # hidden_states ends with the final norm's output
                    a, b = a[:, :-1], b[:, :-1]
                v["max_abs_diff_vs_ours"] = float(np.abs(a - b).max())
                v["max_rel_diff_vs_ours"] = float(np.abs(a - b).max() / max(1e-12, float(np.abs(b).max())))
    result["load_after"] = list(os.getloadavg())
    for floor in ("floor", "bare"):
        if floor in workers:
            for name in names:
                v = result["variants"][name]
                # paired: each round's time over the floor's time in the same round, then the median
                v[f"ratio_to_{floor}"] = statistics.median(a / b for a, b in zip(times[name], times[floor]))
                v[f"cpu_ratio_to_{floor}"] = statistics.median(a / b for a, b in zip(cpu[name], cpu[floor]))
    result["verdict"] = _verdict(result)
    return result


def _verdict(result: dict) -> str:
    v = result["variants"]
    if "median_s" not in v.get("ours", {}) or "median_s" not in v.get("floor", {}):
        return "not measured (ours or the floor did not run)"
    # one thread per worker: CPU seconds are the work itself, free of a busy machine's scheduling
    # noise (on a quiet machine they equal the wall time); with more threads they include spinning
    key, unit = ("cpu_ratio_to_floor", " in CPU seconds") if result["threads"] == 1 else ("ratio_to_floor", "")
    ratio = v["ours"][key]
    problems = [] if ratio <= 1.02 else [f"ours is {ratio:.3f} × the honest floor{unit}"]
    for peer in PEERS:
        if "median_s" not in v.get(peer, {}):
            problems.append(f"{peer} not measured ({v.get(peer, {}).get('skipped', 'not run')})")
        elif v[peer][key] <= ratio:
            problems.append(f"{peer} is faster")
    return "met" if not problems else "missed: " + "; ".join(problems)


def table(result: dict) -> str:
    rows = ["| variant | median s (CPU-s) | × bare | × honest floor (CPU) | max abs diff vs ours | peak RSS MB |",
            "|---|---|---|---|---|---|"]
    nan = float("nan")
    for name, v in result["variants"].items():
        if "median_s" not in v:
            rows.append(f"| {name} | {v.get('skipped', 'not run')} | | | | |")
            continue
        diff = v.get("max_abs_diff_vs_ours")
        rows.append(f"| {name} | {v['median_s']:.2f} ({v['median_cpu_s']:.2f}) | {v.get('ratio_to_bare', nan):.2f} | "
                    f"{v.get('ratio_to_floor', nan):.3f} ({v.get('cpu_ratio_to_floor', nan):.3f}) | "
                    f"{'—' if diff is None else f'{diff:.1e}'} | {v.get('peak_rss_mb', 0):.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--n-prompts", type=int, default=80, help="built-in prompts, half harmful (default 80)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every worker (default: torch's)")
    parser.add_argument("--out", help="also merge the figures into this results.json under 'peers'")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line (for bench.run)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.n_prompts, args.threads or 1)
        return 0
    variants = tuple(args.only.split(",")) if args.only else VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--only: unknown variant(s) {', '.join(unknown)}; use some of {', '.join(VARIANTS)}")
    result = run(variants, rounds=args.rounds, n_prompts=args.n_prompts, threads=args.threads or None)
    if args.out:
        path = Path(args.out)
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged["peers"] = result
        path.write_text(json.dumps(merged, indent=2))
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
        print(f"\n{result['verdict']} (load {result['load_before'][0]:.1f} → {result['load_after'][0]:.1f}, "
              f"{result['threads']} threads, {result['n_prompts']} prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
