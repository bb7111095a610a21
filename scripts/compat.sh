#!/usr/bin/env bash
# Compatibility job: the core bitwise tests on the oldest versions setup.cfg claims, on a real-world pinned stack
# (LLaMA-Factory 0.9.5's pins) and on the newest releases, each in its own virtual environment.
#
#   bash scripts/compat.sh                       # every stack: build what is missing, run the tests, write the table
#   bash scripts/compat.sh oldest llamafactory   # some stacks (oldest | llamafactory | newest | all)
#   bash scripts/compat.sh --build-only          # build / check the environments, run nothing
#   bash scripts/compat.sh --envs DIR            # where the environments live (or $SSAH_COMPAT_ENVS)
#   bash scripts/compat.sh -- -x                 # arguments after -- go to every pytest call
#
# Environments: one per stack in $SSAH_COMPAT_ENVS (default ${XDG_CACHE_HOME:-~/.cache}/ssah-plugin/compat), built
# once and reused while its marker file holds the same Python and pins. "newest" is this checkout's .venv (made by
# scripts/setup.sh when missing). Python: $SSAH_ENV_PYTHON (default python3.11: the CPU torch 2.13 wheel on these
# machines is a cp311 build). torch is installed first and held at 2.13.0 by a constraints file in every
# environment, so no requirement can swap it for a CUDA build; other torch builds are not installable here.
#
# The package is installed editable from this checkout with its extras and the stack's pins as constraints, so pip
# also checks that setup.cfg's bounds admit the stack; a reused environment is checked against this checkout's
# setup.cfg again before the tests (a stack outside the declared range fails the job).
#
# Tests per stack (two pytest calls): Trainer / SFT / DPO / LoRA (PEFT, PEFT+TRL) / resume / custom loop / the
# freeze engine ($CORE_TESTS), then the one real 2-rank ZeRO-2 launch of tests/distributed/test_zero.py (its
# scenarios: Trainer, SFT, DPO, LoRA, raw engine, resume, refusals; -k "z2 or dsopt").
# Results: benchmarks/results/compat/compat.md and .json (stack, versions installed, passed / failed / skipped,
# seconds); pytest logs and JUnit files stay in $SSAH_COMPAT_ENVS/runs/STACK. The job exits non-zero when a test
# fails or errors in any stack.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ENVS=${SSAH_COMPAT_ENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/ssah-plugin/compat}
PY=${SSAH_ENV_PYTHON:-python3.11}
TORCH=2.13.0
OUT=$REPO/benchmarks/results/compat
export PIP_DISABLE_PIP_VERSION_CHECK=1
USER_TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-}

# The stacks. Each pin list goes to pip as requirements and as constraints.
# oldest: setup.cfg's floors. transformers 4.56.1, not 4.56.0: 4.56.0's Trainer reads Accelerator.parallelism_config
# unguarded (accelerate >= 1.10 only; 4.56.1 guards it), so every Trainer test fails there with accelerate < 1.10.
# accelerate 1.4.0 is the lowest TRL 0.20 accepts; tokenizers 0.22.0, safetensors 0.4.3 and huggingface_hub 0.34.0
# the lowest transformers 4.56 accepts; datasets 3.0.0 the data extra's floor.
OLDEST="transformers==4.56.1 trl==0.20.0 peft==0.15.0 accelerate==1.4.0 deepspeed==0.19.0 datasets==3.0.0
  tokenizers==0.22.0 safetensors==0.4.3 huggingface_hub==0.34.0"
# llamafactory: what `pip install llamafactory==0.9.5` resolves to (its caps: transformers<=5.6.0, trl<=0.24.0,
# peft<=0.18.1, accelerate<=1.11.0, datasets<=4.0.0), with the newest DeepSpeed ssah-plugin supports.
LLAMAFACTORY="transformers==5.6.0 trl==0.24.0 peft==0.18.1 accelerate==1.11.0 datasets==4.0.0 deepspeed==0.19.8"
# TRL 0.24 reads transformers' _is_package_available as a bool, but transformers >= 5.3 returns a (bool, version)
# tuple, so `from trl import DPOTrainer` fails with "No module named 'mergekit'". LLaMA-Factory 0.9.5 patches that
# function when it is imported (llamafactory/extras/packages.py). So the stack has llamafactory itself (--no-deps: the
# pins above are what it resolves to; its web UI / audio / vision requirements are not needed) and, while
# SSAH_COMPAT_LLAMAFACTORY=1 (set for this stack's tests only), every Python process of the environment (pytest and
# the ranks of the ZeRO-2 launch) imports that module at start (a .pth file), as every LLaMA-Factory process does.
LLAMAFACTORY_NODEPS="llamafactory==0.9.5"
LLAMAFACTORY_PTH='import os; os.environ.get("SSAH_COMPAT_LLAMAFACTORY") == "1" and __import__("llamafactory.extras.packages")'
CORE_TESTS=(tests/test_freeze.py tests/test_callback.py tests/test_trl.py tests/test_peft.py tests/test_peft_trl.py
            tests/test_resume.py tests/test_optim.py)
ZERO_TESTS=(tests/distributed/test_zero.py)
ZERO_K="z2 or dsopt"  # the zero2 launch's tests only: one 2-rank job
# Tests a stack cannot run whatever the plugin does (pytest -k expressions to leave out, and why; the table says so):
# * oldest: LoRA under ZeRO-2. transformers 4.x (4.57.6 too) builds its LR scheduler on the Trainer's optimizer
#   before deepspeed.initialize removes the empty no-decay group (LoRA trains no bias / norm), and torch 2.13's
#   scheduler zips its per-group values with strict=True: "zip() argument 2 is longer than argument 1" at the first
#   step. The same job without the plugin (scenario sft-z2-fp32-lora-control) fails the same way.
# * llamafactory: DPO. TRL 0.24's DPOTrainer.__init__ writes model.warnings_issued, which transformers 5 removed, so
#   no DPOTrainer can be built (LLaMA-Factory's own DPO stage calls Trainer.__init__ instead).
declare -A CORE_OUT=([llamafactory]="dpo")
declare -A ZERO_OUT=([oldest]="lora" [llamafactory]="dpo")
declare -A NOT_RUN=(
  [oldest]="LoRA under ZeRO-2 (transformers 4.x + torch 2.13: the LR scheduler keeps the empty param group that
deepspeed.initialize removed; fails without the plugin too)"
  [llamafactory]="DPO tests (no TRL DPOTrainer can be built: TRL 0.24 sets model.warnings_issued, which transformers 5
removed)")
VERSIONS="torch transformers trl peft accelerate deepspeed datasets tokenizers safetensors huggingface_hub numpy"

stacks=()
build_only=0
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    oldest|llamafactory|newest) stacks+=("$1") ;;
    all) stacks+=(oldest llamafactory newest) ;;
    --build-only) build_only=1 ;;
    --envs) ENVS=$2; shift ;;
    --envs=*) ENVS=${1#--envs=} ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#stacks[@]} -gt 0 ] || stacks=(oldest llamafactory newest)

log() { echo "[compat] $*" >&2; }
pip_q() {  # pip, quiet, without the warnings about this machine's unused local index folders
  "$@" 2>&1 | { grep -v -e "^WARNING: Location" -e "^ *$" || true; }
  return "${PIPESTATUS[0]}"
}

repair_cpu_torch() {  # a torchvision / torchaudio from the index is a CUDA build that cannot load next to CPU torch
  local py=$1
  if "$py" -c "import importlib.util as u; raise SystemExit(u.find_spec('torchvision') is None)" 2>/dev/null \
      && ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    log "torchvision does not load with CPU torch (a CUDA build): uninstalling it"
    pip_q "$py" -m pip uninstall -y -q torchvision
  fi
}

# Does this checkout's setup.cfg (install_requires + the trl / peft / deepspeed extras) admit what is installed?
check_declared() {  # python
  "$1" - "$REPO/setup.cfg" <<'EOF'
import configparser, sys
from importlib import metadata
from packaging.requirements import Requirement
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
lines = cfg["options"]["install_requires"].splitlines()
for extra in ("trl", "peft", "deepspeed"):
    lines += cfg["options.extras_require"][extra].splitlines()
bad = []
for line in filter(None, (s.strip() for s in lines)):
    req = Requirement(line)
    have = metadata.version(req.name)
    if not req.specifier.contains(have, prereleases=True):
        bad.append(f"{req.name} {have} is outside setup.cfg's {req}")
if bad:
    sys.exit("setup.cfg does not admit this stack: " + "; ".join(bad))
EOF
}

build_env() {  # name, pins, packages installed without their dependencies
  local name=$1 pins=$2 nodeps=${3:-} env="$ENVS/$1"
  local want
  want="python=$("$PY" -c 'import platform; print(platform.python_version())') torch==$TORCH $(echo $pins)"
  [ -z "$nodeps" ] || want="$want --no-deps $nodeps"
  [ "$name" != llamafactory ] || want="$want pth: $LLAMAFACTORY_PTH"
  if [ -f "$env/.ssah-compat" ] && [ "$(cat "$env/.ssah-compat")" = "$want" ] \
      && "$env/bin/python" -c "import torch, transformers, trl, peft, deepspeed" >/dev/null 2>&1; then
    log "$name: cached in $env"
  else
    local t0=$SECONDS
    log "$name: building $env ($want)"
    rm -rf "$env"
    mkdir -p "$ENVS"
    "$PY" -m venv "$env"
    { echo "torch==$TORCH"; for p in $pins; do echo "$p"; done; } > "$env/constraints.txt"
    pip_q "$env/bin/python" -m pip install -q "torch==$TORCH" -c "$env/constraints.txt"
    # shellcheck disable=SC2086  # the pins are words
    pip_q "$env/bin/python" -m pip install -q -e "$REPO[trl,peft,deepspeed]" $pins pytest pytest-timeout \
      -c "$env/constraints.txt"
    # shellcheck disable=SC2086
    [ -z "$nodeps" ] || pip_q "$env/bin/python" -m pip install -q --no-deps $nodeps
    [ "$name" != llamafactory ] || echo "$LLAMAFACTORY_PTH" > "$("$env/bin/python" -c \
      "import sysconfig; print(sysconfig.get_paths()['purelib'])")/ssah_compat_llamafactory.pth"
    repair_cpu_torch "$env/bin/python"
    "$env/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH'), torch.__version__"
    echo "$want" > "$env/.ssah-compat"
    log "$name: built in $((SECONDS - t0)) s, $(du -sh "$env" | cut -f1)"
  fi
  # this checkout, editable (again, without touching the pins, when the environment points at another checkout)
  local where
  where=$("$env/bin/python" -c 'import os, ssah_plugin; print(os.path.dirname(os.path.dirname(ssah_plugin.__file__)))' \
    2>/dev/null || true)
  if [ "$where" != "$REPO" ]; then
    pip_q "$env/bin/python" -m pip install -q --no-deps -e "$REPO"
  fi
}

env_python() {  # name -> the python of that stack's environment (built when missing)
  case "$1" in
    oldest) build_env oldest "$OLDEST" >&2 ;;
    llamafactory) build_env llamafactory "$LLAMAFACTORY" "$LLAMAFACTORY_NODEPS" >&2 ;;
    newest)
      if ! .venv/bin/python -c "import torch, transformers, trl, peft, deepspeed" >/dev/null 2>&1; then
        log "newest: no .venv with the extras yet: scripts/setup.sh"
        bash scripts/setup.sh >&2
      fi ;;
  esac
  if [ "$1" = newest ]; then echo "$REPO/.venv/bin/python"; else echo "$ENVS/$1/bin/python"; fi
}

run_stack() {  # name, python
  local name=$1 py=$2 dir="$ENVS/runs/$1" rc=0 t0=$SECONDS
  local core_k=() zero_k=(-k "$ZERO_K")
  rm -rf "$dir"
  mkdir -p "$dir"
  if [ "$name" = llamafactory ]; then export SSAH_COMPAT_LLAMAFACTORY=1; else unset SSAH_COMPAT_LLAMAFACTORY; fi
  [ -z "${CORE_OUT[$name]:-}" ] || core_k=(-k "not ${CORE_OUT[$name]}")
  [ -z "${ZERO_OUT[$name]:-}" ] || zero_k=(-k "($ZERO_K) and not ${ZERO_OUT[$name]}")
  [ -z "${NOT_RUN[$name]:-}" ] || echo "${NOT_RUN[$name]}" > "$dir/not_run.txt"
  check_declared "$py" > "$dir/declared.txt" 2>&1 || { rc=1; log "$name: $(cat "$dir/declared.txt")"; }
  # one DeepSpeed JIT-extension folder per environment (DeepSpeed builds its CPU shm op on first use, and the builds
  # differ between releases); "newest" keeps the checkout's .torch_extensions, as the main suite does
  if [ "$name" = newest ]; then
    if [ -n "$USER_TORCH_EXTENSIONS_DIR" ]; then export TORCH_EXTENSIONS_DIR=$USER_TORCH_EXTENSIONS_DIR; else
      unset TORCH_EXTENSIONS_DIR; fi
  else
    TORCH_EXTENSIONS_DIR="$(dirname "$(dirname "$py")")/torch_extensions"; export TORCH_EXTENSIONS_DIR; fi
  log "$name: core tests"
  "$py" -m pytest -q -p no:cacheprovider --durations=10 -o junit_family=xunit1 --junitxml "$dir/core.xml" \
    "${CORE_TESTS[@]}" ${core_k[@]+"${core_k[@]}"} \
    ${pytest_args[@]+"${pytest_args[@]}"} > "$dir/core.log" 2>&1 || rc=1
  tail -n 3 "$dir/core.log" >&2
  log "$name: one 2-rank ZeRO-2 launch"
  "$py" -m pytest -q -p no:cacheprovider --durations=10 -o junit_family=xunit1 --junitxml "$dir/zero2.xml" \
    "${ZERO_TESTS[@]}" "${zero_k[@]}" \
    ${pytest_args[@]+"${pytest_args[@]}"} > "$dir/zero2.log" 2>&1 || rc=1
  tail -n 3 "$dir/zero2.log" >&2
  echo "$((SECONDS - t0))" > "$dir/seconds"
  log "$name: tests finished in $((SECONDS - t0)) s (rc $rc)"
  return $rc
}

t_all=$SECONDS
declare -A PYS
for name in "${stacks[@]}"; do
  PYS[$name]=$(env_python "$name")
done
log "environments ready in $((SECONDS - t_all)) s"
[ "$build_only" = 0 ] || exit 0

status=0
for name in "${stacks[@]}"; do
  run_stack "$name" "${PYS[$name]}" || status=1
  # versions actually installed, read in that environment
  "${PYS[$name]}" - "$name" "$VERSIONS" "$ENVS/runs/$name" <<'EOF'
import json, platform, sys
from importlib import metadata
name, names, d = sys.argv[1], sys.argv[2].split(), sys.argv[3]
def v(n):
    try:
        return metadata.version(n)
    except metadata.PackageNotFoundError:
        return None
json.dump({"stack": name, "python": platform.python_version(), "versions": {n: v(n) for n in names}},
          open(f"{d}/versions.json", "w"))
EOF
done

# the table, from the JUnit files of every stack run now (stacks not run keep their last rows)
python3 - "$OUT" "$ENVS/runs" "${stacks[@]}" <<'EOF'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path
out, runs, ran = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
out.mkdir(parents=True, exist_ok=True)
path = out / "compat.json"
old = {r["stack"]: r for r in json.loads(path.read_text())["stacks"]} if path.exists() else {}
rows = dict(old)
for name in ran:
    d = runs / name
    row = json.loads((d / "versions.json").read_text())
    row.update(seconds=int((d / "seconds").read_text()), date=time.strftime("%Y-%m-%d"), failures=[], parts={})
    declared = (d / "declared.txt").read_text().strip()
    row["declared_range_admits_it"] = not declared
    row["not_run"] = " ".join((d / "not_run.txt").read_text().split()) if (d / "not_run.txt").exists() else ""
    if declared:
        row["failures"].append(declared)
    for part in ("core", "zero2"):
        counts = dict(passed=0, failed=0, skipped=0)
        try:
            suites = ET.parse(d / f"{part}.xml").getroot().iter("testcase")
        except (OSError, ET.ParseError) as e:
            row["failures"].append(f"{part}: no JUnit report ({e})")
            suites = []
        for case in suites:
            tid = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                first = (bad.get("message") or "").strip().splitlines()[:1]
                row["failures"].append(f"{tid}: {first[0][:200] if first else ''}")
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
        row["parts"][part] = counts
    rows[name] = row
order = [s for s in ("oldest", "llamafactory", "newest") if s in rows]
path.write_text(json.dumps({"stacks": [rows[s] for s in order]}, indent=1) + "\n")
cols = ["torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "tokenizers", "safetensors",
        "huggingface_hub"]
lines = ["# Compatibility job (scripts/compat.sh)", "",
         "Core bitwise tests (Trainer, SFT, DPO, LoRA, resume, custom loop, freeze engine) and one 2-rank ZeRO-2 "
         "launch per stack; CPU, torch 2.13.0+cpu. Counts: passed / failed / skipped.", "",
         "| stack | python | " + " | ".join(cols) + " | core | ZeRO-2 | s | date |",
         "|" + "---|" * (len(cols) + 6)]
for s in order:
    r = rows[s]
    p = lambda k: "{passed} / {failed} / {skipped}".format(**r["parts"].get(k, dict(passed=0, failed=0, skipped=0)))
    lines.append(f"| {s} | {r['python']} | " + " | ".join(str(r["versions"].get(c)) for c in cols)
                 + f" | {p('core')} | {p('zero2')} | {r['seconds']} | {r['date']} |")
for s in order:
    if rows[s].get("not_run"):
        lines += ["", f"Not run in {s}: {rows[s]['not_run']}."]
for s in order:
    if rows[s]["failures"]:
        lines += ["", f"Failures in {s}:", ""] + [f"- {f}" for f in rows[s]["failures"]]
(out / "compat.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
log "all done in $((SECONDS - t_all)) s (exit $status)"
exit $status
