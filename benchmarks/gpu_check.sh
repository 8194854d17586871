#!/usr/bin/env bash
# The checks that need a GPU, in one short run: the CUDA tests, then the engine table on CUDA at
# n = 10,000,000 with the statistics pass's bandwidth beside a device-to-device copy, then
# the packed 64-point sweep as stacked tensors on the device.
# Without a CUDA device it says so and exits 0. Run from anywhere: benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device here; nothing to check"
    exit 0
fi
"$PYTHON" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name())'
"$PYTHON" -m pytest -q -rs -k cuda tests/unit/test_engines.py tests/unit/test_fused.py \
    tests/unit/test_pack.py
"$PYTHON" -m benchmarks.bench_fused --device cuda --full-rows 10000000 --repeats 3 --bandwidth
"$PYTHON" -m benchmarks.bench_pack --device cuda --repeats 3
