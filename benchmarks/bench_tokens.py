"""Token streams for sparse autoencoders: TokenStream against every token shuffled in memory.

    python benchmarks/bench_tokens.py [--quick] [--json PATH]

A store of a layer with tokens (rows of 256 tokens of 128 float16 features: 512 MB of tokens,
--quick 128 MB) is read as shuffled batches of 4096 float32 tokens, each way in its own
process, for one epoch:
  memory       the users' way: the whole layer read into a float32 tensor, a random permutation
               of all tokens, batches indexed from it (the fastest there is; memory grows with the store)
  tokenstream  TokenStream with a 64 MB buffer (0 and 2 DataLoader workers)
tokens per second, peak RSS of each process, and the ratios (TokenStream's throughput over
the in-memory way's, and the in-memory way's peak RSS over TokenStream's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, finish, machine, peak_rss_mb  # noqa: E402

TOKENS, FEATURES, BATCH = 256, 128, 4096


def make_store(path: str, rows: int) -> None:
    from marstore.store import LayerSpec, StoreWriter

    block = np.random.default_rng(0).standard_normal((64, TOKENS, FEATURES)).astype(np.float16)
    with StoreWriter(path, [LayerSpec("h", (TOKENS, FEATURES))], commit_rows=1 << 30) as w:
        for start in range(0, rows, 64):
            n = min(64, rows - start)
            w.append({"h": block[:n]}, index=np.arange(start, start + n))


def run_way(way: str, path: str) -> dict:
    """One epoch of the way, in this process: tokens seen, seconds, peak RSS."""
    import h5py
    import torch
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    seen = 0
    if way == "memory":
        with h5py.File(path, "r", locking=False) as f:
            x = torch.from_numpy(f["activations/h"][:]).float().reshape(-1, FEATURES)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        for i in range(0, len(x), BATCH):
            seen += len(x[order[i : i + BATCH]])
    else:
        from marstore.dataset import TokenStream

        workers = int(way.rsplit("-", 1)[1])
        stream = TokenStream(path, "h", batch_size=BATCH, buffer_bytes=64 << 20)
        for batch in DataLoader(stream, batch_size=None, num_workers=workers):
            seen += len(batch["h"])
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # DataLoader workers
    return {"tokens": seen, "seconds": seconds, "tokens_per_s": seen / seconds,
            "peak_rss_mb": max(peak_rss_mb(), children / 1024)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--way", help=argparse.SUPPRESS)  # run one way in this process (the parent's child)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(run_way(args.way, args.store)))
        return
    rows = ((128 if args.quick else 512) << 20) // (TOKENS * FEATURES * 2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "tokens.h5")
        make_store(path, rows)
        results = {}
        for way in ("memory", "tokenstream-0", "tokenstream-2"):
            out = subprocess.run([sys.executable, __file__, "--way", way, "--store", path], check=True,
                                 capture_output=True, text=True).stdout
            results[way] = json.loads(out.strip().splitlines()[-1])
            r = results[way]
            print(f"{way:<15} {r['tokens']} tokens in {r['seconds']:.2f} s: {r['tokens_per_s'] / 1e6:.2f} M tokens/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
    assert len({r["tokens"] for r in results.values()}) == 1, "every way must see every token once"
    best = max(results["tokenstream-0"]["tokens_per_s"], results["tokenstream-2"]["tokens_per_s"])
    finish({"device": machine(), "rows": rows, "tokens": results["memory"]["tokens"], "ways": results,
            "ratios": {"tokenstream_vs_memory": best / results["memory"]["tokens_per_s"],
                       "memory_rss_vs_tokenstream": results["memory"]["peak_rss_mb"] / results["tokenstream-0"]["peak_rss_mb"]},
            "peak_rss_mb": {way: r["peak_rss_mb"] for way, r in results.items()}}, args.json)


if __name__ == "__main__":
    main()
