#!/usr/bin/env bash
# What only a GPU can show, in one command (about 6 minutes on one H100/H200; the parts' limits
# add up to under 8), results as files:
#
#   bash bench/gpu_check.sh [OUT]          # OUT: a folder (default bench/results/gpu)
#   bash bench/gpu_check.sh --device cpu [OUT]   # a rehearsal on CPU: the same parts, small sizes
#                                                # (tests/test_gpu_check.py runs it)
#
#   1. environment.txt: torch, CUDA, the device;
#   2. reducers.txt/.json: bench/reducers.py --device cuda in ONE process (a lent machine has one
#      GPU, so NCCL across ranks cannot be shown: the phase split is selection and bookkeeping on
#      the device, with synchronised timing; communication is a no-op at one worker);
#   3. memory.txt/.json: bench/memory.py --device cuda (kept and peak memory per method);
#   4. train.txt/.json: bench/gpu_train.py, ResNet-18 steps dense against compressed, time split;
#   5. fused.txt/.json: bench/fused_check.py, the Triton selection kernel against the torch
#      reference (bit-identical on edge cases) and both timed in read passes of the gradient;
#   6. topk.txt/.json: bench/topk_check.py, the exact top-k search (sampled bound, Triton pass)
#      against the torch reference (bit-identical on ties, NaN/Inf, k = 1, k = n, ...) and both,
#      with plain torch.topk, timed in read passes (ResNet-18, layer-wise and global);
#   7. with RESEARCH_CODE=PATH, bench/reducers.py --compare-with PATH beside ours (when that
#      option exists in this checkout).
# Each part has its own time limit and a failed part does not stop the others; the exit code
# is the number of parts that failed. Record what it prints in docs/benchmarks.md with the date.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ ${1:-} == --device ]]; then
    DEVICE=${2:?--device needs cuda or cpu}
    shift 2
fi
[[ $DEVICE == cuda || $DEVICE == cpu ]] || { echo "gpu_check: --device must be cuda or cpu, not $DEVICE" >&2; exit 2; }
OUT=${1:-bench/results/gpu}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, whatever is installed
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
failed=0

part() {  # part NAME SECONDS COMMAND...: run, tee to OUT/NAME.txt, count a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [[ $rc -ne 0 ]]; then
        echo "== $name failed (exit $rc)" | tee -a "$OUT/$name.txt"
        failed=$((failed + 1))
    fi
}

DEVICE=$DEVICE "$PY" - <<'EOF' | tee "$OUT/environment.txt"
import os, platform, torch
print(f"host {platform.node()}, python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if os.environ["DEVICE"] == "cpu":
    print(f"device cpu: a rehearsal of the parts with small sizes ({os.cpu_count()} cores)")
elif not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device here; this script is for a machine with a GPU")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 1

if [[ $DEVICE == cuda ]]; then  # the parts' sizes: the real ones, or a rehearsal's
    REDUCERS=(--steps 10 --warmup 3) MEMORY=() REPS=(--reps 20) TOPK=(--models resnet18)
    TRAIN=(--methods exact,exdyna,topk,sage,thresh,powersgd)
else
    REDUCERS=(--steps 1 --warmup 1 --models tiny --methods exact,topk,global_topk --selections torch,fused)
    MEMORY=(--methods exact,topk) REPS=(--reps 2) TOPK=(--models tiny)
    TRAIN=(--methods exact,topk --batch 8 --warmup 1 --steps 2)
fi

part reducers 150 "$PY" bench/reducers.py --device "$DEVICE" --workers 1 "${REDUCERS[@]}" \
    --out "$OUT/reducers.json"
part memory 60 "$PY" bench/memory.py --device "$DEVICE" "${MEMORY[@]}" --out "$OUT/memory.json"
part fused 80 "$PY" bench/fused_check.py --device "$DEVICE" "${REPS[@]}" --out "$OUT/fused.json"
part topk 60 "$PY" bench/topk_check.py --device "$DEVICE" "${REPS[@]}" "${TOPK[@]}" --out "$OUT/topk.json"
part train 120 "$PY" bench/gpu_train.py --device "$DEVICE" "${TRAIN[@]}" --out "$OUT/train.json"
if [[ -n "${RESEARCH_CODE:-}" ]]; then
    if "$PY" bench/reducers.py --help | grep -q -- --compare-with; then
        part research 120 "$PY" bench/reducers.py --device "$DEVICE" --workers 1 --compare-with "$RESEARCH_CODE" \
            --out "$OUT/research.json"
    else
        echo "== research: bench/reducers.py has no --compare-with in this checkout; skipped"
    fi
fi
echo "gpu_check: results in $OUT ($failed part(s) failed)"
exit "$failed"
