"""Our own small baukit-style hook layer: the only module that touches PyTorch hooks.

Why our own: baukit is not on PyPI. The concepts are the same: a context manager that,
while active, *retains* and/or *edits* the output (or input) of named submodules, and can
*stop* the forward pass early once everything of interest has run (saving the unembedding).

Two facts of transformers 5 shape the code:

* Llama, GPT-2 and GPT-NeoX blocks return a tensor; GPT-J, Falcon and Bloom blocks return a
  tuple whose first element is the hidden state. Attention modules return tuples. Edits and
  retained values always concern the hidden state (the first tensor); the rest of a tuple is
  passed through untouched.
* Llama calls ``self_attn`` (and others call submodules) with keyword arguments, so input
  hooks are registered ``with_kwargs=True``.

Every hook is removed on exit, also when the forward raises. Each model has one re-entrant
lock; a trace holds it for its whole lifetime, so two callers (two app sessions) never see
each other's edits.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = [
    "EditFn",
    "StopForward",
    "Trace",
    "TraceDict",
    "get_hidden",
    "replace_hidden",
    "get_module",
    "model_lock",
]

EditFn = Callable[[torch.Tensor, str], torch.Tensor]
"""``edit(hidden, module_name) -> new hidden``; may modify in place and return its argument."""

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The per-model re-entrant lock every trace on ``model`` holds while it is active."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = threading.RLock()
            _LOCKS[model] = lock
        return lock


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once all traced modules have run."""


def get_hidden(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output or input: the value or its first element."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a hidden-state tensor in a {type(value).__name__}")


def replace_hidden(value: Any, hidden: torch.Tensor) -> Any:
    """``value`` with its hidden-state tensor replaced, keeping the container type."""
    if isinstance(value, torch.Tensor):
        return hidden
    if isinstance(value, tuple):
        return (hidden, *value[1:])
    if isinstance(value, list):
        return [hidden, *value[1:]]
    raise TypeError(f"cannot replace the hidden state in a {type(value).__name__}")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (as in ``named_modules``), with a clear error if absent."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise KeyError(f"model has no module named {name!r}") from None


class Trace:
    """Retain and/or edit one named module's output (or input) while the context is active.

    >>> with Trace(model, "model.layers.3", edit_output=lambda h, name: h * 0) as tr:
    ...     model(**batch)
    >>> tr.output  # the (edited) hidden state of block 3

    ``retain_output`` / ``retain_input`` keep the hidden-state tensor (detached; ``clone=True``
    copies it so later in-place edits cannot change it). ``edit_output(hidden, name)`` and
    ``edit_input(hidden, name)`` return the new hidden state. ``stop=True`` ends the forward
    pass right after this module has run; the exception is swallowed on exit.
    If the module runs several times in one context (generation), the last value is kept.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = True,
        edit_output: EditFn | None = None,
        edit_input: EditFn | None = None,
        stop: bool = False,
        on_fire: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.layer = layer
        self.module = get_module(model, layer)
        self.retain_output = retain_output
        self.retain_input = retain_input
        self.clone = clone
        self.detach = detach
        self.edit_output = edit_output
        self.edit_input = edit_input
        self.stop = stop
        self._on_fire = on_fire
        self.output: torch.Tensor | None = None
        self.input: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._lock = model_lock(model)
        self._locked = False

    # -- hook bodies -------------------------------------------------------------------
    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if self.detach:
            t = t.detach()
        return t.clone() if self.clone else t

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            hidden = get_hidden(args)
        else:  # keyword call, e.g. Llama's self_attn(hidden_states=...)
            key = "hidden_states" if "hidden_states" in kwargs else next(
                (k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None
            )
            if key is None:
                raise TypeError(f"{self.layer}: no tensor input to trace")
            hidden = kwargs[key]
        if self.edit_input is not None:
            new = self.edit_input(hidden, self.layer)
            if args:
                args = replace_hidden(tuple(args), new)
            else:
                kwargs = {**kwargs, key: new}
            hidden = new
        if self.retain_input:
            self.input = self._keep(hidden)
        if self.edit_input is not None:
            return args, kwargs
        return None

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        result = None
        if self.edit_output is not None:
            hidden = self.edit_output(get_hidden(output), self.layer)
            result = output = replace_hidden(output, hidden)
        if self.retain_output:
            self.output = self._keep(get_hidden(output))
        if self._on_fire is not None:
            self._on_fire(self.layer)
        if self.stop:
            raise StopForward(self.layer)
        return result

    # -- context management ------------------------------------------------------------
    def __enter__(self) -> "Trace":
        self._lock.acquire()
        self._locked = True
        try:
            if self.retain_input or self.edit_input is not None:
                self._handles.append(
                    self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
            self._handles.append(self.module.register_forward_hook(self._hook))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._locked:
            self._locked = False
            self._lock.release()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict):
    """Trace several named modules at once; ``td[name]`` is that module's :class:`Trace`.

    >>> with TraceDict(model, block_names, stop=True) as td:
    ...     model(**batch)           # stops after the last traced module has run
    >>> acts = [td[n].output for n in block_names]

    ``edit_output`` (and ``edit_input``) may be one function for all modules or a dict from
    module name to function (modules missing from the dict are only retained). With
    ``stop=True`` the forward pass ends once *every* traced module has run at least once,
    whatever their order in the model.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str],
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = True,
        edit_output: EditFn | dict[str, EditFn] | None = None,
        edit_input: EditFn | dict[str, EditFn] | None = None,
        stop: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self._lock = model_lock(model)
        self._pending: set[str] = set()
        self._stop = stop
        names = list(dict.fromkeys(layers))
        for name in names:
            self[name] = Trace(
                model,
                name,
                retain_output=retain_output,
                retain_input=retain_input,
                clone=clone,
                detach=detach,
                edit_output=_pick(edit_output, name),
                edit_input=_pick(edit_input, name),
                on_fire=self._fired if stop else None,
            )

    def _fired(self, name: str) -> None:
        self._pending.discard(name)
        if self._stop and not self._pending:
            raise StopForward(name)

    def __enter__(self) -> "TraceDict":
        self._lock.acquire()
        self._pending = set(self.keys())
        entered: list[Trace] = []
        try:
            for trace in self.values():
                trace.__enter__()
                entered.append(trace)
        except BaseException:
            for trace in entered:
                trace.close()
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for trace in self.values():
            trace.close()
        self._lock.release()
        return exc_type is not None and issubclass(exc_type, StopForward)


def _pick(edit: EditFn | dict[str, EditFn] | None, name: str) -> EditFn | None:
    if edit is None or callable(edit):
        return edit
    return edit.get(name)


def _is_transformers_capture_hook(fn: Any) -> bool:
    # transformers 5 builds ``output_hidden_states``/``output_attentions`` on forward hooks that it
    # installs once, permanently, and that do nothing unless a capture is active in that call.
    return "output_capturing_hook" in getattr(fn, "__qualname__", "")


def remaining_hooks(model: nn.Module) -> list[tuple[str, Any]]:
    """Hooks still registered on ``model`` other than transformers' own inert capture hooks.

    Empty whenever no trace is active: every :class:`Trace` removes what it registered. Tests
    and the app's status check use this to prove that no edit outlives its context."""
    found = []
    for name, module in model.named_modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            found += [(name, fn) for fn in hooks.values() if not _is_transformers_capture_hook(fn)]
    return found
