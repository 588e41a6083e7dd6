"""Per quantized Linear: the emulated output vs the float Linear on the same input, and the clipped fraction."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llavaq.model.llava import LlavaArch, Stage
from llavaq.quant.emulate import EmulatedW8A8Linear, quantize_input
from llavaq.quant.state import group_input_smoothing
from llavaq.verify.outputs import QuantizedCheckpoint


@dataclass
class LayerError:
    name: str
    mse: float
    rel_mse: float
    clip_fraction: float


class LayerErrorHooks:
    """Per quantized Linear: emulated output vs the float Linear on the same (smoothed) input.

    The float reference undoes the smoothing using the float model's norms and the output's smoothed
    norms: for a group norm → Linears, ``s = γ/γ'`` and (LayerNorm) ``z = β − β'·s``, so the float
    Linear sees ``x·s + z`` — the original activation — and computes ``W x + b`` with the float model's
    own W and b. For a Linear → Linear group (``--smooth_vo``) the scale of each source row is read off the
    source's weight scale (``s_c = max|W_c|/(127·ws_c)``, ``W`` the float source row with its own input
    smoothing applied) and the shift off its bias (``z = b − b'·s``).

    ``reference`` (tensor name → float tensor) gives the float model the output was quantized from when
    it is not the checkpoint itself: for a rotated output, the rotated float model (its norms are 1 and its
    Linears read and write the rotated stream), read through :class:`~llavaq.model.rotated.RotatedCheckpoint`.

    The hooks are attached one stage at a time (:meth:`attach`, layer-streamed ``verify``): the float weights
    are the float stage's own Linears, or the reference's tensors of that stage.
    """

    def __init__(self, q: QuantizedCheckpoint, arch: LlavaArch,
                 reference: Callable[[str], torch.Tensor] | None = None) -> None:
        self.stats: dict[str, list[float]] = {}
        self.reference = reference
        undo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        fparams = _ReferenceParams(arch, reference)
        recipe = q.record.get("recipe") or {}
        #: a Linear -> Linear group's source -> (scale, shift) per output row its smoothed output carries
        smoothed_out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for g in arch.all_smooth_groups(recipe.get("modules", "msmodelslim"), bool(recipe.get("smooth_vo"))):
            if g.from_linear:
                raw = _pair_scale(g, fparams, q, undo)
                found = None if raw is None else group_input_smoothing(g, *raw)
                if raw is not None:
                    smoothed_out[g.norm] = raw
            else:
                found = _undo_norm(g, fparams, q)
            if found is not None:
                undo.update({lin: found for lin in g.linears})
        #: Linear -> (scale, shift) per input column that maps its smoothed input back to the float model's
        self.undo = undo
        self.smoothed_out = smoothed_out

    def attach(self, stage: Stage, qmodule: nn.Module, fmodule: nn.Module) -> list:
        """Hooks on the emulated Linears of one stage (``fmodule``: the float stage); their handles."""
        handles = []
        for local, mod in qmodule.named_modules():
            if not isinstance(mod, EmulatedW8A8Linear):
                continue
            name = stage.prefix + local
            flin = fmodule.get_submodule(local)
            w, b = flin.weight, flin.bias
            if self.reference is not None:
                w = self.reference(name + ".weight").float()
                b = self.reference(name + ".bias").float() if b is not None else None
            handles.append(mod.register_forward_hook(
                self._hook(name, mod, w, b, self.undo.get(name), self.smoothed_out.get(name))))
        return handles

    def _hook(self, name, mod: EmulatedW8A8Linear, weight: torch.Tensor, bias: torch.Tensor | None, undo,
              smoothed_out=None):
        def hook(_m, args, out):
            x = args[0].detach().float()
            xf = x
            if undo is not None:
                s, z = undo
                xf = x * s + (z if z is not None else 0)
            ref = F.linear(xf, weight, bias)
            if smoothed_out is not None:  # the source of --smooth_vo writes (y − z)/s: compare like with like
                s_out, z_out = smoothed_out
                ref = (ref - (z_out if z_out is not None else 0)) / s_out
            st = self.stats.setdefault(name, [0.0, 0.0, 0, 0, 0])
            st[0] += float(((out.float() - ref) ** 2).sum())
            st[1] += float((ref**2).sum())
            st[2] += ref.numel()
            if mod.mode == "static":
                p = mod.params
                xq = quantize_input(x, p.input_scale, p.input_offset)
                st[3] += int(((xq == -128) | (xq == 127)).sum())
            st[4] += x.numel()

        return hook

    def result(self) -> list[LayerError]:
        out = []
        for name, (se, sr, n, clipped, nx) in self.stats.items():
            if n:
                out.append(LayerError(name, se / n, se / max(sr, 1e-30), clipped / max(nx, 1)))
        return out


class _ReferenceParams(Mapping):
    """The float model's tensors (float32) by name, read from the checkpoint or ``reference`` when asked for."""

    def __init__(self, arch: LlavaArch, reference: Callable[[str], torch.Tensor] | None) -> None:
        self._arch = arch
        self._reference = reference

    def __getitem__(self, name: str) -> torch.Tensor:
        if not self._arch.ckpt.has(name):
            raise KeyError(name)
        if self._reference is None:
            return self._arch.ckpt.tensor(name)
        return self._reference(name).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._arch.ckpt.names)

    def __len__(self) -> int:
        return len(self._arch.ckpt.names)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num/den`` where both are non-zero, else 1 (a channel that carries nothing is not smoothed)."""
    ok = (num != 0) & (den != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))


def _undo_norm(g, fparams: dict[str, torch.Tensor], q: QuantizedCheckpoint):
    """(s, z) of a norm group from the float and the output's norm."""
    wq = q.float_tensors.get(g.norm + ".weight")
    if wq is None:
        return None
    s = _ratio(fparams[g.norm + ".weight"], wq.float())
    z = None
    if g.shift and g.norm + ".bias" in q.float_tensors:
        z = fparams[g.norm + ".bias"] - q.float_tensors[g.norm + ".bias"].float() * s
    return s, z


def _pair_scale(g, fparams: Mapping[str, torch.Tensor], q: QuantizedCheckpoint, undo: dict):
    """(s, z) per output row of a Linear → Linear group's source, from its float and saved weights.

    The destination's input columns take them through :func:`~llavaq.quant.state.group_input_smoothing`.
    """
    src = g.norm
    w = fparams[src + ".weight"]
    b = fparams.get(src + ".bias")
    if src in undo:  # the source's own input smoothing, as the export folded it (shift into the bias first)
        s_in, z_in = undo[src]
        if z_in is not None and b is not None:
            b = b + z_in @ w.T
        w = w * s_in
    if src in q.linears:
        lq = q.linears[src]
        s = _ratio(w.abs().amax(1), 127 * lq.weight_scale.float().reshape(-1))
        b_out = lq.bias
    elif src + ".weight" in q.float_tensors:
        s = _ratio(w.abs().amax(1), q.float_tensors[src + ".weight"].float().abs().amax(1))
        b_out = q.float_tensors.get(src + ".bias")
    else:
        return None
    z = b - b_out.float() * s if g.shift and b is not None and b_out is not None else None
    return s, z
