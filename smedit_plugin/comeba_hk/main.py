"""COMEBA-HK and MEMIT-C: one consecutive editing step (spec 2.4) and EasyEdit's apply function.

A step, for a batch of requests and the edited layers ``L`` (lowest first):

1. on first use, create the state: ``C_accu = lambda E[kk^T]``, ``delta_w = 0``, ``alpha = alpha_z``,
   context templates sampled once from the unedited model;
2. target values ``Z`` at the last edited block, with validated hooks (previous ``alpha``);
3. switch every hook to *temporary*; for each layer ``l`` in order: keys ``K_l`` and ``cur``,
   ``R_l = (Z - cur) / (|L| - i)``, ``Delta_l = R_l K_l^T (C_accu + K_l K_l^T)^{-1}`` (Eq. 13),
   ``delta_w += Delta_l``, ``C_accu += K_l K_l^T``, hook on ``l`` becomes *validated*;
4. calibrate ``alpha_l <- min(alpha_l, min_x max_t z_t)`` on the batch's prompts with recording hooks.

MEMIT-C runs the same steps with ``Delta_l`` added to the weights in place and no hooks (for a bf16/fp16
model into float32 copies of the rewrite weights, rounded once at the end of the step).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..devices import model_input_device
from ..edit_modules import refuse_offloaded, weight_shape_in_out
from ..editing import edit_transaction, maybe_copy_model, weights_copy_for_easyedit, weights_copy_wanted
from ..errors import OVERFLOW_CAUSE, NonFiniteUpdateError, require_finite
from ..precision import float32_edit_weights, note_rounding, wants_float32
from ..request_checks import check_lengths, check_locality, check_targets, warn_contradictions
from .compute_ks import compute_keys_and_cur
from .compute_z import compute_target_values
from .covariance import second_moments
from .hparams import COMEBAHKHyperParams
from .hook_layers import HOOK_ATTR, HookController, HookLayer
from .modules import (final_logit_softcap, frozen_eval, get_module, norm_gain, num_layers, post_mlp_norm, stop_after,
                      weight_out_in)
from .scope import alpha_candidate, next_alpha
from .state import (attach_state, find_state, hook_layers, original_fingerprint, remove_hook_layers, set_mode,
                    state_parameters)
from .templates import EditRequest, TokenView, generate_context_templates, prepare_requests
from .update import accumulate_keys, consecutive_update, initial_c_accu, post_norm_residual, spread_residual

logger = logging.getLogger(__name__)
#: Likely causes of NaN/inf keys or layer deltas, named in the error.
KEYS_CAUSE = "NaN/inf activations at the rewrite module (float16 overflow; load the model in float32 or bfloat16)"
DELTA_CAUSE = ("an ill-conditioned or NaN covariance (mom2_update_weight too small, too few covariance samples; try "
               "cov_ridge > 0), target values that diverged (v_lr too large), or float16 overflow")


class _Modules:
    """Every module the method touches, looked up (and checked) before anything changes."""

    def __init__(self, model: nn.Module, hp: COMEBAHKHyperParams) -> None:
        depth = num_layers(model)
        bad = [layer for layer in hp.layers if layer >= depth]
        if bad:
            raise ValueError(f"hparams field 'layers' has {bad}, but {type(model).__name__} has {depth} layers (0..{depth - 1})")
        if hp.v_loss_layer >= depth:
            raise ValueError(f"hparams field 'v_loss_layer' = {hp.v_loss_layer} but the model has {depth} layers; "
                             f"use {depth - 1} (the last layer)")
        self.names = hp.rewrite_module_names()
        self.rewrite = [get_module(model, name, "rewrite_module_tmp") for name in self.names]
        for name, module in zip(self.names, self.rewrite):
            try:
                weight_shape_in_out(module)
            except ValueError as exc:
                raise ValueError(f"hparams field 'rewrite_module_tmp': {name}: {exc}") from None
        refuse_offloaded(model, self.names, "rewrite_module_tmp")
        self.blocks = [get_module(model, hp.layer_module_tmp.format(layer), "layer_module_tmp") for layer in hp.layers]
        self.z_block = self.blocks[-1]
        self.upper_blocks = [get_module(model, hp.layer_module_tmp.format(layer), "layer_module_tmp")
                             for layer in range(hp.layers[-1] + 1, max(hp.v_loss_layer, hp.layers[-1]) + 1)]
        self.ln_f = get_module(model, hp.ln_f_module, "ln_f_module")
        self.lm_head = get_module(model, hp.lm_head_module, "lm_head_module")
        if not isinstance(getattr(self.lm_head, "weight", None), torch.Tensor) or self.lm_head.weight.dim() != 2:
            raise ValueError(f"hparams field 'lm_head_module': {hp.lm_head_module} has no [vocab, hidden] weight")
        self.softcap = final_logit_softcap(model)
        self.post_norms = [post_mlp_norm(block) for block in self.blocks]


@torch.no_grad()
def _through_post_norm(module: nn.Module, norm: nn.Module, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """Map a residual-stream share to the rewrite output when a norm sits between them (Gemma-2/3)."""
    weight = module.weight
    current = module(keys.T.to(weight.dtype))
    normed = norm(current)
    gain = norm_gain(norm, current.shape[-1], current)
    return post_norm_residual(residuals, current.T.float(), normed.T.float(), gain)


def _check_existing_state(controller: HookController, hp: COMEBAHKHyperParams, names: list[str]) -> None:
    info = controller.info
    if info["alg_name"] != hp.alg_name or info["rewrite_modules"] != names:
        raise ValueError(
            f"the model already carries {info['alg_name']} state for {info['rewrite_modules']}, but these hparams ask for "
            f"{hp.alg_name} on {names}; use the same method and layers, or call "
            "smedit_plugin.comeba_hk.remove_hook_layers(model) first"
        )


def _create_state(model: nn.Module, tok: Any, hp: COMEBAHKHyperParams, mods: _Modules,
                  device: torch.device) -> HookController:
    """Statistics, context templates and fresh hook layers (spec 2.4 step 1)."""
    dtype = torch.float64 if hp.mom2_dtype == "float64" else torch.float32
    fingerprint = original_fingerprint(model)
    with frozen_eval(model):
        if hp.mom2_adjustment:
            moments = second_moments(model, tok, dict(zip(mods.names, mods.rewrite)), mods.rewrite[-1],
                                     dataset=hp.mom2_dataset, n_samples=hp.mom2_n_samples, max_len=hp.mom2_max_len,
                                     dtype=dtype, stats_dir=hp.stats_dir, fingerprint=fingerprint)
        else:
            moments = {name: torch.eye(weight_shape_in_out(m)[0], dtype=dtype, device=m.weight.device)
                       for name, m in zip(mods.names, mods.rewrite)}
        templates = generate_context_templates(model, tok, hp.context_template_length_params, hp.seed, device)
    # popped: each layer's E[kk^T] is freed as soon as its C_accu exists
    c_accus = [initial_c_accu(moments.pop(name), hp.mom2_update_weight, hp.cov_ridge, hp.cov_shrinkage).to(dtype)
               for name in mods.names]
    info = {"alg_name": hp.alg_name, "layers": list(hp.layers), "rewrite_modules": mods.names,
            "templates": templates, "bos_id": TokenView(tok).bos_id, "fingerprint": fingerprint}
    return attach_state(model, info, c_accus, hp.alpha_z if hp.hooks_enabled else None, hp.ddof,
                        hp.mask_padding, hp.mask_bos)


@torch.no_grad()
def calibrate_alpha(model: nn.Module, view: TokenView, requests: Sequence[EditRequest], layers: list[HookLayer],
                    z_block: nn.Module, device: torch.device, validated: bool = False) -> list[Optional[float]]:
    """Spec 2.4 step 7: one forward on the bare edit prompts, ``alpha <- min(alpha, alpha_c)``.

    Recording hooks leave upstream layers unedited, as the authors' code does; ``validated`` runs the
    forward as inference will (every hook validated with the previous alphas), so the keys a layer
    is calibrated on are the keys it will see (spec A12).
    """
    ids, mask = view.right_pad([view.encode(r.prompt) for r in requests], device)
    set_mode(layers, "calibrating" if validated else "recording")
    with stop_after(z_block):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    candidates = []
    for k, layer in enumerate(layers):
        candidate = alpha_candidate(layer.recorded[0])
        if candidate is not None and not math.isfinite(candidate):
            raise NonFiniteUpdateError(f"COMEBA-HK: alpha calibration of hook layer {k + 1} of {len(layers)}: the "
                                       f"smallest largest z-score is {candidate}; no update of this call is kept. "
                                       "Likely cause: NaN/inf activations (float16 overflow; load the model in "
                                       "float32 or bfloat16)")
        layer.alpha.fill_(next_alpha(float(layer.alpha), candidate))
        candidates.append(candidate)
    return candidates


def edit_step(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hp: COMEBAHKHyperParams,
              controller: HookController, mods: _Modules) -> dict[str, Any]:
    """One consecutive step on an attached state; returns diagnostics (z losses, residual norms, alphas)."""
    view = TokenView(tok)
    device = model_input_device(model)
    groups = controller.info["templates"]
    layers = [getattr(m, HOOK_ATTR) for m in mods.rewrite]
    hooks = hp.hooks_enabled
    report: dict[str, Any] = {"residual_norms": []}
    new_keys: list[torch.Tensor] = []  # K_l per layer, added into C_accu_l once the step has succeeded
    tick = time.perf_counter()
    rewrite = dict(zip(mods.names, mods.rewrite))
    in_float32 = not hooks and wants_float32(rewrite, hp.fp32_edit_weights)
    try:
        with frozen_eval(model), float32_edit_weights(rewrite, in_float32) as rounding:
            if hooks:
                set_mode(layers, "validated")
            z, z_info = compute_target_values(model, view, requests, groups, mods.z_block, mods.upper_blocks, mods.ln_f,
                                              mods.lm_head, mods.softcap, hp, device)
            report.update(z_info)
            report["z_seconds"] = time.perf_counter() - tick
            if hooks:
                set_mode(layers, "temporary")
            for i, (module, layer) in enumerate(zip(mods.rewrite, layers)):
                keys, cur = compute_keys_and_cur(model, view, requests, groups, module, mods.z_block, device)
                residuals = spread_residual(z, cur, i, len(layers))
                if mods.post_norms[i] is not None:
                    residuals = _through_post_norm(module, mods.post_norms[i], keys, residuals)
                c_accu = layer.c_accu
                keys = keys.to(c_accu.device)
                delta = consecutive_update(residuals.to(c_accu.device), keys, c_accu)
                where = f"layer {hp.layers[i]} ({i + 1} of {len(layers)})"
                require_finite(keys, method=hp.alg_name, where=where, module=mods.names[i], cause=KEYS_CAUSE)
                require_finite(delta, method=hp.alg_name, where=where, module=mods.names[i], cause=DELTA_CAUSE)
                with torch.no_grad():
                    if hooks:
                        layer.delta_w.add_(delta.to(layer.delta_w.dtype))
                        layer.mode = "validated"
                    else:
                        weight = weight_out_in(module)
                        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
                        require_finite(weight, method=hp.alg_name, where=where, module=mods.names[i],
                                       cause=OVERFLOW_CAUSE)
                new_keys.append(keys)
                report["residual_norms"].append(float(residuals.norm(dim=0).mean()))
            if hooks:
                report["alpha_candidates"] = calibrate_alpha(model, view, requests, layers, mods.z_block, device,
                                                             hp.calibrate_with_validated_hooks)
                report["alpha"] = [float(layer.alpha) for layer in layers]
            with torch.no_grad():
                # last, in place: nothing after this can fail, so C_accu needs no snapshot to be rolled back
                for layer, keys in zip(layers, new_keys):
                    accumulate_keys(layer.c_accu, keys)
                controller.steps.add_(1)
    finally:
        if hooks:
            set_mode(layers, "validated")
    report["rounding_error"] = rounding.relative_error
    note_rounding(model, rounding, hp.alg_name, "Load the model in float32 (`model_dtype: float32`), or use COMEBA-HK, "
                  "whose hooks keep the update in float32")
    report["seconds"] = time.perf_counter() - tick
    logger.info("%s step %d: %d edits in %.1f s (z %.1f s, z steps %s, z loss %s, residual norms %s, alpha %s)",
                hp.alg_name, int(controller.steps), len(requests), report["seconds"], report["z_seconds"],
                report["z_steps"], [round(x, 3) for x in report["z_loss"]],
                [round(x, 2) for x in report["residual_norms"]], report.get("alpha"))
    return report


def apply_comeba_hk_to_model(model: nn.Module, tok: Any, requests: Sequence[dict], hparams: COMEBAHKHyperParams,
                             copy: bool = False, return_orig_weights: bool = False, keep_original_weight: bool = False,
                             **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """EasyEdit apply function for COMEBA-HK and MEMIT-C: one consecutive step, in place.

    The model keeps its hook state between calls (consecutive editing). ``weights_copy`` maps
    parameter names to their values before this call: for COMEBA-HK only the hook parameters
    (``...comeba_hook.delta_w``/``c_accu``/``alpha``, ``comeba_hk_state.steps``), so EasyEdit's
    restore rolls the hooks back and the original weights are never touched; for MEMIT-C also the
    edited weights. If anything fails mid-edit the model and its state are put back as they were.
    Unknown keyword arguments (``train_ds``, ...) are ignored.
    """
    if not isinstance(hparams, COMEBAHKHyperParams):
        raise TypeError(f"hparams must be COMEBAHKHyperParams, got {type(hparams).__name__}")
    prepared = prepare_requests(requests)
    check_locality(requests)
    view = TokenView(tok)
    for request in prepared:
        view.encode_target(request.target_new)
    prompts = [r.before + r.subject + r.after for r in prepared]
    check_lengths(tok, prompts, [r.target_new for r in prepared], hparams.max_length)
    check_targets(tok, [r.target_new for r in prepared])
    warn_contradictions(prompts, [r.target_new for r in prepared])
    model = maybe_copy_model(model, copy)
    mods = _Modules(model, hparams)
    controller = find_state(model)
    if controller is not None:
        _check_existing_state(controller, hparams, mods.names)
    created = controller is None
    if not created:
        _adopt_scope_options(model, controller, hparams)
    # C_accu changes only at the very end of a step (edit_step), so it is copied only for EasyEdit's weights_copy
    keep_c_accu = weights_copy_wanted(return_orig_weights=return_orig_weights, keep_original_weight=keep_original_weight)
    with edit_transaction(model) as snapshot:
        if created:
            snapshot.on_restore(lambda: remove_hook_layers(model))
            controller = _create_state(model, tok, hparams, mods, model_input_device(model))
        tracked = [name for name in state_parameters(model) if keep_c_accu or not name.endswith(f"{HOOK_ATTR}.c_accu")]
        if not hparams.hooks_enabled:
            tracked += [f"{name}.weight" for name in mods.names]
        for name in tracked:
            snapshot.capture(name)
        edit_step(model, tok, prepared, hparams, controller, mods)
    return model, weights_copy_for_easyedit(snapshot, return_orig_weights=return_orig_weights,
                                            keep_original_weight=keep_original_weight)


def _adopt_scope_options(model: nn.Module, controller: HookController, hp: COMEBAHKHyperParams) -> None:
    """Scope-test options (``ddof``, padding/BOS masking) follow the hparams of the latest call."""
    controller.scope.mask_padding = hp.mask_padding
    controller.scope.mask_bos = hp.mask_bos
    for layer in hook_layers(model, controller):
        layer.ddof = hp.ddof
