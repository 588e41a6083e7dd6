"""Calibration-time modules: fake-quantizing Linears with an activation observer, and float recorders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llavaq.algorithms.hessian import InputMoments
from llavaq.calib.observers import make_observer
from llavaq.quant.int8 import activation_qparams, fake_quant_activation, fake_quant_weight, weight_qparams


class FakeQuantLinear(nn.Module):
    """msModelSlim's ``LinearQuantizer`` in calibration mode.

    Per call: ``observer.update(x)``, recompute input_scale/input_offset from the observer's range,
    and return ``F.linear(fq(x), fq(W), b)`` so downstream layers see quantized activations.
    Weight parameters are computed once, from the (already smoothed) weight.
    """

    def __init__(self, linear: nn.Linear, observer: str) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_scale = weight_qparams(linear.weight.data)
        self.weight_fq = fake_quant_weight(linear.weight.data, self.weight_scale)
        self.observer = make_observer(observer)
        self.x_min: torch.Tensor | None = None
        self.x_max: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None
        self.input_offset: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observer.update(x)
        self.x_min, self.x_max = self.observer.min_max()
        self.input_scale, self.input_offset = activation_qparams(self.x_min, self.x_max)
        xq = fake_quant_activation(x, self.input_scale, self.input_offset)
        return F.linear(xq, self.weight_fq, self.bias)


class InputRecorder:
    """Forward pre-hooks recording per-channel float min/max/absmax and a row sample of Linear inputs.

    Each call is one calibration sample, so the per-tensor min/max of every call is kept too
    (``float.<linear>.sample_min`` / ``.sample_max`` [samples]): which samples set a Linear's
    activation range (image prompts vs text-only prompts). For the Linears named in ``moments_for`` the
    input moments GPTQ needs are accumulated over every token (``hess.<linear>.n/mean/cov``,
    :mod:`llavaq.algorithms.hessian`).
    """

    def __init__(self, modules: dict[str, nn.Module], rows_per_call: int, moments_for=()) -> None:
        self.rows_per_call = rows_per_call
        self.moments = {name: InputMoments() for name in moments_for}
        #: weights of the next call's rows in the moments (None: each row counts once); set by the caller
        self.row_weights: torch.Tensor | None = None
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.sample_min: dict[str, list[torch.Tensor]] = {}
        self.sample_max: dict[str, list[torch.Tensor]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            mn, mx = x.amin(0), x.amax(0)
            self.sample_min.setdefault(name, []).append(mn.min())
            self.sample_max.setdefault(name, []).append(mx.max())
            s = self.stats.get(name)
            if s is None:
                self.stats[name] = {"min": mn, "max": mx}
            else:
                s["min"] = torch.minimum(s["min"], mn)
                s["max"] = torch.maximum(s["max"], mx)
            if name in self.moments:
                self.moments[name].update(x, self.row_weights)
            if self.rows_per_call > 0:
                k = min(self.rows_per_call, x.shape[0])
                idx = torch.linspace(0, x.shape[0] - 1, k).round().long()
                self.rows.setdefault(name, []).append(x[idx].clone())

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in self.stats.items():
            out[f"float.{name}.min"] = s["min"]
            out[f"float.{name}.max"] = s["max"]
            out[f"float.{name}.sample_min"] = torch.stack(self.sample_min[name])
            out[f"float.{name}.sample_max"] = torch.stack(self.sample_max[name])
            if name in self.rows:
                out[f"float.{name}.rows"] = torch.cat(self.rows[name])
        for name, m in self.moments.items():
            if m.n:
                out.update({f"hess.{name}.{k}": v for k, v in m.to_tensors().items()})
        return out


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)
