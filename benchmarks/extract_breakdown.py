"""Where marstore extract's loop spends the time the bare forward does not: one process.

    python benchmarks/extract_breakdown.py [--rows 4096] [--device cpu] [bench_extract.py's model options]

Runs `marstore extract` on bench_extract.py's model and in-memory data (by default its default
size, every encoder and decoder block hooked, no reduction) with clocks around the forward and
around the stages after it, and prints the seconds of each. Separate processes differ by 10-25%
in the forward's own speed on a shared VM (benchmarks/RESULTS.md), which hides changes of a few
percent in bench_extract.py's ratios; the loop's time outside the forward shows them.
Indented stages are part of the one above them. On the CPU the store's stages run in the loop
(inside "store append"); on a GPU they run in the writer's thread, beside the loop, and "store
append" is the loop's time handing batches over (waiting while the writer's queue is full), as
"transfer ring" includes waiting for a free slot. A GPU forward's clock covers launching its
work, and waiting where the launch queue is full.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_extract  # noqa: E402
import marstore.extract as extract_module  # noqa: E402
import marstore.models as models  # noqa: E402
from marstore import hooks, store, transfer  # noqa: E402

# (owner, attribute, label): the stages after the forward, outermost first
STAGES = [
    (store.StoreWriter, "append", "store append"),
    (store.StoreWriter, "_write_rows", "  rows into chunks"),
    (store.StoreWriter, "_write_chunk", "    chunks to HDF5"),
    (store._Layer, "add_stats", "  statistics"),
    (store.StoreWriter, "_ensure_room", "  room check"),
    (store.StoreWriter, "close", "store close"),
    (transfer.TransferRing, "submit", "transfer ring"),
    (hooks.Capture, "finish_batch", "hooks' batch"),
    (extract_module, "_collate", "collate"),
]


def timed(seconds: collections.Counter, key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None, help="where the store is written (default: a temporary directory)")
    bench_extract.add_model_options(parser)
    args = parser.parse_args()

    seconds: collections.Counter = collections.Counter()
    models.policy_forward = timed(seconds, "forward (hooks included)", models.policy_forward)
    for owner, name, label in STAGES:
        setattr(owner, name, timed(seconds, label, getattr(owner, name)))
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        opts = extract_module.ExtractOptions(
            out=os.path.join(directory, "breakdown.h5"), model="marstore.models:video_mar",
            dataset="bench_extract:memory_dataset", dataset_args={"size": args.rows, "grid": args.grid},
            forward="marstore.models:policy_forward", layers=["encoder_blocks.*", "decoder_blocks.*"],
            reduction=args.reduction, batch_size=args.batch_size, device=args.device,
            model_args=bench_extract.model_args(args), progress=False, commit_rows=1 << 30, autocast=args.autocast)
        result = extract_module.extract(opts)
    forward = seconds.pop("forward (hooks included)")
    print(f"{args.rows} rows on {args.device}: loop {result.seconds:.3f} s, {args.rows / result.seconds:.0f} rows/s; "
          f"forward {forward:.3f} s; outside the forward {result.seconds - forward:.3f} s")
    for _, _, label in STAGES:
        print(f"  {label:<28} {seconds[label]:.3f} s")


if __name__ == "__main__":
    main()
