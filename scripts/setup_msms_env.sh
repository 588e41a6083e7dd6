#!/usr/bin/env bash
# Create (or reuse) a virtualenv with msModelSlim 26.1.0 for the parity tests / benchmarks.
#
# Usage: scripts/setup_msms_env.sh [VENV_DIR]      (default: <repo>/.venv-msms)
# Env:   PYTHON (interpreter used to create the venv, default python3)
#
# torch is installed FIRST from the CPU wheel index pin (torch==2.13.0): msmodelslim's own
# requirements would otherwise pull a CUDA torch build (several GB). Idempotent: a venv whose
# packages already import with the pinned versions is left as is.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-msms}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
PKGS=("msmodelslim==26.1.0" "transformers==4.37.2" "accelerate==0.34.2" "safetensors" "pillow" "numpy")
START=$(date +%s)

NAME=setup_msms_env
# shellcheck source=venv_lib.sh
source "$REPO_ROOT/scripts/venv_lib.sh"

check_env() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as md
import torch, transformers, accelerate, safetensors, PIL, numpy  # noqa: F401
import msmodelslim  # noqa: F401
from msmodelslim.pytorch.llm_ptq.anti_outlier import AntiOutlier  # noqa: F401
from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator  # noqa: F401
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert transformers.__version__ == "4.37.2", transformers.__version__
assert md.version("msmodelslim") == "26.1.0"
PY
}

if [ -x "$VENV/bin/python" ] && check_env; then
    echo "setup_msms_env: OK (already set up) $VENV/bin/python [$(( $(date +%s) - START ))s]"
    exit 0
fi

install_venv -- "${PKGS[@]}"
echo "setup_msms_env: OK $VENV/bin/python (torch 2.13.0, msmodelslim 26.1.0, transformers 4.37.2) [$(( $(date +%s) - START ))s]"
