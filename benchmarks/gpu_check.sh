#!/usr/bin/env bash
# The device check, one call: build marstore._C with CUDA, run every test (CUDA ones included),
# measure the transfer benchmark twice (the second time with the direct/staged crossover that
# the first run found), and print a short table last. Results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
time python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -vE "is ignored|^$" | tail -25
python -m marstore doctor || exit 1
python -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.log" | tail -15
python benchmarks/bench_transfer.py --json "$OUT/transfer_probe.json" | tee "$OUT/transfer_probe.txt"
crossover=$(python - "$OUT/transfer_probe.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["single"]
# destination (float16) bytes of the largest size where writing directly is still not slower
best = [r["bytes"] // 2 for r in rows if r["seconds"]["direct"] <= r["seconds"]["staged"]]
print(max(best) if best else 0)
PY
)
echo "direct/staged crossover (destination bytes): $crossover"
MARSTORE_DIRECT_MAX_BYTES=$crossover python benchmarks/bench_transfer.py --json "$OUT/transfer_gpu.json" | tee "$OUT/transfer_gpu.txt"
for f in "$@"; do bash -c "$f"; done
echo "=== summary ==="
grep -E "passed|failed" "$OUT/pytest.log" | tail -1
echo "crossover $crossover"
tail -6 "$OUT/transfer_gpu.txt"
