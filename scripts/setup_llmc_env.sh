#!/usr/bin/env bash
# Create (or reuse) a virtualenv with llm-compressor 0.14 for benchmarks/vs_llmcompressor.py.
#
# Usage: scripts/setup_llmc_env.sh [VENV_DIR]      (default: <repo>/.venv-llmc)
# Env:   PYTHON (interpreter used to create the venv, default python3)
#
# llavaq never imports llm-compressor: the benchmark runs it in this venv as a subprocess
# (benchmarks/llmc_runner.py). torch is installed FIRST from the CPU wheel index pin (torch==2.13.0):
# llmcompressor's own requirements would otherwise pull a CUDA torch build (several GB).
# llmcompressor 0.14 pins transformers (5.15-5.17) itself. Idempotent: a venv whose packages already
# import with the pinned versions is left as is.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-llmc}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
PKGS=("llmcompressor==0.14.*" "safetensors" "pillow" "numpy")
START=$(date +%s)

NAME=setup_llmc_env
# shellcheck source=venv_lib.sh
source "$REPO_ROOT/scripts/venv_lib.sh"

check_env() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md
import torch, transformers, safetensors, PIL, numpy  # noqa: F401
import compressed_tensors  # noqa: F401
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: F401
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert md.version("llmcompressor").startswith("0.14"), md.version("llmcompressor")
PY
}

if [ -x "$VENV/bin/python" ] && check_env; then
    echo "setup_llmc_env: OK (already set up) $VENV/bin/python [$(( $(date +%s) - START ))s]"
    exit 0
fi

install_venv -- "${PKGS[@]}"
VERS="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("llmcompressor", "compressed-tensors", "transformers")))')"
echo "setup_llmc_env: OK $VENV/bin/python (torch 2.13.0, $VERS) [$(( $(date +%s) - START ))s]"
