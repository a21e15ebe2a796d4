"""The plugin's user-facing error type, in a module of its own so that every layer can raise it."""
from __future__ import annotations


class HyperParamsError(ValueError):
    """A hyperparameter file or value is wrong; the message names the field, the file and the fix."""
