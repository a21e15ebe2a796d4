"""Per-module predict and meta-gradient blocks (spec §1.4, §1.5) and weight-orientation helpers (§1.1).

Every shift is a ``(d_in, d_out)`` matrix; ``nn.Linear`` stores its weight ``(out, in)`` and GPT-2's
``Conv1D`` stores it ``(in, out)``, so the helpers below are the only place that knows the difference.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..distributed import SINGLE, RowReduce
from .network import HyperNet
from .solve import Form, RidgeSolve


def _is_transposed(module: nn.Module) -> bool:
    """True when the weight is stored ``(out, in)`` (nn.Linear), False for ``(in, out)`` (Conv1D)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, Conv1D):
        return False
    raise TypeError(f"edit modules must be nn.Linear or transformers Conv1D, got {type(module).__name__}; "
                    f"pick linear layers (e.g. mlp.down_proj) in edit_modules")


def module_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an edit module, the key used to share hyper-networks."""
    rows, cols = module.weight.shape
    return (cols, rows) if _is_transposed(module) else (rows, cols)


def to_in_out(module: nn.Module, tensor: Tensor) -> Tensor:
    """A tensor in the weight's storage orientation, seen as ``(d_in, d_out)``."""
    return tensor.T if _is_transposed(module) else tensor


def from_in_out(module: nn.Module, tensor: Tensor) -> Tensor:
    """A ``(d_in, d_out)`` tensor in the weight's storage orientation."""
    return tensor.T if _is_transposed(module) else tensor


def weight_grad_in_out(module: nn.Module) -> Tensor:
    """``∂L/∂W`` of an edit module as fp32 ``(d_in, d_out)`` (the meta-gradient's only input from the LLM)."""
    grad = module.weight.grad
    if grad is None:
        raise ValueError(f"{type(module).__name__} weight has no .grad; set requires_grad on the edit modules' "
                         f"weights and back-propagate the meta-loss before reading it")
    return to_in_out(module, grad).float()


def _weight_update(module: nn.Module, param_shift: Tensor, scale: float) -> Tensor:
    """``scale * param_shift`` in the weight's orientation, dtype and device: exactly what is added to it."""
    if tuple(param_shift.shape) != module_shape(module):
        raise ValueError(f"param_shift has shape {tuple(param_shift.shape)} but the module is (d_in, d_out) = "
                         f"{module_shape(module)}; was the shift predicted for another module?")
    weight = module.weight
    update = from_in_out(module, param_shift.detach().float() * scale)
    return update.to(device=weight.device, dtype=weight.dtype)


def add_param_shift_(module: nn.Module, param_shift: Tensor, scale: float = 1.0) -> None:
    """``W += scale * param_shift`` in place, in the weight's dtype and on its device.

    Writes through ``weight.data`` like the references, so autograd graphs built before the call keep
    their saved tensors (trainers revert shifts before back-propagating, spec §4.3 and §7 item 13).
    """
    module.weight.data.add_(_weight_update(module, param_shift, scale))


def shifted_weight(module: nn.Module, param_shift: Tensor, scale: float = 1.0) -> Tensor:
    """``W + scale * param_shift`` as :func:`add_param_shift_` would compute it, in a new tensor.

    Checked for NaN/inf (a bad shift, or a sum overflowing the weight's dtype) before any weight is written.
    """
    return module.weight.detach() + _weight_update(module, param_shift, scale)


def _row_chunks(n_rows: int, chunk_size: int) -> Iterator[slice]:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return (slice(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size))


def _check_rows(net: HyperNet, keys: Tensor, value_grads: Tensor) -> None:
    if keys.dim() != 2 or value_grads.dim() != 2 or keys.shape[0] != value_grads.shape[0]:
        raise ValueError(f"keys [N, d_in] and value_grads [N, d_out] need the same N, got {tuple(keys.shape)} "
                         f"and {tuple(value_grads.shape)}")
    if keys.shape[0] == 0:
        raise ValueError("no cached rows: the micro-batches have no answer positions (labels are all -100)")
    if (keys.shape[1], value_grads.shape[1]) != (net.key_size, net.value_size):
        raise ValueError(f"rows of shape ({keys.shape[1]}, {value_grads.shape[1]}) given to the hyper-network of "
                         f"shape ({net.key_size}, {net.value_size})")


def _value_diffs(net: HyperNet, module_idx: int, keys: Tensor, value_grads: Tensor) -> Tensor:
    """``d_r = -lr · <k_r, k̃_r> · g̃_r`` for a chunk of rows (in the network's dtype)."""
    keys = keys.to(net.device, net.dtype)
    pseudo_keys, pseudo_value_grads = net(keys, value_grads, module_idx)
    coef = -net.edit_lr(module_idx) * (keys * pseudo_keys).sum(dim=-1, keepdim=True)
    return coef * pseudo_value_grads


def predict_param_shift(net: HyperNet, module_idx: int, keys: Tensor, value_grads: Tensor, *, chunk_size: int,
                        solve_dtype: Optional[torch.dtype] = None, form: Form = "auto",
                        reduce: RowReduce = SINGLE, check: bool = True) -> tuple[Tensor, RidgeSolve, Tensor]:
    """MALMEN predict for one module: ``(param_shift [d_in, d_out], solver, value_diffs [N, d_out])``.

    Outputs are in the network's dtype (fp32 unless the network was cast); the solve runs in
    ``solve_dtype`` (default: the network's dtype). No graph is built; the returned solver holds the
    factored ridge matrix so the meta-gradient reuses it. With ``reduce``, ``keys`` are this rank's rows and
    the shift is that of the rows of all ranks. ``check=False`` leaves the solver's checks to the caller
    (:attr:`RidgeSolve.healthy`), so nothing waits for the device.
    """
    _check_rows(net, keys, value_grads)
    with torch.no_grad():
        value_diffs = torch.cat([_value_diffs(net, module_idx, keys[rows], value_grads[rows])
                                 for rows in _row_chunks(keys.shape[0], chunk_size)])
        solver = RidgeSolve(keys.to(net.device), net.lam(module_idx), dtype=solve_dtype or net.dtype, form=form,
                            reduce=reduce, check=check)
        param_shift = solver.solve(value_diffs)
    return param_shift, solver, value_diffs


def accumulate_meta_grad(net: HyperNet, module_idx: int, keys: Tensor, value_grads: Tensor, solver: RidgeSolve,
                         param_shift: Tensor, weight_grad: Tensor, *, chunk_size: int, reduce: RowReduce = SINGLE) -> None:
    """Add ``∂L/∂θ`` of every hyper-network parameter into ``.grad`` given ``weight_grad = ∂L/∂W``.

    The LLM and the network never share a graph: the solve's vector-Jacobian product gives ``∂L/∂D``
    and ``∂L/∂λ``, then each chunk of rows is re-run with grad and back-propagated on its own. With
    ``reduce`` each rank adds the part of its own rows (``weight_grad`` is the all-ranks one) and the
    batch-global ``λ`` term is added by the first rank only, so summing the ranks' gradients gives the total.
    """
    _check_rows(net, keys, value_grads)
    if solver.n_rows != keys.shape[0]:
        raise ValueError(f"solver was built from {solver.n_rows} rows but {keys.shape[0]} keys were given; pass the "
                         f"same cached rows to predict_param_shift and accumulate_meta_grad")
    value_diffs_grad, lam_grad = solver.backward(param_shift, weight_grad.to(solver.keys.device))
    value_diffs_grad = value_diffs_grad.to(net.device, net.dtype)
    lamda = net.lamda.weight[module_idx, 0]
    lamda_grad_const = (lam_grad * solver.lam).to(net.device, net.dtype)
    if reduce.is_first:
        (lamda_grad_const * lamda).backward()
    for rows in _row_chunks(keys.shape[0], chunk_size):
        value_diffs = _value_diffs(net, module_idx, keys[rows], value_grads[rows])
        (value_diffs_grad[rows] * value_diffs).sum().backward()
