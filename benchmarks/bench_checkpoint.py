"""Reading a training checkpoint for its weights: marstore's read against torch.load whole.

    python benchmarks/bench_checkpoint.py [--quick] [--json PATH] [--dir DIR]

A training checkpoint as MAR's and UVA's are saved: the weights, their EMA copy and AdamW's
two moments for each (a quarter of the file is the weights a run loads). Each way runs in its
own process, so that its peak memory is its own, and takes the EMA weights and touches them:
  marstore   read_checkpoint + find_state_dict (the file's tensors memory-mapped)
  whole      torch.load(weights_only=True) into memory, as users' scripts do
Reported: seconds and peak memory (VmHWM) of each, and the ratios whole / marstore. The file
is read from the page cache (written just before), so the seconds are the memory's work, not
the disk's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, finish, machine, peak_rss_mb  # noqa: E402

WAYS = ("marstore", "whole")


def write_checkpoint(path: str, megabytes: int) -> int:
    """A checkpoint of `megabytes` in all: weights, EMA weights, and two moments of each; returns
    the bytes of the EMA weights."""
    import torch

    tensors = max(1, megabytes // 4 // 4)  # 4 MiB float32 tensors, a quarter of the file each kind
    weights = {f"blocks.{i}.weight": torch.randn(1 << 20) for i in range(tensors)}
    ema = {k: v * 0.5 for k, v in weights.items()}
    moments = {i: {"exp_avg": torch.randn(1 << 20), "exp_avg_sq": torch.rand(1 << 20)} for i in range(tensors)}
    torch.save({"model": weights, "model_ema": ema, "optimizer": {"state": moments, "param_groups": []}, "epoch": 3}, path)
    return tensors * (4 << 20)


def child(way: str, path: str) -> dict:
    import torch

    before = peak_rss_mb()
    start = time.perf_counter()
    if way == "marstore":
        from marstore.loading import find_state_dict, read_checkpoint

        state, key = find_state_dict(read_checkpoint(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["model_ema"]
    total = sum(float(v.sum()) for v in state.values())  # the weights used, as loading them into a model would
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "after_import_mb": before,
            "checksum": total}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--child", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--megabytes", type=int, default=None, help="the checkpoint's size (default 1024, --quick 256)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    megabytes = args.megabytes or (256 if args.quick else 1024)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "checkpoint-last.pth")
        weights = write_checkpoint(path, megabytes)
        results = {}
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "--child", way, path], capture_output=True, text=True, check=True)
            results[way] = json.loads(out.stdout.strip().splitlines()[-1])
        size = os.path.getsize(path)
    if results["marstore"]["checksum"] != results["whole"]["checksum"]:
        raise SystemExit("the two ways read different weights")
    print(f"device: {machine()}; a checkpoint of {size / 2**20:.0f} MiB, {weights / 2**20:.0f} MiB of EMA weights")
    print(f"{'way':<10} {'seconds':>8} {'peak MiB':>9} {'after import':>13}")
    for way, r in results.items():
        print(f"{way:<10} {r['seconds']:>8.3f} {r['peak_rss_mb']:>9.0f} {r['after_import_mb']:>13.0f}")
    ratios = {"whole_vs_marstore_seconds": results["whole"]["seconds"] / results["marstore"]["seconds"],
              "whole_vs_marstore_peak_rss": results["whole"]["peak_rss_mb"] / results["marstore"]["peak_rss_mb"]}
    finish({"device": machine(), "checkpoint_mb": size / 2**20, "weights_mb": weights / 2**20, "ways": results,
            "ratios": ratios}, args.json)


if __name__ == "__main__":
    main()
