"""Store write throughput and memory: the marstore writer against the raw disk and users' ways.

    python benchmarks/bench_store.py [--quick] [--json PATH] [--dir DIR]

The same activation batches (4 layers of (128, 256) float16 rows, 32 rows a batch; 256 MB in
all, --quick 64 MB) are written, each way in its own process so that peak RSS is its own:
  marstore      StoreWriter (background thread, chunked datasets, commits, statistics)
  marstore_nodirect  the same without write_direct_chunk (every batch through h5py slicing)
  raw           a sequential write() of the same bytes (the limit)
  h5py          h5py with default settings: resizable datasets, auto chunks, slicing per batch
  pickle        the users' way: keep every batch, concatenate, pickle at the end
marstore and pickle also run at a quarter of the size, to show whose peak RSS grows.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, machine, peak_rss_mb  # noqa: E402

LAYERS = [f"encoder_blocks.{i}" for i in range(4)]
ROW = (128, 256)
BATCH = 32
MB = 1 << 20


def make_pool() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{name: rng.standard_normal((BATCH, *ROW)).astype(np.float16) for name in LAYERS} for _ in range(3)]


def run_way(way: str, path: str, total: int) -> dict:
    pool = make_pool()
    per_batch = len(LAYERS) * BATCH * int(np.prod(ROW)) * 2

    def batches(total_bytes: int):
        """The same few distinct batches over and over: producing them costs nothing."""
        for i in range(total_bytes // per_batch):
            yield i, pool[i % len(pool)]

    import h5py

    from marstore.store import LayerSpec, StoreWriter

    start = time.perf_counter()
    if way.startswith("marstore"):
        specs = [LayerSpec(name, ROW) for name in LAYERS]
        with StoreWriter(path, specs, commit_bytes=64 * MB, direct_chunks=(way == "marstore")) as w:
            for i, b in batches(total):
                w.append(b, index=np.arange(i * BATCH, (i + 1) * BATCH))
    elif way == "raw":
        with open(path, "wb") as f:
            for _, b in batches(total):
                for a in b.values():
                    f.write(a.data)
    elif way == "h5py":
        with h5py.File(path, "w") as f:
            ds = {n: f.create_dataset(n, shape=(0, *ROW), maxshape=(None, *ROW), dtype=np.float16) for n in LAYERS}
            for _, b in batches(total):
                for n, a in b.items():
                    d = ds[n]
                    d.resize((d.shape[0] + len(a), *ROW))
                    d[-len(a):] = a
    elif way == "pickle":
        kept = {n: [] for n in LAYERS}
        for _, b in batches(total):
            for n, a in b.items():
                kept[n].append(a.copy())  # users' scripts keep a fresh .cpu() copy per batch
        with open(path, "wb") as f:
            pickle.dump({n: np.concatenate(v) for n, v in kept.items()}, f, protocol=pickle.HIGHEST_PROTOCOL)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "file_bytes": os.path.getsize(path),
            "peak_rss_mb": peak_rss_mb()}


def child(way: str, total: int, directory: str) -> dict:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        out = subprocess.run([sys.executable, __file__, "--child", way, str(total), os.path.join(tmp, "out")],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MB instead of 256 MB")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dir", default=None, help="where to write the files (default: the system temp dir)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each way; the median is kept")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, total, path = args.child
        print(json.dumps(run_way(way, path, int(total))))
        return
    total = (64 if args.quick else 256) * MB
    small = total // 4
    runs = [(way, total) for way in ["raw", "marstore", "marstore_nodirect", "h5py", "pickle"]]
    runs += [(way, small) for way in ("marstore", "pickle")]
    # Rounds interleave the ways so that the machine's drifts hit each alike; median of 3.
    trials: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for way, size in runs:
            name = way if size == total else f"{way}@{size // MB}MB"
            trials.setdefault(name, []).append(child(way, size, args.dir))
    results = {name: sorted(t, key=lambda r: r["seconds"])[len(t) // 2] for name, t in trials.items()}
    for name, r in results.items():
        size = small if "@" in name else total
        r["mb_per_s"] = size / MB / r["seconds"]
    speed = {name: r["mb_per_s"] for name, r in results.items()}
    payload = {
        "device": machine(),
        "bytes": total,
        "results": results,
        "ratios": {
            "marstore_vs_raw_write": speed["marstore"] / speed["raw"],
            "marstore_vs_pickle": speed["marstore"] / speed["pickle"],
            "marstore_vs_h5py_default": speed["marstore"] / speed["h5py"],
            "direct_chunks_vs_slicing": speed["marstore"] / speed["marstore_nodirect"],
        },
        "peak_rss_mb": {name: r["peak_rss_mb"] for name, r in results.items()},
    }
    print(f"device: {payload['device']}; {total // MB} MB of float16 activations, median of {args.rounds}")
    print(f"{'way':<20} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"{name:<20} {r['mb_per_s']:8.0f} {r['peak_rss_mb']:12.0f}")
    finish(payload, args.json)


if __name__ == "__main__":
    main()
