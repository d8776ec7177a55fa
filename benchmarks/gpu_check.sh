#!/usr/bin/env bash
# The one check for a lent GPU machine (no network): the op tests with the Triton kernels compiled on CUDA,
# then the kernel benchmark. Logs and the markdown table go to ${OUT:-benchmarks/results}.
# A timm wheel carried in .whl/ is installed to /tmp/site first (skipped when there is none).
# Exit status: the tests' (the benchmark still runs after failing tests, to keep the device time's output).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"

if compgen -G '.whl/*.whl' > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1

gpu=$("$PYTHON" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA device; on a CPU run make test and benchmarks/kernels.py")
print(torch.cuda.get_device_name().replace(" ", "-"))')
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee "$OUT/env-$gpu.log"

tests=0
timeout 240 "$PYTHON" -m pytest -q -rs tests/test_ops.py 2>&1 | tee "$OUT/test_ops-$gpu.log" || tests=$?
timeout 330 "$PYTHON" benchmarks/kernels.py --out "$OUT/kernels-$gpu.md" 2>&1 | tee "$OUT/kernels-$gpu.log"
exit "$tests"
