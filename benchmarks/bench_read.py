"""Training-read throughput: the store as a torch Dataset against in-memory tensors.

    python benchmarks/bench_read.py [--quick] [--json PATH]

A store of float16 rows (512 MB, --quick 128 MB; 1024 features a row) is read in batches of
256 as float32 by:
  memory          indexing a float32 tensor already in memory (the upper bound)
  random          DataLoader(ActivationDataset, shuffle=True): rows in random order
  chunk_shuffled  DataLoader(ActivationDataset, sampler=ChunkShuffleSampler): shuffled chunks
each with 0 and 2 workers, over the same number of samples; samples per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, machine  # noqa: E402

from marstore.dataset import ActivationDataset, ChunkShuffleSampler, collate_rows  # noqa: E402
from marstore.store import LayerSpec, StoreWriter  # noqa: E402

FEATURES = 1024
BATCH = 256


def make_store(path: str, rows: int) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((4096, FEATURES)).astype(np.float16)
    with StoreWriter(path, [LayerSpec("h", (FEATURES,))], commit_rows=1 << 30) as w:
        for start in range(0, rows, 4096):
            n = min(4096, rows - start)
            w.append({"h": block[:n]}, index=np.arange(start, start + n))


def samples_per_s(loader, limit: int) -> float:
    seen = 0
    start = time.perf_counter()
    for batch in loader:
        seen += len(batch["h"]) if isinstance(batch, dict) else len(batch)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    size = (128 if args.quick else 512) << 20
    rows = size // (FEATURES * 2)
    limit = min(rows, 40_000 if args.quick else 120_000)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "read.h5")
        make_store(path, rows)
        ds = ActivationDataset(path, "h")
        memory = torch.from_numpy(np.asarray(ds.read_all(np.arange(min(rows, limit)))["h"]))
        perm = torch.randperm(len(memory), generator=torch.Generator().manual_seed(0))

        def from_memory():
            for i in range(0, len(perm), BATCH):
                yield memory[perm[i : i + BATCH]]

        results["memory"] = samples_per_s(from_memory(), limit)
        for workers in (0, 2):
            kw = {"batch_size": BATCH, "num_workers": workers, "collate_fn": collate_rows}
            results[f"random_w{workers}"] = samples_per_s(
                DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(0), **kw), limit)
            sampler = ChunkShuffleSampler(len(ds), ds.chunk_rows, seed=0)
            results[f"chunk_shuffled_w{workers}"] = samples_per_s(DataLoader(ds, sampler=sampler, **kw), limit)
    best = lambda prefix: max(v for k, v in results.items() if k.startswith(prefix))  # noqa: E731
    payload = {
        "device": machine(),
        "store_mb": size >> 20,
        "samples": limit,
        "samples_per_s": results,
        "ratios": {
            "chunk_shuffled_vs_memory": best("chunk_shuffled") / results["memory"],
            "chunk_shuffled_vs_random": best("chunk_shuffled") / best("random"),
        },
    }
    print(f"device: {payload['device']}; {payload['store_mb']} MB store, {limit} samples of {FEATURES} features, batch {BATCH}")
    for k, v in results.items():
        print(f"{k:<20} {v:10.0f} samples/s")
    finish(payload, args.json)


if __name__ == "__main__":
    main()
