"""Block functions ``f(x, w)`` whose output error drives the m2 (OS+) range search.

Each factory returns a :class:`Block` ``block(x, w)`` with ``x`` ``[B, N, C]`` and ``w`` the concatenated
weight ``[sum_out, C]`` of the smoothed linears, mirroring msModelSlim's migration module types
``llama_qkv``, ``up_and_gate``, ``llava_vit_qkv`` and ``c_fc`` (transformers 4.37 semantics).

Every block's output splits into independent parts (attention heads, MLP channels): a part's output
columns depend only on some rows of ``w``.  The squared error of a candidate is the sum of its parts'
squared errors, so the m2 search can stop evaluating a candidate as soon as the parts seen so far
already exceed the best loss (see :class:`llavaq.algorithms.m2.RangeSearch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Block",
    "BlockPart",
    "causal_mask",
    "llama_qkv_block",
    "gate_up_block",
    "clip_qkv_block",
    "clip_fc1_block",
    "rotate_half",
]

BlockFn = Callable[[Tensor, Tensor], Tensor]

#: at most this many parts per block, each of at least MIN_PART_ROWS weight rows (smaller int8 GEMMs
#: lose throughput; more parts only refine the early stop a little)
MAX_PARTS = 32
MIN_PART_ROWS = 256


@dataclass(frozen=True)
class BlockPart:
    """Block output columns ``cols`` = ``screen(linear output over weight rows `rows`)``."""

    rows: Tensor  # int64 weight row indices, in the order ``screen`` expects its input columns
    cols: slice  # the block output columns this part produces
    screen: Callable[[Tensor], Tensor]


class Block:
    """``block(x, w) = post(F.linear(x, w, bias))``: the smoothed linears followed by the rest of the block.

    Keeping ``post`` separate lets the m2 search feed it a linear output computed another way (the
    integer product of the quantized operands) while ``__call__`` does exactly the float operations
    msModelSlim's kernel does.  ``partition(rows)`` (optional) splits the block into independent
    :class:`BlockPart` s for a weight of ``rows`` rows; without it the block is one part.
    """

    def __init__(self, post: Callable[[Tensor], Tensor], bias: Tensor | None = None,
                 screen: Callable[[Tensor], Tensor] | None = None,
                 partition: Callable[[int], list[BlockPart]] | None = None) -> None:
        self.post = post
        self.bias = bias
        #: the same function as ``post`` with faster float arithmetic (fused attention); used where
        #: only rounding-level agreement is needed (the m2 search's screening pass)
        self.screen = screen or post
        self._partition = partition

    def __call__(self, x: Tensor, w: Tensor) -> Tensor:
        return self.post(F.linear(x, w, self.bias))

    def parts(self, rows: int) -> list[BlockPart]:
        """The block's independent parts for a weight of ``rows`` rows (one part: the whole block)."""
        if self._partition is None:
            return [BlockPart(torch.arange(rows), slice(None), self.screen)]
        return self._partition(rows)


def _ranges(n: int, unit_rows: int) -> list[tuple[int, int]]:
    """Split ``n`` units of ``unit_rows`` weight rows each into at most MAX_PARTS contiguous ranges."""
    k = max(1, min(MAX_PARTS, n, n * unit_rows // MIN_PART_ROWS))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _span(start: int, a: int, b: int, width: int) -> Tensor:
    return torch.arange(start + a * width, start + b * width)


def rotate_half(x: Tensor) -> Tensor:
    """Rotate half the hidden dims (LLaMA RoPE helper)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def causal_mask(n: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Additive causal mask ``[1, 1, n, n]``: 0 on/below the diagonal, ``finfo(dtype).min`` above."""
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return m[None, None]


def llama_qkv_block(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cos_cached: Tensor,
    sin_cached: Tensor,
    position_ids: Tensor,
    attention_mask: Tensor | None,
    bias: Tensor | None = None,
) -> Block:
    """LLaMA self-attention up to (excluding) ``o_proj``: ``[B, N, num_heads*head_dim]``.

    ``bias`` (Qwen2: the concatenated q/k/v biases) is added to the linear output before RoPE, as the
    layer does; msModelSlim's ``llama_qkv`` kernel has none (Llama has no q/k/v biases).

    ``attention_mask`` is the 4-D additive mask transformers 4.37 passes to the layer
    (``[B, 1, N, N]``).  With ``None`` a causal mask is used, which is what msModelSlim's kernel does
    (verified: with ``None`` it matches an explicit causal mask, not "no mask").  Parts: groups of
    key/value heads with their query heads.
    """
    attn = _LlamaQKV(num_heads, num_kv_heads, head_dim, cos_cached[position_ids].unsqueeze(1),
                     sin_cached[position_ids].unsqueeze(1), attention_mask)  # cos/sin: computed once
    return Block(attn.post, bias, screen=attn.screen_heads(num_kv_heads), partition=attn.partition)


@dataclass
class _LlamaQKV:
    """The attention of :func:`llama_qkv_block` on the q/k/v linear output ``y`` (RoPE, softmax, values)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    cos: Tensor
    sin: Tensor
    attention_mask: Tensor | None
    masks: dict[tuple[int, torch.dtype], Tensor] = field(default_factory=dict)  # causal masks by (n, dtype)

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def rotated_heads(self, y: Tensor, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = y.shape
        heads, head_dim = kv_heads * self.n_rep, self.head_dim
        q, k, v = torch.split(y, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        q = q.view(b, n, heads, head_dim).transpose(1, 2)
        k = k.view(b, n, kv_heads, head_dim).transpose(1, 2)
        v = v.view(b, n, kv_heads, head_dim).transpose(1, 2)
        cos, sin = self.cos, self.sin
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def post(self, y: Tensor) -> Tensor:
        b, n, _ = y.shape
        q, k, v = self.rotated_heads(y, self.num_kv_heads)
        k = _repeat_kv(k, self.n_rep)
        v = _repeat_kv(v, self.n_rep)
        attn = torch.matmul(q, k.transpose(2, 3)).div_(math.sqrt(self.head_dim))
        if self.attention_mask is not None:
            mask = self.attention_mask
        else:
            mask = self.masks.get((n, attn.dtype))
            if mask is None:
                mask = self.masks.setdefault((n, attn.dtype), causal_mask(n, attn.dtype, attn.device))
        attn.add_(mask)
        attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(attn, v)
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def screen_heads(self, kv_heads: int) -> Callable[[Tensor], Tensor]:
        def screen(y: Tensor) -> Tensor:
            b, n, _ = y.shape
            q, k, v = self.rotated_heads(y, kv_heads)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attention_mask,
                                                 is_causal=self.attention_mask is None, enable_gqa=self.n_rep > 1)
            return out.transpose(1, 2).reshape(b, n, kv_heads * self.n_rep * self.head_dim)

        return screen

    def partition(self, rows: int) -> list[BlockPart]:
        n_rep, head_dim = self.n_rep, self.head_dim
        q_rows, kv_rows = self.num_heads * head_dim, self.num_kv_heads * head_dim
        out = []
        for a, b in _ranges(self.num_kv_heads, (n_rep + 2) * head_dim):
            idx = torch.cat([_span(0, a, b, n_rep * head_dim), _span(q_rows, a, b, head_dim),
                             _span(q_rows + kv_rows, a, b, head_dim)])
            out.append(BlockPart(idx, slice(a * n_rep * head_dim, b * n_rep * head_dim), self.screen_heads(b - a)))
        return out


def gate_up_block(act_fn: Callable[[Tensor], Tensor]) -> Block:
    """``act(x W_gate^T) * (x W_up^T)`` with ``w = cat(W_gate, W_up)``.  Parts: intermediate channels."""

    def post(y: Tensor) -> Tensor:
        inter = y.shape[-1] // 2
        return act_fn(y[..., :inter]) * y[..., inter:]

    def partition(rows: int) -> list[BlockPart]:
        inter = rows // 2
        return [BlockPart(torch.cat([_span(0, a, b, 1), _span(inter, a, b, 1)]), slice(a, b), post)
                for a, b in _ranges(inter, 2)]

    return Block(post, partition=partition)


def clip_qkv_block(embed_dim: int, num_heads: int, head_dim: int, bias: Tensor | None) -> Block:
    """CLIP self-attention up to (excluding) ``out_proj``, no mask: ``[B, N, embed_dim]``.  Parts: heads."""
    scale = head_dim**-0.5

    def post(y: Tensor) -> Tensor:
        b, n, _ = y.shape
        q, k, v = torch.split(y, embed_dim, -1)
        q = q * scale

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, num_heads, head_dim).transpose(1, 2).reshape(b * num_heads, n, head_dim)

        q, k, v = heads(q), heads(k), heads(v)
        attn = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        out = torch.bmm(attn, v)
        return out.view(b, num_heads, n, head_dim).transpose(1, 2).reshape(b, n, embed_dim)

    def screen(y: Tensor) -> Tensor:
        b, n, width = y.shape
        heads = width // (3 * head_dim)
        q, k, v = (t.view(b, n, heads, head_dim).transpose(1, 2) for t in torch.split(y, heads * head_dim, -1))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(b, n, heads * head_dim)

    def partition(rows: int) -> list[BlockPart]:
        return [BlockPart(torch.cat([_span(j * embed_dim, a, b, head_dim) for j in range(3)]),
                          slice(a * head_dim, b * head_dim), screen)
                for a, b in _ranges(num_heads, 3 * head_dim)]

    return Block(post, bias, screen, partition)


def clip_fc1_block(bias: Tensor | None) -> Block:
    """Exact-erf GELU of ``x W^T + b`` (the kernel ignores CLIP's quick_gelu ``act_fn``).  Parts: channels."""

    def partition(rows: int) -> list[BlockPart]:
        return [BlockPart(_span(0, a, b, 1), slice(a, b), F.gelu) for a, b in _ranges(rows, 1)]

    return Block(F.gelu, bias, partition=partition)
