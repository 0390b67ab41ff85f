"""Extraction throughput and memory on the built-in model: bare forward, users' way, marstore.

    python benchmarks/bench_extract.py [--quick] [--json PATH] [--device cuda] [model options]

Each way runs in its own process over the same in-memory batches (the same DataLoader):
  bare      the forward alone, no hooks
  users     forward hooks that append `out.half().cpu()` to lists, pickled at the end
  marstore  marstore.extract.extract(): hooks -> transfer ring -> store writer (its thread on a GPU,
            between the forwards on the CPU)
Every way also runs with a quarter of the rows, to show whose peak RSS grows and to give its
steady rate: the rows between the two runs over the seconds between them, without what a run
costs once (model warm-up, creating and closing the store), which dominates a short run. The
full-size ways run in --rounds rounds, each round in a shuffled order; each way's figures are
its median run, and each ratio is the median of the rounds' ratios: a way is compared with the
runs beside it, so that the drift of a shared machine's speed between rounds (a VM: 25% over
minutes) cancels out. Nine rounds by default: on the development VM the forward's speed also
moves by 10-25% from second to second, and five-round medians of one code spread over
0.82-0.98 (benchmarks/RESULTS.md). The ratios of the medians are in the JSON too. On the CPU
every way runs with the malloc thresholds that marstore extract sets (--no-malloc-tuning: none).
marstore_vs_bare is marstore's rows/s over the bare forward's. The disk's write speed is
measured in the same directory (sequential writes, then fsync), so that marstore's MB/s can
be read against it: marstore can keep up with the bare forward only while the model makes
fewer bytes per second than the disk takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import finish, machine, peak_rss_mb  # noqa: E402


class MemoryDataset(torch.utils.data.Dataset):
    """The synthetic samples, generated once, so that data loading costs the same for every way."""

    def __init__(self, size: int, grid: int = 4):
        from marstore.models import synthetic_video_actions

        source = synthetic_video_actions(size=min(size, 256), grid=grid)
        self.samples = [source[i] for i in range(len(source))]
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.samples[i % len(self.samples)]


def memory_dataset(size: int, grid: int = 4) -> MemoryDataset:
    return MemoryDataset(size, grid)


def model_args(args) -> dict:
    return {"task_name": "bench", "shape_meta": {"action": {"shape": [2]}, "horizon": 16}, "embed_dim": args.embed_dim,
            "depth": args.depth, "decoder_depth": args.depth, "num_heads": args.heads, "grid": args.grid}


def run_way(way: str, rows: int, args, out: str) -> dict:
    from marstore.extract import ExtractOptions, extract, tune_malloc
    from marstore.models import policy_forward, video_mar

    device = torch.device(args.device)
    layers = args.layers
    if device.type == "cpu" and not args.no_malloc_tuning and way != "marstore":
        tune_malloc()  # what marstore extract does on the CPU, so that every way runs with it
    if way == "marstore":
        opts = ExtractOptions(out=out, model="marstore.models:video_mar", dataset="bench_extract:memory_dataset",
                              dataset_args={"size": rows, "grid": args.grid}, forward="marstore.models:policy_forward",
                              layers=layers, reduction=args.reduction, batch_size=args.batch_size, device=args.device,
                              model_args=model_args(args), progress=False, commit_rows=1 << 30,
                              malloc_tuning=not args.no_malloc_tuning, autocast=args.autocast)
        result = extract(opts)  # its clock starts after the model is built and loaded, as below
        seconds, nbytes = result.seconds, result.bytes
    else:
        from marstore.hooks import parse_layers, parse_reduction, reduce_tokens

        torch.manual_seed(0)
        model = video_mar(**model_args(args)).to(device).eval()
        loader = torch.utils.data.DataLoader(memory_dataset(rows, args.grid), batch_size=args.batch_size,
                                             pin_memory=device.type == "cuda")
        kept: dict[str, list] = {}
        handles = []
        if way == "users":
            reduction = parse_reduction(args.reduction)
            for sel in parse_layers(layers, model):
                kept[sel.name] = []
                handles.append(model.get_submodule(sel.name).register_forward_hook(
                    lambda m, a, o, n=sel.name: kept[n].append(reduce_tokens(o, reduction).half().cpu())))
        amp = torch.autocast(device.type, dtype=getattr(torch, args.autocast)) if args.autocast else contextlib.nullcontext()
        start = time.perf_counter()
        with torch.inference_mode(), amp:
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                policy_forward(model, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        nbytes = sum(t.numel() * 2 for v in kept.values() for t in v)
        if way == "users":
            with open(out, "wb") as f:
                pickle.dump({k: torch.cat(v).numpy() for k, v in kept.items()}, f, protocol=pickle.HIGHEST_PROTOCOL)
        seconds = time.perf_counter() - start
        for h in handles:
            h.remove()
    return {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds, "bytes": nbytes,
            "mb_per_s": nbytes / seconds / 2**20, "peak_rss_mb": peak_rss_mb()}


def disk_write_mb_s(directory: str, megabytes: int) -> float:
    """MB/s of a sequential write of fresh bytes, fsync included (the disk, not the page cache)."""
    block = os.urandom(8 << 20)
    path = os.path.join(directory, "disk-speed.bin")
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, megabytes // 8)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return max(1, megabytes // 8) * 8 / seconds


RATIOS = {"marstore_vs_bare": "bare", "marstore_vs_users_way": "users"}


def paired(ours: list[dict], theirs: list[dict]) -> list[float]:
    """Each round's ratio of rows/s."""
    return [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(ours, theirs)]


def paired_median(ours: list[dict], theirs: list[dict]) -> float:
    ratios = sorted(paired(ours, theirs))
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The built-in model's size, its batches, the reduction and autocast (extract_breakdown.py has them too)."""
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4, help="encoder blocks (and as many decoder blocks)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--grid", type=int, default=4, help="tokens per frame side (4 frames of grid x grid)")
    parser.add_argument("--reduction", default="none")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], help="the forward runs under torch.autocast")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows")
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None)
    add_model_options(parser)
    parser.add_argument("--layers", nargs="+", default=["encoder_blocks.*", "decoder_blocks.*"])
    parser.add_argument("--dir", default=None, help="where the stores are written (default: a temporary directory)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's malloc thresholds alone in every way (marstore extract sets them on the CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the full-size ways (default 9, --quick 1)")
    parser.add_argument("--disk-mb", type=int, default=None, help="MB written to measure the disk (default 1024, --quick 256)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, rows, out = args.child
        print(json.dumps(run_way(way, int(rows), args, out)))
        return
    rows = args.rows or (1024 if args.quick else 4096)
    args.rounds = args.rounds or (1 if args.quick else 9)
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("device", "batch_size", "embed_dim", "depth", "heads", "grid", "reduction") or (k == "autocast" and v)]
    passthrough += ["--no-malloc-tuning"] if args.no_malloc_tuning else []
    passthrough += ["--layers", *args.layers]
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        disk = disk_write_mb_s(tmp, args.disk_mb or (256 if args.quick else 1024))
        # Rounds of the three full-size ways in a shuffled order: a machine whose speed drifts
        # between processes (a VM) then slows every way alike, and the medians compare them.
        runs: dict[str, list[dict]] = {}
        order = random.Random(0)
        plan = []
        for _ in range(args.rounds):
            ways = ["bare", "users", "marstore"]
            order.shuffle(ways)
            plan += [(way, rows) for way in ways]
        for way, n in plan + [(way, rows // 4) for way in ("bare", "users", "marstore")]:
            name = way if n == rows else f"{way}@{n}"
            target = os.path.join(tmp, f"{name}.{len(runs.get(name, []))}.out")
            out = subprocess.run([sys.executable, __file__, "--child", way, str(n), target, *passthrough],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                     [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])))
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            os.sync()  # the next way must not share the CPU with the writeback of this one's file
            runs.setdefault(name, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        for name, rs in runs.items():
            results[name] = dict(sorted(rs, key=lambda r: r["rows_per_s"])[len(rs) // 2])  # the median run
            results[name]["rows_per_s_each_round"] = [r["rows_per_s"] for r in rs]
    small = rows // 4
    steady = {way: (rows - small) / (results[way]["seconds"] - results[f"{way}@{small}"]["seconds"])
              for way in ("bare", "users", "marstore")}
    payload = {
        "device": machine() + f" ({args.device})",
        "model": {k: getattr(args, k) for k in ("embed_dim", "depth", "heads", "grid", "batch_size", "reduction", "layers",
                                                "autocast")},
        "malloc_tuning": not args.no_malloc_tuning,
        "rows": rows,
        "results": results,
        "ratios": {name: paired_median(runs["marstore"], runs[other]) for name, other in RATIOS.items()},
        "ratios_each_round": {name: paired(runs["marstore"], runs[other]) for name, other in RATIOS.items()},
        "ratios_of_medians": {name: results["marstore"]["rows_per_s"] / results[other]["rows_per_s"]
                              for name, other in RATIOS.items()},
        "steady_rows_per_s": steady,
        "ratios_steady": {name: steady["marstore"] / steady[other] for name, other in RATIOS.items()},
        "peak_rss_mb": {name: r["peak_rss_mb"] for name, r in results.items()},
        "disk_write_mb_s": disk,
        "marstore_mb_s_over_disk": results["marstore"]["mb_per_s"] / disk,
    }
    print(f"device: {payload['device']}; model {payload['model']}; {rows} rows; disk writes {disk:.0f} MB/s")
    print(f"{'way':<16} {'rows/s':>9} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, r in results.items():
        print(f"{name:<16} {r['rows_per_s']:9.1f} {r['mb_per_s']:8.0f} {r['peak_rss_mb']:12.0f}")
    for name, each in payload["ratios_each_round"].items():
        print(f"{name} each round: {' '.join(f'{r:.3f}' for r in each)}")
    print(f"steady rows/s ({small} to {rows} rows): " + ", ".join(f"{way} {r:.1f}" for way, r in steady.items()))
    for name, r in payload["ratios_steady"].items():
        print(f"{name} steady: {r:.3f}")
    finish(payload, args.json)


if __name__ == "__main__":
    main()
