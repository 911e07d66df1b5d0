"""The whole analysis on a CUDA GPU gives the CPU's results (tiny models of every architecture).

Skipped where no CUDA device is present (CI has none); run ``pytest tests/test_cuda.py`` on a
machine with one. Why: every tensor that leaves the model for numpy or for the report must be
brought to the host; a GPU run once failed in the patching stage on exactly that.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from core.analysis import analyse
from core.config import PatchingConfig
from core.models import load_model
from core.packed_linear import PackedLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "gptj"])
def test_analyse_on_the_gpu_equals_the_cpu(arch, tiny_dirs, tiny_models):
    from test_analysis import prompts, small

    gpu = load_model(str(tiny_dirs[arch]), dtype="float32", device="cuda")
    assert gpu.device.type == "cuda"
    layer = next(m for m in gpu.model.modules() if isinstance(m, PackedLinear))
    x = torch.randn(20, layer.in_features, device="cuda")  # inside the packed rows: F.linear on a GPU
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    settings = small(patching=PatchingConfig(n_pairs=1, sites=("resid",), pair_filter="none"), name=arch)
    on_gpu, on_cpu = analyse(gpu, prompts(), settings).to_dict(), analyse(tiny_models[arch], prompts(), settings).to_dict()
    json.dumps(on_gpu)  # the results serialise: nothing left on the device
    assert (on_gpu["layer"], on_gpu["position"]) == (on_cpu["layer"], on_cpu["position"])
    assert [g["generation"] for g in on_gpu["generations"]] == [g["generation"] for g in on_cpu["generations"]]
    assert on_gpu["patching"] is not None
    assert on_gpu["force_refusal"]["kl"] == pytest.approx(on_cpu["force_refusal"]["kl"], rel=1e-3)
