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

fail() { echo "setup_llmc_env: FAILED: $*" >&2; exit 1; }

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
    echo "setup_llmc_env: $TORCH_INDEX_URL unreachable, installing $TORCH_PIN from pip's configured sources" >&2
fi
"${PIP[@]}" "${TORCH_ARGS[@]}" "$TORCH_PIN" || fail "could not install $TORCH_PIN"
if [ "$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda is None)')" != "True" ]; then
    echo "setup_llmc_env: warning: installed torch is a CUDA build (large); a CPU build is enough" >&2
fi
# Keep torch pinned while resolving the rest (a constraint, so nothing upgrades it; no CUDA extras pulled).
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINT"
"${PIP[@]}" -c "$CONSTRAINT" "${PKGS[@]}" || fail "could not install ${PKGS[*]}"
check_env || fail "packages installed but llmcompressor/torch/transformers do not import with the pinned versions"
VERS="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("llmcompressor", "compressed-tensors", "transformers")))')"
echo "setup_llmc_env: OK $VENV/bin/python (torch 2.13.0, $VERS) [$(( $(date +%s) - START ))s]"
