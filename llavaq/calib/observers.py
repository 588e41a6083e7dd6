"""Activation-range observers used during static calibration.

``"histogram"`` is an exact port of the old PyTorch (~1.6) ``HistogramObserver`` as shipped in
msModelSlim's ``quant_funcs`` (``act_method=2``), ``"minmax"`` is msModelSlim's
``StatMinMaxObserver(method='mean')`` (``act_method=1``) and ``"absmax_minmax"`` a plain running
global min/max.  All observers work per tensor over all elements of the fp32-cast input and return
0-dim fp32 ``(min, max)``.  Their ``state_dict()`` holds tensors only (safetensors-friendly) and
``load_state_dict()`` resumes bit-exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Observer",
    "OBSERVERS",
    "register_observer",
    "make_observer",
    "HistogramObserver",
    "MeanMinMaxObserver",
    "RunningMinMaxObserver",
]


class Observer(Protocol):
    """Interface shared by all observers."""

    num_updates: int

    def update(self, x: Tensor) -> None: ...

    def min_max(self) -> tuple[Tensor, Tensor]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, d: dict[str, Tensor]) -> None: ...


OBSERVERS: dict[str, Callable[[], Observer]] = {}


def register_observer(name: str) -> Callable[[type], type]:
    """Class decorator registering an observer factory under ``name``."""

    def deco(cls: type) -> type:
        if name in OBSERVERS:
            raise ValueError(f"observer {name!r} already registered")
        OBSERVERS[name] = cls
        return cls

    return deco


def make_observer(name: str) -> Observer:
    """Instantiate the observer registered as ``name``."""
    try:
        return OBSERVERS[name]()
    except KeyError:
        raise KeyError(f"unknown observer {name!r}; known: {sorted(OBSERVERS)}") from None


def _prep(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32)


@register_observer("histogram")
class HistogramObserver:
    """Old-PyTorch ``HistogramObserver`` (bins 2048, upsample 128, 256 destination bins, L2 search).

    Faithful quirks kept on purpose: ``histc`` bounds are truncated with ``int()`` (as msModelSlim
    does), the histogram is re-initialised whenever the stored min equals the stored max, the
    combine step goes through a float64 integral histogram whose shifted copy is stored in fp32,
    and the range search is the greedy ``_non_linear_param_search`` with step 1e-5.
    """

    def __init__(self, bins: int = 2048, upsample_rate: int = 128, dst_nbins: int = 256) -> None:
        self.bins = bins
        self.upsample_rate = upsample_rate
        self.dst_nbins = dst_nbins
        self.histogram = torch.zeros(bins, dtype=torch.float32)
        self.min_val = torch.tensor([], dtype=torch.float32)
        self.max_val = torch.tensor([], dtype=torch.float32)
        self.num_updates = 0

    # ---- update -------------------------------------------------------------------------------
    def _adjust_min_max(self, cmin: Tensor, cmax: Tensor) -> tuple[Tensor, Tensor, int, int]:
        hist_bin_width = (self.max_val - self.min_val) / (self.bins * self.upsample_rate)
        downsample_rate = int(torch.ceil((cmax - cmin) / (self.bins * hist_bin_width)).item())
        e = downsample_rate * (self.bins * hist_bin_width) - (cmax - cmin)
        cmax = cmax + e
        start_idx = int(torch.round((self.min_val - cmin) / hist_bin_width).item())
        return cmin, cmax, downsample_rate, start_idx

    def _combine_histograms(self, orig_hist: Tensor, downsample_rate: int, start_idx: int) -> Tensor:
        nb, up = self.bins, self.upsample_rate
        upsampled = self.histogram.repeat_interleave(up)
        with_range = torch.zeros(nb * downsample_rate)
        with_range[start_idx : nb * up + start_idx] = upsampled
        integral = torch.cumsum(with_range, 0, dtype=torch.double)[downsample_rate - 1 :: downsample_rate]
        shifted = torch.zeros(nb)  # fp32 on purpose (old torch quirk)
        shifted[1:nb] = integral[0:-1]
        interpolated = (integral - shifted) / up
        return orig_hist + interpolated.to(torch.float)

    def update(self, x: Tensor) -> None:
        """Fold all elements of ``x`` (cast to fp32) into the histogram."""
        x = _prep(x)
        self.num_updates += 1
        min_val, max_val = self.min_val, self.max_val
        same = min_val.numel() > 0 and max_val.numel() > 0 and min_val.item() == max_val.item()
        if min_val.numel() == 0 or max_val.numel() == 0 or same:
            mn, mx = torch.min(x), torch.max(x)
            self.min_val, self.max_val = mn.clone(), mx.clone()
            self.histogram = torch.histc(x, self.bins, min=int(mn), max=int(mx))
            return
        cmin = torch.min(torch.min(x), min_val)
        cmax = torch.max(torch.max(x), max_val)
        cmin, cmax, ds, start = self._adjust_min_max(cmin, cmax)
        combined = torch.histc(x, self.bins, min=int(cmin), max=int(cmax))
        if bool(cmin == min_val) and bool(cmax == max_val):
            combined = combined + self.histogram
        else:
            combined = self._combine_histograms(combined, ds, start)
        self.histogram, self.min_val, self.max_val = combined, cmin.clone(), cmax.clone()

    # ---- search -------------------------------------------------------------------------------
    def _quantization_error(self, next_start_bin: int, next_end_bin: int) -> float:
        nb = self.bins
        bin_width = (self.max_val.item() - self.min_val.item()) / nb
        dst_bin_width = bin_width * (next_end_bin - next_start_bin + 1) / self.dst_nbins
        if dst_bin_width == 0.0:
            return 0.0
        src_bin = torch.arange(nb)
        src_bin_begin = (src_bin - next_start_bin) * bin_width
        src_bin_end = src_bin_begin + bin_width
        dst_bin_of_begin = torch.clamp(
            torch.div(src_bin_begin, dst_bin_width, rounding_mode="floor"), 0, self.dst_nbins - 1
        )
        dst_bin_of_begin_center = (dst_bin_of_begin + 0.5) * dst_bin_width
        dst_bin_of_end = torch.clamp(
            torch.div(src_bin_end, dst_bin_width, rounding_mode="floor"), 0, self.dst_nbins - 1
        )
        density = self.histogram / bin_width
        norm = torch.zeros(nb)
        delta_begin = src_bin_begin - dst_bin_of_begin_center
        delta_end = dst_bin_width / 2
        norm += _l2_norm(delta_begin, torch.ones(nb) * delta_end, density)
        norm += (dst_bin_of_end - dst_bin_of_begin - 1) * _l2_norm(
            torch.tensor(-dst_bin_width / 2), torch.tensor(dst_bin_width / 2), density
        )
        dst_bin_of_end_center = dst_bin_of_end * dst_bin_width + dst_bin_width / 2
        delta_begin2 = -dst_bin_width / 2
        delta_end2 = src_bin_end - dst_bin_of_end_center
        norm += _l2_norm(torch.tensor(delta_begin2), delta_end2, density)
        return norm.sum().item()

    def _non_linear_param_search(self) -> tuple[Tensor, Tensor]:
        bin_width = (self.max_val - self.min_val) / self.bins
        total = torch.sum(self.histogram).item()
        csum = torch.cumsum(self.histogram, dim=0).tolist()  # exact fp32 values
        f32 = np.float32
        stepsize = 1e-5
        alpha, beta = 0.0, 1.0
        start_bin, end_bin = 0, self.bins - 1
        norm_min = float("inf")
        while alpha < beta:
            next_alpha = alpha + stepsize
            next_beta = beta - stepsize
            # torch compares the fp32 cumsum with the python float cast to fp32
            thr_a = float(f32(next_alpha * total))
            thr_b = float(f32(next_beta * total))
            lo = start_bin
            r = end_bin
            while lo < end_bin and csum[lo] < thr_a:
                lo += 1
            while r > start_bin and csum[r] > thr_b:
                r -= 1
            next_start_bin, next_end_bin = start_bin, end_bin
            if (lo - start_bin) > (end_bin - r):
                next_start_bin = lo
                alpha = next_alpha
            else:
                next_end_bin = r
                beta = next_beta
            if next_start_bin == start_bin and next_end_bin == end_bin:
                continue
            norm = self._quantization_error(next_start_bin, next_end_bin)
            if norm > norm_min:
                break
            norm_min = norm
            start_bin, end_bin = next_start_bin, next_end_bin
        new_min = self.min_val + bin_width * start_bin
        new_max = self.min_val + bin_width * (end_bin + 1)
        return new_min, new_max

    def min_max(self) -> tuple[Tensor, Tensor]:
        """Searched ``(min, max)`` as 0-dim fp32 tensors (requires at least one update)."""
        if self.num_updates == 0:
            raise RuntimeError("HistogramObserver.min_max() called before any update()")
        return self._non_linear_param_search()

    # ---- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors needed to resume bit-exactly (``min_val``/``max_val`` may be empty)."""
        return {
            "histogram": self.histogram.clone(),
            "min_val": self.min_val.clone(),
            "max_val": self.max_val.clone(),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
            "config": torch.tensor([self.bins, self.upsample_rate, self.dst_nbins], dtype=torch.int64),
        }

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.bins, self.upsample_rate, self.dst_nbins = (int(v) for v in d["config"].tolist())
        self.histogram = d["histogram"].clone().to(torch.float32)
        self.min_val = d["min_val"].clone().to(torch.float32)
        self.max_val = d["max_val"].clone().to(torch.float32)
        self.num_updates = int(d["num_updates"])


def _l2_norm(delta_begin: Tensor, delta_end: Tensor, density: Tensor) -> Tensor:
    """``density * integral_{begin}^{end} x^2 dx`` (old torch ``_get_norm``, L2 only)."""
    norm = (delta_end * delta_end * delta_end - delta_begin * delta_begin * delta_begin) / 3
    return density * norm


@register_observer("minmax")
class MeanMinMaxObserver:
    """msModelSlim ``StatMinMaxObserver(method='mean')``: mean of per-update global min / max."""

    def __init__(self) -> None:
        self._mins: list[Tensor] = []
        self._maxs: list[Tensor] = []

    @property
    def num_updates(self) -> int:
        return len(self._mins)

    def update(self, x: Tensor) -> None:
        x = _prep(x)
        self._mins.append(x.min())
        self._maxs.append(x.max())

    def min_max(self) -> tuple[Tensor, Tensor]:
        if not self._mins:
            raise RuntimeError("MeanMinMaxObserver.min_max() called before any update()")
        return torch.mean(torch.stack(self._mins)), torch.mean(torch.stack(self._maxs))

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "mins": torch.stack(self._mins) if self._mins else torch.zeros(0),
            "maxs": torch.stack(self._maxs) if self._maxs else torch.zeros(0),
        }

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self._mins = [v.clone() for v in d["mins"].to(torch.float32)]
        self._maxs = [v.clone() for v in d["maxs"].to(torch.float32)]


@register_observer("absmax_minmax")
class RunningMinMaxObserver:
    """Plain running global min / max over all updates."""

    def __init__(self) -> None:
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self.num_updates = 0

    def update(self, x: Tensor) -> None:
        x = _prep(x)
        mn, mx = x.min(), x.max()
        self._min = mn if self._min is None else torch.minimum(self._min, mn)
        self._max = mx if self._max is None else torch.maximum(self._max, mx)
        self.num_updates += 1

    def min_max(self) -> tuple[Tensor, Tensor]:
        if self._min is None or self._max is None:
            raise RuntimeError("RunningMinMaxObserver.min_max() called before any update()")
        return self._min.clone(), self._max.clone()

    def state_dict(self) -> dict[str, Tensor]:
        empty = torch.zeros(0)
        return {
            "min": empty if self._min is None else self._min.reshape(1).clone(),
            "max": empty if self._max is None else self._max.reshape(1).clone(),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
        }

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self._min = d["min"].reshape(()).clone() if d["min"].numel() else None
        self._max = d["max"].reshape(()).clone() if d["max"].numel() else None
        self.num_updates = int(d["num_updates"])


OBSERVERS["running_minmax"] = RunningMinMaxObserver
