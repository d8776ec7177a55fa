#!/usr/bin/env bash
# The one check for a lent GPU machine (the kernels compiled, tested and timed; training on the GPU), run once, in at
# most 9 minutes, with no network:
#   0. kernel compile report: benchmarks/kernel_compile.py for this GPU's compute capability (registers, spills,
#      occupancy of every launch the registered ops make); it fills triton's cache, so the steps after it spend
#      their time measuring, not compiling, and benchmarks/kernels.py reads the registers from it
#   1. op tests, Triton compiled on CUDA: tests/ops/test_ops.py (every registered op, dtype and layout at small and odd
#      shapes) and each kernel family's own tests/ops/test_ops_<family>.py
#   2. op tests at training scale: tests/ops/test_ops_large.py (B 256, C 2048, 56x56; values and gradients)
#   3. kernel benchmark: benchmarks/kernels.py (each registered op: eager / torch.compile / Triton, fwd+bwd, memory,
#      % of HBM peak; the op of SA's step first)
#   4. backend agreement: benchmarks/backend_agreement.py (50 SA steps, Triton vs torch backend, same seed)
#   5. one epoch of timm-sadistill train --distill sa --amp --channels-last (fp16 AMP): benchmarks/train_check.py
#   6. teacher precision: benchmarks/teacher_precision.py (fp32 / TF32 / bf16 / channels-last / compiled)
#   7. training step: benchmarks/overhead.py, resnet50 -> resnet18, 224 px, batch 128, bf16, channels-last,
#      none / kd / sa (Triton) / sa (torch), eager (interleaved), then each compiled (the report is rewritten
#      after each row: a cold compile takes tens of seconds, and a row cut off by the limit costs only itself)
#   8. one epoch of train --amp --amp-dtype bfloat16 --channels-last --torchcompile: benchmarks/train_check.py
# Compile-heavy steps come last, so a slow compile cannot cost the others. Every step has its own timeout; they
# sum to 490 s (+2 s to kill each) and leave the machine's start and one rerun inside the 15-minute lease.
#
# Output, under ${OUT:-benchmarks/results}, named by GPU ("NVIDIA-H200"): gpu_check-<gpu>.md (each step's
# status and time), gpu_check-<gpu>.log (all output) and one markdown per benchmark: 8 files, what the device
# tool brings back from $OUT at most. A timm wheel carried in .whl/ is installed to /tmp/site first.
#
#   benchmarks/gpu_check.sh             # on the GPU machine; exit status 0 when every step passed
#   benchmarks/gpu_check.sh --dry-run   # on a CPU: every step at toy sizes (Triton interpreter), output under
#                                       # ${OUT:-/tmp/gpu-check-dry-run}, timeouts x${TIMEOUT_SCALE:-4}
set -uo pipefail  # no -e: a failing step is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 2

DRY=0
if [[ ${1:-} == --dry-run ]]; then
    DRY=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--dry-run]" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if ((DRY)); then
    OUT=${OUT:-/tmp/gpu-check-dry-run}
    SCALE=${TIMEOUT_SCALE:-4}  # 2 shared CPU cores and the interpreter are far slower than the GPU machine
    export TRITON_INTERPRET=1
    gpu=cpu-dry-run
else
    OUT=${OUT:-benchmarks/results}
    SCALE=1
    export TRITON_INTERPRET=0
    if compgen -G '.whl/*.whl' > /dev/null; then
        timeout -k 2 20 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || echo "installing .whl/ failed: the machine's own packages are used"
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
    gpu=$("$PYTHON" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device; on a CPU run it with --dry-run")
print(torch.cuda.get_device_name().replace(" ", "-"))') || exit 2
fi
mkdir -p "$OUT"
LOG=$OUT/gpu_check-$gpu.log
SUMMARY=$OUT/gpu_check-$gpu.md
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

"$PYTHON" -c 'import torch, timm, timm_sadistill
try:
    import triton
    version = triton.__version__
except ImportError:
    version = "not installed"
print("torch", torch.__version__, "| triton", version, "| timm", timm.__version__)' || {
    echo "the package does not import here: nothing else can run"
    exit 2
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true

cat > "$SUMMARY" <<EOF
# gpu_check.sh on $gpu ($(date -u +%Y-%m-%dT%H:%MZ))

| step | result | seconds (of the limit) |
|---|---|---|
EOF
failed=0

# step NAME LIMIT_S COMMAND...: runs COMMAND under its own timeout and records its status and time
step() {
    local name=$1 limit=$(($2 * SCALE)) start=$SECONDS rc=0 result
    shift 2
    echo
    echo "=== $name (limit ${limit} s): $*"
    timeout -k 2 "$limit" "$@" || rc=$?
    case $rc in
        0) result=ok ;;
        124 | 137) result="**TIMED OUT**" ;;
        *) result="**FAILED** (exit $rc)" ;;
    esac
    ((rc == 0)) || failed=1
    echo "=== $name: $result after $((SECONDS - start)) s"
    echo "| $name | $result | $((SECONDS - start)) ($limit) |" >> "$SUMMARY"
}

# xdist spreads the small tests' Triton compiles over the cores; the large ones run alone (tens of GB each)
parallel=()
if ((!DRY)) && "$PYTHON" -c 'import xdist' 2> /dev/null; then
    parallel=(-n 8)
fi
pytest=("$PYTHON" -m pytest -q -rs -p no:cacheprovider)
# the registry's op tests and each kernel family's own; not the dispatch tests (CPU tensors made to take the
# interpreter) nor the large shapes (a step of their own)
op_tests=(tests/ops/test_ops.py)
for file in tests/ops/test_ops_*.py; do
    [[ $file == */test_ops_dispatch.py || $file == */test_ops_large.py ]] || op_tests+=("$file")
done

if ((DRY)); then
    toy_pair=(--teacher test_resnet --student test_resnet --img-size 32 --num-classes 10 --batch-size 4)
    step "kernel compile report" 60 "$PYTHON" benchmarks/kernel_compile.py --arch 90 --shapes 'odd sizes' \
        --out "$OUT/kernel_compile-$gpu.md"
    step "op tests" 50 "${pytest[@]}" tests/ops/test_ops.py -k "op_matches_reference and shape1"
    step "op tests, large shapes" 50 "${pytest[@]}" tests/ops/test_ops_large.py
    step "kernel benchmark" 60 "$PYTHON" benchmarks/kernels.py --small --iters 2 --triton-on-cpu --out "$OUT/kernels-$gpu.md"
    # at 64 px: test_resnet's last map is 1x1 at 32 px, where the CAM term's position-normalised maps are +-1 and
    # the term moves in jumps of a tenth (a sign flip of one class) that no rounding-sized yardstick covers
    step "backend agreement" 35 "$PYTHON" benchmarks/backend_agreement.py "${toy_pair[@]}" --img-size 64 --steps 3 \
        --amp --channels-last --out "$OUT/backend_agreement-$gpu.md"
    train=(--teacher test_resnet --student test_resnet --img-size 32 --per-class 4 --batch-size 8
        --work /tmp/gpu-check-dry-run-train --out "$OUT/train_check-$gpu.md")
    rm -f "$OUT/train_check-$gpu.md"
    step "train, amp + channels-last" 45 "$PYTHON" benchmarks/train_check.py "${train[@]}" --flags '--amp --channels-last'
    step "teacher precision" 50 "$PYTHON" benchmarks/teacher_precision.py --model test_resnet --img-size 32 \
        --batch-size 8 --num-classes 10 --iters 2 --warmup 1 --eval-batches 2 --out "$OUT/teacher_precision-$gpu.md"
    # the interpreter cannot run under torch.compile: the Triton row runs eager only here
    step "training step" 110 "$PYTHON" benchmarks/overhead.py "${toy_pair[@]}" --amp --channels-last --compile both \
        --methods 'none;kd;sa[backend=torch]' --steps 1 --repeats 1 --warmup 1 --no-flops \
        --report-each-compiled-row --out "$OUT/overhead-$gpu.md"
    step "train, bf16 + channels-last + compile" 70 "$PYTHON" benchmarks/train_check.py "${train[@]}" \
        --flags '--amp --amp-dtype bfloat16 --channels-last --torchcompile'
else
    step "kernel compile report" 30 "$PYTHON" benchmarks/kernel_compile.py --arch native --jobs "$(nproc)" \
        --out "$OUT/kernel_compile-$gpu.md"
    step "op tests" 45 "${pytest[@]}" "${parallel[@]}" "${op_tests[@]}"
    # the compile report compiled the training-shape kernels these launch, so their limits leave out the compiles
    step "op tests, large shapes" 35 "${pytest[@]}" tests/ops/test_ops_large.py
    step "kernel benchmark" 40 "$PYTHON" benchmarks/kernels.py --out "$OUT/kernels-$gpu.md"
    step "backend agreement" 35 "$PYTHON" benchmarks/backend_agreement.py --amp --channels-last \
        --out "$OUT/backend_agreement-$gpu.md"
    train=(--work /tmp/gpu-check-train --out "$OUT/train_check-$gpu.md")
    rm -f "$OUT/train_check-$gpu.md"
    step "train, amp + channels-last" 45 "$PYTHON" benchmarks/train_check.py "${train[@]}" --flags '--amp --channels-last'
    step "teacher precision" 40 "$PYTHON" benchmarks/teacher_precision.py --out "$OUT/teacher_precision-$gpu.md"
    step "training step" 130 "$PYTHON" benchmarks/overhead.py --device cuda --teacher resnet50 --student resnet18 \
        --img-size 224 --num-classes 1000 --batch-size 128 --amp --channels-last --compile both \
        --methods 'none;kd;sa[backend=triton];sa[backend=torch]' --steps 10 --repeats 3 --warmup 3 --no-flops \
        --report-each-compiled-row --out "$OUT/overhead-$gpu.md"
    step "train, bf16 + channels-last + compile" 70 "$PYTHON" benchmarks/train_check.py "${train[@]}" \
        --flags '--amp --amp-dtype bfloat16 --channels-last --torchcompile'
fi

echo
cat "$SUMMARY"
exit "$failed"
