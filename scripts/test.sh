#!/usr/bin/env bash
# The project's test command: set up .venv with the test extras if needed, lint, run the
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
