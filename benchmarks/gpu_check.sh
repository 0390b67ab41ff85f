#!/usr/bin/env bash
# The device check, one call: build marstore._C with CUDA, run the tests that use the GPU (and
# the CPU ones of the same files), then the GPU benchmarks (transfer; extraction on a UVA-sized
# model, token means and full tokens), and print a short table last. Results go to $OUT (or
# ./gpu-out). Sized for one device call of under 10 minutes (not yet run in this form).
# TESTS=tests runs the whole suite; SKIP_TRANSFER=1 or SKIP_EXTRACT=1 leave a benchmark out.
#   bash benchmarks/gpu_check.sh [extra benchmark command ...]
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
time python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -vE "is ignored|^$" | tail -25
python -m marstore doctor || exit 1
python -m pytest -q -rs ${TESTS:-tests/test_ops_cuda.py tests/test_transfer.py tests/test_extract.py} 2>&1 | tee "$OUT/pytest.log" | tail -15
[ "${SKIP_TRANSFER:-}" ] || python benchmarks/bench_transfer.py --json "$OUT/transfer_gpu.json" | tee "$OUT/transfer_gpu.txt"
# UVA's size and, as UVA runs (FIELD-NOTES §3), bfloat16 autocast: AUTOCAST= for float32
UVA="--device cuda --embed-dim 768 --depth 12 --heads 12 --grid 16 --batch-size 8 --rounds 1"
UVA="$UVA ${AUTOCAST=--autocast bfloat16}"
if [ -z "${SKIP_EXTRACT:-}" ]; then
  python benchmarks/bench_extract.py $UVA --reduction mean --rows 512 --json "$OUT/extract_gpu_mean.json" | tee "$OUT/extract_gpu_mean.txt"
  python benchmarks/bench_extract.py $UVA --rows 64 --json "$OUT/extract_gpu_tokens.json" | tee "$OUT/extract_gpu_tokens.txt"
fi
for cmd in "$@"; do bash -c "$cmd"; done
echo "=== summary ==="
grep -E "passed|failed" "$OUT/pytest.log" | tail -1
for f in "$OUT"/transfer_gpu.txt "$OUT"/extract_gpu_*.txt; do
  if [ -f "$f" ]; then echo "$(basename "$f" .txt):"; grep -E "^(device|[a-z0-9_]+: )" "$f"; fi
done
