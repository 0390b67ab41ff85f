"""Shared helpers for the benchmark scripts: options, timing, machine description, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from typing import Callable

import torch


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that scales with --quick, writes --json PATH and keeps its
    files in --dir (default: the system's temporary folder); a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--dir", default=None)
    return parser


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM, which a child starts afresh,
    where ru_maxrss carries the parent's peak across fork and exec (a child of a process that
    imported torch would read that process's memory as its floor)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare(fns: dict[str, Callable[[], object]], repeats: int, cuda: bool = False) -> dict[str, float]:
    """Median wall time in seconds of each fn, timed in interleaved rounds so that drifts of
    the machine (clock, other load) hit every contender alike; synchronised when cuda.

    The order is shuffled every round (seeded): a contender that runs right after another
    that wrote the same destination finds it in cache, and one that follows an allocating
    contender finds the cache stirred. A fixed or rotating order keeps those neighbours the
    same; a shuffled one gives every contender every neighbour alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    names = list(fns)
    for rnd in range(repeats + 1):
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if rnd:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def finish(payload: dict, json_path: str | None) -> None:
    """Prints the ratios (the lines that RESULTS.md quotes) and writes the JSON."""
    for name, value in payload["ratios"].items():
        print(f"{name}: {value:.3f}")
    write_json(json_path, payload)


def write_json(path: str | None, payload: dict) -> None:
    text = json.dumps(payload, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
