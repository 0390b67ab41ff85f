#!/usr/bin/env bash
# The device check, one call: build marstore._C with CUDA, run every test (CUDA ones included),
# then the GPU benchmarks, and print a short table last. Results go to $OUT (or ./gpu-out).
#   bash benchmarks/gpu_check.sh [extra benchmark command ...]
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
time python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -vE "is ignored|^$" | tail -25
python -m marstore doctor || exit 1
python -m pytest -q -rs ${TESTS:-tests} 2>&1 | tee "$OUT/pytest.log" | tail -15
[ "${SKIP_TRANSFER:-}" ] || python benchmarks/bench_transfer.py --json "$OUT/transfer_gpu.json" | tee "$OUT/transfer_gpu.txt"
for cmd in "$@"; do bash -c "$cmd"; done
echo "=== summary ==="
grep -E "passed|failed" "$OUT/pytest.log" | tail -1
[ -f "$OUT/transfer_gpu.txt" ] && grep -E "^[a-z0-9_]+: " "$OUT/transfer_gpu.txt"
