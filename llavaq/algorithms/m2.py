"""msModelSlim anti-outlier "m2" = Outlier Suppression+ 1-D range search (per-channel scaling).

Given the (possibly shifted) activation ``x`` ``[B, N, C]`` feeding a group of linears whose
concatenated weight is ``weight`` ``[sum_out, C]``, search a clipping threshold ``t`` and derive the
per-channel scale ``s = scale_for_threshold(cmax, cmin, t)``.  The loss of a candidate is the MSE
between the float block output ``block_fn(x, weight)`` and the output with fake-quantized
``x / s`` (per-tensor asymmetric uint8 over ``[-t, t]``) and ``weight * s`` (per-row symmetric).
Smoothing is then applied as ``x / s`` (into the preceding norm) and ``W * s`` (columns).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llavaq.algorithms.blocks import Block
from llavaq.algorithms.migration import (
    act_qparams,
    fake_quant_act_,
    fake_quant_weight_,
    migration_fake_quant_act,
    migration_fake_quant_weight,
    scale_for_threshold,
)
from llavaq.quant.int8 import EPS
from llavaq.recipe import M2_SEARCH_MODES

__all__ = [
    "scale_for_threshold",
    "migration_fake_quant_act",
    "migration_fake_quant_weight",
    "os_plus_search",
    "threshold_grid",
    "threshold_loss",
    "RangeSearch",
    "int_candidate_loss",
    "IntegerScreen",
    "quantize_weight_int8",
]

BlockFn = Callable[[Tensor, Tensor], Tensor]


def _candidate_loss(x: Tensor, weight: Tensor, block_fn: BlockFn, cmx: Tensor, cmn: Tensor, t: float,
                    y_ref: Tensor) -> Tensor:
    """``((block_fn(fq(x/s), fq(W·s)) − y_ref)²).sum(−1).mean()`` for threshold ``t`` (0-d tensor)."""
    s = scale_for_threshold(cmx, cmn, t)
    y = block_fn(fake_quant_act_(x / s, t), fake_quant_weight_(weight * s))
    y.sub_(y_ref)
    return y.mul_(y).sum(-1).mean()


def os_plus_search(
    x: Tensor,
    weight: Tensor,
    block_fn: BlockFn,
    *,
    steps_min: int = 100,
    mode: str = "full",
    info: dict | None = None,
) -> Tensor:
    """Return the per-channel migration scale ``[C]`` chosen by the OS+ 1-D range search.

    ``num = max(steps_min, int(amax / 0.5))`` candidate thresholds are visited from
    ``max(-amin, amax)`` down to 0.1 in equal steps; the first minimum of
    ``((block_fn(fq(x/s), fq(W*s)) - block_fn(x, W))**2).sum(-1).mean()`` wins.

    Modes (see :class:`RangeSearch`):

    - ``"exhaustive"``: every candidate in float, msModelSlim's loop operation for operation.
    - ``"full"`` (default): every candidate screened on the integer path (int8 x int8 -> int32
      products, ~4x the float GEMM's throughput, fused attention; part by part, dropped once its
      parts exceed the bound), then the candidates within a verified margin of the best
      re-evaluated in float; returns the exhaustive search's threshold (the margin is widened until
      it covers the largest screening error seen, see :meth:`RangeSearch.settle`).
    - ``"fast"``: the grid screened coarse-to-fine (about a third of it), then settled the same way;
      not guaranteed to find the full search's threshold (loss curves can have several dips).

    ``info`` (optional) receives ``threshold``, ``loss`` (float), ``evals`` (float block forwards),
    ``screened`` (integer-path work in whole-block forwards: parts screened / parts per block) and
    ``grid`` (size).
    """
    if mode not in M2_SEARCH_MODES:
        raise ValueError(f"unsupported mode {mode!r}")
    with torch.no_grad():
        search = RangeSearch(x, weight, block_fn, steps_min)
        if mode == "exhaustive":
            best = search.exhaustive()
        elif mode == "full":
            best = search.settle(range(len(search.grid)))
        else:
            best = search.settle(search.coarse_to_fine())
        if info is not None:
            info.update(threshold=search.grid[best], loss=search.float_losses[best],
                        evals=len(search.float_losses), screened=search.screened, grid=len(search.grid))
        return scale_for_threshold(search.cmx, search.cmn, search.grid[best])


class RangeSearch:
    """One group's threshold search: the grid, and its candidates' losses on both paths (memoised).

    ``float_loss(i)`` is msModelSlim's loss (float fake quant, float GEMM, the block's own ops);
    ``int_loss(i)`` is the same quantity with the quantized operands multiplied exactly as integers
    and the block's screening ops (:attr:`Block.screen`), which differ from the float path only by
    float rounding (measured ≤ 3e-4 relative on the demo model, mostly < 1e-5).

    Screening goes part by part (:meth:`Block.parts`: head groups, channel groups): a candidate's
    loss is the sum of its parts' non-negative squared errors, so once the parts screened so far
    exceed the bound a candidate must beat, it is dropped without screening the rest (branch and
    bound: exact, the dropped candidates' losses are above the bound).  Parts are visited
    largest-error first (the order measured on the first candidate completed).
    """

    #: candidates whose screened loss is within this relative margin of the best are re-evaluated in
    #: float; it is widened to ``SAFETY`` x the largest screening error observed on them.
    MARGIN = 2e-3
    SAFETY = 8.0
    #: quantized activations (int8) kept between a candidate's probe and its continuation
    ACT_CACHE_BYTES = 1 << 30

    def __init__(self, x: Tensor, weight: Tensor, block_fn: BlockFn, steps_min: int = 100) -> None:
        self.x, self.weight, self.block = x, weight, block_fn
        self.cmx = x.amax(dim=(0, 1))
        self.cmn = x.amin(dim=(0, 1))
        self.grid = threshold_grid(x, steps_min)
        self.y_ref = block_fn(x, weight)
        self.float_losses: dict[int, float] = {}
        self.int_losses: dict[int, float] = {}
        # torch._int_mm is exact on any shape on the CPU; on accelerators it has shape limits (CUDA)
        # or no kernel (NPU), where screening falls back to the float loss (= the exhaustive search)
        self._integer_path = isinstance(block_fn, Block) and x.device.type == "cpu"
        self._screen = IntegerScreen(x, weight, block_fn, self.y_ref) if self._integer_path else None
        self._order = list(range(len(self._screen.parts))) if self._screen else [0]
        self._ordered = False
        self._sse: dict[int, list[float]] = {}  # per candidate: squared errors of the parts screened, in _order
        self._parts_screened = 0
        self._acts: dict[int, tuple[Tensor, Tensor, Tensor, int]] = {}

    @property
    def screened(self) -> float:
        """Integer-path block forwards spent, in whole-block units (parts screened / parts per block)."""
        if not self._integer_path:
            return float(len(self.int_losses))
        return self._parts_screened / len(self._order)

    def float_loss(self, i: int) -> float:
        if i not in self.float_losses:
            self.float_losses[i] = float(_candidate_loss(self.x, self.weight, self.block, self.cmx, self.cmn,
                                                         self.grid[i], self.y_ref))
        return self.float_losses[i]

    def int_loss(self, i: int) -> float:
        """Candidate ``i``'s screened loss (all its parts)."""
        self._advance(i)
        return self.int_losses[i]

    def lower_bound(self, i: int) -> float:
        """Candidate ``i``'s screened loss if complete, else the part of it screened so far (a lower bound)."""
        if i in self.int_losses:
            return self.int_losses[i]
        return sum(self._sse.get(i, ())) / self._screen.tokens

    def _advance(self, i: int, limit: float = math.inf, max_parts: int | None = None) -> bool:
        """Screen candidate ``i``'s next parts until it is complete (True), its partial loss exceeds
        ``limit``, or ``max_parts`` more parts are done."""
        if i in self.int_losses:
            return True
        if not self._integer_path:  # screen in float: a plain callable, or not on a CPU
            self.int_losses[i] = self.float_loss(i)
            return True
        done = self._sse.setdefault(i, [])
        bound = limit * self._screen.tokens
        total = sum(done)
        if total > bound:
            return False
        stop = len(self._order) if max_parts is None else min(len(self._order), len(done) + max_parts)
        act = self._acts.pop(i, None) or self._screen.quantize_act(self.cmx, self.cmn, self.grid[i])
        while len(done) < stop and total <= bound:
            done.append(self._screen.part_sse(act, self._order[len(done)]))
            total += done[-1]
            self._parts_screened += 1
        if len(done) < len(self._order):
            # stopped by max_parts (the probe): keep the quantized activations for the continuation
            if total <= bound and (len(self._acts) + 1) * act[1].numel() <= self.ACT_CACHE_BYTES:
                self._acts[i] = act
            return False
        self.int_losses[i] = total / self._screen.tokens
        return True

    def _screen_set(self, cands: list[int], keep: int = 1, margin: float = 0.0) -> None:
        """Screen ``cands`` until the ``keep`` smallest screened losses among them are known exactly;
        every other candidate is left complete or with a partial loss above ``(1 + margin)`` x the
        ``keep``-th smallest."""
        pending = [i for i in cands if i not in self.int_losses]
        for i in pending:  # probe: one part of each (a cheap first ranking)
            if not self._sse.get(i):
                self._advance(i, max_parts=1)
        pending.sort(key=lambda i: (self.lower_bound(i), i))
        if pending and not self._ordered:
            self._advance(pending[0])
            self._order_parts(self._sse.get(pending[0], []))
        done = sorted(self.int_losses[j] for j in cands if j in self.int_losses)
        for i in pending:
            if i in self.int_losses:  # the candidate completed above to order the parts
                continue
            if self._advance(i, done[keep - 1] * (1 + margin) if len(done) >= keep else math.inf):
                bisect.insort(done, self.int_losses[i])

    def _order_parts(self, sse: list[float]) -> None:
        """Visit the parts after the first in decreasing order of ``sse`` (one candidate's part errors),
        so that candidates above the bound are dropped after fewer parts.  Only while no candidate
        has gone past its first part (their partial sums stay sums over the same parts)."""
        self._ordered = True
        if len(sse) != len(self._order) or any(len(v) > 1 for j, v in self._sse.items() if j not in self.int_losses):
            return
        perm = [0] + sorted(range(1, len(sse)), key=lambda p: -sse[p])
        self._order = [self._order[p] for p in perm]
        for j, v in self._sse.items():
            if len(v) == len(perm):
                self._sse[j] = [v[p] for p in perm]

    def exhaustive(self) -> int:
        """msModelSlim's loop: every candidate in float, the first minimum."""
        return min(range(len(self.grid)), key=lambda i: (self.float_loss(i), i))

    def coarse_to_fine(self, windows: int = 2) -> list[int]:
        """Screen every k-th candidate (k = isqrt(n)), then every candidate within k of the best
        ``windows`` coarse points (so that a second dip next to the coarse winner is refined too);
        returns the candidates visited (those of the windows are screened by :meth:`settle`)."""
        n = len(self.grid)
        k = max(1, math.isqrt(n))
        coarse = sorted(set(range(0, n, k)) | {n - 1})
        self._screen_set(coarse, keep=windows)
        ranked = sorted((i for i in coarse if i in self.int_losses), key=lambda i: (self.int_losses[i], i))
        cands = set(coarse)
        for c in ranked[:windows]:
            cands.update(range(max(0, c - k + 1), min(n, c + k)))
        return sorted(cands)

    def settle(self, candidates) -> int:
        """Screen ``candidates`` on the integer path; re-evaluate in float those within the margin of
        the best screened loss and return the first float minimum among them.

        Any candidate left out has a screened loss above ``best·(1 + margin)`` (a candidate dropped
        early has a partial loss above it); it cannot be the float minimum unless the screening error
        exceeds ``margin/2``. The margin starts at ``MARGIN`` and is widened to ``SAFETY`` x the
        largest relative screening error measured on the re-evaluated candidates (screening and
        re-evaluating more) until it covers it.
        """
        cands = list(candidates)
        self._screen_set(cands, keep=1, margin=self.MARGIN)
        best = min(self.int_losses[i] for i in cands if i in self.int_losses)
        margin = self.MARGIN
        while True:
            limit = best * (1 + margin) if best > 0 else math.inf
            for i in cands:
                if self.lower_bound(i) <= limit:
                    self._advance(i)
            chosen = [i for i in cands if i in self.int_losses and self.int_losses[i] <= limit]
            err = max(abs(self.float_loss(i) - self.int_losses[i]) / max(self.float_loss(i), 1e-30)
                      for i in chosen)
            if self.SAFETY * err <= margin or len(chosen) == len(cands):
                break
            margin = self.SAFETY * err
        return min(chosen, key=lambda i: (self.float_losses[i], i))


def threshold_grid(x: Tensor, steps_min: int = 100) -> list[float]:
    """The candidate thresholds of the full search, in its visiting order (same float arithmetic)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    amx = torch.maximum(x.max(), zero)
    amn = torch.minimum(x.min(), zero)
    num = max(steps_min, int(amx / 0.5))
    hi = float(torch.maximum(-amn, amx).item())
    lo = 0.1
    step = (hi - lo) / num
    out, t = [], hi
    while t >= lo:
        out.append(t)
        t = t - step
    return out or [hi]


def threshold_loss(x: Tensor, weight: Tensor, block_fn: BlockFn, t: float, y_ref: Tensor | None = None) -> Tensor:
    """The search's loss for threshold ``t`` (the quantity both modes minimise)."""
    with torch.no_grad():
        cmx = x.amax(dim=(0, 1))
        cmn = x.amin(dim=(0, 1))
        y_ref = block_fn(x, weight) if y_ref is None else y_ref
        return _candidate_loss(x, weight, block_fn, cmx, cmn, t, y_ref)


# ---------------------------------------------------------------------------------------------
# Integer path: the same candidate loss with the quantized operands multiplied as integers.

_ROW_BLOCK_BYTES = 1 << 21  # weight rows quantized per step: keeps the working set in cache


def quantize_weight_int8(weight: Tensor, s: Tensor, out: Tensor, rowsum: Tensor | None = None,
                         rows: Tensor | None = None) -> Tensor:
    """Integer values and row scales of :func:`migration_fake_quant_weight` ``(weight * s)``.

    Writes ``round(weight*s / r)`` (|.| <= 127 by construction of ``r``) into ``out`` (int8 ``[O, C]``)
    and returns ``r`` ``[O, 1]``; the same float operations per element as the fake quant, done in row
    blocks that stay in cache. ``rowsum`` (optional, ``[O]``) receives each row's integer sum.
    ``rows`` (optional int64 indices) quantizes only those rows of ``weight``, in that order
    (``O = len(rows)``).
    """
    n = weight.shape[0] if rows is None else rows.numel()
    step = max(1, _ROW_BLOCK_BYTES // (weight.shape[1] * weight.element_size()))
    buf = torch.empty(min(step, n), weight.shape[1], dtype=weight.dtype, device=weight.device)
    mag = torch.empty_like(buf)
    scales = torch.empty(n, 1, dtype=weight.dtype, device=weight.device)
    for i in range(0, n, step):
        j = min(i + step, n)
        if rows is None:
            ws = torch.mul(weight[i:j], s, out=buf[: j - i])
        else:
            ws = torch.index_select(weight, 0, rows[i:j], out=buf[: j - i]).mul_(s)
        # max(-min(row, 0), max(row, 0)) == max |row|: the kernel's scale, one cheap reduction
        r = torch.clamp(torch.abs(ws, out=mag[: j - i]).amax(1, keepdim=True) / 127, min=EPS)
        ws.div_(r).round_()
        out[i:j].copy_(ws)
        scales[i:j] = r
        if rowsum is not None:
            rowsum[i:j] = ws.sum(1)  # integers < 2^24: exact in float
    return scales


class IntegerScreen:
    """The search's loss with the linear computed as an exact int8 x int8 -> int32 product, part by part.

    The quantized integers are those of the float search; only the product differs from the float
    GEMM — it is exact here, where the float GEMM rounds (relative error ~1e-7 per output).  A
    candidate's activations are quantized once (:meth:`quantize_act`), then each part
    (:meth:`Block.parts`) quantizes its weight rows and returns its summed squared error
    (:meth:`part_sse`); the loss is the parts' sum over ``tokens``.
    """

    def __init__(self, x: Tensor, weight: Tensor, block: Block, y_ref: Tensor) -> None:
        self.x, self.weight, self.y_ref = x, weight, y_ref
        self.parts = block.parts(weight.shape[0])
        self.tokens = y_ref.numel() // y_ref.shape[-1]
        rows = max(p.rows.numel() for p in self.parts)
        self._wq = torch.empty(rows, weight.shape[1], dtype=torch.int8, device=weight.device)
        self._rows = [p.rows.to(weight.device) for p in self.parts]
        self._bias = [None if block.bias is None else block.bias[r] for r in self._rows]

    def quantize_act(self, cmx: Tensor, cmn: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor, int]:
        """``(s, q, sa, shift)``: the migration scale, the activations as int8 ``q - 128`` ``[B*N, C]``,
        their scale, and ``128 - zero point`` (0 or 1)."""
        x = self.x
        s = scale_for_threshold(cmx, cmn, t)
        sa, zp = act_qparams(t, x, 255)
        q = (x / s).div_(sa).round_().add_(zp).clamp_(0, 255).sub_(128).to(torch.int8).reshape(-1, x.shape[-1])
        return s, q, sa, int(128 - zp.item())  # q - zp = (q - 128) + shift

    def part_sse(self, act: tuple[Tensor, Tensor, Tensor, int], k: int) -> float:
        """Summed squared error of part ``k``'s block output for the quantized candidate ``act``."""
        s, q, sa, shift = act
        x, rows = self.x, self._rows[k]
        wq = self._wq[: rows.numel()]
        rowsum = torch.empty(rows.numel(), dtype=x.dtype, device=x.device) if shift else None
        r = quantize_weight_int8(self.weight, s, wq, rowsum, rows)
        acc = torch._int_mm(q, wq.t())
        sr = (r.reshape(1, -1) * sa).to(x.dtype)
        y = torch.mul(acc, sr)  # int32 x float -> float in one pass
        const = shift * rowsum * sr if shift else None
        if self._bias[k] is not None:
            const = self._bias[k] if const is None else const + self._bias[k]
        if const is not None:
            y += const
        part = self.parts[k]
        out = part.screen(y.reshape(*x.shape[:-1], -1))
        return float(F.mse_loss(out, self.y_ref[..., part.cols], reduction="sum"))


def int_candidate_loss(x: Tensor, weight: Tensor, block: Block, cmx: Tensor, cmn: Tensor, t: float,
                       y_ref: Tensor) -> float:
    """:func:`threshold_loss` with the linear computed as an exact int8 x int8 -> int32 product
    (all parts of :class:`IntegerScreen`)."""
    screen = IntegerScreen(x, weight, block, y_ref)
    act = screen.quantize_act(cmx, cmn, t)
    return sum(screen.part_sse(act, k) for k in range(len(screen.parts))) / screen.tokens
