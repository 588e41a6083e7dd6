"""Per-Linear W8A8 sensitivity: which Linears to keep in float (``--keep_float N``).

For a quantized Linear with (smoothed) weight ``W'``, bias ``b'``, smoothing ``(s, z)`` of its input
and static activation parameters ``(input_scale, input_offset)``, and float input rows ``x`` of the
original model (the session cache's activation sample), the error is the W8A8 output error relative
to the float output power::

    x' = (x − z) / s                                  (what the smoothed Linear sees)
    y  = x' W'ᵀ + b'                                   (= the original Linear's output)
    ŷ  = deq(Q_static(x')) · deq(Q_channel(W'))ᵀ + b'  (what the int8 kernel computes)
    err = ‖ŷ − y‖² / ‖y‖²

It covers both error sources a static W8A8 Linear has: weight rounding and the per-tensor activation
range (clipping of tokens outside it, coarse steps when an outlier widens it). It is local (no error
propagation through later layers), cheap (one small matmul per Linear, no forward pass), and the
same number `llavaq verify` reports per Linear as "rel. MSE" on its evaluation inputs.
"""

from __future__ import annotations

from torch import Tensor

from llavaq.quant.int8 import fake_quant_activation, fake_quant_weight, weight_qparams


def w8a8_relative_error(
    rows: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    input_scale: Tensor,
    input_offset: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    codes: Tensor | None = None,
) -> float:
    """``‖ŷ − y‖² / ‖y‖²`` of one W8A8 Linear on float input rows (see the module docstring).

    ``codes``: the int8 weight codes to use on the per-row grid (GPTQ); default round to nearest.
    """
    x = rows.float()
    if shift is not None:
        x = x - shift.float()
    if scale is not None:
        x = x / scale.float()
    w = weight.float()
    y = x @ w.T
    xq = fake_quant_activation(x, input_scale.float().reshape(1), input_offset.float().reshape(1))
    ws = weight_qparams(w)
    yq = xq @ (fake_quant_weight(w, ws) if codes is None else codes.float() * ws).T
    if bias is not None:
        y = y + bias.float()
        yq = yq + bias.float()
    power = float((y**2).sum())
    return float(((yq - y) ** 2).sum()) / max(power, 1e-30)


def most_sensitive(errors: dict[str, float], n: int) -> list[str]:
    """The ``n`` names with the largest error (ties broken by name, so the choice is deterministic)."""
    ranked = sorted(errors, key=lambda k: (-errors[k], k))
    return ranked[: max(0, n)]


__all__ = ["w8a8_relative_error", "most_sensitive"]
