"""Compressed layers written with tails against the same writer without them, in one run.

    python benchmarks/bench_compressed_commits.py [--quick] [--rounds N] [--json PATH] [--dir DIR]

A compressed layer's part-filled chunk goes to its tail (/layer_tail) at each commit, and into
the dataset once, whole (marstore.store, LAYER_TAIL). Without the tails (the writer's `_tailed`
emptied, as the writer was before them) each commit wrote that chunk compressed into the dataset,
and the next commit wrote it again, bigger, at a new place. Both write the same rows: 4 lzf
layers of 768 float16 values a row, 64 rows a batch, a commit every 512 rows (40 commits for
20,000 rows). Reports each way's median seconds and file size, and the ratio without/with.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, compare, machine, write_json  # noqa: E402

from marstore.store import LayerSpec, StoreWriter  # noqa: E402

LAYERS = [LayerSpec(f"layer{i}", (768,), compression="lzf") for i in range(4)]
BATCH_ROWS = 64


def write(path: str, rows: int, tails: bool, commit_rows: int = 512) -> int:
    """Writes `rows` rows to a new store at path; returns its size in bytes."""
    batch = np.random.default_rng(0).standard_normal((BATCH_ROWS, 768)).astype(np.float16)
    w = StoreWriter(path, LAYERS, commit_rows=commit_rows, background=False)
    if not tails:
        w._tailed = {}
    for start in range(0, rows, BATCH_ROWS):
        w.append({layer.name: batch for layer in LAYERS}, index=np.arange(start, start + BATCH_ROWS))
    w.close()
    size = os.path.getsize(path)
    os.remove(path)
    return size


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = 5_000 if args.quick else 20_000
    folder = tempfile.mkdtemp(dir=args.dir)
    sizes: dict[str, int] = {}

    def way(name: str, tails: bool):
        def run() -> None:
            sizes[name] = write(os.path.join(folder, f"{name}.h5"), rows, tails)
        return run

    times = compare({"tails": way("tails", True), "without": way("without", False)}, args.rounds)
    result = {"device": machine(), "rows": rows, "seconds": times, "file_bytes": sizes,
              "without_vs_tails": times["without"] / times["tails"]}
    for name in ("tails", "without"):
        print(f"{name:8s} {times[name]:6.2f} s  {sizes[name] / 2**20:6.1f} MiB")
    print(f"without_vs_tails {result['without_vs_tails']:.2f} (above 1: the tails are faster)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
