"""Linear layers through a packed copy of the weight: the same numbers (to float32 rounding) in
the same layout, the packed path really taken where it claims to be and nowhere else, never a
stale copy after the weight changes, and the library's own kernel wherever bits must stay."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from core import packed_linear
from core.hooks import TraceDict
from core.packed_linear import PACK_ROWS, ROWS, PackedLinear, available, exact_linear

pytestmark = pytest.mark.skipif(not available(), reason="torch without MKL's packed linear: everything runs F.linear")


def _layer(bias: bool = True, seed: int = 0, shape: tuple[int, int] = (48, 80)) -> PackedLinear:
    torch.manual_seed(seed)
    layer = nn.Linear(*shape, bias=bias)
    assert packed_linear.install(layer) == 1
    return layer.eval()


@pytest.mark.parametrize("rows", [1, ROWS.start - 1, ROWS.start, 16, PACK_ROWS, ROWS.stop - 1, ROWS.stop])
@pytest.mark.parametrize("bias", [True, False])
def test_the_product_matches_f_linear_in_value_and_layout(rows, bias):
    layer = _layer(bias, shape=(576, 1536))
    x = torch.randn(2, rows, 576)[:1]  # a leading batch dim, and a view
    with torch.inference_mode():
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape == (1, rows, 1536)
    assert got.is_contiguous(), "attention kernels and view() downstream need F.linear's row-major layout"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [4, 7, 16, 33, PACK_ROWS, 96, 187, 464])
def test_one_packed_copy_serves_every_row_count(rows):
    """MKL's packed layout does not depend on the row count it was packed for: the op itself,
    beyond the rows the layer uses it for, against F.linear."""
    w, b, x = torch.randn(1536, 576), torch.randn(1536), torch.randn(rows, 576)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS)
    torch.testing.assert_close(torch.ops.mkl._mkl_linear(x, packed, w, b, rows), F.linear(x, w, b),
                               rtol=1e-5, atol=1e-4)


class _Calls(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _took_f_linear(layer: nn.Module, x: torch.Tensor) -> bool:
    with _Calls() as calls:
        layer(x)
    return "linear" in calls.names


def test_the_packed_path_runs_inside_its_rows_and_nowhere_else():
    """It must really run where it claims to (else the speed-up is imaginary), and nowhere else."""
    layer = _layer()
    with torch.inference_mode():
        for rows, packed in ((ROWS.start - 1, False), (ROWS.start, True), (ROWS.stop - 1, True), (ROWS.stop, False)):
            assert _took_f_linear(layer, torch.randn(rows, 48)) != packed, rows
        with exact_linear():
            assert _took_f_linear(layer, torch.randn(16, 48))
    layer.train()
    with torch.no_grad():
        assert _took_f_linear(layer, torch.randn(16, 48)), "train mode always runs F.linear"


def test_exact_linear_and_autograd_keep_the_library_kernel_bit_for_bit():
    layer = _layer()
    x = torch.randn(16, 48)
    want = F.linear(x, layer.weight, layer.bias)
    with torch.inference_mode(), exact_linear():
        assert torch.equal(layer(x), want)
    with torch.inference_mode():
        packed = layer(x)
    layer.weight.requires_grad_(True)
    trained = layer(x)
    assert torch.equal(trained, F.linear(x, layer.weight, layer.bias))
    trained.sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-5)


def test_no_stale_copy_after_the_weight_changes():
    """An in-place write, an optimizer step (which need not bump the version: the train/eval
    switch drops the copy), a new storage: each is seen at the next call."""
    layer = _layer()
    x = torch.randn(16, 48)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)

    check()
    with torch.no_grad():
        layer.weight.mul_(-2)
    check()
    layer.train()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    for _ in range(3):
        layer(x).square().sum().backward()
        opt.step()
    layer.eval()
    check()
    layer.load_state_dict({k: v * 3 for k, v in layer.state_dict().items()})
    check()
    layer.float().to("cpu")
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.copy_(torch.randn_like(twin.weight))
        torch.testing.assert_close(twin(x), F.linear(x, twin.weight, twin.bias), rtol=1e-5, atol=1e-5)
    check()


def test_install_keeps_state_dict_hooks_and_copies(tiny_models):
    lm = tiny_models["llama"]
    kinds = {type(m) for m in lm.model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {PackedLinear}, "the loader installs the packed path on every plain linear layer"
    twin = copy.deepcopy(lm.model)
    assert all(type(m) is PackedLinear for m in twin.modules() if isinstance(m, nn.Linear))
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
    assert packed_linear.install(model) == 1
    assert type(model[0]) is Adapter and type(model[1]) is PackedLinear


def test_a_batch_of_sixteen_gives_the_same_next_tokens(embedded):
    """On the real model, a batch inside the packed rows gives the library kernel's next tokens
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
