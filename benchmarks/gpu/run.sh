#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu/README.md): the bitwise tests on CUDA, then the step-time overhead benchmark.
#   bash benchmarks/gpu/run.sh            # on a machine with a GPU: < 8 minutes, results in benchmarks/results/gpu/
#   bash benchmarks/gpu/run.sh --smoke    # the same code on CPU with a tiny model: < 1 minute
# PYTHON selects the interpreter (default python3); extra arguments go to gpu_check.py (--help lists them).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" benchmarks/gpu/gpu_check.py "$@"
