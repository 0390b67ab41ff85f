"""A store-writing subprocess for the crash, resume, concurrency and write-error tests.

    python -m helpers.store_worker PATH [--resume] [--batches N] [--sleep S] [--fsize-limit BYTES]

Batch i is a pure function of i (make_batch), so any prefix of rows can be checked exactly.
"""

import argparse
import gc
import resource
import signal
import sys
import time

import numpy as np

from marstore.store import LayerSpec, Ragged, StoreError, StoreWriter, TargetSpec

BATCH_ROWS = 32
COMMIT_ROWS = 96  # every 3 batches
LAYERS = [
    LayerSpec("encoder_blocks.0", (48,), chunk_rows=64),
    LayerSpec("encoder_blocks.1", (6, 8), dtype="float32", chunk_rows=20),
    LayerSpec("proj", (8,), dtype="bfloat16", source_dtype="bfloat16"),
    LayerSpec("encoder_norm", (16,), ragged=True, chunk_rows=100),
]
TARGETS = [TargetSpec("action", (4, 2), "float32"), TargetSpec("label", (), "int64")]
METADATA = {"model": "tests.helpers.store_worker", "command": "test"}


def make_batch(i: int) -> tuple[dict, dict, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    n = BATCH_ROWS
    dense = (rng.standard_normal((n, 48)) * 3).astype(np.float16)
    dense[0, 0] = np.inf if i % 5 == 0 else dense[0, 0]
    bits = rng.integers(0, 2**16, (n, 8), dtype=np.uint16)
    lengths = rng.integers(0, 9, n)
    ragged = rng.standard_normal((int(lengths.sum()), 16)).astype(np.float16)
    acts = {
        "encoder_blocks.0": dense,
        "encoder_blocks.1": rng.standard_normal((n, 6, 8)).astype(np.float32),
        "proj": bits,
        "encoder_norm": Ragged(ragged, lengths.tolist()),
    }
    targets = {"action": rng.standard_normal((n, 4, 2)).astype(np.float32), "label": rng.integers(0, 10, n)}
    return acts, targets, np.arange(i * n, (i + 1) * n, dtype=np.int64) * 7


def write(path: str, batches: int, resume: bool, sleep: float) -> None:
    with StoreWriter(path, LAYERS, TARGETS, METADATA, commit_rows=COMMIT_ROWS, queue_batches=2, resume=resume) as w:
        first = w.committed // BATCH_ROWS
        print(f"ready {first}", flush=True)
        for i in range(first, batches):
            acts, targets, index = make_batch(i)
            w.append(acts, targets=targets, index=index)
            if sleep:
                time.sleep(sleep)


def main() -> None:
    # the kill tests time their kills against this worker's batches: a full collection of the
    # heap that importing torch leaves (about 130 ms, when it falls in the first batches) would
    # move the first commit past the kills' window
    gc.freeze()
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fsize-limit", type=int)
    args = parser.parse_args()
    if args.fsize_limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # make write() fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))
    try:
        write(args.path, args.batches, args.resume, args.sleep)
    except StoreError as exc:
        print(f"StoreError: {exc}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
