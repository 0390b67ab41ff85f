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
# The operator tests first, under a debugger where there is one, so that a crash leaves a backtrace.
if command -v cuda-gdb >/dev/null; then
  cuda-gdb -q -batch -ex run -ex bt --args python -m pytest -q -x -p no:cacheprovider tests/test_ops.py 2>&1 | tail -40
fi
python -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.log" | tail -15
python benchmarks/bench_transfer.py --json "$OUT/transfer_gpu.json" | tee "$OUT/transfer_gpu.txt"
python benchmarks/bench_store.py --rounds 2 --json "$OUT/store_gpu_machine.json" | tee "$OUT/store_gpu_machine.txt"
for cmd in "$@"; do bash -c "$cmd"; done
echo "=== summary ==="
grep -E "passed|failed" "$OUT/pytest.log" | tail -1
tail -6 "$OUT/transfer_gpu.txt"
tail -5 "$OUT/store_gpu_machine.txt"
