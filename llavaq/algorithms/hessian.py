"""Input moments of a Linear, and the Hessian GPTQ needs under any smoothing derived later.

Calibration records, per Linear input (one record for Linears that share it: q/k/v, gate/up), the token
count ``n``, the per-channel mean ``μ`` and the centred second moment ``C = Σ_t (x_t − μ)(x_t − μ)ᵀ`` —
the same information as XᵀX and the column sums (``XᵀX = C + n·μμᵀ``, ``Σx = n·μ``) but without the
cancellation that XᵀX suffers on channels whose mean dwarfs their spread. A smoothing ``x' = (x − z)/s``
decided at export time (m1 with another α, ``--alpha auto``, a calibrated m2 scale) then gives the
Hessian of the smoothed input exactly::

    H' = Σ_t x'_t x'_tᵀ = diag(1/s) · (C + n·(μ − z)(μ − z)ᵀ) · diag(1/s)

``C`` is symmetric, so the cache stores its upper triangle (float32): ``in·(in+1)/2`` values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class InputMoments:
    """Running (n, μ, C) of a Linear's input rows; ``update`` merges one batch exactly (Chan et al.)."""

    n: float = 0
    mean: Tensor | None = None  # float64 [in]
    cov: Tensor | None = None  # float32 [in, in], centred second moment (a sum, not divided by n)

    def update(self, x: Tensor, weights: Tensor | None = None) -> None:
        """Merge a batch of rows; ``weights`` (one per row) count a row that many times (``n`` = their sum)."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        if weights is None:
            nb = x.shape[0]
            mb = x.double().mean(0)
            xc = x.float() - mb.float()
            cb = xc.T @ xc
        else:
            w = weights.reshape(-1).double()
            nb = float(w.sum())
            mb = (w[:, None] * x.double()).sum(0) / nb
            xc = x.float() - mb.float()
            cb = (xc * w.float()[:, None]).T @ xc
        if self.mean is None:
            self.n, self.mean, self.cov = nb, mb, cb
            return
        n = self.n + nb
        d = mb - self.mean
        self.cov += cb
        self.cov += (torch.outer(d, d) * (self.n * nb / n)).float()
        self.mean = self.mean + d * (nb / n)
        self.n = n

    def to_tensors(self) -> dict[str, Tensor]:
        assert self.mean is not None and self.cov is not None
        n = torch.tensor([self.n], dtype=torch.int64 if float(self.n).is_integer() else torch.float64)
        return {"n": n, "mean": self.mean.double(),
                "cov": pack_upper(self.cov)}

    @classmethod
    def from_tensors(cls, n: Tensor, mean: Tensor, cov: Tensor) -> InputMoments:
        m = mean.double()
        count = n.reshape(-1)[0]
        return cls(int(count) if not count.is_floating_point() else float(count), m, unpack_upper(cov, m.numel()))


def pack_upper(mat: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row, as float32."""
    n = mat.shape[0]
    return torch.cat([mat[i, i:] for i in range(n)]).float()


def unpack_upper(vec: Tensor, n: int) -> Tensor:
    """The symmetric float64 matrix whose upper triangle :func:`pack_upper` stored."""
    if vec.numel() != n * (n + 1) // 2:
        raise ValueError(f"packed triangle has {vec.numel()} values, a {n}x{n} matrix needs {n * (n + 1) // 2}")
    out = torch.empty(n, n, dtype=torch.float64)
    pos = 0
    v = vec.double()
    for i in range(n):
        row = v[pos:pos + n - i]
        out[i, i:] = row
        out[i:, i] = row
        pos += n - i
    return out


def smoothed_hessian(moments: InputMoments, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """``Σ x'x'ᵀ`` (float64) of the smoothed input ``x' = (x − z)/s`` from the recorded moments (exact)."""
    assert moments.mean is not None and moments.cov is not None
    d = moments.mean - (shift.double() if shift is not None else 0.0)
    h = moments.cov.double() + moments.n * torch.outer(d, d)
    if scale is not None:
        inv = 1.0 / scale.double()
        h = h * inv.unsqueeze(0) * inv.unsqueeze(1)
    return h


__all__ = ["InputMoments", "pack_upper", "unpack_upper", "smoothed_hessian"]
