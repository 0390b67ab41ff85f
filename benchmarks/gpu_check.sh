#!/usr/bin/env bash
# The device check, one call: build marstore._C with CUDA, run the tests that use the GPU (and
# the CPU ones of the same files), the GPU benchmarks (transfer; extraction on a UVA-sized model,
# token means and full tokens), then the rest of the suite on the GPU machine, and print a short
# table last. Every step has its own time limit, so that one hang costs only its step. Results
# and logs go to $OUT (or ./gpu-out), at most 8 files (what the device tool brings back); the
# build log stays only when the build failed. KEEP_SO=1 also keeps the built extension there
# (debug info stripped), so that a second call can skip the build:
#   PREBUILT=path/to/_C...so bash benchmarks/gpu_check.sh
#   STEPS="build tests transfer extract rest" (default: all) chooses the steps;
#   CUDA_TESTS (pytest arguments) the tests of the tests step.
# Sizes measured on an H100 (2026-11-26): build 62 s, the CUDA tests 64 s, transfer 12 s,
# extraction 45 s with token means and 60 s with full tokens, the rest of the suite over 130 s;
# on an H200 (eighth session): build 60 s, CUDA tests 74 s, transfer 11 s, extraction 56 and
# 70 s (before its quarter-row bare run was added), the rest of the suite over 150 s. The
# extraction breakdown (ninth and tenth sessions) has not run on a GPU yet: one process, two
# extractions of 1024 rows and three bare runs.
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
STEPS=${STEPS:-build tests transfer extract rest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
SUMMARY="$OUT/summary.txt"
rm -f "$OUT"/*.log "$OUT"/*.txt "$OUT"/*.json  # the step logs below are appended to
: > "$SUMMARY"
want() { [[ " $STEPS " == *" $1 "* ]]; }
# step NAME SECONDS LOG COMMAND...: runs it under a time limit, appends its output to LOG, records rc and time
step() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc; shift 3
  echo "=== $name (limit ${limit}s)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"; rc=${PIPESTATUS[0]}
  echo "$name: rc $rc in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  return "$rc"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$SUMMARY"
$PY -c "import torch, h5py; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'h5py', h5py.__version__)" | tee -a "$SUMMARY"
if [ -n "${PREBUILT:-}" ]; then
  cp "$PREBUILT" marstore/ && export PYTHONPATH=$PWD && echo "prebuilt: $PREBUILT" | tee -a "$SUMMARY"
elif want build; then
  if step build 240 "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps -e . -v; then
    rm "$OUT/build.log"
  else
    grep -E "error|warning: " "$OUT/build.log" | tail -20
  fi
  if [ -n "${KEEP_SO:-}" ]; then
    for so in marstore/_C*.so; do strip --strip-debug -o "$OUT/$(basename "$so")" "$so"; done
  fi
fi
$PY -m marstore doctor 2>&1 | tee -a "$SUMMARY"
if want tests; then
  step cuda-tests 150 "$OUT/pytest.log" $PY -m pytest -q -rfEs -p no:cacheprovider \
    ${CUDA_TESTS:-tests/test_ops_cuda.py tests/test_transfer.py tests/test_extract.py}
fi
if want transfer; then
  step transfer 120 "$OUT/transfer_gpu.txt" $PY benchmarks/bench_transfer.py --json "$OUT/transfer_gpu.json"
fi
if want extract; then
  # UVA's size and, as UVA runs (FIELD-NOTES §3), bfloat16 autocast
  # (each way is a process of its own: 4096 rows in 3 rounds took over 150 s)
  MODEL="--device cuda --embed-dim 768 --depth 12 --heads 12 --grid 16 --batch-size 8 --autocast bfloat16"
  UVA="$MODEL --disk-mb 1024"
  # where the loop's time goes with token means, and marstore_vs_bare within one process (see its doc)
  step extract-breakdown 60 "$OUT/extract_gpu.txt" $PY benchmarks/extract_breakdown.py $MODEL --reduction mean --rows 1024 --rounds 2
  step extract-tokens 120 "$OUT/extract_gpu.txt" $PY benchmarks/bench_extract.py $UVA --rows 128 --rounds 1 \
    --json "$OUT/extract_gpu_tokens.json"
  step extract-mean 120 "$OUT/extract_gpu.txt" $PY benchmarks/bench_extract.py $UVA --reduction mean \
    --rows ${MEAN_ROWS:-1024} --rounds ${MEAN_ROUNDS:-1} --json "$OUT/extract_gpu_mean.json"
fi
if want rest; then
  # the rest of the suite, on a machine where a GPU is the default device: in 8 processes where
  # pytest-xdist is installed (nothing can be installed there), of 2 threads each, since 8 workers
  # whose tests start torchrun ranks would otherwise each run 16 threads
  WORKERS=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  OMP_NUM_THREADS=2 step rest-tests ${REST_LIMIT:-240} "$OUT/pytest.log" $PY -m pytest -q -rfEs $WORKERS -p no:cacheprovider \
    --ignore tests/test_ops_cuda.py --ignore tests/test_transfer.py --ignore tests/test_extract.py tests
fi
echo "=== summary ==="
cat "$SUMMARY"
[ -f "$OUT/pytest.log" ] && grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | cut -c1-200 | tail -12
for f in "$OUT"/transfer_gpu.txt "$OUT"/extract_gpu.txt; do
  if [ -f "$f" ]; then echo "$(basename "$f" .txt):"; grep -E "^(device|[a-z0-9_@]+ |[a-z0-9_]+: |[0-9]+ rows on)" "$f" | cut -c1-160; fi
done
