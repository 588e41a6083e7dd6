"""PROVISIONAL (replaced by the kernels branch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rot(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)

def llama_qkv_block(num_heads, num_kv_heads, head_dim, cos_cached, sin_cached, position_ids, attention_mask):
    def fn(x, w):
        b, n, _ = x.shape
        y = x @ w.T
        q, k, v = y.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        q = q.view(b, n, num_heads, head_dim).transpose(1, 2)
        k = k.view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        v = v.view(b, n, num_kv_heads, head_dim).transpose(1, 2)
        cos = cos_cached[position_ids].unsqueeze(1); sin = sin_cached[position_ids].unsqueeze(1)
        q = q * cos + _rot(q) * sin; k = k * cos + _rot(k) * sin
        rep = num_heads // num_kv_heads
        k = k.repeat_interleave(rep, 1); v = v.repeat_interleave(rep, 1)
        a = q @ k.transpose(2, 3) / head_dim ** 0.5
        if attention_mask is not None:
            a = a + attention_mask
        a = torch.softmax(a.float(), -1)
        return (a @ v).transpose(1, 2).reshape(b, n, -1)
    return fn

def gate_up_block(act_fn):
    def fn(x, w):
        y = x @ w.T
        g, u = y.chunk(2, -1)
        return act_fn(g) * u
    return fn

def clip_qkv_block(embed_dim, num_heads, head_dim, bias):
    def fn(x, w):
        b, n, _ = x.shape
        y = x @ w.T + bias
        q, k, v = y.split(embed_dim, -1)
        q = q * head_dim ** -0.5
        sh = lambda t: t.view(b, n, num_heads, head_dim).transpose(1, 2).reshape(b * num_heads, n, head_dim)
        a = torch.softmax(torch.bmm(sh(q), sh(k).transpose(1, 2)), -1)
        return torch.bmm(a, sh(v))
    return fn

def clip_fc1_block(bias):
    return lambda x, w: F.gelu(x @ w.T + bias)
