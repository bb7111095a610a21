#!/usr/bin/env bash
# Build the Axolotl and LLaMA-Factory environments (cached) and run ssah-plugin's integration tests in each.
#
#   bash scripts/integration_envs.sh                    # both: build what is missing, then run the tests
#   bash scripts/integration_envs.sh axolotl            # one framework (axolotl | llamafactory | all)
#   bash scripts/integration_envs.sh all --build-only   # build / check the environments, run nothing
#   bash scripts/integration_envs.sh axolotl -- -k lora # arguments after -- go to pytest
#
# Each framework pins its own transformers / TRL / PEFT / accelerate, so each gets its own virtual environment in
# $SSAH_ENVS_DIR (default: an `envs` folder next to this checkout), built once and reused while its marker file
# says the same versions. Python: $SSAH_ENV_PYTHON (default python3.11; Axolotl 0.19 supports 3.10-3.12, and the
# CPU torch 2.13 wheel this project uses is a cp311 build). torch is installed first and pinned with a constraints
# file, so no framework requirement can replace it with a CUDA build.
#
# Cost on the 2-core CPU machine (pip cache warm): building axolotl ~6 min, 4.3 GiB; llamafactory ~3 min, 2.1 GiB;
# the tests ~2 min (axolotl) and ~1 min (llamafactory). Too long and too large for every CI run: CI runs the main
# suite, where these tests skip with the reason; run this script before a release-like change (README, "Use it
# from ...").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ENVS=${SSAH_ENVS_DIR:-$(dirname "$REPO")/envs}
PY=${SSAH_ENV_PYTHON:-python3.11}
TORCH=2.13.0
AXOLOTL=0.19.0
LLAMAFACTORY=0.9.5
export PIP_DISABLE_PIP_VERSION_CHECK=1

which=all
build_only=0
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    axolotl|llamafactory|all) which=$1 ;;
    --build-only) build_only=1 ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "[integration_envs] $*" >&2; }
pip_q() {  # pip, quiet, without the warnings about this machine's unused local index folders
  "$@" 2>&1 | { grep -v -e "^WARNING: Location" -e "^ *$" || true; }
  return "${PIPESTATUS[0]}"
}

# Frameworks' wheels that cannot work next to the CPU build of torch are repaired here, and each repair is said:
# * torchvision from the package index (pulled by LLaMA-Factory) is a CUDA build: its operators fail to register
#   against CPU torch ("operator torchvision::nms does not exist") and break `import transformers`' image code.
#   Nothing text-only needs it: uninstalled.
# * torchaudio 2.11 (newest on the index; LLaMA-Factory imports it at start for audio data) ships CUDA-linked
#   extensions (libc10_cuda.so missing): its compiled libraries are removed, which torchaudio treats as "extension not
#   available" (the pure-Python package still imports). Audio data sets do not work in that environment.
repair_cpu_torch() {
  local py=$1 site
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  if [ -d "$site/torchvision" ] && ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    log "torchvision does not load with CPU torch (a CUDA build): uninstalling it"
    pip_q "$py" -m pip uninstall -y -q torchvision
  fi
  if [ -d "$site/torchaudio/lib" ] && ! "$py" -c "import torchaudio" >/dev/null 2>&1; then
    log "torchaudio's compiled extension needs CUDA libraries: removing $site/torchaudio/lib/*.so"
    rm -f "$site"/torchaudio/lib/*.so
    "$py" -c "import torchaudio" >/dev/null 2>&1 || { log "torchaudio still does not import"; exit 1; }
  fi
}

build_env() {  # name, pip requirement, python module to import
  local name=$1 req=$2 module=$3 env="$ENVS/$1" marker="$ENVS/$1/.ssah-env"
  local want="torch==$TORCH $req"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && "$env/bin/python" -c "import $module" >/dev/null 2>&1; then
    log "$name: cached in $env ($want)"
  else
    local t0=$SECONDS
    log "$name: building $env ($want) with $PY"
    rm -rf "$env"
    mkdir -p "$ENVS"
    "$PY" -m venv "$env"
    echo "torch==$TORCH" > "$env/constraints.txt"
    pip_q "$env/bin/python" -m pip install -q "torch==$TORCH" -c "$env/constraints.txt"
    pip_q "$env/bin/python" -m pip install -q "$req" pytest pytest-timeout -c "$env/constraints.txt"
    repair_cpu_torch "$env/bin/python"
    "$env/bin/python" -c "import torch, $module; assert torch.__version__.startswith('$TORCH'), torch.__version__"
    echo "$want" > "$marker"
    log "$name: built in $((SECONDS - t0)) s, $(du -sh "$env" | cut -f1)"
  fi
  # this checkout, editable (again if the environment points at another checkout)
  if [ "$("$env/bin/python" -c 'import os, ssah_plugin; print(os.path.dirname(os.path.dirname(ssah_plugin.__file__)))' 2>/dev/null)" != "$REPO" ]; then
    pip_q "$env/bin/python" -m pip install -q -e "$REPO" -c "$env/constraints.txt"
  fi
  "$env/bin/python" - <<EOF >&2
import importlib.metadata as md
names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "$req".split("==")[0], "ssah-plugin"]
print("[integration_envs] $name:", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
}

run_tests() {  # name
  local name=$1 t0=$SECONDS rc=0
  log "$name: pytest tests/integrations/test_$name.py"
  "$ENVS/$name/bin/python" -m pytest -q -p no:cacheprovider "tests/integrations/test_$name.py" \
    ${pytest_args[@]+"${pytest_args[@]}"} || rc=$?
  log "$name: tests finished in $((SECONDS - t0)) s (exit $rc)"
  return $rc
}

status=0
for name in axolotl llamafactory; do
  [ "$which" = all ] || [ "$which" = "$name" ] || continue
  case "$name" in
    axolotl) build_env axolotl "axolotl==$AXOLOTL" axolotl ;;
    llamafactory) build_env llamafactory "llamafactory==$LLAMAFACTORY" llamafactory.train.tuner ;;
  esac
  if [ "$build_only" = 0 ]; then
    run_tests "$name" || status=1
  fi
done
exit $status
