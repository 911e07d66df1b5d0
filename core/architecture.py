"""What the rest of ``core`` needs to know about a loaded causal LM: :class:`LoadedModel`.

The residual-stream blocks are found generically (known attribute paths, then the longest list
of identical layers), with each block's attention, MLP and attention-output projection, so hooks
work on any decoder; the *fingerprint* (:mod:`core.fingerprints`) keys every cache entry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core import packed_linear
from core.errors import LayerRangeError, ModelLoadError
from core.fingerprints import fingerprint_state
from core.hooks import get_module, model_lock

# Attribute paths (relative to the *ForCausalLM model) of the list of transformer blocks.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom, GPT-Neo
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "transformer.layers",
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, ...)
)
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ATTN_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


@dataclass
class LoadedModel:
    """A causal LM in eval mode plus what hooks need to know about its structure."""

    model: nn.Module
    tokenizer: Any
    source: str
    name: str
    block_names: list[str]
    attn_names: list[str | None]
    mlp_names: list[str | None]
    attn_out_names: list[str | None]
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    fingerprint: str
    dtype: torch.dtype
    device: torch.device
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    max_positions: int | None = None  # context length (prompt + generated tokens); None if unknown

    @property
    def lock(self) -> threading.RLock:
        """The model's lock (shared with every hook trace on it)."""
        return model_lock(self.model)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def blocks(self) -> list[nn.Module]:
        return [get_module(self.model, n) for n in self.block_names]

    def module(self, name: str) -> nn.Module:
        return get_module(self.model, name)

    def check_layer(self, layer: int) -> int:
        """``layer`` as a non-negative index, or a clear error if it is out of range."""
        if not isinstance(layer, (int,)) or isinstance(layer, bool):
            raise ValueError(f"layer must be an integer, got {layer!r}")
        index = layer + self.n_layers if layer < 0 else layer
        if not 0 <= index < self.n_layers:
            raise LayerRangeError(
                f"layer {layer} is out of range: {self.name} has {self.n_layers} layers (0–{self.n_layers - 1})"
            )
        return index

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "chat_template": self.has_chat_template,
            "max_positions": self.max_positions,
        }


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the residual-stream blocks, in order: known paths first, then a fallback that
    takes the longest ``ModuleList`` whose children all share one class."""
    for path in BLOCK_PATHS:
        blocks = _get_attr_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return [f"{path}.{i}" for i in range(len(blocks))]
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and (best is None or len(module) > best[0]):
                best = (len(module), name)
    if best is None:
        raise ModelLoadError(
            f"Could not find the transformer blocks of {type(model).__name__}: "
            "no known attribute path and no list of identical layers."
        )
    return [f"{best[1]}.{i}" for i in range(best[0])]


def _child_name(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for cand in candidates:
        if isinstance(getattr(module, cand, None), nn.Module):
            return cand
    return None


def find_components(model: nn.Module, block_names: list[str]):
    """(attention, MLP, attention-output-projection) module names per block (None if absent)."""
    attn, mlp, attn_out = [], [], []
    for block_name in block_names:
        block = get_module(model, block_name)
        a = _child_name(block, ATTN_NAMES)
        m = _child_name(block, MLP_NAMES)
        attn.append(f"{block_name}.{a}" if a else None)
        mlp.append(f"{block_name}.{m}" if m else None)
        o = _child_name(getattr(block, a), ATTN_OUT_NAMES) if a else None
        attn_out.append(f"{block_name}.{a}.{o}" if o else None)
    return attn, mlp, attn_out


def _config_int(config: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        return _config_int(text, *names)
    return None


SANE_MAX_POSITIONS = 10_000_000  # tokenizers without a limit report ~1e30


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The model's maximum sequence length: from its config (max_position_embeddings,
    n_positions, ...) when known, else the tokenizer's ``model_max_length`` if that is a real
    number, else None (no limit is enforced)."""
    value = _config_int(config, "max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
    if value is not None and 0 < value < SANE_MAX_POSITIONS:
        return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < SANE_MAX_POSITIONS:
        return value
    return None


def describe(
    model: nn.Module, tokenizer: Any, source: str, name: str, fingerprint: str, dtype: torch.dtype, notes: list[str]
) -> LoadedModel:
    """Wrap a loaded model and its tokenizer with the structure hooks need. Its plain linear
    layers become :class:`~core.packed_linear.PackedLinear` (the same products from a packed copy
    of each weight, faster on a few dozen rows; see that module)."""
    packed_linear.install(model)
    block_names = find_blocks(model)
    attn, mlp, attn_out = find_components(model, block_names)
    config = model.config
    d_model = _config_int(config, "hidden_size", "n_embd", "d_model")
    if d_model is None:
        d_model = int(model.get_input_embeddings().weight.shape[1])
    n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads") or 1
    head_dim = _config_int(config, "head_dim") or d_model // n_heads
    if not getattr(tokenizer, "chat_template", None):
        notes.append("The tokenizer has no chat template: prompts use the base-model template.")
    max_positions = context_length(config, tokenizer)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        name=name,
        block_names=block_names,
        attn_names=attn,
        mlp_names=mlp,
        attn_out_names=attn_out,
        n_layers=len(block_names),
        d_model=int(d_model),
        n_heads=int(n_heads),
        head_dim=int(head_dim),
        fingerprint=fingerprint,
        dtype=dtype,
        device=next(model.parameters()).device,
        notes=notes,
        max_positions=max_positions,
    )


def wrap_model(model: nn.Module, tokenizer: Any, *, name: str = "in-memory model", source: str = "memory") -> LoadedModel:
    """Wrap a model already in memory (e.g. built in a notebook); fingerprinted from its weights."""
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    dtype = next(model.parameters()).dtype
    return describe(model, tokenizer, source, name, fingerprint_state(model), dtype, [])
