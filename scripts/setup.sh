#!/usr/bin/env bash
# Set up a fresh machine: a project-local virtual environment in .venv with the CPU build of torch and every extra.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: 2.13.0 is the CPU wheel on this machine's disk; a plain `torch` requirement would fetch a CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch; print('torch', torch.__version__)"
pip install -q -e ".[dev]" 2>&1 | grep -v -e "^WARNING: Location" -e "^ *$" || true
python -c "import ssah_plugin, transformers, trl, peft, deepspeed; print('ssah-plugin', ssah_plugin.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| deepspeed', deepspeed.__version__)"
