"""A late token-count change: rewriting the rows stored so far ragged, against extracting them again.

    python benchmarks/bench_ragged_rewrite.py [--quick] [--json PATH]

The built-in video-action MAR (its demo size: 64 wide, 4 + 4 blocks) extracts every encoder
block with its 64 tokens (reduction none) over 2048 samples (--quick 512): the rows a run has
stored, dense, when a batch's token count first differs from the first batches'. What that
change costs, each way timed on the same rows in alternate rounds:
  reextract  what a run that stops there costs: the extraction of those rows again, ragged
  rewrite    what marstore does: store.convert_to_ragged on a copy of the dense store
seconds of each (median of the rounds), and the ratio reextract / rewrite (above 1: the rewrite
costs less than the rows it saves extracting again).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import arguments, finish, machine  # noqa: E402

CONFIG = {"task_name": "synthetic", "shape_meta": {"action": {"shape": [2]}, "horizon": 16}, "embed_dim": 64,
          "depth": 4, "decoder_depth": 4, "num_heads": 4}
LAYERS = ["encoder_blocks.*"]


def extract(out: str, rows: int, ragged: list[str]) -> float:
    from marstore.extract import ExtractOptions, extract

    opts = ExtractOptions(out=out, model="marstore.models:video_mar", model_args=CONFIG, layers=LAYERS,
                          dataset="marstore.models:synthetic_video_actions", dataset_args={"size": rows},
                          forward="marstore.models:dynamic_forward", batch_size=32, device="cpu", progress=False,
                          ragged=ragged)
    start = time.perf_counter()
    extract(opts)
    return time.perf_counter() - start


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("marstore").setLevel(logging.ERROR)  # each extraction's notes, the same every round
    rows = 512 if args.quick else 2048
    from marstore.store import convert_to_ragged, open_store

    folder = tempfile.mkdtemp(dir=args.dir)
    try:
        dense = os.path.join(folder, "dense.h5")
        extract(dense, rows, [])
        with open_store(dense) as store:
            names = list(store.layers)
            nbytes = sum(store.file["activations"][name].nbytes for name in names)
        times: dict[str, list[float]] = {"reextract": [], "rewrite": []}
        for r in range(args.repeats):
            again = os.path.join(folder, f"again{r}.h5")
            times["reextract"].append(extract(again, rows, ["encoder_blocks.*"]))
            os.remove(again)
            copy = os.path.join(folder, f"copy{r}.h5")
            shutil.copyfile(dense, copy)
            start = time.perf_counter()
            convert_to_ragged(copy, names)
            times["rewrite"].append(time.perf_counter() - start)
            os.remove(copy)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = {way: statistics.median(t) for way, t in times.items()}
    for way, s in seconds.items():
        print(f"{way:<10} {s:7.3f} s")
    print(f"rows: {rows}, layers: {len(names)}, dense bytes rewritten: {nbytes / 2**20:.1f} MiB "
          f"({nbytes / seconds['rewrite'] / 2**20:.0f} MiB/s)")
    finish({"machine": machine(), "rows": rows, "layers": names, "dense_bytes": nbytes, "seconds": seconds,
            "ratios": {"reextract_vs_rewrite": seconds["reextract"] / seconds["rewrite"]}}, args.json)


if __name__ == "__main__":
    main()
