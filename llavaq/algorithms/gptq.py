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

from collections.abc import Sequence
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


def prepare_hessian(hessian: Tensor, options: GPTQOptions = GPTQOptions(), dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> PreparedHessian:
    """Dampen, order and invert H once (float64 factorisation on the CPU, ``dtype`` result on ``device``)."""
    h = hessian.detach().to("cpu", torch.float64).clone()
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
    dev = torch.device(device) if device is not None else hessian.device
    # cast on the CPU, then move: an NPU need not support float64
    return PreparedHessian(_cholesky(hinv, upper=True).to(dtype).to(dev), None if perm is None else perm.to(dev),
                           dead.to(dev))


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


@torch.no_grad()
def gptq_codes(weight: Tensor, scale: Tensor, prepared: PreparedHessian, options: GPTQOptions = GPTQOptions(),
               offset: Tensor | None = None, code_range: tuple[int, int] = (-QMAX, QMAX)) -> Tensor:
    """int8 codes [out, in] of ``weight`` on the grid ``scale`` ([out, 1]) with GPTQ error compensation.

    Computed in the dtype and on the device of ``prepared.hinv_chol`` (float32 by default, float64 for
    references); the codes come back on ``weight``'s device.
    """
    return gptq_codes_shared([weight], [scale], prepared, options, None if offset is None else [offset],
                             code_range)[0]


#: rows of the stacked weight processed together inside a block: [block, rows] float32 stays in a core's L2
CACHE_BYTES = 1 << 20


@torch.no_grad()
def gptq_codes_shared(weights: Sequence[Tensor], scales: Sequence[Tensor], prepared: PreparedHessian,
                      options: GPTQOptions = GPTQOptions(), offsets: Sequence[Tensor] | None = None,
                      code_range: tuple[int, int] = (-QMAX, QMAX)) -> list[Tensor]:
    """GPTQ codes of several Linears that read the same input (q/k/v, gate/up), processed as one stack.

    GPTQ's rows are independent given the shared inverse-Hessian factor, so the Linears are stacked into one
    transposed matrix ``[in, Σout]``. Per block of columns, the column loop (rounding, error, rank-one
    updates inside the block: elementwise, in the order of the textbook loop) runs over row chunks that stay
    in cache, and the lazy update of the later columns is one in-place matrix product for the whole stack.
    The codes equal :func:`gptq_codes` of each Linear alone, bit for bit (tests/algorithms/test_gptq_speedpath.py).

    Weight-only grids: ``scales`` (and ``offsets``, asymmetric) ``[out, G]`` hold one value per group of
    ``in/G`` input columns, fixed beforehand from the float weight (GPTQModel's static groups: with act order
    the columns are processed permuted but keep their own group's scale, so the stored weight needs no
    ``g_idx``); codes are ``clamp(round(w/s + o), *code_range)`` and the error ``w − (q − o)·s``.
    """
    hinv = prepared.hinv_chol
    dtype, dev = hinv.dtype, hinv.device
    # [in, Σout]: stacked row-major, then one whole transpose (a strided copy into a slice is far slower)
    wt = torch.cat([w.detach().to(dev, dtype) for w in weights]).T.contiguous()
    ws, off = _column_grid(weights, scales, offsets, dtype, dev)
    wt[prepared.dead] = 0
    if prepared.perm is not None:
        wt = wt[prepared.perm]
        if ws.dim() == 2:
            ws = ws[prepared.perm].contiguous()
            off = None if off is None else off[prepared.perm].contiguous()
    wt = wt.contiguous()
    n_in, n_rows = wt.shape
    codes = torch.empty(n_in, n_rows, dtype=torch.int8, device=dev)
    bs = max(1, options.block_size)
    chunk = max(256, CACHE_BYTES // (wt.element_size() * bs)) if dev.type == "cpu" else n_rows
    buf = _Buffers(min(bs, n_in), n_rows, min(chunk, n_rows), dtype, dev)
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        block, hblock = wt[i1:i2], hinv[i1:i2, i1:i2]
        err = buf.err[: i2 - i1]
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            grid = _grid_slice(ws, off, i1, i2, r0, r1)
            _block_columns(block[:, r0:r1], grid, hblock, buf.q[: i2 - i1, r0:r1], err[:, r0:r1], buf, code_range)
        codes[i1:i2] = buf.q[: i2 - i1]
        if i2 < n_in:  # lazy BLAS-3 update of the later columns: W[:, i2:] −= E·H⁻¹[i1:i2, i2:]
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1)
    if prepared.perm is not None:
        codes = codes[torch.argsort(prepared.perm)]
    codes = codes.T.contiguous()  # [Σout, in]
    out, row = [], 0
    for w in weights:
        out.append(codes[row:row + w.shape[0]].to(w.device))
        row += w.shape[0]
    return out


def _column_grid(weights: Sequence[Tensor], scales: Sequence[Tensor], offsets: Sequence[Tensor] | None,
                 dtype: torch.dtype, dev: torch.device) -> tuple[Tensor, Tensor | None]:
    """The stack's scales: ``[Σout]`` (one per row, the W8A8 path) or, for groups / zero points, ``[in, Σout]``
    (one per element, transposed like the stack) with the offsets alike."""
    if offsets is None and all(s.dim() < 2 or s.shape[1] == 1 for s in scales):
        return torch.cat([s.detach().to(dev, dtype).reshape(-1) for s in scales]), None

    def columns(ts: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.detach().to(dev, dtype).reshape(w.shape[0], -1).repeat_interleave(
            w.shape[1] // t.reshape(w.shape[0], -1).shape[1], dim=1) for t, w in zip(ts, weights, strict=True)]
                         ).T.contiguous()

    return columns(scales), None if offsets is None else columns(offsets)


def _grid_slice(ws: Tensor, off: Tensor | None, i1: int, i2: int, r0: int, r1: int
                ) -> tuple[Tensor, Tensor | None]:
    if ws.dim() == 1:
        return ws[r0:r1], None
    return ws[i1:i2, r0:r1], None if off is None else off[i1:i2, r0:r1]


class _Buffers:
    """Scratch tensors reused by every block: float codes, errors, one column, the rank-one update."""

    def __init__(self, bs: int, n_rows: int, chunk: int, dtype: torch.dtype, dev: torch.device) -> None:
        self.q = torch.empty(bs, n_rows, dtype=dtype, device=dev)
        self.err = torch.empty(bs, n_rows, dtype=dtype, device=dev)
        self.col = torch.empty(chunk, dtype=dtype, device=dev)
        self.update = torch.empty(bs, chunk, dtype=dtype, device=dev)
        self._hrows: tuple[Tensor, list[Tensor]] | None = None

    def hrows(self, hblock: Tensor) -> list[Tensor]:
        """``[H⁻¹]_{i, i+1:}`` of the block as columns, one view each, made once per block (not per chunk)."""
        if self._hrows is None or self._hrows[0] is not hblock:
            self._hrows = (hblock, [hblock[i, i + 1:].unsqueeze(1) for i in range(hblock.shape[0])])
        return self._hrows[1]


def _block_columns(block: Tensor, grid: tuple[Tensor, Tensor | None], hblock: Tensor, q: Tensor, err: Tensor,
                   buf: _Buffers, code_range: tuple[int, int] = (-QMAX, QMAX)) -> None:
    """The column loop of one block on a chunk of rows (``block`` [b, rows], transposed, updated in place).

    Per element exactly the textbook loop's float operations: ``q = clamp(round(w/ws), −127, 127)``,
    ``e = (w − q·ws)/[H⁻¹]_ii``, then ``w_k −= e·[H⁻¹]_ik`` for the block's later columns k, one rank-one
    update per column (a rounded product, then a rounded difference: no fused multiply-add). A per-column grid
    (``grid`` [b, rows]: groups, zero points) gives ``q = clamp(round(w/s + o))`` and ``e = (w − (q − o)·s)/[H⁻¹]_ii``.
    """
    b, rows = block.shape
    tmp, update = buf.col[:rows], buf.update[:, :rows]
    hrows = buf.hrows(hblock)
    ws, off = grid
    lo, hi = code_range
    for i, (col, qi, ei, d) in enumerate(zip(block.unbind(0), q.unbind(0), err.unbind(0), hblock.diagonal().unbind(0),
                                             strict=True)):
        wsi = ws if ws.dim() == 1 else ws[i]
        torch.div(col, wsi, out=tmp)
        if off is not None:
            tmp.add_(off[i])
        torch.round(tmp, out=qi)
        qi.clamp_(lo, hi)
        if off is not None:
            torch.sub(qi, off[i], out=tmp)
            tmp.mul_(wsi)
        else:
            torch.mul(qi, wsi, out=tmp)
        torch.sub(col, tmp, out=ei)
        ei.div_(d)
        if i + 1 < b:
            upd = update[: b - i - 1]
            torch.mul(hrows[i], ei, out=upd)
            block[i + 1:].sub_(upd)


def weighted_error(weight: Tensor, dequantized: Tensor, hessian: Tensor) -> float:
    """``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)``: the output error power on the calibration inputs, relative."""
    w = weight.double()
    dw = w - dequantized.double()
    h = hessian.double()
    power = float(((w @ h) * w).sum())
    return float(((dw @ h) * dw).sum()) / max(power, 1e-300)


__all__ = ["GPTQOptions", "PreparedHessian", "prepare_hessian", "gptq_codes", "gptq_codes_shared", "weighted_error",
           "QMAX"]
