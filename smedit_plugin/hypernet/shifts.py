"""Per-module predict and meta-gradient blocks (spec §1.4, §1.5) and weight-orientation helpers (§1.1).

Every shift is a ``(d_in, d_out)`` matrix; ``nn.Linear`` stores its weight ``(out, in)`` and GPT-2's
``Conv1D`` stores it ``(in, out)``, so the helpers below are the only place that knows the difference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..distributed import SINGLE, RowReduce
from .cache import ModuleCache
from .network import HyperNet
from .solve import ChunkedKeys, Form, RidgeSolve


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


def _check_rows(net: HyperNet, rows: ModuleCache) -> None:
    if rows.n_rows == 0:
        raise ValueError("no cached rows: the micro-batches have no answer positions (labels are all -100)")
    if (rows.key_size, rows.value_size) != (net.key_size, net.value_size):
        raise ValueError(f"rows of shape ({rows.key_size}, {rows.value_size}) given to the hyper-network of "
                         f"shape ({net.key_size}, {net.value_size})")


def _value_diffs(net: HyperNet, module_idx: int, keys: Tensor, value_grads: Tensor) -> Tensor:
    """``d_r = -lr · <k_r, k̃_r> · g̃_r`` for a chunk of rows (in the network's dtype)."""
    keys = keys.to(net.device, net.dtype)
    pseudo_keys, pseudo_value_grads = net(keys, value_grads, module_idx)
    coef = -net.edit_lr(module_idx) * (keys * pseudo_keys).sum(dim=-1, keepdim=True)
    return coef * pseudo_value_grads


def predict_param_shift(net: HyperNet, module_idx: int, rows: ModuleCache, *, chunk_size: int,
                        solve_dtype: Optional[torch.dtype] = None, form: Form = "auto",
                        reduce: RowReduce = SINGLE, check: bool = True) -> tuple[Tensor, RidgeSolve]:
    """MALMEN predict for one module: ``(param_shift [d_in, d_out], solver)`` from its cached ``rows``.

    Rows are read ``chunk_size`` at a time: the network runs chunk by chunk and, in the primal form, only
    ``KᵀK`` and ``KᵀD`` (sums over chunks) are kept, so memory does not grow with the rows; the dual
    form (fewer rows than key features) holds its rows' ``K`` and ``D``. Outputs are in the network's dtype
    (fp32 unless the network was cast); the solve runs in ``solve_dtype`` (default: the network's dtype).
    No graph is built; the returned solver holds the factored ridge matrix so the meta-gradient reuses it.
    With ``reduce``, ``rows`` are this rank's and the shift is that of the rows of all ranks. ``check=False``
    leaves the solver's checks to the caller (:attr:`RidgeSolve.healthy`), so nothing waits for the device.
    """
    _check_rows(net, rows)
    dtype = solve_dtype or net.dtype
    with torch.no_grad():
        keys = ChunkedKeys(rows.n_rows, rows.key_size,
                           lambda: (k for k, _ in rows.chunks(chunk_size, device=net.device)))
        solver = RidgeSolve(keys, net.lam(module_idx), dtype=dtype, form=form, reduce=reduce, check=check)
        diffs = ((k, _value_diffs(net, module_idx, k, g)) for k, g in rows.chunks(chunk_size, device=net.device))
        if solver.form == "dual":
            return solver.solve(torch.cat([d for _, d in diffs])), solver
        projected: Optional[Tensor] = None
        for k, d in diffs:
            part = k.to(dtype).T @ d.to(dtype)
            projected = part if projected is None else projected.add_(part)
        assert projected is not None  # _check_rows: at least one row
        return solver.solve_projected(projected).to(net.dtype), solver


def accumulate_meta_grad(net: HyperNet, module_idx: int, rows: ModuleCache, solver: RidgeSolve,
                         param_shift: Tensor, weight_grad: Tensor, *, chunk_size: int, reduce: RowReduce = SINGLE) -> None:
    """Add ``∂L/∂θ`` of every hyper-network parameter into ``.grad`` given ``weight_grad = ∂L/∂W``.

    The LLM and the network never share a graph: the solve's vector-Jacobian product gives ``∂L/∂D``
    and ``∂L/∂λ``, then each chunk of rows is re-run with grad and back-propagated on its own (in the
    primal form the chunk's ``∂L/∂D = K_c (KᵀK+λI)⁻¹G`` is formed there, so no ``[N, d_out]`` tensor exists).
    With ``reduce`` each rank adds the part of its own rows (``weight_grad`` is the all-ranks one) and the
    batch-global ``λ`` term is added by the first rank only, so summing the ranks' gradients gives the total.
    """
    _check_rows(net, rows)
    if solver.n_rows != rows.n_rows:
        raise ValueError(f"solver was built from {solver.n_rows} rows but {rows.n_rows} rows were given; pass the "
                         f"same cached rows to predict_param_shift and accumulate_meta_grad")
    mat: Optional[Tensor] = None
    value_diffs_grad: Optional[Tensor] = None
    if solver.form == "primal":
        mat, lam_grad = solver.backward_primal(param_shift, weight_grad)
        lam_grad = lam_grad.to(weight_grad.dtype)
    else:
        value_diffs_grad, lam_grad = solver.backward(param_shift, weight_grad)
        value_diffs_grad = value_diffs_grad.to(net.device, net.dtype)
    lamda = net.lamda.weight[module_idx, 0]
    lamda_grad_const = (lam_grad * solver.lam).to(net.device, net.dtype)
    if reduce.is_first:
        (lamda_grad_const * lamda).backward()
    start = 0
    for keys, value_grads in rows.chunks(chunk_size, device=net.device):
        stop = start + keys.shape[0]
        if mat is not None:
            chunk_grad = (keys.to(solver.dtype) @ mat).to(weight_grad.dtype).to(net.device, net.dtype)
        else:
            assert value_diffs_grad is not None
            chunk_grad = value_diffs_grad[start:stop]
        value_diffs = _value_diffs(net, module_idx, keys, value_grads)
        (chunk_grad * value_diffs).sum().backward()
        start = stop
