"""The arithmetic-floor counter of ``bench/floors.py``: it must count exactly the linear layers'
operations of a forward pass, the backward pass where one runs, nothing for blocks that do not
run, and attribute each call to its stage; otherwise the floors it reports mean nothing."""

from __future__ import annotations

import torch
from torch import nn

from bench.floors import LinearFlops, gemm_peak


def _linear_flops(model: nn.Module, tokens: int) -> float:
    return sum(2.0 * tokens * m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def test_counts_every_linear_call_of_a_real_forward(tiny_models):
    lm = tiny_models["llama"]  # loaded through the app's loader: its linear layers are PackedLinear
    ids = torch.randint(0, 50, (3, 7))
    with LinearFlops() as count, torch.inference_mode():
        lm.model(input_ids=ids)
    assert count.total == _linear_flops(lm.model, 3 * 7) > 0
    with LinearFlops() as last, torch.inference_mode():  # the unembedding on one position per row only
        lm.model(input_ids=ids, logits_to_keep=1)
    head = lm.model.get_output_embeddings()
    assert last.total == count.total - 2.0 * 3 * 6 * head.in_features * head.out_features


def test_backward_counts_the_gradients_that_are_needed():
    torch.manual_seed(0)
    frozen, trained = nn.Linear(8, 16), nn.Linear(16, 4)
    frozen.requires_grad_(False)
    x = torch.randn(5, 8)
    with LinearFlops() as count:
        trained(frozen(x)).sum().backward()
    # frozen, input without grad: forward only; trained: forward + weight gradient (its input needs none)
    assert count.total == 2 * 5 * 8 * 16 + 2 * (2 * 5 * 16 * 4)
    with LinearFlops() as both:
        trained(frozen(x).requires_grad_()).sum()
    assert both.total == 2 * 5 * 8 * 16 + 3 * (2 * 5 * 16 * 4)


def test_stages_and_removal():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.no_grad(), LinearFlops() as count:
        layer(x)
        with count.during("a"):
            layer(x)
            with count.during("b"):
                layer(x)
        layer(x)
    layer(x)  # after the block: no longer counted
    assert dict(count.by_stage) == {"other": 128.0, "a": 64.0, "b": 64.0}  # 2 rows x 4 x 4 x 2 a call


def test_the_peak_is_the_best_of_its_shapes(monkeypatch):
    import bench.floors as floors

    monkeypatch.setattr(floors, "PEAK_SHAPES", ((8, 16, 32), (16, 16, 16)))
    peak = gemm_peak(repeats=2)
    assert set(peak["by_shape"]) == {f"{s} {k}" for s in ("8x16x32", "16x16x16") for k in ("linear", "packed")}
    assert abs(peak["gflops"] - max(peak["by_shape"].values())) < 0.1  # by_shape is rounded
