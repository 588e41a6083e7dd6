"""The two models ``verify`` compares: the float LLaVA, and the same with emulated int8 kernels for the W8A8 Linears.

The quantized model is a float32 ``LlavaForConditionalGeneration`` whose float parameters come from
the output's FLOAT tensors and whose quantized Linears are replaced by
:class:`~llavaq.quant.emulate.EmulatedW8A8Linear` (static int8 activations with the saved
input_scale/input_offset, int8×int8 accumulated exactly, rescaled with deq_scale and quant_bias),
i.e. what MindIE / vLLM int8 kernels compute from the saved tensors.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llavaq.errors import OutputError
from llavaq.model.loading import open_model
from llavaq.quant.emulate import EmulatedW8A8Linear, kernel_mode
from llavaq.verify.outputs import QuantizedCheckpoint


def load_float_model(model_path: str | Path) -> nn.Module:
    """The float LLaVA in float32 (what the quantized model is compared with)."""
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    open_model(model_path)  # validated: one-line errors for bad model dirs
    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(model_path), torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(prev)
    return model.eval()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def build_quantized_model(float_model: nn.Module, q: QuantizedCheckpoint, *, mode: str = "static",
                          absent: Callable[[str], bool] | None = None) -> nn.Module:
    """A float32 LLaVA with the output's FLOAT tensors and emulated int8 kernels for its W8A8 Linears.

    ``absent(name)`` (optional) tells parameters the checkpoint has no tensor for (a SigLIP head
    llava-interleave does not ship): they keep the float model's values, as transformers gives them.
    """
    model = copy.deepcopy(float_model)
    _untie_differing(model, q.float_tensors)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, lq in q.linears.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise OutputError(f"{q.path}: quantized module {name} does not exist in the float model") from None
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(lq.weight.shape):
            raise OutputError(f"{q.path}: {name}.weight has shape {list(lq.weight.shape)}, the float model's "
                              f"is {list(getattr(lin, 'weight', torch.empty(0)).shape)}")
    covered = set()
    with torch.no_grad():
        for name, t in q.float_tensors.items():
            p = params.get(name)
            if p is None:
                raise OutputError(f"{q.path}: tensor {name} does not belong to the float model")
            if tuple(p.shape) != tuple(t.shape):
                raise OutputError(f"{q.path}: tensor {name} has shape {list(t.shape)}, expected {list(p.shape)}")
            p.copy_(t.float())
            covered.add(name)
    for name in q.linears:
        covered.update({f"{name}.weight", f"{name}.bias"})
    missing = [n for n in params if n not in covered and not n.endswith("lm_head.weight")
               and not (absent is not None and absent(n))]
    if missing:
        raise OutputError(f"{q.path}: the output has no tensor for {missing[0]} ({len(missing)} missing)")
    for name, lq in q.linears.items():
        _set_submodule(model, name, EmulatedW8A8Linear(lq, kernel_mode(mode, lq)))
    return model.eval()


def _untie_differing(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a shared parameter (tied embeddings) its own copy where the output stores different values for it.

    A rotated output unties the float model's tied ``lm_head`` (``E·diag(γ)·Q`` vs the embedding ``E·Q``).
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for shared in names.values():
        given = [n for n in shared if n in tensors]
        for n in given[1:]:
            if not torch.equal(tensors[n], tensors[given[0]]):
                parent, _, attr = n.rpartition(".")
                mod = model.get_submodule(parent)
                setattr(mod, attr, nn.Parameter(getattr(mod, attr).detach().clone(), requires_grad=False))
