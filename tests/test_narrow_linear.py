"""The transposed product for linear layers on a few rows: same numbers, same layout, same
hooks, and the library's own kernel wherever numbers must stay bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from core import narrow_linear
from core.hooks import TraceDict
from core.narrow_linear import ROWS, NarrowLinear, exact_linear


def _layer(bias: bool = True, seed: int = 0) -> NarrowLinear:
    torch.manual_seed(seed)
    layer = nn.Linear(48, 80, bias=bias)
    assert narrow_linear.install(layer) == 1
    return layer


@pytest.mark.parametrize("rows", [1, ROWS.start, 16, ROWS.stop - 1, ROWS.stop, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_the_product_matches_f_linear_in_value_and_layout(rows, bias):
    layer = _layer(bias)
    x = torch.randn(2, rows, 48)[:1]  # a leading batch dim, and a view
    with torch.inference_mode():
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape == (1, rows, 80)
    assert got.is_contiguous(), "attention kernels and view() downstream need F.linear's row-major layout"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_narrow_path_runs_inside_its_rows_and_nowhere_else():
    """It must really run where it claims to (else the speed-up is imaginary), and nowhere else."""
    layer = _layer()
    for rows, narrow in ((ROWS.start - 1, False), (ROWS.start, True), (ROWS.stop - 1, True), (ROWS.stop, False)):
        with torch.inference_mode(), _Calls() as calls:
            layer(torch.randn(rows, 48))
        assert ("linear" not in calls.names) == narrow, (rows, calls.names)
    with torch.inference_mode(), exact_linear(), _Calls() as calls:
        layer(torch.randn(ROWS.start, 48))
    assert "linear" in calls.names


def test_exact_linear_and_autograd_keep_the_library_kernel_bit_for_bit():
    layer = _layer()
    x = torch.randn(16, 48)
    want = F.linear(x, layer.weight, layer.bias)
    with torch.inference_mode(), exact_linear():
        assert torch.equal(layer(x), want)
    with torch.inference_mode():
        narrow = layer(x)
    layer.weight.requires_grad_(True)
    trained = layer(x)
    assert torch.equal(trained, F.linear(x, layer.weight, layer.bias))
    trained.sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(narrow, want, rtol=1e-5, atol=1e-5)


def test_install_keeps_state_dict_hooks_and_copies(tiny_models):
    lm = tiny_models["llama"]
    kinds = {type(m) for m in lm.model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {NarrowLinear}, "the loader installs the narrow product on every plain linear layer"
    twin = copy.deepcopy(lm.model)
    assert all(type(m) is NarrowLinear for m in twin.modules() if isinstance(m, nn.Linear))
    assert lm.model.state_dict().keys() == twin.state_dict().keys()
    ids = torch.randint(3, 100, (16, 1))
    name = lm.block_names[1] + ".mlp.down_proj"
    with torch.inference_mode(), TraceDict(lm.model, [name]) as trace:
        lm.model(input_ids=ids)
    assert trace[name].output.shape[-1] == lm.d_model


def test_a_subclass_of_linear_keeps_its_own_forward():
    class Adapter(nn.Linear):
        pass

    model = nn.Sequential(Adapter(4, 4), nn.Linear(4, 4))
    assert narrow_linear.install(model) == 1
    assert type(model[0]) is Adapter and type(model[1]) is NarrowLinear


def test_a_batch_of_sixteen_gives_the_same_next_tokens(embedded):
    """On the real model, a batch inside the narrow rows gives the library kernel's next tokens
    (logits equal to float rounding)."""
    ids = torch.randint(200, 20_000, (16, 3), generator=torch.Generator().manual_seed(0))  # 48 rows a layer

    def run():
        with torch.inference_mode():
            return embedded.model(input_ids=ids, logits_to_keep=1).logits[:, -1]

    fast = run()
    with exact_linear():
        exact = run()
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))
