"""Cast-copy throughput: marstore's operator against torch's own ways, side by side.

    python benchmarks/bench_transfer.py [--quick] [--json PATH] [--cpu-kernels avx2]

For each size (source float32 bytes), the same source and preallocated destination go through:
  marstore   ops.cast_copy(src, dst, counts=c)    (the fused cast + copy, counts into a kept
                                                  tensor, as the transfer ring calls it)
  alloc      ops.cast_copy(src, dst)              (the same, with a new counts tensor each call)
  copy_      dst.copy_(src)                       (torch's own fused path: the strongest baseline)
  users      src.half().cpu()                     (what users' scripts do)
  limit      dst16.copy_(src16)                   (a same-dtype copy of the float16 bytes)
Ratios are the other way's time over marstore's for the same elements: above 1, marstore is
faster. The multi-tensor case copies 24 tensors of 256 KB: one cast_copy_many against a loop of
copy_ into the same regions, timed both among the other contenders and back to back (each way
called repeatedly with nothing between its calls), there beside its limit: multi_limit_vs_copy_loop
is the most that multi_vs_copy_loop could be on the machine, for a way as fast as a plain copy. On a GPU, the direct-write and staged modes are timed as well.
The contenders run in a shuffled order every round (benchmarks/common.py says why). On the CPU,
--cpu-kernels times a lesser kernel set of marstore._C than the best one the processor runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import compare, finish, machine  # noqa: E402

from marstore import ops  # noqa: E402

KB, MB = 1 << 10, 1 << 20


def measure_size(size: int, device: str, cuda: bool, quick: bool) -> dict:
    """One size: the same source and destinations through every way, in interleaved rounds."""
    n = size // 4
    # Sizes to 16 MB take well under a millisecond a call: many rounds make their medians steady.
    repeats = 7 if size >= 64 * MB else 200
    src = torch.randn(n, device=device)
    src16 = src.half()
    dst = torch.empty(n, dtype=torch.float16, pin_memory=cuda)
    dst16 = torch.empty(n, dtype=torch.float16, pin_memory=cuda)
    counts = torch.empty(2, dtype=torch.int64, device=device)
    fns = {
        "marstore": lambda: ops.cast_copy(src, dst, counts=counts),
        "alloc": lambda: ops.cast_copy(src, dst),
        "copy_": lambda: dst.copy_(src, non_blocking=cuda),
        "users": lambda: src.half().cpu(),
        "limit": lambda: dst16.copy_(src16, non_blocking=cuda),
    }
    if cuda:
        fns["direct"] = lambda: ops.cast_copy(src, dst, counts=counts, mode="direct")
        fns["staged"] = lambda: ops.cast_copy(src, dst, counts=counts, mode="staged")
    t = compare(fns, repeats, cuda)
    return {"bytes": size, "seconds": t, "gbps": {k: size / v / 1e9 for k, v in t.items()}}


def run(quick: bool) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    top = 512 * MB if cuda else 256 * MB
    sizes = [64 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB] if quick else [64 * KB, 256 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB, top]
    sizes = sorted(set(s for s in sizes if s <= top))
    rows = [measure_size(size, device, cuda, quick) for size in sizes]

    srcs = [torch.randn(256 * KB // 4, device=device) for _ in range(24)]
    offsets, total = ops.aligned_offsets(srcs, torch.float16)
    dst = torch.empty(total, dtype=torch.float16, pin_memory=cuda)
    regions = [dst[o : o + s.numel()] for s, o in zip(srcs, offsets)]

    def copy_loop():
        for r, s in zip(regions, srcs):
            r.copy_(s, non_blocking=cuda)

    multi_counts = torch.empty(len(srcs), 2, dtype=torch.int64, device=device)
    repeats = 100 if quick else 300
    multi = compare(
        {
            "marstore": lambda: ops.cast_copy_many(srcs, dst, offsets, counts=multi_counts),
            "alloc": lambda: ops.cast_copy_many(srcs, dst, offsets),
            "copy_loop": copy_loop,
            "users": lambda: [s.half().cpu() for s in srcs],
        },
        repeats,
        cuda,
    )
    # The same two ways again, each called back to back in blocks: no other contender between
    # two calls stirs the caches or lets the worker threads fall asleep. Beside them the limit:
    # one same-dtype copy of the float16 bytes. No way of converting the sources runs faster, so
    # the copy_ loop's time over the limit's caps multi_vs_copy_loop on this machine.
    src16 = torch.cat(srcs).half()
    dst16 = torch.empty_like(src16, device="cpu", pin_memory=cuda)
    tight = back_to_back(
        {"marstore": lambda: ops.cast_copy_many(srcs, dst, offsets, counts=multi_counts), "copy_loop": copy_loop,
         "limit": lambda: dst16.copy_(src16, non_blocking=cuda)},
        repeats,
        cuda,
    )
    big = [r for r in rows if r["bytes"] >= 4 * MB]
    ratios = {
        "single_ge_4MB_vs_copy_min": min(r["seconds"]["copy_"] / r["seconds"]["marstore"] for r in big),
        "single_ge_4MB_vs_users_min": min(r["seconds"]["users"] / r["seconds"]["marstore"] for r in big),
        "single_ge_4MB_vs_limit_min": min(r["seconds"]["limit"] / r["seconds"]["marstore"] for r in big),
        "multi_vs_copy_loop": multi["copy_loop"] / multi["marstore"],
        "multi_vs_users": multi["users"] / multi["marstore"],
        "multi_back_to_back_vs_copy_loop": tight["copy_loop"] / tight["marstore"],
        "multi_back_to_back_vs_limit": tight["limit"] / tight["marstore"],
        "multi_limit_vs_copy_loop": tight["copy_loop"] / tight["limit"],  # the most multi_vs_copy_loop can be
        "single_ge_4MB_alloc_vs_copy_min": min(r["seconds"]["copy_"] / r["seconds"]["alloc"] for r in big),
        "multi_alloc_vs_copy_loop": multi["copy_loop"] / multi["alloc"],
    }
    kernels = ops._C.cpu_kernels() if ops._C is not None else None
    return {"device": machine(), "backend": ops.backend(), "cpu_kernels": kernels, "quick": quick, "single": rows, "multi_24x256KB": multi,
            "multi_24x256KB_back_to_back": tight, "ratios": ratios}


def back_to_back(fns: dict, repeats: int, cuda: bool, blocks: int = 4) -> dict[str, float]:
    """Median time of each fn called `repeats` times in a row, in alternating blocks."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            times[name].append(compare({name: fn}, repeats // blocks, cuda)[name])
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (64 KB to 64 MB) and fewer rounds of the multi-tensor case")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cpu-kernels", help="time a lesser CPU kernel set of marstore._C (e.g. avx2 where the best "
                                              "is avx512), for A/B runs")
    args = parser.parse_args()
    if args.cpu_kernels:
        if ops._C is None:
            parser.error(f"--cpu-kernels needs marstore._C, which is not in use: {ops.EXTENSION_STATUS}")
        try:
            ops._C.set_cpu_kernels(args.cpu_kernels)
        except ValueError as exc:
            parser.error(f"--cpu-kernels: {exc}")
    result = run(args.quick)
    modes = torch.cuda.is_available()
    print(f"device: {result['device']} (operators: {result['backend']}, CPU kernels: {result['cpu_kernels']})")
    head = f"{'size':>8} {'marstore':>9} {'alloc':>8} {'copy_':>8} {'users':>8} {'limit':>8}" + (f" {'direct':>8} {'staged':>8}" if modes else "") + "   GB/s of source bytes"
    print(head)
    for r in result["single"]:
        g = r["gbps"]
        line = f"{_size(r['bytes']):>8} {g['marstore']:9.2f} {g['alloc']:8.2f} {g['copy_']:8.2f} {g['users']:8.2f} {g['limit']:8.2f}"
        if modes:
            line += f" {g['direct']:8.2f} {g['staged']:8.2f}"
        print(line)
    m = result["multi_24x256KB"]
    print(f"24 x 256 KB: marstore {m['marstore'] * 1e6:.0f} us, alloc {m['alloc'] * 1e6:.0f} us, "
          f"copy_ loop {m['copy_loop'] * 1e6:.0f} us, users {m['users'] * 1e6:.0f} us")
    t = result["multi_24x256KB_back_to_back"]
    print(f"24 x 256 KB back to back: marstore {t['marstore'] * 1e6:.0f} us, copy_ loop {t['copy_loop'] * 1e6:.0f} us, "
          f"limit (one float16 copy of the 3 MB) {t['limit'] * 1e6:.0f} us")
    finish(result, args.json)


def _size(b: int) -> str:
    return f"{b // MB} MB" if b >= MB else f"{b // KB} KB"


if __name__ == "__main__":
    main()
