"""Block functions ``f(x, w)`` whose output error drives the m2 (OS+) range search.

Each factory returns a :class:`Block` ``block(x, w)`` with ``x`` ``[B, N, C]`` and ``w`` the concatenated
weight ``[sum_out, C]`` of the smoothed linears, mirroring msModelSlim's migration module types
``llama_qkv``, ``up_and_gate``, ``llava_vit_qkv`` and ``c_fc`` (transformers 4.37 semantics).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Block",
    "causal_mask",
    "llama_qkv_block",
    "gate_up_block",
    "clip_qkv_block",
    "clip_fc1_block",
    "rotate_half",
]

BlockFn = Callable[[Tensor, Tensor], Tensor]


class Block:
    """``block(x, w) = post(F.linear(x, w, bias))``: the smoothed linears followed by the rest of the block.

    Keeping ``post`` separate lets the m2 search feed it a linear output computed another way (the
    integer product of the quantized operands) while ``__call__`` does exactly the float operations
    msModelSlim's kernel does.
    """

    def __init__(self, post: Callable[[Tensor], Tensor], bias: Tensor | None = None,
                 screen: Callable[[Tensor], Tensor] | None = None) -> None:
        self.post = post
        self.bias = bias
        #: the same function as ``post`` with faster float arithmetic (fused attention); used where
        #: only rounding-level agreement is needed (the m2 search's screening pass)
        self.screen = screen or post

    def __call__(self, x: Tensor, w: Tensor) -> Tensor:
        return self.post(F.linear(x, w, self.bias))


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
) -> Block:
    """LLaMA self-attention up to (excluding) ``o_proj``: ``[B, N, num_heads*head_dim]``.

    ``attention_mask`` is the 4-D additive mask transformers 4.37 passes to the layer
    (``[B, 1, N, N]``).  With ``None`` a causal mask is used, which is what msModelSlim's kernel does
    (verified: with ``None`` it matches an explicit causal mask, not "no mask").
    """
    n_rep = num_heads // num_kv_heads
    cos = cos_cached[position_ids].unsqueeze(1)  # the same for every candidate: computed once
    sin = sin_cached[position_ids].unsqueeze(1)
    masks: dict[tuple[int, torch.dtype], Tensor] = {}
    inv_norm = math.sqrt(head_dim)

    def rotated_heads(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = y.shape
        q, k, v = torch.split(y, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        q = q.view(b, n, num_heads, head_dim).transpose(1, 2)
        k = k.view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        v = v.view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def post(y: Tensor) -> Tensor:
        b, n, _ = y.shape
        q, k, v = rotated_heads(y)
        k = _repeat_kv(k, n_rep)
        v = _repeat_kv(v, n_rep)
        attn = torch.matmul(q, k.transpose(2, 3)).div_(inv_norm)
        if attention_mask is not None:
            mask = attention_mask
        else:
            mask = masks.get((n, attn.dtype))
            if mask is None:
                mask = masks.setdefault((n, attn.dtype), causal_mask(n, attn.dtype, attn.device))
        attn.add_(mask)
        attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(attn, v)
        return out.transpose(1, 2).reshape(b, n, num_heads * head_dim)

    def screen(y: Tensor) -> Tensor:
        b, n, _ = y.shape
        q, k, v = rotated_heads(y)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None,
                                             enable_gqa=n_rep > 1)
        return out.transpose(1, 2).reshape(b, n, num_heads * head_dim)

    return Block(post, screen=screen)


def gate_up_block(act_fn: Callable[[Tensor], Tensor]) -> Block:
    """``act(x W_gate^T) * (x W_up^T)`` with ``w = cat(W_gate, W_up)``."""

    def post(y: Tensor) -> Tensor:
        inter = y.shape[-1] // 2
        return act_fn(y[..., :inter]) * y[..., inter:]

    return Block(post)


def clip_qkv_block(embed_dim: int, num_heads: int, head_dim: int, bias: Tensor) -> Block:
    """CLIP self-attention up to (excluding) ``out_proj``, no mask: ``[B, N, embed_dim]``."""
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
        b, n, _ = y.shape
        q, k, v = (t.view(b, n, num_heads, head_dim).transpose(1, 2) for t in torch.split(y, embed_dim, -1))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(b, n, embed_dim)

    return Block(post, bias, screen)


def clip_fc1_block(bias: Tensor) -> Block:
    """Exact-erf GELU of ``x W^T + b`` (the kernel ignores CLIP's quick_gelu ``act_fn``)."""
    return Block(F.gelu, bias)
