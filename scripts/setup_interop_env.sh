#!/usr/bin/env bash
# Create (or reuse) a virtualenv with the NEWEST transformers + compressed-tensors, for tests/interop: every
# export must load and run with plain `from_pretrained` in the current ecosystem, not only next to our pins.
#
# Usage: scripts/setup_interop_env.sh [VENV_DIR]      (default: <repo>/.venv-interop)
# Env:   PYTHON (interpreter used to create the venv, default python3)
#        INTEROP_PACKAGES (default "transformers compressed-tensors"; e.g. "transformers==5.24.0
#        compressed-tensors==0.20.1" to pin a known pair)
#
# torch is installed FIRST from the CPU wheel index pin (torch==2.13.0): a bare torch requirement would pull
# a CUDA build (several GB). Idempotent: a venv whose packages already import (torch 2.13.0) is left as is;
# delete it to pick up newer releases (CI builds it afresh in every clone).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-interop}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
read -r -a PKGS <<< "${INTEROP_PACKAGES:-transformers compressed-tensors}"
PKGS+=("safetensors" "numpy")
START=$(date +%s)

NAME=setup_interop_env
# shellcheck source=venv_lib.sh
source "$REPO_ROOT/scripts/venv_lib.sh"

check_env() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import torch, transformers, compressed_tensors, safetensors  # noqa: F401
from transformers import LlavaForConditionalGeneration  # noqa: F401
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
PY
}

versions() {
    "$VENV/bin/python" -c 'import torch, transformers, compressed_tensors as ct
print(f"torch {torch.__version__}, transformers {transformers.__version__}, compressed-tensors {ct.__version__}")'
}

if [ -x "$VENV/bin/python" ] && check_env; then
    echo "setup_interop_env: OK (already set up) $VENV/bin/python: $(versions) [$(( $(date +%s) - START ))s]"
    exit 0
fi

install_venv --upgrade -- "${PKGS[@]}"
echo "setup_interop_env: OK $VENV/bin/python: $(versions) [$(( $(date +%s) - START ))s]"
