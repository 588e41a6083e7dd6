"""Device selection: cpu, cuda, npu (torch_npu imported lazily), or auto."""

from __future__ import annotations

import torch

from llavaq.errors import LlavaqError

DEVICE_TYPES = ("auto", "cpu", "cuda", "npu")


def npu_available() -> tuple[bool, str]:
    try:
        import torch_npu  # noqa: F401
    except ImportError as e:
        return False, (
            f"torch_npu is not importable ({e}); install the NPU extra (pip install 'llavaq[npu]') "
            "and Ascend CANN, then source its set_env.sh"
        )
    except Exception as e:  # torch_npu raises various errors when CANN libraries are missing
        return False, f"torch_npu failed to load ({str(e).splitlines()[0]}); is Ascend CANN installed and sourced?"
    if not hasattr(torch, "npu") or not torch.npu.is_available():
        return False, "torch_npu is installed but no NPU device is visible (check ASCEND_RT_VISIBLE_DEVICES)"
    return True, ""


def resolve_device(device_type: str) -> torch.device:
    """Map --device_type to a torch device, explaining clearly what is missing."""
    dt = (device_type or "auto").lower()
    if dt not in DEVICE_TYPES:
        raise LlavaqError(f"unknown --device_type {device_type!r}; choose one of {', '.join(DEVICE_TYPES)}")
    if dt == "cpu":
        return torch.device("cpu")
    if dt == "cuda":
        if not torch.cuda.is_available():
            raise LlavaqError("--device_type cuda: CUDA is not available (no GPU or a CPU-only torch build)")
        return torch.device("cuda")
    if dt == "npu":
        ok, why = npu_available()
        if not ok:
            raise LlavaqError(f"--device_type npu: {why}")
        return torch.device("npu")
    if npu_available()[0]:
        return torch.device("npu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_devices(device_type: str) -> list[torch.device]:
    """All devices of ``--device_type`` that the visible-devices variable exposes (CUDA_VISIBLE_DEVICES,
    ASCEND_RT_VISIBLE_DEVICES are applied by the runtimes themselves): ``cuda:0..n-1`` / ``npu:0..n-1``,
    or ``[cpu]``. Calibration places stage i on ``devices[i % n]`` (round-robin)."""
    dev = resolve_device(device_type)
    if dev.type == "cuda":
        n = torch.cuda.device_count()
    elif dev.type == "npu":
        n = torch.npu.device_count()
    else:
        return [dev]
    return [torch.device(dev.type, i) for i in range(max(1, n))]
