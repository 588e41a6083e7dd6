"""The two models ``verify`` compares, built one stage at a time: the float LLaVA from its checkpoint, and the
quantized output with emulated int8 kernels for its W8A8 Linears.

The quantized side uses the float model's own builders (:class:`~llavaq.model.llava.LlavaArch`) on a copy of
the arch whose checkpoint is the output (:class:`OutputTensors`): its float tensors (norms, embeddings, float
Linears, the projector...) as saved, in float32, and every quantized Linear replaced by
:class:`~llavaq.quant.emulate.EmulatedW8A8Linear` (static int8 activations with the saved
input_scale/input_offset, int8×int8 accumulated exactly, rescaled with deq_scale and quant_bias), i.e. what
MindIE / vLLM int8 kernels compute from the saved tensors. A missing ``lm_head`` keeps the float model's (the
output's embedding where the float model ties them), as the whole-model emulation did.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llavaq.errors import OutputError
from llavaq.model.llava import LM_HEAD, LlavaArch, Stage
from llavaq.quant.emulate import EmulatedW8A8Linear, kernel_mode
from llavaq.verify.outputs import QuantizedCheckpoint


class OutputTensors:
    """A quantized output read as a float checkpoint (the part of the ``Checkpoint`` API the builders use).

    A quantized Linear's own weight and bias read as meta placeholders: the stage replaces the Linear.
    """

    def __init__(self, q: QuantizedCheckpoint, arch: LlavaArch) -> None:
        self.q, self.arch, self.path = q, arch, q.path

    def _placeholder(self, name: str) -> bool:
        module, _, suffix = name.rpartition(".")
        return module in self.q.linears and suffix in ("weight", "bias")

    def has(self, name: str) -> bool:
        return name in self.q.float_tensors or self._placeholder(name)

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if name in self.q.float_tensors:
            t = self.q.float_tensors[name]
        elif self._placeholder(name):
            return torch.empty(self.arch.ckpt.shape(name), dtype=dtype or torch.float32, device="meta")
        elif name == LM_HEAD:
            t = self.arch.ckpt.tensor(LM_HEAD, None)
        else:
            raise OutputError(f"{self.q.path}: the output has no tensor for {name}")
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def check_output_layout(arch: LlavaArch, q: QuantizedCheckpoint) -> None:
    """The output's tensors are the float model's (names and shapes), with one-line errors."""
    expected = arch.expected_shapes()
    linears = set(arch.linear_names)
    for name in q.linears:
        if name not in linears:
            raise OutputError(f"{q.path}: quantized module {name} does not exist in the float model")
    covered = set()
    for name in q.float_tensors:
        if name not in expected:
            raise OutputError(f"{q.path}: tensor {name} does not belong to the float model")
        shape = tuple(q.float_tensors.shape(name))
        if shape != expected[name]:
            raise OutputError(f"{q.path}: tensor {name} has shape {list(shape)}, expected {list(expected[name])}")
        covered.add(name)
    for name in q.linears:
        covered.update({f"{name}.weight", f"{name}.bias"})
    missing = [n for n in expected if n not in covered and not n.endswith("lm_head.weight")]
    if missing:
        raise OutputError(f"{q.path}: the output has no tensor for {missing[0]} ({len(missing)} missing)")


def output_arch(arch: LlavaArch, q: QuantizedCheckpoint) -> LlavaArch:
    """A copy of ``arch`` whose builders read the output's float tensors (see the module docstring)."""
    check_output_layout(arch, q)
    qarch = copy.copy(arch)
    qarch.ckpt = OutputTensors(q, arch)
    # the output's lm_head when it has one (a rotated output unties it), else as the float model
    qarch.tied_embeddings = arch.tied_embeddings and LM_HEAD not in q.float_tensors
    return qarch


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def quantized_stage(qarch: LlavaArch, q: QuantizedCheckpoint, stage: Stage, mode: str) -> nn.Module:
    """One stage of the quantized model: the output's float tensors, emulated kernels for its W8A8 Linears."""
    module = qarch.build_stage(stage)
    for name in stage_linears(q, stage):
        lq = q.linears[name]
        want = tuple(qarch.ckpt.arch.ckpt.shape(name + ".weight"))
        if tuple(lq.weight.shape) != want:
            raise OutputError(f"{q.path}: {name}.weight has shape {list(lq.weight.shape)}, the float model's "
                              f"is {list(want)}")
        set_submodule(module, name[len(stage.prefix):], EmulatedW8A8Linear(lq, kernel_mode(mode, lq)))
    return module.eval()


def stage_linears(q: QuantizedCheckpoint, stage: Stage) -> list[str]:
    """The output's quantized Linears in ``stage``."""
    return [n for n in q.linears if stage.owns(n)]


__all__ = ["OutputTensors", "check_output_layout", "output_arch", "quantized_stage", "set_submodule",
           "stage_linears"]
