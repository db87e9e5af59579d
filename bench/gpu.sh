#!/usr/bin/env bash
# The prepared GPU check (issue 13): the CUDA paths (bf16 autocast, channels_last, pinned
# workers, batch sizing, OOM splitting) on one GPU machine, in at most ~8 minutes, as one run:
#
#     bash bench/gpu.sh              # on a machine with an NVIDIA GPU
#     bash bench/gpu.sh --dry-run    # anywhere: every step on the CPU, tiny (also GPU_DRY_RUN=1)
#
# Steps, each with its own time budget; a step that fails is recorded and the next one runs:
#   1. the CUDA tests: `pytest -m "not slow"` with CUDA visible, then the tests that skip
#      without CUDA and the slow test of the default local cluster (the pinned GPU worker);
#   2. bf16 autocast against fp32 on 8 Lite0 units (bench/gpu_checks.py parity);
#   3. bench/speed.py --device cuda (atlas against Lucent when installed, and a naive loop);
#   4. the full default Lite0 atlas: `atlas plan --json`, then `atlas run` under a time cap;
#   5. peak memory and speed per batch size for a few layers (bench/gpu_checks.py batches);
#   6. with two or more GPUs, a pinned local cluster: `atlas run --scheduler local` and a check
#      that every worker got tasks (bench/gpu_checks.py cluster); one GPU: skipped.
#
# Figures go to $OUT/gpu-results.md when OUT is set (the device tool returns what is written
# under $OUT), else bench/gpu-results.md (GPU_RESULTS=FILE to choose), ready to paste into
# bench/RESULTS.md; every step's full output to the same name with -logs.txt. Exit status 0
# when no step failed, else 1. Other settings: GPU_TOTAL_S (seconds for all steps, default
# 470), GPU_PYTHON (the interpreter; default .venv/bin/python, see below).
#
# Python: .venv/bin/python when it imports torch; if there is no .venv, `make .venv/.installed`
# builds it (needs the package registry); failing that, the first python3 that imports torch,
# with this tree on PYTHONPATH and any wheels in .whl/ (GPU_WHEELS=DIR) installed beside it.
# The script never resets or reconfigures the GPU.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

DRY=${GPU_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
[ "$DRY" = 0 ] || DRY=1

if [ -n "${OUT:-}" ]; then RESULTS=$OUT/gpu-results.md; else RESULTS=bench/gpu-results.md; fi
RESULTS=${GPU_RESULTS:-$RESULTS}
LOGS=${RESULTS%.md}-logs.txt
mkdir -p "$(dirname "$RESULTS")" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/atlas-gpu.XXXXXX") || exit 2
if [ "$DRY" = 1 ]; then TOTAL=${GPU_TOTAL_S:-600}; else TOTAL=${GPU_TOTAL_S:-470}; fi
DEADLINE=$((SECONDS + TOTAL))
FAILED=0
export PYTHONUNBUFFERED=1

# Each command's time budget in seconds: a cap, shrunk when the time left must keep the later
# commands' budgets (so that all steps end within TOTAL); the atlas run of step 4 gets what is
# left, up to B_RUN. Measured times are far below these caps except for step 4.
B_FAST=100 B_CUDA=45 B_PARITY=45 B_SPEED=100 B_PLAN=45 B_RUN=330 MIN_RUN=30 B_BATCHES=45
B_TWO=40 B_SMALL=15 # step 6's atlas run and check each; junit counts and the run's summary

# --- helpers -----------------------------------------------------------------------------

# budget DEFAULT LATER: seconds for a step: DEFAULT, or less so that LATER seconds stay for
# the steps after it; 0 when under 10 are left.
budget() {
    local left=$((DEADLINE - SECONDS - $2))
    local b=$(($1 < left ? $1 : left))
    [ "$b" -ge 10 ] || b=0
    echo "$b"
}

# begin N TITLE: a step's header, section file and log.
begin() {
    STEP=$1
    TITLE=$2
    SEC=$WORK/sec$STEP.md
    LOG=$WORK/step$STEP.log
    STEP_START=$SECONDS
    STEP_BUDGET=0
    printf '\n=== step %s: %s ===\n' "$STEP" "$TITLE"
    printf '\n### %s. %s\n\n' "$STEP" "$TITLE" >"$SEC"
    printf '=== step %s: %s ===\n' "$STEP" "$TITLE" >"$LOG"
}

# run BUDGET CMD...: CMD under `timeout`, its output in the step's log (and on the terminal);
# the command as run goes into the results. Returns CMD's status (124 or 137: timed out; 200:
# not run, no time left).
run() {
    local limit=$1
    shift
    listed "$limit" "$@" || return 200
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

# to_file FILE BUDGET CMD...: as run, but CMD's stdout goes to FILE, its stderr to the log.
to_file() {
    local file=$1 limit=$2
    shift 2
    : >"$file"
    listed "$limit" "$@" || return 200
    timeout -k 10 "$limit" "$@" >"$file" 2>>"$LOG"
}

# markdown BUDGET CMD...: as to_file, CMD's stdout being Markdown for the results.
markdown() {
    to_file "$WORK/md" "$@"
    local rc=$?
    { echo; cat "$WORK/md"; echo; } >>"$SEC"
    tee -a "$LOG" <"$WORK/md"
    return "$rc"
}

# listed BUDGET CMD...: the command, as run, in the results and the log; fails for budget 0.
listed() {
    local limit=$1 line
    shift
    line=$(printf '%q ' "$@")
    line=${line% }
    printf '$ %s\n' "$line" >>"$LOG"
    if [ "$limit" -le 0 ]; then
        printf -- '- not run (no time left): `%s`\n' "$line" >>"$SEC"
        return 1
    fi
    STEP_BUDGET=$((STEP_BUDGET + limit))
    printf -- '- `%s` (budget %s s)\n' "$line" "$limit" >>"$SEC"
}

# tail_of_log: the end of the step's log, in the results (for a step that failed).
tail_of_log() {
    { echo; echo '```'; tail -n 15 "$LOG"; echo '```'; } >>"$SEC"
}

# finish STATUS [NOTE]: one row of the summary table; then the results file is rewritten.
finish() {
    local status=$1 text=${2:-}
    case $status in *failed* | *"timed out"*) FAILED=$((FAILED + 1)); tail_of_log ;; esac
    [ -z "$text" ] || printf '\n%s\n' "$text" >>"$SEC"
    printf '| %s. %s | %s | %s | %s |\n' "$STEP" "$TITLE" "$status" \
        "$((SECONDS - STEP_START))" "$STEP_BUDGET" >>"$WORK/rows.md"
    echo "--- step $STEP: $status ($((SECONDS - STEP_START)) s)"
    write_results
}

# worse TEXT: the step's status becomes TEXT, or gains it after an earlier failure.
worse() {
    if [ "$status" = ok ]; then status=$1; else status="$status; $1"; fi
}

# status_of RC: ok, timed out or failed, from a command's exit status.
status_of() {
    case $1 in
        0) echo ok ;;
        124 | 137) echo "timed out" ;;
        200) echo "skipped (no time left)" ;;
        *) echo "failed (exit $1)" ;;
    esac
}

write_results() {
    {
        cat "$WORK/header.md"
        printf '\n| step | status | seconds | budget s |\n| --- | --- | --- | --- |\n'
        cat "$WORK/rows.md" 2>/dev/null
        cat "$WORK"/sec*.md 2>/dev/null
    } >"$RESULTS.tmp" && mv -f "$RESULTS.tmp" "$RESULTS"
    cat "$WORK"/step*.log >"$LOGS" 2>/dev/null
}

# --- the machine and the interpreter -----------------------------------------------------

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the CPU even on a GPU machine
    export PYTHONPATH=$REPO/tests${PYTHONPATH:+:$PYTHONPATH}  # tinymodels:tiny on workers too
fi

if [ "$DRY" = 1 ]; then
    GPUS=0
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c -v -e '^ *$' -e '^-1$')
else
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fi

PY=${GPU_PYTHON:-}
SETUP=""
WHEELS=${GPU_WHEELS:-.whl}
if [ -z "$PY" ] && [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
    PY=.venv/bin/python
fi
# No .venv: build it, unless wheels were brought for an offline machine (the device tool's way).
if [ -z "$PY" ] && [ ! -e .venv ] && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no .venv: building it with make .venv/.installed (needs the package registry)"
    if PIP_RETRIES=0 PIP_TIMEOUT=5 timeout -k 10 "$(budget 600 300)" make .venv/.installed \
        >"$WORK/make.log" 2>&1; then
        PY=.venv/bin/python
        SETUP="no .venv: built it with \`make .venv/.installed\` in $SECONDS s."
    else
        SETUP="no .venv, and \`make .venv/.installed\` failed after $SECONDS s (offline?):"
        SETUP="$SETUP $(grep -m 1 -i error "$WORK/make.log" || tail -n 1 "$WORK/make.log")."
    fi
fi
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import torch' 2>/dev/null; then
            PY=$(command -v "$candidate")
            break
        fi
    done
    if [ -n "$PY" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
            "$WHEELS"/*.whl >"$WORK/pip.log" 2>&1 || tail -n 3 "$WORK/pip.log"
        export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
        SETUP="$SETUP Installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS beside it."
    fi
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    SETUP="Using ${PY:-no python with torch} with this tree on PYTHONPATH (no usable .venv). $SETUP"
fi
PY=${PY:-python3}
ATLAS=("$PY" -m atlas)

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$COMMIT" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT="$COMMIT (with uncommitted changes)"
fi
VERSIONS=$("$PY" -c 'import sys, torch, atlas
print(f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"CUDA available: {torch.cuda.is_available()}")' 2>&1 | tail -n 1)
if [ "$DRY" = 1 ]; then
    CPU=$(grep -m 1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')
    DEVICE="dry run on the CPU ($(nproc) cores${CPU:+, $CPU}): a tiny configuration, no figures"
else
    DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        2>/dev/null | sed 's/^/GPU: /' | paste -sd ';' -)
    DEVICE="${DEVICE:-no GPU found by nvidia-smi}; $(nproc) CPU cores"
fi

{
    if [ "$DRY" = 1 ]; then
        echo "## GPU check (\`bench/gpu.sh --dry-run\`): a dry run, not figures"
    else
        echo "## GPU check (\`bench/gpu.sh\`, issue 13)"
    fi
    echo
    echo "- device: $DEVICE; GPUs visible: $GPUS"
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit: $COMMIT"
    echo "- $VERSIONS; interpreter: \`$PY\`"
    echo "- command: \`bash bench/gpu.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\`"
    echo "  (all steps within ${TOTAL} s; each step's commands and budgets below)"
    [ -z "$SETUP" ] || echo "- setup: $SETUP"
} >"$WORK/header.md"
cat "$WORK/header.md"
: >"$WORK/rows.md"
if [ "$DRY" = 0 ] && [ "$GPUS" = 0 ]; then
    echo "warning: no GPU visible; the CUDA steps will fail (--dry-run runs them on the CPU)" >&2
fi

# What the later commands keep (seconds): after step 5, after step 4's run, and so on.
if [ "$GPUS" -ge 2 ] && [ "$DRY" = 0 ]; then AFTER5=$((2 * B_TWO)); else AFTER5=0; fi
AFTER_RUN=$((B_SMALL + B_BATCHES + AFTER5))
AFTER_PLAN=$((MIN_RUN + AFTER_RUN))
AFTER3=$((B_PLAN + AFTER_PLAN))
AFTER2=$((B_SPEED + AFTER3))
AFTER1=$((B_PARITY + AFTER2))

# --- 1. the CUDA tests ---------------------------------------------------------------------

begin 1 "CUDA tests"
CUDA_FILES=$(grep -l 'cuda.is_available' tests/test_*.py | tr '\n' ' ')
status=ok
if [ "$DRY" = 1 ]; then
    echo "Dry run: only the tests that need CUDA (they skip here), not the not-slow suite." >>"$SEC"
else
    run "$(budget $B_FAST $((B_CUDA + 2 * B_SMALL + AFTER1)))" "$PY" -m pytest -q -m "not slow" \
        -p no:cacheprovider --junitxml="$WORK/fast.xml" tests
    rc=$?
    [ "$rc" = 0 ] || worse "$(status_of $rc) (not-slow suite)"
    printf '\nThe not-slow suite with CUDA visible:\n' >>"$SEC"
    markdown $B_SMALL "$PY" bench/gpu_checks.py junit "$WORK/fast.xml" --show-skipped 5
fi
# shellcheck disable=SC2086  # CUDA_FILES is a list of paths
run "$(budget $B_CUDA $((B_SMALL + AFTER1)))" "$PY" -m pytest -q -rA -p no:cacheprovider \
    --junitxml="$WORK/cuda.xml" $CUDA_FILES $([ "$DRY" = 0 ] && echo tests/test_execute.py) \
    -k "cuda or default_local_cluster"
rc=$?
[ "$rc" = 0 ] || worse "$(status_of $rc) (CUDA tests)"
printf '\nThe tests that skip without CUDA (named cuda, in %s)%s:\n' "${CUDA_FILES% }" \
    "$([ "$DRY" = 0 ] && echo ", and the default local cluster's (its pinned GPU worker)")" >>"$SEC"
markdown $B_SMALL "$PY" bench/gpu_checks.py junit "$WORK/cuda.xml" --show-skipped 10
finish "$status"

# --- 2. bf16 autocast against fp32 ---------------------------------------------------------

begin 2 "bf16 autocast against fp32 (image parity)"
B=$(budget $B_PARITY $AFTER2)
if [ "$DRY" = 1 ]; then
    markdown "$B" "$PY" bench/gpu_checks.py parity --model tinymodels:tiny --device cpu \
        --targets conv2:0,conv2:1,logits:0,logits:1 --steps 2
else
    markdown "$B" "$PY" bench/gpu_checks.py parity --steps 64 --seconds $((B - 15))
fi
finish "$(status_of $?)"

# --- 3. bench/speed.py ---------------------------------------------------------------------

begin 3 "bench/speed.py: atlas against Lucent and a naive loop"
SKIP=""
if ! "$PY" -c 'import lucent' 2>/dev/null; then
    SKIP=lucent
    echo "Lucent not installed (the \`bench\` extra): atlas and the naive loop only." >>"$SEC"
fi
B=$(budget $B_SPEED $AFTER3)
if [ "$DRY" = 1 ]; then
    run "$B" "$PY" bench/speed.py --device cpu --steps 2 --units 0-1 --batches 1 --rounds 1 \
        --no-variants --no-projection ${SKIP:+--skip "$SKIP"}
else
    run "$B" "$PY" bench/speed.py --device cuda --steps 64 --units 0-15 --batches 8 --rounds 2 \
        --project-steps 8 ${SKIP:+--skip "$SKIP"}
fi
rc=$?
{ echo; echo '```'; sed -n '/^[0-9][0-9][0-9][0-9]-[0-9]/,$p' "$LOG"; echo '```'; } >>"$SEC"
finish "$(status_of $rc)"

# --- 4. the full default Lite0 atlas against the plan's projection -------------------------

begin 4 "the full default atlas against \`atlas plan\`"
ATLAS_OUT=$WORK/atlas
if [ "$DRY" = 1 ]; then  # in-process: step 6 runs the local cluster of the dry run
    MODEL=(tinymodels:tiny --steps 2)
    SCHEDULER=(--scheduler inline)
else
    MODEL=(efficientnet_lite0)
    SCHEDULER=()
fi
to_file "$WORK/plan.json" "$(budget $B_PLAN $AFTER_PLAN)" \
    "${ATLAS[@]}" plan "${MODEL[@]}" --out "$ATLAS_OUT" --json
rc=$?
status=ok
[ "$rc" = 0 ] || worse "$(status_of $rc) (plan)"
CAP=$(budget $B_RUN $AFTER_RUN)
STARTED=$(date +%s)
run "$CAP" "${ATLAS[@]}" run "${MODEL[@]}" "${SCHEDULER[@]}" --out "$ATLAS_OUT"
rc=$?
WALL=$(($(date +%s) - STARTED))
case $rc in
    0) ;;
    124 | 137) [ "$status" != ok ] || status="ok (capped at $CAP s)" ;;
    *) worse "$(status_of $rc) (run)" ;;
esac
markdown $B_SMALL "$PY" bench/gpu_checks.py summary --plan "$WORK/plan.json" \
    --out "$ATLAS_OUT" --wall "$WALL" --started "$STARTED" --cap "$CAP" --rc "$rc" ||
    worse "failed (summary)"
finish "$status"

# --- 5. batch size from measured peak memory -----------------------------------------------

begin 5 "batch size from peak memory"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >>"$LOG" 2>&1
B=$(budget $B_BATCHES $AFTER5)
if [ "$DRY" = 1 ]; then
    markdown "$B" "$PY" bench/gpu_checks.py batches --model tinymodels:tiny --device cpu \
        --layers conv2,logits --batches 1,4 --steps 3
else
    markdown "$B" "$PY" bench/gpu_checks.py batches --seconds $((B - 15))
fi
finish "$(status_of $?)"

# --- 6. two pinned workers -----------------------------------------------------------------

begin 6 "a pinned local cluster of two or more GPUs"
if [ "$DRY" = 1 ]; then
    echo "Dry run: the check on the CPU's one local worker." >>"$SEC"
    markdown "$(budget $B_TWO 0)" "$PY" bench/gpu_checks.py cluster --model tinymodels:tiny \
        --layer conv2 --channels 0-3 --steps 2 --batch 2 --expect 1
    finish "$(status_of $?)"
elif [ "$GPUS" -lt 2 ]; then
    finish "skipped" "$([ "$GPUS" = 1 ] && echo one || echo "$GPUS") GPU: skipped (needs two)."
else
    status=ok
    run "$(budget $B_TWO $B_TWO)" "${ATLAS[@]}" run efficientnet_lite0 --layers blocks.8 \
        --channels 0-63 --classes '' --steps 32 --batch 8 --scheduler local --out "$WORK/two"
    rc=$?
    [ "$rc" = 0 ] || worse "$(status_of $rc) (atlas run)"
    grep -E 'done, [0-9]+ failed' "$LOG" | tail -n 1 | sed 's/^/atlas run: /' >>"$SEC"
    markdown "$(budget $B_TWO 0)" "$PY" bench/gpu_checks.py cluster --steps 16 --expect "$GPUS"
    rc=$?
    [ "$rc" = 0 ] || worse "$(status_of $rc) (cluster check)"
    finish "$status"
fi

printf '\nAll steps in %s s; %s failed.\n' "$SECONDS" "$FAILED" >>"$WORK/sec6.md"
write_results
rm -rf "$WORK"
echo
echo "results: $RESULTS (logs: $LOGS); $FAILED step(s) failed; $SECONDS s"
[ "$FAILED" = 0 ]
