"""Which device and number type a model is loaded in (``"auto"`` resolved for this machine)."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_fast_bf16() -> bool:
    """True if the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo.

    Elsewhere bf16 matmuls are emulated and slower than fp32, so ``auto`` keeps float32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on GPUs that support it (else float16); on the CPU bfloat16 where the
    CPU has native bf16 units, else float32.

    Why bf16 on such CPUs (``make bench``, 2-core CPU with AVX-512 BF16): prefill 3.2× and decode
    1.6× faster than fp32, while per-layer directions keep cosine ≥ 0.988 with the fp32 ones,
    held-out separation moves ≤ 0.04σ, probe accuracy ≤ 2.4 points, and refusal rates on 32 + 32
    test prompts were identical. Activations and every statistic are accumulated in float32;
    pass ``dtype="float32"`` for bit-level reproducibility across machines."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
