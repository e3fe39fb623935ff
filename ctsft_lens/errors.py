"""The toolkit's error types: each a ``ValueError`` the CLI turns into one line (``--debug``: traceback).

They live in one module at the bottom of the import graph so that every layer can raise them
without importing the layer that usually owns the concept.
"""

from __future__ import annotations


class CtsftError(ValueError):
    """Base class: bad input that the user can fix; the message names the input and the fix."""


class TaskError(CtsftError):
    """Bad task input: unknown task or language, missing data, a split that cannot be sampled."""


DataError = TaskError  # the name the issue tracker uses; one class


class ModelLoadError(CtsftError):
    """A model name or folder that cannot be turned into a bridge."""


class MaskError(CtsftError):
    """A head mask or circuit that does not fit the model, or a malformed mask/circuit file."""


class ConfigError(CtsftError):
    """An experiment config that cannot run: named key, bad value."""


class CLIError(CtsftError):
    """Bad command-line input."""


class UnsupportedOperationError(CtsftError, NotImplementedError):
    """An architecture, or an operation in one, that CD-T or head masking has no rule for: never a silent wrong answer."""
