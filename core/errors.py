"""Exception types with messages meant for people: the UI shows them as they are, the CLI prints
them on one line. Each says what went wrong and what to do instead."""

from __future__ import annotations


class ExplorerError(Exception):
    """Base class of every error Refusal Circuit Explorer raises on purpose."""


class ModelLoadError(ExplorerError):
    """A model source could not be loaded (unknown id offline, not a model folder, ...)."""


class PromptFileError(ExplorerError, ValueError):
    """A prompt file or upload is unusable (encoding, columns, malformed line, empty)."""


class ConfigError(ExplorerError, ValueError):
    """A batch config has unknown keys or wrong types; the message names the key path."""


class NonFiniteActivationError(ExplorerError, FloatingPointError):
    """NaN or inf appeared in activations (e.g. fp16 overflow); the message names the layer."""


class DirectionError(ExplorerError, ValueError):
    """A direction cannot be computed or used (zero norm, bad layer, too few prompts)."""


class PromptTooLongError(ExplorerError, ValueError):
    """A formatted prompt has more tokens than the model's context or the configured limit."""


class LayerRangeError(ExplorerError, ValueError):
    """A layer index outside the model's blocks."""


class BatchMemoryError(ExplorerError, MemoryError):
    """Out of memory even at batch size 1 (smaller batches were tried first)."""


class DirectionFileError(DirectionError):
    """A saved directions file (or control vector) is unreadable, or belongs to another model."""


class BundleError(ExplorerError, ValueError):
    """A results file or reproducible bundle (.zip) is unreadable or unsafe to open."""


class SplitError(ExplorerError, ValueError):
    """Train/validation/test prompts overlap, or a split is too small for what uses it."""


class AbliterationError(ExplorerError, ValueError):
    """Weight orthogonalisation would not equal runtime ablation on this model (or cannot be done)."""
