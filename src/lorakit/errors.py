"""lorakit's exceptions.

Every error a user can cause raises a subclass of :class:`LorakitError` whose message says what was
wrong and what to do. Each one also subclasses the matching builtin (``ValueError``, ``KeyError``,
``FileNotFoundError``, ``RuntimeError``) so callers that catch the builtin keep working.
"""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid (r <= 0, unknown init, bad pattern...)."""


class TargetError(LorakitError, ValueError):
    """Target modules did not match, or matched a layer type LoRA cannot adapt."""


class AdapterNameError(LorakitError, KeyError):
    """An adapter name is unknown, or already taken."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes
        return str(self.args[0]) if self.args else ""


class AdapterStateError(LorakitError, RuntimeError):
    """The operation does not fit the adapter's state (e.g. merging an already merged adapter)."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter directory is missing files, is corrupt, or does not fit the model."""


class ModelNotFoundError(LorakitError, FileNotFoundError):
    """A model name or path could not be resolved to a model available offline."""


class DataError(LorakitError, ValueError):
    """Training or evaluation data is malformed (the message names file and line)."""


class GenerationError(LorakitError, RuntimeError):
    """Text generation failed while it ran (in the streaming thread, say)."""


class ServerBusyError(LorakitError, RuntimeError):
    """The serving engine's queue is full; the client should retry later (HTTP 429)."""


class AdapterLoadError(LorakitError, RuntimeError):
    """A served adapter could not be brought into memory in time, or its files failed to load (HTTP 503)."""
