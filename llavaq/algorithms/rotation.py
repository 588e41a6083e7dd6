"""Orthogonal rotations of a residual stream and the folds that put them into the weights (QuaRot, SpinQuant R1/R2).

Pure math on tensors, float64 throughout; the caller casts the results.

**Hadamard matrices** (±1 entries, ``H·Hᵀ = n·I``) are built for every order ``n = 2^k·m`` where ``m`` is 1
(Sylvester), ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (Paley I: 12, 20, 24, 44, 48, 60, 68, 72, 80, 84, 104,
108, ...) or ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (Paley II: 12, 28, 36, 60, 76, 84, 108, 124, ...):
``H = H_{2^k} ⊗ H_m``. That covers LLaVA-1.5-7B (4096 = 2^12), 13B (5120 = 256·20), SmolLM2-135M (576 = 16·36),
Qwen2-0.5B (896 = 32·28) and Qwen2-7B (3584 = 128·28). Paley over prime *powers* (e.g. q = 49) and
Williamson-type tables are not built: those orders get a seeded random orthogonal matrix instead (QR of a
Gaussian, signs fixed), and :class:`Rotation` says which one it is.

**Randomised Hadamard**: ``Q = H·diag(d)/√n`` with a seeded ±1 vector ``d`` (orthogonal). ``x·Q`` is applied
without forming ``Q``: ``H`` is the Kronecker product of Sylvester factors of order ≤ 64 and ``H_m``, so
``x·H`` is a few small products along the axes of ``x`` reshaped to the factor sizes (two 64×64 products
per row for 4096), not one n×n product: rotating a 7B layer costs ~1/30 of the dense GEMM.

**Folds** (weights are ``[out, in]``, ``y = x·Wᵀ + b``, activations are rows, the rotated stream is ``h·Q``):

* RMSNorm γ into the Linears that read the norm: ``W ← W·diag(γ)``, γ ← 1 (RMSNorm commutes with Q);
* input side (a Linear reading the rotated stream): ``W ← W·Q``; its bias is unchanged;
* output side (a Linear writing the stream): ``W ← Qᵀ·W``, ``b ← Qᵀ·b``; embeddings ``E ← E·Q``;
* per head (R2, between ``v_proj`` and ``o_proj``): ``v_proj`` rows of each KV head ``W_g ← R2ᵀ·W_g``
  (bias too), ``o_proj`` columns of each query head ``W_h ← W_h·R2`` (one R2 shared by all heads, so it
  holds for grouped-query attention: attention mixes tokens, not channels, so ``softmax·(v·R2) =
  (softmax·v)·R2``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

F64 = torch.float64


# ---------------------------------------------------------------------------------------------- constructions
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _quadratic_character(q: int) -> torch.Tensor:
    """χ(a) for a in 0..q−1: 0, +1 (a non-zero square mod q) or −1."""
    chi = -torch.ones(q, dtype=F64)
    chi[0] = 0
    for a in range(1, q):
        chi[a * a % q] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """``J[i, j] = χ(j − i)`` over GF(q), q prime."""
    idx = torch.arange(q)
    return _quadratic_character(q)[(idx[None, :] - idx[:, None]) % q]


def paley_kind(m: int) -> tuple[str, int] | None:
    """``("paley1", q)`` if m = q + 1 (q prime ≡ 3 mod 4), ``("paley2", q)`` if m = 2(q + 1) (q prime ≡ 1 mod 4)."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):
        return "paley1", q
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            return "paley2", q
    return None


def paley_hadamard(m: int) -> torch.Tensor:
    """A Hadamard matrix of order m by Paley's first or second construction (float64, ±1)."""
    kind = paley_kind(m)
    if kind is None:
        raise ValueError(f"no Paley construction of order {m}")
    name, q = kind
    j = _jacobsthal(q)
    if name == "paley1":  # H = I + S, S = [[0, 1ᵀ], [−1, J]] (skew)
        s = torch.zeros(q + 1, q + 1, dtype=F64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = j
        return torch.eye(q + 1, dtype=F64) + s
    # Paley II: C = [[0, 1ᵀ], [1, J]] (symmetric conference matrix); 0 -> [[1,−1],[−1,−1]], ±1 -> ±[[1,1],[1,−1]]
    c = torch.zeros(q + 1, q + 1, dtype=F64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = j
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=F64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=F64), zero)


def sylvester_hadamard(p: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order p = 2^k (symmetric)."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Sylvester needs a power of two, not {p}")
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factors(n: int) -> tuple[int, int, str] | None:
    """``(2^k, m, construction)`` with ``n = 2^k·m`` and a known Hadamard matrix of order m, smallest m first.

    ``construction`` is ``"sylvester"`` (m = 1), ``"paley1"`` or ``"paley2"``; None when no construction here
    reaches n (n ≢ 0 mod 4 beyond 1 and 2 has no Hadamard matrix at all).
    """
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # largest power of two dividing n
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1:
            return n, 1, "sylvester"
        kind = paley_kind(m)
        if kind is not None:
            return 1 << j, m, kind[0]
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense ±1 Hadamard matrix ``H_{2^k} ⊗ H_m`` of order n (for tests and small n)."""
    f = hadamard_factors(n)
    if f is None:
        raise ValueError(f"no Hadamard construction of order {n}")
    p, m, _ = f
    core = torch.ones(1, 1, dtype=F64) if m == 1 else paley_hadamard(m)
    return torch.kron(sylvester_hadamard(p), core)


def kron_factors(n: int, block: int = 64) -> tuple[torch.Tensor, ...] | None:
    """±1 matrices of order ≤ max(block, m) whose Kronecker product (in order) is :func:`hadamard_matrix` (n).

    ``H_{2^k} = H_{64} ⊗ H_{64} ⊗ ...`` (Sylvester's matrix is the k-fold Kronecker power of H_2), so ``x·H`` is
    a few small matrix products along the axes of ``x`` reshaped to the factor sizes instead of one n×n product.
    """
    f = hadamard_factors(n)
    if f is None:
        return None
    p, m, _ = f
    out = []
    while p > 1:
        b = min(p, block)
        out.append(sylvester_hadamard(b))
        p //= b
    if m > 1:
        out.append(paley_hadamard(m))
    return tuple(out) or (torch.ones(1, 1, dtype=F64),)


def kron_apply(x: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x·(F_1 ⊗ F_2 ⊗ ...)`` along the last dimension of ``x``, without forming the product."""
    lead = x.shape[:-1]
    sizes = [f.shape[0] for f in factors]
    y = x.contiguous().reshape(*lead, *sizes)  # a transposed view would reshape into a slow strided one
    for t, f in enumerate(factors):
        pos = len(lead) + t
        y = torch.movedim(torch.movedim(y, pos, -1) @ f, -1, pos)
    return y.reshape(*lead, x.shape[-1])


# ---------------------------------------------------------------------------------------------- rotations
def _generator(seed: int, label: str) -> torch.Generator:
    """An independent, reproducible random stream per (seed, label): the residual and head rotations differ."""
    digest = hashlib.sha256(f"llavaq-rotation:{seed}:{label}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class Rotation:
    """An orthogonal n×n matrix Q, applied to rows (``x·Q``) without forming it when it is a Hadamard one."""

    n: int
    kind: str  # "hadamard" | "random_orthogonal"
    construction: str  # e.g. "sylvester 4096", "sylvester 16 x paley2 36", "QR of a Gaussian (...)"
    seed: int
    factors: tuple[torch.Tensor, ...]  # ±1 Kronecker factors of H (hadamard), or (Q,) (random_orthogonal)
    signs: torch.Tensor | None = None  # d in Q = H·diag(d)/√n

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Q`` along the last dimension, in float64."""
        x = x.to(F64)
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of size {self.n} applied to a last dimension of {x.shape[-1]}")
        y = kron_apply(x, self.factors)
        return y if self.signs is None else y * (self.signs / math.sqrt(self.n))

    def matrix(self) -> torch.Tensor:
        """The dense Q (float64)."""
        return self.apply(torch.eye(self.n, dtype=F64))

    def describe(self) -> dict[str, object]:
        return {"size": self.n, "kind": self.kind, "construction": self.construction}


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian with the signs of R's diagonal moved into Q."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=F64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(n, dtype=F64))


def make_rotation(n: int, seed: int, label: str = "residual") -> Rotation:
    """The randomised Hadamard rotation of size n (seeded), or a seeded random orthogonal one without a construction."""
    g = _generator(seed, label)
    f = hadamard_factors(n)
    if f is None:
        return Rotation(n, "random_orthogonal", f"QR of a Gaussian (no Hadamard construction of order {n})", seed,
                        (random_orthogonal(n, g),))
    p, m, kind = f
    signs = torch.randint(0, 2, (n,), generator=g).to(F64) * 2 - 1
    what = f"sylvester {p}" if m == 1 else (f"{kind} {m}" if p == 1 else f"sylvester {p} x {kind} {m}")
    return Rotation(n, "hadamard", what, seed, kron_factors(n), signs)


# ---------------------------------------------------------------------------------------------- folds
def fold_norm(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``W·diag(γ)``: the norm's weight moved into a Linear that reads it."""
    return weight.to(F64) * gamma.to(F64)


def rotate_input(weight: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """``W·Q``: a Linear (or an embedding table's rows) reading / holding the rotated stream."""
    return rot.apply(weight)


def rotate_output(weight: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """``Qᵀ·W``: a Linear writing the rotated stream."""
    return rot.apply(weight.to(F64).T).T


def rotate_vector(bias: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """``Qᵀ·b``: the bias of a Linear writing the rotated stream."""
    return rot.apply(bias)


def rotate_head_outputs(weight: torch.Tensor, rot: Rotation, n_heads: int) -> torch.Tensor:
    """``R2ᵀ·W_g`` for each head's block of output rows (``v_proj``); also a bias, as a 1-D tensor."""
    w = weight.to(F64)
    hd = rot.n
    if w.dim() == 1:
        return rot.apply(w.reshape(n_heads, hd)).reshape(-1)
    out_f, in_f = w.shape
    blocks = w.reshape(n_heads, hd, in_f).transpose(1, 2)  # [heads, in, hd]
    return rot.apply(blocks).transpose(1, 2).reshape(out_f, in_f)


def rotate_head_inputs(weight: torch.Tensor, rot: Rotation, n_heads: int) -> torch.Tensor:
    """``W_h·R2`` for each head's block of input columns (``o_proj``)."""
    w = weight.to(F64)
    out_f, in_f = w.shape
    return rot.apply(w.reshape(out_f, n_heads, rot.n)).reshape(out_f, in_f)
