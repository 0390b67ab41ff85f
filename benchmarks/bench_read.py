"""Training-read throughput: the store as a torch Dataset against in-memory tensors.

    python benchmarks/bench_read.py [--quick] [--json PATH]

A store of float16 rows (512 MB, --quick 128 MB; 1024 features a row) is read in batches of
256 as float32 by:
  memory          indexing a float32 tensor already in memory (the upper bound)
  random          DataLoader(ActivationDataset, shuffle=True): rows in random order
  chunk_shuffled  DataLoader(ActivationDataset, sampler=ChunkShuffleSampler): shuffled chunks
each with 0 and 2 workers, over the same number of samples; samples per second. And
  joined          chunk_shuffled with 0 workers, of the same layer through a store that
                  `marstore join` made of it and another extraction (virtual datasets),
                  timed against the plain store in interleaved rounds (median of 5 epochs of
                  20,000 samples each), as a single pass of each varied 0.57-1.03 on this VM
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, compare, finish, machine  # noqa: E402

from marstore.dataset import ActivationDataset, ChunkShuffleSampler, collate_rows  # noqa: E402
from marstore.scaleout import join_layers  # noqa: E402
from marstore.store import LayerSpec, StoreWriter  # noqa: E402

FEATURES = 1024
BATCH = 256


def make_store(path: str, rows: int, layer: str = "h", features: int = FEATURES) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((4096, features)).astype(np.float16)
    with StoreWriter(path, [LayerSpec(layer, (features,))], commit_rows=1 << 30) as w:
        for start in range(0, rows, 4096):
            n = min(4096, rows - start)
            w.append({layer: block[:n]}, index=np.arange(start, start + n))


def samples_per_s(loader, limit: int) -> float:
    seen = 0
    start = time.perf_counter()
    for batch in loader:
        seen += len(batch["h"]) if isinstance(batch, dict) else len(batch)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = arguments(__doc__)
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
        make_store(os.path.join(tmp, "other.h5"), rows, layer="g", features=8)
        join_layers(os.path.join(tmp, "joined.h5"), [path, os.path.join(tmp, "other.h5")])
        joined = ActivationDataset(os.path.join(tmp, "joined.h5"), "h")
        part = min(limit, 20_000)

        def epoch(data: ActivationDataset) -> Callable[[], float]:
            sampler = ChunkShuffleSampler(len(data), data.chunk_rows, seed=0)
            return lambda: samples_per_s(DataLoader(data, sampler=sampler, batch_size=BATCH, collate_fn=collate_rows), part)

        seconds = compare({"plain": epoch(ds), "joined": epoch(joined)}, repeats=5)
        results["joined_w0"] = part / seconds["joined"]
        results["plain_beside_joined_w0"] = part / seconds["plain"]
    best = lambda prefix: max(v for k, v in results.items() if k.startswith(prefix))  # noqa: E731
    payload = {
        "device": machine(),
        "store_mb": size >> 20,
        "samples": limit,
        "samples_per_s": results,
        "ratios": {
            "chunk_shuffled_vs_memory": best("chunk_shuffled") / results["memory"],
            "chunk_shuffled_vs_random": best("chunk_shuffled") / best("random"),
            "joined_vs_plain": seconds["plain"] / seconds["joined"],
        },
    }
    print(f"device: {payload['device']}; {payload['store_mb']} MB store, {limit} samples of {FEATURES} features, batch {BATCH}")
    for k, v in results.items():
        print(f"{k:<20} {v:10.0f} samples/s")
    finish(payload, args.json)


if __name__ == "__main__":
    main()
