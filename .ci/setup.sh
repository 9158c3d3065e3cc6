#!/usr/bin/env bash
# Development setup: a virtual environment with torch (CPU), QSilk and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The CPU build of torch first, so nothing below pulls a CUDA build (torch>=2.1 works).
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
# models: diffusers + transformers for the command line's checkpoint path (its tests build a tiny checkpoint)
.venv/bin/python -m pip install -q -e ".[test,models]"
