"""GPTQ: error-compensated rounding of int8 per-row weights on a fixed grid (``--weight_method gptq``).

Optimal brain quantization column by column (Frantar et al., "GPTQ", 2022): with H = XᵀX of the Linear's
input over the calibration tokens, quantizing column j to q_j leaves the error δ = (w_j − q_j)/[H⁻¹]_jj,
which the not-yet-quantized columns absorb, w_k −= δ·[H⁻¹]_jk, so that ‖X(W − Ŵ)ᵀ‖² grows as little as
possible. The inverse Hessian's upper Cholesky factor gives every [H⁻¹] row needed after removing the
columns already done (the "Cholesky reformulation"), and updates outside the current block of columns
are applied lazily, one matrix product per block.

The grid is the caller's: a per-row scale ``ws`` ([out, 1], msModelSlim's ``absmax/127`` of the float
weight, exactly what round-to-nearest uses) and codes in [−127, 127]. Only the rounding decisions change,
so every output format writes GPTQ weights unchanged.

Options: ``damp`` (λ = damp·mean(diag H) added to the diagonal: numerical stability and a prior towards
round-to-nearest), ``block_size`` (columns per lazy update: speed only, the result does not depend on it
beyond float rounding) and ``act_order`` (columns in decreasing order of diag H: the large-activation
columns are quantized first, while the most columns remain to absorb their error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QMAX = 127


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False


@dataclass
class PreparedHessian:
    """What GPTQ needs of one input's Hessian: shared by every Linear that reads that input (q, k, v)."""

    hinv_chol: Tensor  # upper Cholesky factor of (H + λI)⁻¹, columns in processing order
    perm: Tensor | None  # processing order of the input columns (act_order), None = natural
    dead: Tensor  # bool [in]: input channels that were never non-zero (their weights are irrelevant)


def prepare_hessian(hessian: Tensor, options: GPTQOptions = GPTQOptions(), dtype: torch.dtype = torch.float32
                    ) -> PreparedHessian:
    """Dampen, order and invert H once (float64 factorisation, ``dtype`` result)."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if options.act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    d = torch.diagonal(h)
    d += options.damp * float(d.mean())
    chol = _cholesky(h)
    hinv = torch.cholesky_inverse(chol)
    return PreparedHessian(_cholesky(hinv, upper=True).to(dtype), perm, dead)


def _cholesky(h: Tensor, upper: bool = False) -> Tensor:
    """Cholesky factor; if H is numerically not positive definite, add more damping until it is."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(h + extra * eye, upper=upper)
        if int(info) == 0:
            return factor
        extra = max(extra * 10, 1e-6 * float(torch.diagonal(h).abs().mean()) or 1e-12)
    raise ValueError("the Hessian is not positive definite even with extra damping")


def _round_column(w: Tensor, scale: Tensor) -> Tensor:
    """Codes of one column on the per-row grid: ``clamp(round(w/ws), −127, 127)`` (as float)."""
    return torch.clamp(torch.round(w / scale), -QMAX, QMAX)


@torch.no_grad()
def gptq_codes(weight: Tensor, scale: Tensor, prepared: PreparedHessian, options: GPTQOptions = GPTQOptions()
               ) -> Tensor:
    """int8 codes [out, in] of ``weight`` on the grid ``scale`` ([out, 1]) with GPTQ error compensation.

    Computed in the dtype of ``prepared.hinv_chol`` (float32 by default, float64 for references).
    """
    dtype = prepared.hinv_chol.dtype
    w = weight.to(dtype).clone()
    ws = scale.to(dtype).reshape(-1)
    w[:, prepared.dead] = 0
    if prepared.perm is not None:
        w = w[:, prepared.perm]
    hinv = prepared.hinv_chol
    n_out, n_in = w.shape
    codes = torch.zeros_like(w)
    bs = max(1, options.block_size)
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        block = w[:, i1:i2].clone()
        err = torch.zeros_like(block)
        hblock = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i]
            q = _round_column(col, ws)
            codes[:, i1 + i] = q
            e = (col - q * ws) / hblock[i, i]
            block[:, i:] -= e.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    if prepared.perm is not None:
        codes = codes[:, torch.argsort(prepared.perm)]
    return codes.to(torch.int8)


def weighted_error(weight: Tensor, dequantized: Tensor, hessian: Tensor) -> float:
    """``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)``: the output error power on the calibration inputs, relative."""
    w = weight.double()
    dw = w - dequantized.double()
    h = hessian.double()
    power = float(((w @ h) * w).sum())
    return float(((dw @ h) * dw).sum()) / max(power, 1e-300)


__all__ = ["GPTQOptions", "PreparedHessian", "prepare_hessian", "gptq_codes", "weighted_error", "QMAX"]
