"""PROVISIONAL (replaced by the kernels branch)."""
from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps

def activation_qparams(x_min, x_max, bits=8):
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    scale = torch.clamp((x_max - x_min) / 255, min=EPS)
    offset = torch.round(-x_min / scale) - 128
    return scale, offset

def fake_quant_activation(x, scale, offset, bits=8):
    q = torch.clamp(torch.round(x / scale + offset), -128, 127)
    return (q - offset) * scale

def weight_qparams(w):
    return torch.clamp(w.abs().amax(1, keepdim=True) / 127, min=EPS).to(w.dtype)

def quantize_weight(w, scale):
    return torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)

def fake_quant_weight(w, scale):
    return torch.clamp(torch.round(w / scale), -127, 127) * scale
