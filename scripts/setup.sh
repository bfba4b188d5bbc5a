#!/usr/bin/env bash
# Create .venv and install blipserve with what running it needs; --test adds the test
# extras (transformers, ray, schemathesis, playwright, ...), which scripts/test.sh asks for,
# and the Chromium the browser tests drive (Debian's package, when none is installed).
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

# The browser tests drive the system's Chromium through Playwright (never Playwright's own
# browser download). BLIPSERVE_CHROMIUM may name one instead.
have_chromium() {
    [ -n "${BLIPSERVE_CHROMIUM:-}" ] && return 0
    command -v chromium || command -v chromium-browser || command -v google-chrome ||
        command -v google-chrome-stable
} >/dev/null 2>&1
if [ "$target" = '.[test]' ] && ! have_chromium; then
    echo "installing Debian's chromium for the browser tests"
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if ! command -v apt-get >/dev/null ||
        ! "${sudo[@]}" apt-get update -qq ||
        ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; then
        echo "scripts/setup.sh: could not install chromium, which the browser tests need;" \
            "install it (Debian: apt-get install chromium) or set BLIPSERVE_CHROMIUM" >&2
        exit 1
    fi
fi
echo "blipserve installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
