"""The MALMEN ridge least-squares shift and its backward, written once (spec §1.4, §1.5, §8.2, §8.3).

``param_shift = argmin ||K Δ - D||² + λ||Δ||² = (KᵀK + λI)^-1 Kᵀ D``. The matrix is factored once per
(module, step) and reused by the predict solve and the meta-gradient solve, which the references redo
from scratch with LU. When there are fewer cached rows than key features the dual (kernel) form
``Δ = Kᵀ (KKᵀ + λI)^-1 D`` is used: an N×N instead of a d_in×d_in system (push-through identity).
With rows sharded over data-parallel ranks (``reduce``), ``KᵀK`` and ``KᵀD`` are summed over ranks and
the primal form is used, so every rank solves the same system. The primal form needs the keys only
through sums over rows, so keys given as :class:`ChunkedKeys` are read chunk by chunk and never held
whole (issue 27.4): ``KᵀK = Σ_c K_cᵀK_c``, ``KᵀD = Σ_c K_cᵀD_c`` (:meth:`RidgeSolve.solve_projected`) and
``∂L/∂D_c = K_c A⁻¹G`` (:meth:`RidgeSolve.backward_primal`).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..distributed import SINGLE, RowReduce

Form = Literal["auto", "primal", "dual"]


class ChunkedKeys(NamedTuple):
    """Keys read chunk by chunk: ``n_rows`` rows of ``key_size`` columns; ``chunks()`` yields them in row order."""

    n_rows: int
    key_size: int
    chunks: Callable[[], Iterator[Tensor]]


def _as_positive_float(lam: Union[float, Tensor]) -> float:
    value = float(lam.detach()) if isinstance(lam, Tensor) else float(lam)
    if not value > 0.0 or value == float("inf"):
        raise ValueError(f"ridge coefficient lam must be a positive finite number, got {value!r}; "
                         f"lam = exp(lamda) of the hyper-network, check that lamda is finite")
    return value


class RidgeSolve:
    """A factored ridge system for one module's keys, reusable for the shift and its backward.

    Building one never waits for the device when ``check=False``: whether the Cholesky factorisation
    succeeded, the keys are finite and a tensor ``lam`` is positive and finite is kept in the device
    flag :attr:`healthy`, which the caller reads once for all modules of a step (then calls
    :meth:`verify` on a failure). ``check=True`` verifies at once.
    """

    def __init__(self, keys: Union[Tensor, ChunkedKeys], lam: Union[float, Tensor], *,
                 dtype: torch.dtype = torch.float32, form: Form = "auto", reduce: RowReduce = SINGLE,
                 check: bool = True) -> None:
        shape = (keys.n_rows, keys.key_size) if isinstance(keys, ChunkedKeys) else tuple(keys.shape)
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"keys must be a non-empty [N, d_in] matrix, got shape {shape}")
        if form not in ("auto", "primal", "dual"):
            raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype (float32 or float64), got {dtype}")
        if reduce.active and form == "dual":
            raise ValueError("the dual form needs every row in one process; use form='primal' (or 'auto') when the "
                             "rows are sharded over ranks")
        self.reduce = reduce
        #: the ridge coefficient: a float (checked here) or a 0-dim tensor (checked in :attr:`healthy`)
        self.lam: Union[float, Tensor] = lam.detach() if isinstance(lam, Tensor) else _as_positive_float(lam)
        self.dtype = dtype
        n_rows, d_in = shape
        self._shape = (n_rows, d_in)
        if reduce.active:
            self.form: Literal["primal", "dual"] = "primal"
        else:
            self.form = ("primal" if d_in <= n_rows else "dual") if form == "auto" else form
        #: every key in one tensor, or None when the keys are read in chunks (primal form)
        self.keys: Optional[Tensor] = None
        self._chunked: Optional[ChunkedKeys] = None
        if isinstance(keys, ChunkedKeys) and self.form == "primal":
            self._chunked = keys
        else:
            self.keys = (torch.cat(list(keys.chunks())) if isinstance(keys, ChunkedKeys) else keys).detach().to(dtype)
        gram, self._finite = self._gram()
        factor, info = torch.linalg.cholesky_ex(gram)
        del gram
        self._factor: Tensor = factor
        self._pivots: Optional[Tensor] = None
        healthy = (info == 0) & self._finite
        if isinstance(self.lam, Tensor):
            healthy = healthy & torch.isfinite(self.lam) & (self.lam > 0)
        #: device flag: factored by Cholesky, keys finite, lam positive and finite
        self.healthy: Tensor = healthy
        self._last_dual: Optional[tuple[Tensor, Tensor]] = None
        if check:
            self.verify()

    def _chunks(self) -> Iterator[Tensor]:
        if self._chunked is None:
            yield self._whole_keys("")
            return
        for chunk in self._chunked.chunks():
            yield chunk.detach().to(self.dtype)

    def _gram(self) -> tuple[Tensor, Tensor]:
        """``(KᵀK + λI, keys finite)``: primal summed over chunks and ranks, or ``KKᵀ + λI`` (dual)."""
        gram: Optional[Tensor] = None
        finite: Optional[Tensor] = None
        for chunk in self._chunks():
            part = chunk.T @ chunk if self.form == "primal" else chunk @ chunk.T
            gram = part if gram is None else gram.add_(part)
            ok = torch.isfinite(chunk).all()
            finite = ok if finite is None else finite & ok
        assert gram is not None and finite is not None  # n_rows > 0 was checked
        if self.form == "primal":
            gram = self.reduce.sum(gram)
        gram.diagonal().add_(self.lam)
        return gram, finite

    def verify(self) -> None:
        """Read :attr:`healthy` (one host synchronisation): raise for corrupt keys or a bad ``lam``; when only
        the Cholesky factorisation failed, factor by LU instead (a warning says how to avoid it)."""
        if bool(self.healthy):
            return
        if not bool(self._finite):
            raise ValueError("keys contain NaN or inf; the cached activations are corrupt (check the model dtype)")
        _as_positive_float(self.lam)
        warnings.warn(f"ridge matrix ({self.form} form, lam={float(self.lam):g}, {self.dtype}) is not numerically "
                      f"positive definite; falling back to an LU solve. Use dtype=torch.float64 or a "
                      f"larger lamda to restore the Cholesky path", RuntimeWarning, stacklevel=2)
        self._factor, self._pivots = torch.linalg.lu_factor(self._gram()[0])
        self.healthy = torch.ones_like(self.healthy)

    @property
    def n_rows(self) -> int:
        return self._shape[0]

    @property
    def key_size(self) -> int:
        return self._shape[1]

    @property
    def uses_cholesky(self) -> bool:
        return self._pivots is None

    def _solve_gram(self, rhs: Tensor) -> Tensor:
        if self._pivots is None:
            return torch.cholesky_solve(rhs, self._factor)
        return torch.linalg.lu_solve(self._factor, self._pivots, rhs)

    def _check(self, name: str, tensor: Tensor, rows: int, expected_rows: str) -> None:
        if tensor.dim() != 2 or tensor.shape[0] != rows:
            raise ValueError(f"{name} must be [{expected_rows}, d_out] = [{rows}, d_out], got {tuple(tensor.shape)}")

    def _whole_keys(self, what: str) -> Tensor:
        if self.keys is None:
            raise ValueError(f"this solver reads its keys in chunks; use {what}")
        return self.keys

    def solve(self, value_diffs: Tensor) -> Tensor:
        """``param_shift = (KᵀK+λI)^-1 Kᵀ D`` as a [d_in, d_out] matrix in ``value_diffs``' dtype."""
        self._check("value_diffs", value_diffs, self.n_rows, "N")
        keys = self._whole_keys("solve_projected with KᵀD summed over the chunks")
        rhs = value_diffs.detach().to(device=keys.device, dtype=self.dtype)
        if self.form == "primal":
            param_shift = self.solve_projected(keys.T @ rhs).to(value_diffs.dtype)
        else:
            coef = self._solve_gram(rhs)
            param_shift = (keys.T @ coef).to(value_diffs.dtype)
            self._last_dual = (param_shift, coef)
        return param_shift

    def solve_projected(self, projected: Tensor) -> Tensor:
        """Primal form: ``param_shift = (KᵀK+λI)^-1 P`` from ``P = Kᵀ D`` of this rank's rows (summed over ranks here)."""
        if self.form != "primal":
            raise ValueError("solve_projected is the primal form's; this solver uses the dual form")
        self._check("KᵀD", projected, self.key_size, "d_in")
        return self._solve_gram(self.reduce.sum(projected.detach().to(self.dtype)))

    def backward_primal(self, param_shift: Tensor, weight_grad: Tensor) -> tuple[Tensor, Tensor]:
        """Primal form: ``(mat = (KᵀK+λI)^-1 G, lam_grad)``; ``∂L/∂D`` of a chunk of rows is ``K_c @ mat``."""
        if self.form != "primal":
            raise ValueError("backward_primal is the primal form's; this solver uses the dual form")
        self._check("weight_grad", weight_grad, self.key_size, "d_in")
        if param_shift.shape != weight_grad.shape:
            raise ValueError(f"param_shift {tuple(param_shift.shape)} and weight_grad {tuple(weight_grad.shape)} "
                             f"must both be [d_in, d_out]")
        device = self._factor.device
        mat = self._solve_gram(weight_grad.detach().to(device=device, dtype=self.dtype))
        lam_grad = -(mat * param_shift.detach().to(device=device, dtype=self.dtype)).sum()
        return mat, lam_grad

    def backward(self, param_shift: Tensor, weight_grad: Tensor) -> tuple[Tensor, Tensor]:
        """Vector-Jacobian product of :meth:`solve` given ``weight_grad = ∂L/∂param_shift``.

        Returns ``(value_diffs_grad = K (KᵀK+λI)^-1 G, lam_grad = ∂L/∂λ = -<(KᵀK+λI)^-1 G, Δ>)``;
        multiply ``lam_grad`` by λ for the gradient of the log-parameter ``lamda``.
        """
        keys = self._whole_keys("backward_primal and multiply each chunk of keys by its mat")
        if self.form == "primal":
            mat, lam_grad = self.backward_primal(param_shift, weight_grad)
            return (keys @ mat).to(weight_grad.dtype), lam_grad.to(weight_grad.dtype)
        self._check("weight_grad", weight_grad, self.key_size, "d_in")
        if param_shift.shape != weight_grad.shape:
            raise ValueError(f"param_shift {tuple(param_shift.shape)} and weight_grad {tuple(weight_grad.shape)} "
                             f"must both be [d_in, d_out]")
        grad = weight_grad.detach().to(device=keys.device, dtype=self.dtype)
        shift = param_shift.detach().to(device=keys.device, dtype=self.dtype)
        value_diffs_grad = self._solve_gram(keys @ grad)
        lam_grad = self._dual_lam_grad(param_shift, shift, grad, value_diffs_grad)
        return value_diffs_grad.to(weight_grad.dtype), lam_grad.to(weight_grad.dtype)

    def _dual_lam_grad(self, param_shift: Tensor, shift: Tensor, grad: Tensor, value_diffs_grad: Tensor) -> Tensor:
        """``-<A^-1 G, Δ>`` in the dual form.

        For the shift this solver produced (Δ = Kᵀ C) it equals ``-<value_diffs_grad, C>`` exactly, which
        avoids the cancellation in ``A^-1 G = (G - Kᵀ (KKᵀ+λI)^-1 K G) / λ`` used for any other Δ.
        """
        if self._last_dual is not None and self._last_dual[0] is param_shift:
            return -(value_diffs_grad * self._last_dual[1]).sum()
        inv_grad = (grad - self._whole_keys("the primal form").T @ value_diffs_grad) / self.lam
        return -(inv_grad * shift).sum()
