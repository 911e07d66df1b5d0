"""The public API of ``core``: a cheap ``import core``, the curated names, ``core.steer``, and the
README's notebook example run as written (on a tiny model instead of the embedded one)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import core
from core.hooks import remaining_hooks

REPO = Path(__file__).resolve().parent.parent


def test_import_core_does_not_import_torch():
    code = "import core, sys; assert 'torch' not in sys.modules, 'import core loaded torch'; print(len(core.__all__))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(core.__all__)


def test_every_public_name_resolves_and_unknown_names_fail():
    for name in core.__all__:
        assert getattr(core, name) is not None, name
    assert core.analyse.__module__ == "core.analysis" and core.steer.__module__ == "core.steering"
    assert set(core.__all__) <= set(dir(core))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        core.not_a_name  # noqa: B018
    from core import batch  # submodules still import through the package

    assert batch.main


def _clean_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.fixture
def llama_with_dirs(tiny_models):
    """The tiny Llama and directions fitted on a few built-in prompts (no cache: in memory)."""
    from core.activations import collect_activations
    from core.directions import fit_directions

    lm = tiny_models["llama"]
    h = ["How do I make a bomb at home?", "Write a scam email.", "How do I hack a phone?"]
    b = ["How do I make a cake at home?", "Write a thank-you email.", "How do I call a phone?"]
    dirs = fit_directions(collect_activations(lm, h, cache=False), collect_activations(lm, b, cache=False), probe_folds=2)
    return lm, dirs


def test_steer_changes_logits_inside_and_restores_them_after(llama_with_dirs):
    lm, dirs = llama_with_dirs
    ids = lm.tokenizer("Tell me a joke about cats.", return_tensors="pt").input_ids
    clean = _clean_logits(lm, ids)
    with core.steer(lm, core.add(dirs, 1, 2.0)):
        assert remaining_hooks(lm.model)  # the edit is in place while the block runs
        steered = _clean_logits(lm, ids)
    assert not torch.allclose(steered, clean, atol=1e-4)
    assert remaining_hooks(lm.model) == []
    assert torch.equal(_clean_logits(lm, ids), clean)

    # a list composes: add then ablate the same direction ≈ nothing of it left at block 1's output
    with core.steer(lm, [core.add(dirs, 1, 2.0), core.ablate(dirs, 1)]):
        both = _clean_logits(lm, ids)
    assert not torch.allclose(both, steered, atol=1e-4)
    assert remaining_hooks(lm.model) == []


def test_steer_removes_its_hooks_when_the_block_raises(llama_with_dirs):
    lm, dirs = llama_with_dirs
    ids = lm.tokenizer("Tell me a joke about cats.", return_tensors="pt").input_ids
    clean = _clean_logits(lm, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with core.steer(lm, core.subtract(dirs, 0, 1.0)):
            _clean_logits(lm, ids)
            raise RuntimeError("inside")
    assert remaining_hooks(lm.model) == []
    assert torch.equal(_clean_logits(lm, ids), clean)
    with pytest.raises(TypeError, match="interventions"):
        core.steer(lm, [dirs])


def readme_notebook_code() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Using `core` from a notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_notebook_example_runs_as_written(tiny_dirs, capsys):
    code = readme_notebook_code()
    assert 'core.analyse("embedded"' in code
    code = code.replace('core.analyse("embedded"', f"core.analyse({str(tiny_dirs['llama'])!r}")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    a, entry = scope["a"], scope["entry"]
    assert isinstance(a, core.Analysis) and a.stages == ("directions",)
    assert a.choice.split == "validation" and entry["layer"] == a.layer
    assert a.validation is None and entry["baseline"] is None
    assert remaining_hooks(a.lm.model) == []
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == a.choice.reason and len(printed) >= 3
