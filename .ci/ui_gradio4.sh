#!/usr/bin/env bash
# CI: build QSilk's Gradio controls under Gradio 4.40 (new Forge's version) in a second venv.
# The main venv has Gradio 3.41.2 (AUTOMATIC1111's pin); qsilk/ui.py must work under both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-g4/bin/python ] || "$PY" -m venv .venv-g4
.venv-g4/bin/python -m pip install -q --upgrade pip
# gradio 4.40 imports huggingface_hub.HfFolder, removed in huggingface_hub 1.0: pinned below 1.
# The CPU build of torch first, so nothing below pulls a CUDA build.
.venv-g4/bin/python -c "import torch" 2>/dev/null || .venv-g4/bin/python -m pip install -q "torch==2.13.0"
.venv-g4/bin/python -c "import gradio, sys; sys.exit(gradio.__version__ != '4.40.0')" 2>/dev/null \
  || .venv-g4/bin/python -m pip install -q "gradio==4.40.0" "huggingface_hub<1"
.venv-g4/bin/python -m pip install -q -e ".[test]"
QSILK_EXPECT_GRADIO=4 .venv-g4/bin/python -m pytest -q -p no:cacheprovider tests/hosts/test_ui.py \
  "tests/hosts/test_forge_job.py::test_ui_builds_with_the_familys_input_accordion"
