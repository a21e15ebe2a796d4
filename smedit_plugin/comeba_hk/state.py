"""State that lasts across ``batch_edit`` calls: attaching, finding, removing, saving and loading it.

The state is a :class:`HookController` on the root model plus one :class:`HookLayer` per edited
rewrite module, all holding their tensors as non-trainable parameters (see ``hook_layers``).
Saving writes those tensors (and, for MEMIT-C, the edited rewrite weights, since the original
ones are gone) to ``hook_state.safetensors`` and the configuration to ``hook_state.json``, published
together as one version of a versioned directory (``fileio.write_version``: one rename swaps both,
each file's sha256 is verified on load). Removing COMEBA-HK state gives back the untouched model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from safetensors.torch import save_file

from ..editing import edit_transaction
from ..fileio import current_version, is_versioned_dir, write_version
from ..methods import LOCATE_FAMILY, method_spec, methods_of_family
from .covariance import model_fingerprint
from .hook_layers import CONTROLLER_ATTR, HOOK_ATTR, MODES, HookController, HookLayer, ScopeContext
from .modules import base_model, get_module, weight_out_in

STATE_FORMAT = "smedit-comeba-hk/2"
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
    modules = [get_module(model, name, "rewrite_module_tmp") for name in info["rewrite_modules"]]
    layers = [HookLayer(c_accu, weight_out_in(module).shape[0] if alpha_z is not None else None, alpha_z, ddof, scope)
              for module, c_accu in zip(modules, c_accus)]
    controller = HookController(info, scope, c_accus[0].device)
    model.add_module(CONTROLLER_ATTR, controller)  # first, so remove_hook_layers finds a partly attached state
    for module, layer in zip(modules, layers):
        module.add_module(HOOK_ATTR, layer)
        if layer.with_hook:
            module.register_forward_hook(layer.forward_hook)
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


class StateError(ValueError):
    """A saved COMEBA-HK/MEMIT-C state is missing, damaged, or belongs to another model; nothing was attached."""


def save_hook_state(model: nn.Module, directory: Union[str, Path], *, overwrite: bool = False) -> Path:
    """Publish the state as a new version of ``directory`` (safetensors + JSON, swapped in together by one rename).

    An interrupted or failed save leaves the previous state in ``directory`` loadable and unchanged. A
    folder holding entries the plugin did not write is refused unless ``overwrite`` (then the state is
    written beside them, never deleting them); a file, a hypernetwork archive, a damaged manifest or a
    ``manifest.json`` the plugin did not write are always refused. Returns the folder.
    """
    controller = find_state(model)
    if controller is None:
        raise ValueError("the model carries no COMEBA-HK/MEMIT-C state to save")
    folder = Path(directory)
    tensors = {name: p.detach().contiguous().cpu() for name, p in state_parameters(model).items()}
    if not hook_layers(model, controller)[0].with_hook:  # MEMIT-C: the edits live in the weights
        for name in controller.info["rewrite_modules"]:
            tensors[f"{name}.weight"] = get_module(model, name, "rewrite_module_tmp").weight.detach().contiguous().cpu()
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise StateError(f"refusing to save: state tensor {name} holds NaN/inf")
    scope = controller.scope
    info = {"format": STATE_FORMAT, **controller.info, "steps": int(controller.steps),
            "mask_padding": scope.mask_padding, "mask_bos": scope.mask_bos,
            "ddof": hook_layers(model, controller)[0].ddof,
            "shapes": {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()}}

    def write(version: Path) -> None:
        save_file(tensors, str(version / STATE_TENSORS))
        (version / STATE_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    write_version(folder, STATE_FORMAT, write, StateError, required=(STATE_TENSORS, STATE_JSON), overwrite=overwrite)
    return folder


_INFO_FIELDS = {"alg_name": str, "layers": list, "rewrite_modules": list, "templates": list, "fingerprint": str,
                "steps": int, "mask_padding": bool, "mask_bos": bool, "ddof": int, "shapes": dict}


def _read_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The verified JSON and tensors of a saved state (checksums, format, fields); raises :class:`StateError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not is_versioned_dir(folder):
        old = (folder / STATE_JSON).is_file()
        raise StateError(f"{folder} is a state of an older smedit-plugin (no manifest.json, no checksums); edit and "
                         "save it again" if old else f"no saved COMEBA-HK/MEMIT-C state at {folder} (no manifest.json)")
    version = current_version(folder, STATE_FORMAT, StateError, required=(STATE_TENSORS, STATE_JSON))
    try:
        info = json.loads((version / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{version / STATE_JSON} is not valid JSON ({exc}); the state is damaged") from exc
    if not isinstance(info, dict) or info.get("format") != STATE_FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise StateError(f"{version / STATE_JSON} is not a {STATE_FORMAT} state (format {found!r})")
    for key, kind in _INFO_FIELDS.items():
        value = info.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StateError(f"{version / STATE_JSON}: field {key!r} is missing or not a {kind.__name__}; "
                             "the state is damaged")
    try:
        tensors = load_file(str(version / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateError(f"{version / STATE_TENSORS} is not a readable safetensors file ({exc}); "
                         "the state is damaged") from exc
    return info, tensors


#: dtypes a saved state holds: the step counter is int64; ``c_accu`` is float32 or float64 (``mom2_dtype``, the
#: same for every layer); ``delta_w`` and ``alpha`` are float32 masters whatever the model's dtype (hook_layers).
C_ACCU_DTYPES = (torch.float32, torch.float64)


def _expected_tensors(model: nn.Module, info: dict[str, Any], hooks: bool
                      ) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
    """Name -> (shape, allowed dtypes) of every tensor a state of ``info`` must hold for ``model``."""
    want: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]] = {f"{CONTROLLER_ATTR}.steps": ((), (torch.long,))}
    for name in info["rewrite_modules"]:
        module = get_module(model, name, "rewrite_module_tmp")
        d_out, d_in = weight_out_in(module).shape
        want[f"{name}.{HOOK_ATTR}.c_accu"] = ((d_in, d_in), C_ACCU_DTYPES)
        if hooks:
            want[f"{name}.{HOOK_ATTR}.delta_w"] = ((d_out, d_in), (torch.float32,))
            want[f"{name}.{HOOK_ATTR}.alpha"] = ((), (torch.float32,))
        else:
            want[f"{name}.weight"] = (tuple(module.weight.shape), (module.weight.dtype,))
    return want


def _check_tensors(model: nn.Module, info: dict[str, Any], tensors: dict[str, torch.Tensor], hooks: bool,
                   file: str) -> None:
    """Names, shapes, dtypes and finiteness of every saved tensor against what ``model`` needs."""
    want = _expected_tensors(model, info, hooks)
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise StateError(f"{file}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}; the state is damaged "
                         "or was saved for other layers")
    recorded = info["shapes"]
    for name, (shape, dtypes) in want.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise StateError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, this model needs {shape}")
        floating = name != f"{CONTROLLER_ATTR}.steps"
        if tensor.is_floating_point() != floating:
            raise StateError(f"{file}: tensor {name} has dtype {tensor.dtype}, expected "
                             f"{'a floating-point' if floating else 'an integer'} tensor")
        saved_as = recorded.get(name, [None])[0] if isinstance(recorded.get(name), list) else None
        if tensor.dtype not in dtypes or saved_as != str(tensor.dtype).removeprefix("torch."):
            raise StateError(
                f"{file}: tensor {name} is {tensor.dtype} but a state saved from this model holds "
                f"{' or '.join(str(d) for d in dtypes)} there (and {STATE_JSON} records {saved_as}): the file was "
                "converted after saving. States are never converted on load; save the state again from the edited "
                "model, or convert the tensor back to the recorded dtype yourself")
        if floating and not bool(tensor.isfinite().all()):
            raise StateError(f"{file}: tensor {name} holds NaN/inf; the state is damaged")
    c_accu = {tensors[f"{name}.{HOOK_ATTR}.c_accu"].dtype for name in info["rewrite_modules"]}
    if len(c_accu) > 1:
        raise StateError(f"{file}: the layers' c_accu tensors have different dtypes ({sorted(map(str, c_accu))}); "
                         "the state is damaged")
    for name in info["rewrite_modules"]:
        module = get_module(model, name, "rewrite_module_tmp")
        top = torch.finfo(module.weight.dtype).max
        largest = (float(tensors[f"{name}.weight"].double().abs().max()) if not hooks else
                   float(module.weight.detach().abs().max()) + float(tensors[f"{name}.{HOOK_ATTR}.delta_w"].double().abs().max()))
        if not largest <= top:
            raise StateError(f"{file}: the edited weight of {name} would overflow the model's {module.weight.dtype} "
                             f"(values up to {largest:.3g}, the dtype holds {top:.3g}); the state is damaged")


def load_hook_state(model: nn.Module, directory: Union[str, Path]) -> HookController:
    """Attach a saved state to a fresh copy of the same base model, ready to infer or keep editing.

    Everything is checked before anything is attached: checksums, the JSON fields, the model's
    identity (fingerprint of the unedited base model), and the name, shape, dtype and finiteness of
    every tensor. If attaching still fails (or is interrupted), the model is put back bit for bit with
    no hook left. MEMIT-C then writes the saved edited weights back into the rewrite modules.
    """
    folder = Path(directory)
    info, tensors = _read_state(folder)
    if info["alg_name"] not in methods_of_family(LOCATE_FAMILY):
        raise StateError(f"{folder}: unknown method {info['alg_name']!r} in the saved state")
    if info["ddof"] not in (0, 1) or not (info.get("bos_id") is None or isinstance(info.get("bos_id"), int)):
        raise StateError(f"{folder}: fields 'ddof' ({info['ddof']!r}, 0 or 1) or 'bos_id' ({info.get('bos_id')!r}) "
                         "are malformed; the state is damaged")
    hooks = method_spec(info["alg_name"]).hooks_enabled
    if find_state(model) is not None:
        raise StateError(f"the model already carries COMEBA-HK/MEMIT-C state; remove it with remove_hook_layers(model) "
                         f"before loading {folder}")
    if original_fingerprint(model) != info["fingerprint"]:
        raise StateError(f"{folder} was saved for a different base model (fingerprint {info['fingerprint']}, this "
                         f"model {original_fingerprint(model)}); load it into the model it was edited from")
    names = info["rewrite_modules"]
    try:
        for name in names:
            get_module(model, name, "rewrite_module_tmp")
    except (AttributeError, LookupError, ValueError) as exc:
        raise StateError(f"{folder}: {exc}") from exc
    _check_tensors(model, info, tensors, hooks, f"{folder} ({STATE_TENSORS})")
    meta = {k: info.get(k) for k in ("alg_name", "layers", "rewrite_modules", "templates", "bos_id", "fingerprint")}
    with edit_transaction(model) as snapshot:
        snapshot.on_restore(lambda: remove_hook_layers(model))
        if not hooks:
            for name in names:
                snapshot.capture_module(name)
        c_accus = [tensors[f"{name}.{HOOK_ATTR}.c_accu"].to(get_module(model, name, "rewrite_module_tmp").weight.device)
                   for name in names]
        controller = attach_state(model, meta, c_accus, 0.0 if hooks else None, info["ddof"], info["mask_padding"],
                                  info["mask_bos"])
        with torch.no_grad():
            for name, param in state_parameters(model).items():
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))
            if not hooks:
                for name in names:
                    weight = get_module(model, name, "rewrite_module_tmp").weight
                    weight.copy_(tensors[f"{name}.weight"].to(device=weight.device, dtype=weight.dtype))
    return controller
