#!/usr/bin/env bash
# Run the stages of the real-model study in order. Each stage is its own process (memory is returned between
# stages), finished stages are skipped (done-markers under $ROOT), a failing stage does not stop later ones that
# do not depend on it, and only one stage runs at a time (never two fine-tunings at once).
#
#   nohup benchmarks/real_model/run_study.sh > /work/cache/study/logs/run_study.log 2>&1 &
#   STAGES="ft-benign-none eval-ft-benign-none" benchmarks/real_model/run_study.sh     # a subset
#
# Extra arguments are passed to every stage (e.g. --root /work/cache/study-lr5e-5 --lr 5e-5).
# The order puts the main result first (harmful fine-tuning, no plugin vs setting ii vs setting i), so that a
# stopped run still leaves the most informative rows.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
ROOT=/work/cache/study
prev=""
for a in "$@"; do if [ "$prev" = "--root" ]; then ROOT=$a; fi; prev=$a; done
LOGS=$ROOT/logs
mkdir -p "$LOGS"
STAGES=${STAGES:-"baseline calib locate
  ft-harmful-none eval-ft-harmful-none ft-harmful-scu+cu eval-ft-harmful-scu+cu
  ft-harmful-scu+cu6 eval-ft-harmful-scu+cu6 ablate-scu ablate-ru-matched
  ft-benign-none eval-ft-benign-none ft-benign-scu+cu eval-ft-benign-scu+cu ft-benign-scu+cu6 eval-ft-benign-scu+cu6
  ablate-ru"}
for s in $STAGES; do
  echo "$(date -u +%H:%M:%S) stage $s"
  $PY benchmarks/real_model/study.py "$s" "$@" > "$LOGS/${s//+/_}.log" 2>&1
  echo "$(date -u +%H:%M:%S) stage $s rc=$?"
done
