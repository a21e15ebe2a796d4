"""Hook layers (paper §3.3): a small module on each rewrite module that holds every change.

The hook layer of layer ``l`` owns ``delta_w`` (``W_h - W_0``, float32 master), ``c_accu`` and
``alpha`` as non-trainable ``nn.Parameter``s, so they appear in ``model.named_parameters()`` and
EasyEdit's restore of ``weights_copy`` (which writes tensors back by parameter name) rolls them
back exactly; the model's original parameters keep their names and are never written. They follow
``model.to(device)`` but not ``model.to(dtype)`` (buffers would be cast just the same), so a bf16
model keeps float32 state. A forward
hook on the rewrite module adds ``delta_w k`` to its output according to the mode:

* ``validated`` (inference): only tokens whose z-score of ``||delta_w k||`` reaches ``alpha``;
* ``temporary``: every token (used while spreading the residual over later layers);
* ``recording``: output unchanged, each sequence's largest z-score recorded (alpha calibration);
* ``calibrating``: as ``validated``, and the largest z-scores recorded too (alpha calibration under
  the hooks the edited model runs with at inference, spec A12);
* ``off``: output unchanged.

``delta_w k`` is computed directly rather than as ``O - P``, whose fp16/bf16 rounding would dominate
for out-of-scope tokens (spec 2.3), by one GEMM in the model's dtype (a bf16 model multiplies a bf16
copy of ``delta_w``, made once per change of ``delta_w``: on GPUs an fp32 GEMM per token would run on
the slow non-tensor-core path); its norm and z-score are accumulated in float32. The :class:`HookController`
on the root model captures the attention mask and input ids of each forward, so padding and BOS
can be left out of the statistics (spec A3, A4).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .scope import max_zscore, swap_mask

#: Attribute name of a hook layer on its rewrite module, and of the controller on the root model.
HOOK_ATTR = "comeba_hook"
CONTROLLER_ATTR = "comeba_hk_state"
MODES = ("validated", "temporary", "recording", "calibrating", "off")


class ScopeContext:
    """Which tokens of the current forward count for the scope test (shared by all hook layers)."""

    def __init__(self, mask_padding: bool, mask_bos: bool, bos_id: Optional[int]) -> None:
        self.mask_padding = mask_padding
        self.mask_bos = mask_bos
        self.bos_id = bos_id
        self.valid: Optional[torch.Tensor] = None

    def capture(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                seq_len: Optional[int]) -> None:
        """Build the ``[batch, seq]`` valid-token mask of a forward (last ``seq`` mask columns under a KV cache)."""
        self.valid = None
        if seq_len is None:
            return
        valid = None
        if self.mask_padding and attention_mask is not None and attention_mask.dim() == 2 \
                and attention_mask.shape[-1] >= seq_len:
            valid = attention_mask[:, -seq_len:].bool()
        if self.mask_bos and self.bos_id is not None and input_ids is not None and input_ids.dim() == 2:
            not_bos = input_ids != self.bos_id
            valid = not_bos if valid is None or valid.shape != not_bos.shape else valid & not_bos
        self.valid = valid

    def valid_for(self, batch: int, seq: int, device: torch.device) -> torch.Tensor:
        """The captured mask when it fits this hidden state, else every token counts."""
        if self.valid is not None and tuple(self.valid.shape) == (batch, seq):
            return self.valid.to(device)
        return torch.ones(batch, seq, dtype=torch.bool, device=device)


class HookLayer(nn.Module):
    """Per-layer state of COMEBA-HK (``delta_w``, ``c_accu``, ``alpha``) or of MEMIT-C (``c_accu`` only)."""

    def __init__(self, c_accu: torch.Tensor, d_out: Optional[int], alpha_z: Optional[float], ddof: int,
                 scope: ScopeContext) -> None:
        super().__init__()
        self.c_accu = nn.Parameter(c_accu, requires_grad=False)
        self.with_hook = d_out is not None
        if self.with_hook:
            self.delta_w = nn.Parameter(torch.zeros(d_out, c_accu.shape[0], dtype=torch.float32, device=c_accu.device),
                                        requires_grad=False)
            self.alpha = nn.Parameter(torch.tensor(float(alpha_z), dtype=torch.float32, device=c_accu.device),
                                      requires_grad=False)
        self.ddof = ddof
        self.scope = scope
        self.mode = "validated"
        self.recorded: list[torch.Tensor] = []
        self._cast: Optional[tuple[tuple, torch.Tensor]] = None  # (key, delta_w in a model dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> "HookLayer":
        """Follow the model's device moves but never its dtype casts.

        ``model.to(torch.bfloat16)`` or ``model.half()`` would otherwise round ``delta_w``, ``c_accu``
        and ``alpha`` (float32/float64 masters) for good; each tensor goes where ``fn`` would send a
        tensor of its own dtype, and keeps that dtype.
        """
        def device_only(tensor: torch.Tensor) -> torch.Tensor:
            probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
            return tensor.to(probe.device)

        self._cast = None
        return super()._apply(device_only, recurse)

    def _delta_w_in(self, dtype: torch.dtype) -> torch.Tensor:
        """``delta_w`` in ``dtype``: itself for float32, else a copy kept until ``delta_w`` changes (an edit, a
        rollback or a device move bumps its version or storage)."""
        if dtype == self.delta_w.dtype:
            return self.delta_w
        key = (self.delta_w.data_ptr(), self.delta_w._version, dtype)
        if self._cast is None or self._cast[0] != key:
            self._cast = None  # the old copy goes before the new one is made
            self._cast = (key, self.delta_w.detach().to(dtype))
        return self._cast[1]

    def shift(self, keys: torch.Tensor) -> torch.Tensor:
        """``delta_w k`` for every token, in the keys' (the model's) dtype."""
        return torch.nn.functional.linear(keys, self._delta_w_in(keys.dtype))

    def forward_hook(self, _module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        """The rewrite module's output with the hook applied per :attr:`mode`."""
        if self.mode == "off":
            return None
        shift = self.shift(args[0])
        if self.mode == "temporary":
            return output + shift.to(output.dtype)
        norms, valid = self._scope_inputs(shift)
        if self.mode in ("recording", "calibrating"):
            self.recorded.append(max_zscore(norms, valid, self.ddof).detach())
            if self.mode == "recording":
                return None
        swap = swap_mask(norms, valid, self.alpha, self.ddof).reshape(shift.shape[:-1])
        return torch.where(swap.unsqueeze(-1), output + shift.to(output.dtype), output)

    def _scope_inputs(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``||delta_w k||`` per token as ``[sequences, tokens]`` (float32) and the scope's valid-token mask."""
        norms = torch.linalg.vector_norm(shift, dim=-1, dtype=torch.float32)
        norms = norms.reshape(-1, norms.shape[-1])
        return norms, self.scope.valid_for(norms.shape[0], norms.shape[1], norms.device)

    def swapped(self, shift: torch.Tensor) -> torch.Tensor:
        """Which tokens the validated hook moves, given their ``shift = delta_w k`` (``[..., tokens, d_out]``):
        the one scope test, for tools that measure the hook from outside (shape ``[..., tokens]``)."""
        norms, valid = self._scope_inputs(shift)
        return swap_mask(norms, valid, self.alpha, self.ddof).reshape(shift.shape[:-1])

    def extra_repr(self) -> str:
        return f"mode={self.mode}, hook={self.with_hook}, f={self.c_accu.shape[0]}"


class HookController(nn.Module):
    """Editor-level state on the root model: step counter, context templates, the scope context."""

    def __init__(self, info: dict[str, Any], scope: ScopeContext, device: torch.device) -> None:
        super().__init__()
        self.steps = nn.Parameter(torch.zeros((), dtype=torch.long, device=device), requires_grad=False)
        self.info = info
        self.scope = scope

    def capture_inputs(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the decoder stack: remember which tokens are padding or BOS."""
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        seq_len = input_ids.shape[-1] if input_ids is not None else (embeds.shape[1] if embeds is not None else None)
        self.scope.capture(input_ids, kwargs.get("attention_mask"), seq_len)

    def release_inputs(self, _module: nn.Module, _args: tuple, _kwargs: dict, _output: Any) -> None:
        """Forward hook on the decoder stack: the mask belongs to that forward only."""
        self.scope.valid = None

    def extra_repr(self) -> str:
        return f"alg={self.info.get('alg_name')}, layers={self.info.get('layers')}"
