"""Where marstore extract's loop spends the time the bare forward does not: one process.

    python benchmarks/extract_breakdown.py [--rows 4096] [--rounds 1] [--device cpu] [bench_extract.py's model options]

Runs bench_extract.py's marstore way (`marstore extract` on its model and in-memory data; by
default its default size, every encoder and decoder block hooked, no reduction) with clocks
around the forward and around the stages after it, and prints the seconds of each. Separate processes differ by 10-25%
in the forward's own speed on a shared VM (benchmarks/RESULTS.md), which hides changes of a few
percent in bench_extract.py's ratios; the loop's time outside the forward shows them. Each
extraction runs between two runs of bench_extract.py's bare forward in the same process, and its
rows/s over their mean is printed too: marstore_vs_bare without the noise between processes.
"Once" stages are paid once a run, not a batch.
With --without-layer-writes each round runs a third extraction whose layers' chunks are not
handed to HDF5 (their extent is set, the index and targets are written, the statistics summed),
to show what writing the activations into the file costs the loop, the forwards after the writes
included (the kernel's copies into the page cache share the model's cores). Its store holds the
fill value in every layer: a measurement, not a store.
Indented stages are part of the one above them. On the CPU the store's stages run in the loop
(inside "store append"); on a GPU they run in the writer's thread, beside the loop, and "store
append" is the loop's time handing batches over (waiting while the writer's queue is full), as
"transfer ring" includes waiting for a free slot. A GPU forward's clock covers launching its
work, and waiting where the launch queue is full.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_extract  # noqa: E402
import marstore.extract as extract_module  # noqa: E402
import marstore.models as models  # noqa: E402
from marstore import hooks, store, transfer  # noqa: E402

FORWARD = "forward (hooks included)"
# (owner, attribute, label): the stages after the forward, outermost first
STAGES = [
    (store.StoreWriter, "append", "store append"),
    (store.StoreWriter, "_write_rows", "  rows into chunks"),
    (store.StoreWriter, "_write_chunk", "    chunks to HDF5"),
    (store._Layer, "add_stats", "  statistics"),
    (store.StoreWriter, "_ensure_room", "  room check"),
    (store.StoreWriter, "close", "store close"),
    (extract_module, "_open_writer", "store creation (once)"),
    (transfer.TransferRing, "submit", "transfer ring"),
    (transfer.TransferRing, "_allocate", "  slot allocation (once)"),
    (hooks.Capture, "finish_batch", "hooks' batch"),
    (extract_module, "_collate", "collate"),
]


def timed(seconds: collections.Counter, key: str, fn, marks: dict | None = None):
    """fn, its seconds added to seconds[key]; with marks, its first start and last end kept there."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        if marks is not None:
            marks.setdefault("first start", start)
        try:
            return fn(*args, **kwargs)
        finally:
            end = time.perf_counter()
            seconds[key] += end - start
            if marks is not None:
                marks["last end"] = end
    return wrapper


@contextlib.contextmanager
def unwritten_layers():
    """The store's layer chunks are not handed to HDF5 (extent set, index and targets written)."""
    write_chunk = store.StoreWriter._write_chunk

    def extent_only(self, buf, first, rows):
        if not buf.ds.name.startswith("/activations/"):
            return write_chunk(self, buf, first, rows)
        if first + len(rows) > buf.length:
            buf.ds.resize((first + len(rows), *buf.row_shape))
            buf.length = first + len(rows)
        if buf.start == first:
            buf.handed = len(rows)

    store.StoreWriter._write_chunk = extent_only
    try:
        yield
    finally:
        store.StoreWriter._write_chunk = write_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None, help="where the store is written (default: a temporary directory)")
    parser.add_argument("--rounds", type=int, default=1, help="extractions, each between two runs of the bare forward")
    parser.add_argument("--without-layer-writes", action="store_true",
                        help="each round also extracts without handing the layers' chunks to HDF5")
    bench_extract.add_model_options(parser)
    args = parser.parse_args()
    args.layers, args.no_malloc_tuning = ["encoder_blocks.*", "decoder_blocks.*"], False  # bench_extract's defaults

    seconds: collections.Counter = collections.Counter()
    forward_marks: dict = {}  # the first forward's start and the last one's end, of one run
    ring_marks: dict = {}  # the ring is made right after extract's clock starts
    models.policy_forward = timed(seconds, FORWARD, models.policy_forward, forward_marks)
    transfer.TransferRing.__init__ = timed(collections.Counter(), "", transfer.TransferRing.__init__, ring_marks)
    for owner, name, label in STAGES:
        setattr(owner, name, timed(seconds, label, getattr(owner, name)))
    bare, bare_forwards = [], []

    def run_bare() -> None:
        forward_before = seconds[FORWARD]
        bare.append(bench_extract.run_way("bare", args.rows, args, out="")["rows_per_s"])
        bare_forwards.append(seconds[FORWARD] - forward_before)

    def run_marstore(path: str) -> tuple[float, float, float, float]:
        """The loop's seconds, the forward's, and the loop's before the first forward and after the last."""
        forward_before = seconds[FORWARD]
        forward_marks.clear()
        ring_marks.clear()
        loop = bench_extract.run_way("marstore", args.rows, args, path)["seconds"]
        return (loop, seconds[FORWARD] - forward_before, forward_marks["first start"] - ring_marks["first start"],
                ring_marks["first start"] + loop - forward_marks["last end"])

    run_bare()
    runs, unwritten, ratios = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for k in range(args.rounds):
            runs.append(run_marstore(os.path.join(directory, f"breakdown{k}.h5")))
            run_bare()
            ratios.append(args.rows / runs[-1][0] / statistics.mean(bare[-2:]))
            if args.without_layer_writes:
                stage_seconds = seconds.copy()  # the stages above are the full extraction's
                with unwritten_layers():
                    unwritten.append(run_marstore(os.path.join(directory, f"unwritten{k}.h5")))
                seconds.clear()
                seconds.update(stage_seconds)
                run_bare()
    loop, forward, before, after = (statistics.mean(column) for column in zip(*runs))
    print(f"{args.rows} rows on {args.device}: marstore_vs_bare in this process {' '.join(f'{r:.3f}' for r in ratios)} "
          f"(marstore rows/s {' '.join(f'{args.rows / run[0]:.0f}' for run in runs)}; bare rows/s "
          f"{' '.join(f'{r:.0f}' for r in bare)}, before and after each extraction)")
    print(f"per extraction: loop {loop:.3f} s; forward {forward:.3f} s; outside the forward {loop - forward:.3f} s, "
          f"of which before the first forward {before:.3f} s and after the last {after:.3f} s; the bare forward "
          f"{statistics.mean(bare_forwards):.3f} s (its runs: {' '.join(f'{t:.3f}' for t in bare_forwards)})")
    if unwritten:
        print(f"without the layers' writes: loop {' '.join(f'{run[0]:.3f}' for run in unwritten)} s, forward "
              f"{' '.join(f'{run[1]:.3f}' for run in unwritten)} s (with them, the same rounds: loop "
              f"{' '.join(f'{run[0]:.3f}' for run in runs)} s, forward {' '.join(f'{run[1]:.3f}' for run in runs)} s)")
    for _, _, label in STAGES:
        print(f"  {label:<28} {seconds[label] / args.rounds:.3f} s")


if __name__ == "__main__":
    main()
