"""Load a model folder or hub id into a :class:`~core.architecture.LoadedModel`.

This is the loader below the named sources (:mod:`core.sources` turns ``"embedded"``,
``"gemma-3-270m"`` … into a folder): it knows folders and hub ids only.

Why a tokenizer fast path: ``AutoTokenizer`` on a folder whose ``tokenizer_config.json`` names
the generic fast class still parses ``tokenizer.json`` again in Python (for the added tokens)
and deep-copies every added token, on top of the Rust parse that builds the tokenizer; for
Gemma's 262k-token vocabulary that was seconds per load. Such a folder (nothing else that
``AutoTokenizer`` would read: no legacy special-token files, no extra special tokens, no
remote code) is built straight from ``tokenizer.json`` with the same class and settings; any
other folder goes through ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.architecture import LoadedModel, describe
from core.errors import ModelLoadError
from core.fingerprints import fingerprint_folder, fingerprint_state
from core.progress import Progress

FAST_TOKENIZER_CLASS = "TokenizersBackend"
_FAST_CLASSES = frozenset({FAST_TOKENIZER_CLASS, "PreTrainedTokenizerFast"})
# files and settings AutoTokenizer would read or act on beyond tokenizer.json: their presence
# sends a folder the long way
_OTHER_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.json",
                          "additional_chat_templates", "tokenizer.model", "vocab.json", "merges.txt")
_PLAIN_TOKEN_KEYS = frozenset({"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                               "mask_token"})


def short_message(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (for error messages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_folder(
    where: str | Path,
    *,
    source: str,
    display: str,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    is_hub: bool = False,
    notes: list[str] | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load the model in folder ``where`` (or hub id, with ``is_hub``) as a :class:`LoadedModel`
    named ``display`` that remembers ``source`` (what the user asked for)."""
    if progress:
        progress(0.8, f"Loading {display}…")
    model, tokenizer = _from_pretrained(where, dtype, device, trust_remote_code, is_hub)
    fingerprint = _hub_fingerprint(str(where), model) if is_hub else fingerprint_folder(Path(where), model.config)
    return describe(model, tokenizer, source, display, fingerprint, dtype, list(notes or []))


def load_tokenizer(where: str | Path, **kwargs: Any) -> Any:
    """The tokenizer in folder ``where``: straight from ``tokenizer.json`` when the folder holds
    only the generic fast class (see the module docstring), else through ``AutoTokenizer``."""
    fast = _fast_tokenizer_settings(where) if not kwargs.get("trust_remote_code") else None
    if fast is not None:
        from transformers import PreTrainedTokenizerFast  # the generic fast class (TokenizersBackend)

        return PreTrainedTokenizerFast(tokenizer_file=str(Path(where) / "tokenizer.json"), **fast)
    return _auto_tokenizer(where, **kwargs)


def _auto_tokenizer(where: str | Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(where, **kwargs)


def _fast_tokenizer_settings(where: str | Path) -> dict[str, Any] | None:
    """The keyword arguments ``AutoTokenizer`` would pass the generic fast class for this folder,
    or None when the folder needs ``AutoTokenizer`` itself."""
    folder = Path(where)
    config_file = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not config_file.is_file():
        return None
    if any((folder / name).exists() for name in _OTHER_TOKENIZER_FILES):
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("tokenizer_class") not in _FAST_CLASSES:
        return None
    special = [k for k in config if k.endswith("_token") or k.endswith("_tokens") or k == "added_tokens_decoder"]
    if "auto_map" in config or "init_inputs" in config or any(k not in _PLAIN_TOKEN_KEYS for k in special):
        return None
    if any(not isinstance(config[k], (str, type(None))) for k in special):
        return None
    settings = {k: v for k, v in config.items() if k not in ("tokenizer_class", "add_bos_token", "add_eos_token")}
    template = folder / "chat_template.jinja"
    if template.is_file():
        settings["chat_template"] = template.read_text(encoding="utf-8")
    settings.update(name_or_path=str(where), is_local=True, local_files_only=False)
    return settings


def _from_pretrained(where: str | Path, dtype: torch.dtype, device: torch.device, trust: bool, is_hub: bool):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust}
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        model_kwargs["device_map"] = "auto"  # accelerate spreads layers over the GPUs
    try:
        if is_hub:
            kwargs["local_files_only"] = _hub_cached(str(where)) or not _hub_reachable()
        tokenizer = load_tokenizer(where, **kwargs) if not is_hub else _auto_tokenizer(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **model_kwargs)
    except Exception as exc:
        if is_hub:
            raise ModelLoadError(
                f"Could not load '{where}' from the Hugging Face hub ({short_message(exc, 160)}). "
                "This machine may have no network access to the hub. Use 'embedded' (offline), a local "
                "folder with config.json, or a .gguf path; on a machine that reaches the hub the id works "
                "and is cached, after which HF_HUB_OFFLINE=1 loads it offline."
            ) from exc
        raise ModelLoadError(f"Could not load the model in {where}: {short_message(exc)}") from exc
    if "device_map" not in model_kwargs:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def _hub_cached(hub_id: str) -> bool:
    """True if the hub's local cache already holds this model (then no network is needed)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(hub_id, local_files_only=True)
        return True
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so offline machines fail in seconds, not minutes."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except Exception:
        return False


def _hub_fingerprint(hub_id: str, model: nn.Module) -> str:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(hub_id, local_files_only=True))
        return fingerprint_folder(folder, model.config)
    except Exception:
        return fingerprint_state(model)

