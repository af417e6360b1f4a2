"""Exception types raised by Salience.

Every error a user can cause is a :class:`SalienceError` with a one-line message; the CLI prints
that message (no traceback) and exits with status 2.
"""


class SalienceError(Exception):
    """Base class of every error Salience raises on purpose."""


class AssetMissingError(SalienceError):
    """An offline asset (model weights, dataset) is not installed; the message says how to fetch it."""


class InputError(SalienceError, ValueError):
    """The input to explain is unusable: empty, too long for the model, or of the wrong shape."""


class UnknownMethodError(SalienceError, KeyError):
    """No attribution method is registered under that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ParameterError(SalienceError, TypeError):
    """A method was given a parameter it does not have, or a value of the wrong kind."""


class TargetError(SalienceError, ValueError):
    """The target class index or label name does not exist for this model."""


class ModelOutputError(SalienceError, FloatingPointError):
    """The model produced NaN or infinite scores."""


class ModelLoadError(SalienceError, OSError):
    """A model directory or hub id could not be loaded as a supported model."""


def indefinite(noun: str) -> str:
    """``noun`` with its indefinite article, for messages: "an image classifier", "a causal LM"."""
    first = next((c for c in noun if c.isalnum()), "")  # (a quoted name: its first letter)
    return ("an " if first.lower() in "aeiou" else "a ") + noun
