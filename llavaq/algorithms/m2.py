"""PROVISIONAL (replaced by the kernels branch)."""
from __future__ import annotations

import torch


def os_plus_search(x, weight, block_fn, *, mode="full", steps_min=100):
    y = block_fn(x, weight)
    cmx = x.amax((0, 1)); cmn = x.amin((0, 1))
    amx = max(x.max().item(), 0.0); amn = min(x.min().item(), 0.0)
    num = max(steps_min, int(amx / 0.5)); hi = max(-amn, amx); lo = 0.1; step = (hi - lo) / num
    best = None; best_t = hi; t = hi
    def scale(t):
        return torch.maximum(torch.where(cmx > t, cmx / t, torch.ones_like(cmx)), torch.where(cmn < -t, cmn / -t, torch.ones_like(cmn)))
    while t >= lo:
        s = scale(t)
        xs = x / s
        sc = max(2 * t / 255, 1.1920929e-07); zp = min(max(0 - round(-t / sc), 0), 255)
        xq = (torch.clamp(torch.round(xs / sc) + zp, 0, 255) - zp) * sc
        ws = weight * s
        wsc = torch.clamp(ws.abs().amax(1, keepdim=True) / 127, min=1.1920929e-07)
        wq = torch.clamp(torch.round(ws / wsc), -127, 127) * wsc
        loss = ((block_fn(xq, wq) - y) ** 2).sum(-1).mean().item()
        if best is None or loss < best:
            best, best_t = loss, t
        t -= step
    return scale(best_t)
