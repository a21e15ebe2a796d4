"""Weight snapshots and EasyEdit's ``weights_copy`` contract, shared by every apply function.

An apply function edits the model in place and returns ``(model, weights_copy)``. ``weights_copy``
maps exact ``model.named_parameters()`` names to pre-edit tensors; EasyEdit copies them back to undo
an edit. Who decides whether that happens depends on the EasyEdit era (contract §1.3):

* era A (PyPI wheel, GitHub before 2024-05-28): the editor restores after *every* edit, so the
  apply function returns ``{}`` unless ``keep_original_weight`` is True, and edits accumulate by
  default, exactly as with the built-in methods;
* era C (current GitHub): ``keep_original_weight`` is always False and meaningless; the editor
  restores unless ``sequential_edit=True``, so the copy must always be returned.
"""
from __future__ import annotations

import contextlib
import copy as copy_module
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .easyedit import detect_era


class WeightsSnapshot:
    """Pre-edit clones of the parameters an edit touches, keyed by their ``named_parameters`` name.

    Each parameter is cloned once, on its own device and in its own dtype, so :meth:`restore` is
    bit-exact. Tied weights are stored once, under the first-registered name (the one
    ``named_parameters()`` yields), because that is the name EasyEdit's restore looks up.
    Changes that are not parameter values (hook layers attached to the model) register their undo
    with :meth:`on_restore`, so this class stays the one rollback for edits, loads and run ends.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved: dict[str, torch.Tensor] = {}
        self._undo: list[Callable[[], None]] = []
        self._index()

    def _index(self) -> None:
        """Name tables of the model's parameters (re-read when a parameter added since, e.g. a hook layer's, is captured)."""
        self._canonical: dict[str, str] = {}
        first_name_of: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            first_name_of.setdefault(id(param), name)
            self._canonical[name] = first_name_of[id(param)]
        self._name_of_param = first_name_of
        # parameters captured earlier stay reachable for restore even if their module was detached since
        self._params = {**getattr(self, "_params", {}), **dict(self.model.named_parameters())}

    @property
    def names(self) -> tuple[str, ...]:
        """Captured parameter names, in capture order."""
        return tuple(self._saved)

    def canonical_name(self, name: str) -> str:
        """The ``named_parameters()`` name of ``name`` (an alias of a tied weight maps to its first name)."""
        if name not in self._canonical:
            self._index()
        try:
            return self._canonical[name]
        except KeyError:
            raise LookupError(
                f"model has no parameter {name!r}; use an exact model.named_parameters() name "
                f"(e.g. {next(iter(self._params), '<none>')!r})"
            ) from None

    def capture(self, name: str) -> str:
        """Clone parameter ``name`` unless already captured; call before its first change.

        Returns the name it is stored under (differs from ``name`` only for a tied alias).
        """
        canonical = self.canonical_name(name)
        if canonical not in self._saved:
            self._saved[canonical] = self._params[canonical].detach().clone()
        return canonical

    def capture_module(self, module_name: str) -> str:
        """Capture the ``.weight`` of submodule ``module_name``; returns the parameter name used."""
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError as exc:
            raise LookupError(f"model has no submodule {module_name!r}: {exc}") from None
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) not in self._name_of_param:
            self._index()
        if not isinstance(weight, nn.Parameter) or id(weight) not in self._name_of_param:
            raise LookupError(f"submodule {module_name!r} has no .weight parameter of this model")
        return self.capture(self._name_of_param[id(weight)])

    def capture_model(self) -> None:
        """Capture every parameter and buffer, and the model object for object: the module tree (children,
        parameter slots, forward hooks), each module's other attributes, each parameter's ``requires_grad``
        and the model's config.

        For edits whose reach is unknown (EasyEdit's own methods): :meth:`restore` then also removes
        modules and hooks added since (GRACE adaptors, LoRA layers, hook layers), puts back modules that
        were replaced, and undoes what training set up on the side (PEFT's ``peft_config``, gradient
        checkpointing, frozen parameters, ``config.use_cache = False``).
        """
        for name, _ in self.model.named_parameters():
            self.capture(name)
        tree = [(module, {name: None if buf is None else buf.detach().clone() for name, buf in module._buffers.items()},
                 dict(vars(module)), {k: dict(v) for k, v in vars(module).items() if isinstance(v, dict)})
                for module in self.model.modules()]
        trainable = [(param, param.requires_grad) for param in self.model.parameters()]
        config = getattr(self.model, "config", None)
        settings = None if config is None else dict(vars(config))

        @torch.no_grad()
        def undo() -> None:
            for module, buffers, attributes, tables in tree:
                for name in [k for k in vars(module) if k not in attributes]:
                    del module.__dict__[name]
                module.__dict__.update(attributes)
                # dict attributes (children, parameter slots, buffers, hook tables) are refilled in place: hook
                # handles hold weak references to their table
                for name, table in tables.items():
                    attributes[name].clear()
                    attributes[name].update(table)
                for name, saved in buffers.items():
                    original = module._buffers[name]  # the captured tensor, back in its slot
                    if saved is not None and original is not None and original.shape == saved.shape:
                        original.copy_(saved)
                    else:
                        module._buffers[name] = None if saved is None else saved.clone()
            for param, flag in trainable:
                param.requires_grad_(flag)
            if settings is not None:
                vars(config).clear()
                vars(config).update(settings)

        self.on_restore(undo)

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` at every :meth:`restore`, after the parameters (last registered first); it must be idempotent."""
        self._undo.append(undo)

    @torch.no_grad()
    def restore(self) -> None:
        """Write every captured tensor back into its parameter (wherever and in whatever dtype it lives now),
        then run the registered undo steps."""
        for name, saved in self._saved.items():
            param = self._params[name]
            param.copy_(saved.to(device=param.device, dtype=param.dtype))
        for undo in reversed(self._undo):
            undo()

    def changed(self) -> dict[str, torch.Tensor]:
        """``{name: current value}`` of every captured parameter that differs from its capture (the edits so far)."""
        return {name: self._params[name].detach() for name, saved in self._saved.items()
                if not torch.equal(self._params[name].detach().to(saved.device), saved)}

    def added(self) -> dict[str, torch.Tensor]:
        """``{name: value}`` of the model's parameters that none of the captured ones is (those of modules an edit
        put into the model since, e.g. LoRA's adapters), under their ``named_parameters`` names now."""
        known = {id(p) for p in self._params.values()}
        return {name: p.detach() for name, p in self.model.named_parameters() if id(p) not in known}

    def as_weights_copy(self) -> dict[str, torch.Tensor]:
        """``{named_parameters name: pre-edit tensor}`` in the shape EasyEdit's restore expects."""
        return dict(self._saved)


@contextlib.contextmanager
def edit_transaction(model: nn.Module, snapshot: Optional[WeightsSnapshot] = None) -> Iterator[WeightsSnapshot]:
    """Yield a snapshot; if the body raises (even KeyboardInterrupt), undo every captured change and re-raise.

    A half-applied edit is worse than none: the next edit or evaluation would silently run on a
    model that matches no request. Pass the ``snapshot`` of earlier edits to extend it (edits that
    accumulate are then all undone together, by the caller or on failure).
    """
    snapshot = WeightsSnapshot(model) if snapshot is None else snapshot
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise


def weights_copy_for_easyedit(snapshot: WeightsSnapshot, *, return_orig_weights: bool,
                              keep_original_weight: bool) -> dict[str, torch.Tensor]:
    """The ``weights_copy`` an apply function returns, with the semantics of the EasyEdit in this process.

    ``return_orig_weights``: the caller asks for the pre-edit weights (EasyEdit editors always pass True).
    ``keep_original_weight``: only meaningful in era A, where it means "restore after this edit";
    False (the default) returns ``{}`` so edits accumulate like the built-ins'. In era C, or when
    EasyEdit is not loaded (a direct call), it is ignored and the copy is returned whenever
    ``return_orig_weights`` is True. EasyEdit is never imported here (its import seeds RNGs and
    configures logging); an unloaded EasyEdit cannot be the caller.
    """
    if not weights_copy_wanted(return_orig_weights=return_orig_weights, keep_original_weight=keep_original_weight):
        return {}
    return snapshot.as_weights_copy()


def weights_copy_wanted(*, return_orig_weights: bool, keep_original_weight: bool) -> bool:
    """Whether :func:`weights_copy_for_easyedit` will return the copy (so state it alone needs is worth cloning)."""
    if not return_orig_weights:
        return False
    return not (detect_era(allow_import=False) == "A" and not keep_original_weight)


def maybe_copy_model(model: nn.Module, copy: bool) -> nn.Module:
    """``model`` itself, or a deep copy of it when ``copy`` is True (EasyEdit's ``copy`` flag)."""
    return copy_module.deepcopy(model) if copy else model
