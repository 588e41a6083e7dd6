# Shared steps of scripts/setup_*_env.sh (sourced, not run). The caller sets NAME (its messages' prefix),
# VENV, PY, TORCH_PIN and START, and defines check_env.
#
# install_venv [PIP_ARGS...] -- PKGS...: create the venv if missing, install torch FIRST (CPU build: a bare torch
# requirement pulls a CUDA build of several GB), then PKGS with torch held by a constraint, then check_env.

fail() { echo "$NAME: FAILED: $*" >&2; exit 1; }

install_venv() {
    local extra=()
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do extra+=("$1"); shift; done
    [ "$#" -gt 0 ] && shift
    command -v "$PY" >/dev/null 2>&1 || fail "interpreter '$PY' not found (set PYTHON=...)"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV" || fail "could not create venv at $VENV"
    fi
    local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
    # CPU-only torch first. TORCH_INDEX_URL overrides; by default the PyTorch CPU index is used when it
    # is reachable, otherwise pip's configured sources (e.g. a local find-links with a +cpu wheel).
    local index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" torch_args=()
    if "$VENV/bin/python" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
            "$index/" >/dev/null 2>&1; then
        torch_args=(--extra-index-url "$index")
    else
        echo "$NAME: $index unreachable, installing $TORCH_PIN from pip's configured sources" >&2
    fi
    "${pip[@]}" "${torch_args[@]}" "$TORCH_PIN" || fail "could not install $TORCH_PIN"
    if [ "$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda is None)')" != "True" ]; then
        echo "$NAME: warning: installed torch is a CUDA build (large); a CPU build is enough" >&2
    fi
    # Keep torch pinned while resolving the rest (a constraint, so nothing upgrades it; no CUDA extras pulled).
    CONSTRAINT="$(mktemp)"
    trap 'rm -f "$CONSTRAINT"' EXIT
    echo "$TORCH_PIN" > "$CONSTRAINT"
    "${pip[@]}" "${extra[@]}" -c "$CONSTRAINT" "$@" || fail "could not install $*"
    check_env || fail "packages installed but do not import with the pinned versions ($*)"
}
