"""The plugin's user-facing error types, in a module of their own so that every layer can raise them."""
from __future__ import annotations

from typing import Any


class HyperParamsError(ValueError):
    """A hyperparameter file or value is wrong; the message names the field, the file and the fix."""


def short_repr(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, for naming a value in an error message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


class SettingsMismatchError(ValueError):
    """Runs that must agree do not: a resumed archive and this run, or two data-parallel ranks; names each field."""


class OutputTargetError(ValueError):
    """A command's output target cannot be written (not writable, a folder where a file goes, a link leading out)."""


class FolderInUseError(RuntimeError):
    """Another process holds the writer lock of a saved folder; the message names the folder and the holder's pid."""


class MethodUnavailable(RuntimeError):
    """A method cannot run on this machine or model (its library is missing, it has no YAML for the model);
    the message says why, and ``smedit compare`` puts it in that method's row instead of stopping."""


class NonFiniteUpdateError(ValueError):
    """A computed update (a BP step's shift, a layer delta, a hook tensor) holds NaN or inf; nothing was written."""


#: Likely cause of a weight that is no longer finite after a finite update was added to it.
OVERFLOW_CAUSE = ("the weight plus the update overflowed the model's dtype (float16 tops out at 65504); load the model "
                  "in float32 or bfloat16, or make the update smaller")


def require_finite(tensor: Any, *, method: str, where: str, module: str, cause: str) -> None:
    """Raise :class:`NonFiniteUpdateError` naming ``method``, ``where`` (step/layer), ``module`` and the likely cause.

    Called right before an update touches the model, so the enclosing ``edit_transaction`` only has
    to undo the updates that were already checked.
    """
    if bool(tensor.isfinite().all()):
        return
    bad = int((~tensor.isfinite()).sum())
    raise NonFiniteUpdateError(
        f"{method}: {where}, module {module}: {bad} of {tensor.numel()} values are NaN/inf; no update of this call "
        f"is kept (the model is restored to what it was before the call). Likely cause: {cause}"
    )
