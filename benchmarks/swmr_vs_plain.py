"""Why the store is written in plain mode with flushes rather than SWMR: measured here.

    python benchmarks/swmr_vs_plain.py [--json PATH]

For each mode, a writer process appends 1 MiB chunks to a resizable float16 dataset and
flushes after every 8; it is killed with SIGKILL mid-way. The script then tries a plain
h5py.File(path, "r") and a SWMR open, and counts the flushed rows it can read. It also times
128 MiB written with the same flushes, per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_json  # noqa: E402

ROW = (16, 1024)  # 32 KiB of float16 a row; 32 rows a chunk


def writer(path: str, mode: str, chunks: int, pause: float) -> None:
    swmr = mode == "swmr"
    f = h5py.File(path, "w", libver="latest" if swmr else "earliest")
    ds = f.create_dataset("x", shape=(0, *ROW), maxshape=(None, *ROW), chunks=(32, *ROW), dtype=np.float16)
    if swmr:
        f.swmr_mode = True
    block = np.ones((32, *ROW), np.float16)
    for i in range(chunks):
        ds.resize((ds.shape[0] + 32, *ROW))
        ds[-32:] = block * i
        if i % 8 == 7:
            f.flush()
            print(ds.shape[0], flush=True)
        time.sleep(pause)
    f.close()


def killed(mode: str, directory: str) -> dict:
    path = os.path.join(directory, f"{mode}.h5")
    p = subprocess.Popen([sys.executable, __file__, "--child", mode, path, "64", "0.01"], stdout=subprocess.PIPE, text=True)
    flushed = 0
    for _ in range(3):
        flushed = int(p.stdout.readline())
    p.send_signal(signal.SIGKILL)
    p.wait()
    result = {"flushed_rows": flushed}
    for how, kwargs in (("plain_open", {}), ("swmr_open", {"swmr": True, "libver": "latest"})):
        try:
            with h5py.File(path, "r", **kwargs) as f:
                x = f["x"]
                ok = all(float(x[r, 0, 0]) == r // 32 for r in range(0, flushed, 32))
                result[how] = f"ok, {x.shape[0]} rows, flushed rows intact: {ok}"
        except OSError as exc:
            result[how] = "refused: " + " ".join(str(exc).split())[:160]
    return result


def speed(mode: str, directory: str) -> float:
    path = os.path.join(directory, f"{mode}-speed.h5")
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", mode, path, "128", "0"], check=True, capture_output=True)
    return 128 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, chunks, pause = args.child
        writer(path, mode, int(chunks), float(pause))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = {"device": machine(), "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version}
        for mode in ("plain", "swmr"):
            result[mode] = killed(mode, tmp)
            result[mode]["mb_per_s_with_flushes"] = speed(mode, tmp)
    print(json.dumps(result, indent=2))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
