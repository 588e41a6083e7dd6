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

fail() { echo "setup_interop_env: FAILED: $*" >&2; exit 1; }

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

command -v "$PY" >/dev/null 2>&1 || fail "interpreter '$PY' not found (set PYTHON=...)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" || fail "could not create venv at $VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# CPU-only torch first. TORCH_INDEX_URL overrides; by default the PyTorch CPU index is used when it
# is reachable, otherwise pip's configured sources (e.g. a local find-links with a +cpu wheel).
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
TORCH_ARGS=()
if "$VENV/bin/python" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
        "$TORCH_INDEX_URL/" >/dev/null 2>&1; then
    TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL")
else
    echo "setup_interop_env: $TORCH_INDEX_URL unreachable, installing $TORCH_PIN from pip's configured sources" >&2
fi
"${PIP[@]}" "${TORCH_ARGS[@]}" "$TORCH_PIN" || fail "could not install $TORCH_PIN"
if [ "$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda is None)')" != "True" ]; then
    echo "setup_interop_env: warning: installed torch is a CUDA build (large); a CPU build is enough" >&2
fi
# Keep torch pinned while resolving the rest (a constraint, so nothing upgrades it); --upgrade: the newest.
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINT"
"${PIP[@]}" --upgrade -c "$CONSTRAINT" "${PKGS[@]}" || fail "could not install ${PKGS[*]}"
check_env || fail "packages installed but torch/transformers/compressed-tensors do not import (torch 2.13.0)"
echo "setup_interop_env: OK $VENV/bin/python: $(versions) [$(( $(date +%s) - START ))s]"
