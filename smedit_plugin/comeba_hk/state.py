"""State that lasts across ``batch_edit`` calls: attaching, finding, removing, saving and loading it.

The state is a :class:`HookController` on the root model plus one :class:`HookLayer` per edited
rewrite module, all holding their tensors as non-trainable parameters (see ``hook_layers``).
Saving writes those tensors (and, for MEMIT-C, the edited rewrite weights, since the original
ones are gone) to ``hook_state.safetensors`` and the configuration to ``hook_state.json``, both
atomically. Removing COMEBA-HK state gives back the untouched model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..fileio import save_safetensors_atomic, write_json_atomic
from .covariance import model_fingerprint
from .hook_layers import CONTROLLER_ATTR, HOOK_ATTR, MODES, HookController, HookLayer, ScopeContext
from .modules import base_model, get_module, weight_out_in

STATE_FORMAT = "smedit-comeba-hk/1"
STATE_TENSORS = "hook_state.safetensors"
STATE_JSON = "hook_state.json"
#: Parameter-name fragments of the plugin's own state (left out of model fingerprints).
STATE_NAME_PARTS = (f".{HOOK_ATTR}.", f"{CONTROLLER_ATTR}.")


def find_state(model: nn.Module) -> Optional[HookController]:
    """The controller attached to ``model``, if any."""
    controller = getattr(model, CONTROLLER_ATTR, None)
    return controller if isinstance(controller, HookController) else None


def original_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the model without the plugin's state parameters."""
    return model_fingerprint(model, skip=STATE_NAME_PARTS)


def hook_layers(model: nn.Module, controller: HookController) -> list[HookLayer]:
    """The hook layers of the controller's rewrite modules, lowest layer first."""
    return [getattr(get_module(model, name, "rewrite_module_tmp"), HOOK_ATTR)
            for name in controller.info["rewrite_modules"]]


def attach_state(model: nn.Module, info: dict[str, Any], c_accus: list[torch.Tensor], alpha_z: Optional[float],
                 ddof: int, mask_padding: bool, mask_bos: bool) -> HookController:
    """Create the controller and hook layers (``delta_w = 0``, ``alpha = alpha_z``) and register their hooks.

    ``info`` holds ``alg_name``, ``layers``, ``rewrite_modules``, ``templates``, ``bos_id`` and
    ``fingerprint``. ``alpha_z`` None means MEMIT-C: the layers hold only ``c_accu`` and no forward
    hook is registered, so inference costs nothing extra.
    """
    if find_state(model) is not None:
        raise ValueError("the model already carries COMEBA-HK/MEMIT-C state; remove it first with remove_hook_layers(model)")
    scope = ScopeContext(mask_padding, mask_bos, info.get("bos_id"))
    names = info["rewrite_modules"]
    for name, c_accu in zip(names, c_accus):
        module = get_module(model, name, "rewrite_module_tmp")
        d_out = weight_out_in(module).shape[0] if alpha_z is not None else None
        layer = HookLayer(c_accu, d_out, alpha_z, ddof, scope)
        module.add_module(HOOK_ATTR, layer)
        if layer.with_hook:
            module.register_forward_hook(layer.forward_hook)
    controller = HookController(info, scope, c_accus[0].device)
    model.add_module(CONTROLLER_ATTR, controller)
    if alpha_z is not None:
        decoder = base_model(model)
        decoder.register_forward_pre_hook(controller.capture_inputs, with_kwargs=True)
        decoder.register_forward_hook(controller.release_inputs, with_kwargs=True)
    return controller


def _drop_hooks_of(owner: nn.Module, module: nn.Module) -> None:
    """Unregister every forward (pre-)hook of ``module`` that is a bound method of ``owner``.

    Hooks are found by owner rather than by stored handles because a handle of a deep-copied
    model would still point at the original's hook dictionaries.
    """
    for table, extras in (("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
                          ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",))):
        hooks = getattr(module, table)
        for key, fn in list(hooks.items()):
            if getattr(fn, "__self__", None) is owner:
                del hooks[key]
                for extra in extras:
                    getattr(module, extra, {}).pop(key, None)


def remove_hook_layers(model: nn.Module) -> bool:
    """Detach and delete all COMEBA-HK/MEMIT-C state; True if there was any.

    For COMEBA-HK this restores the original model exactly (its weights were never written). For
    MEMIT-C only the accumulated ``c_accu`` goes away: the edits live in the weights themselves.
    """
    controller = find_state(model)
    if controller is None:
        return False
    for name in controller.info["rewrite_modules"]:
        module = get_module(model, name, "rewrite_module_tmp")
        layer = getattr(module, HOOK_ATTR, None)
        if isinstance(layer, HookLayer):
            _drop_hooks_of(layer, module)
            delattr(module, HOOK_ATTR)
    _drop_hooks_of(controller, base_model(model))
    delattr(model, CONTROLLER_ATTR)
    return True


def set_mode(layers: list[HookLayer], mode: str) -> None:
    """Switch hook layers between ``validated`` / ``temporary`` / ``recording`` / ``calibrating`` / ``off``.

    An unknown name would otherwise act as ``validated`` in the forward hook, silently.
    """
    if mode not in MODES:
        raise ValueError(f"hook mode must be one of {list(MODES)}, got {mode!r}")
    for layer in layers:
        layer.mode = mode
        layer.recorded.clear()


def state_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of the plugin's state, by its ``model.named_parameters()`` name."""
    return {name: p for name, p in model.named_parameters() if any(part in name for part in STATE_NAME_PARTS)}


def save_hook_state(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write the state to ``directory`` (safetensors + JSON, each atomically); returns the folder."""
    controller = find_state(model)
    if controller is None:
        raise ValueError("the model carries no COMEBA-HK/MEMIT-C state to save")
    folder = Path(directory)
    tensors = {name: p.detach() for name, p in state_parameters(model).items()}
    if controller.info["alg_name"] == "MEMIT-C":
        for name in controller.info["rewrite_modules"]:
            tensors[f"{name}.weight"] = get_module(model, name, "rewrite_module_tmp").weight.detach()
    save_safetensors_atomic(tensors, folder / STATE_TENSORS)
    scope = controller.scope
    write_json_atomic(folder / STATE_JSON, {
        "format": STATE_FORMAT, **controller.info, "steps": int(controller.steps),
        "mask_padding": scope.mask_padding, "mask_bos": scope.mask_bos,
        "ddof": hook_layers(model, controller)[0].ddof,
    })
    return folder


def load_hook_state(model: nn.Module, directory: Union[str, Path]) -> HookController:
    """Attach a saved state to a fresh copy of the same base model, ready to infer or keep editing.

    The model fingerprint must match the one the state was created on (the unedited base model);
    MEMIT-C then writes the saved edited weights back into the rewrite modules.
    """
    from safetensors.torch import load_file

    folder = Path(directory)
    info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    if info.get("format") != STATE_FORMAT:
        raise ValueError(f"{folder / STATE_JSON} is not a {STATE_FORMAT} state (format {info.get('format')!r})")
    tensors = load_file(str(folder / STATE_TENSORS))
    hooks = info["alg_name"] == "COMEBA-HK"
    if original_fingerprint(model) != info["fingerprint"]:
        raise ValueError(f"{folder} was saved for a different base model (fingerprint {info['fingerprint']}); "
                         "load it into the model it was edited from")
    names = info["rewrite_modules"]
    c_accus = []
    for name in names:
        module = get_module(model, name, "rewrite_module_tmp")
        c_accus.append(tensors[f"{name}.{HOOK_ATTR}.c_accu"].to(module.weight.device))
    meta = {k: info[k] for k in ("alg_name", "layers", "rewrite_modules", "templates", "bos_id", "fingerprint")}
    controller = attach_state(model, meta, c_accus, 0.0 if hooks else None, info["ddof"], info["mask_padding"],
                              info["mask_bos"])
    with torch.no_grad():
        for name, param in state_parameters(model).items():
            param.copy_(tensors[name].to(param.device))
        if not hooks:
            for name in names:
                weight = get_module(model, name, "rewrite_module_tmp").weight
                weight.copy_(tensors[f"{name}.weight"].to(device=weight.device, dtype=weight.dtype))
    return controller
