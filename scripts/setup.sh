#!/usr/bin/env bash
# Create .venv and install blipserve with what running it needs; --test adds the test
# extras (transformers, ray, schemathesis, ...), which scripts/test.sh asks for.
#
# torch is installed first and pinned (TORCH_SPEC): a bare `torch` requirement on a
# machine without torch pulls the newest CUDA build (several GB). Override TORCH_SPEC
# for another build, e.g. for an NVIDIA GPU:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    "") target='.' ;;
    --test) target='.[test]' ;;
    *) echo "usage: scripts/setup.sh [--test]" >&2; exit 1 ;;
esac
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "blipserve needs Python 3.11+"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
    "${pip[@]}" $TORCH_SPEC
fi
"${pip[@]}" -e "$target"
echo "blipserve installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
