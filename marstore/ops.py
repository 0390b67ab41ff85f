"""The cast-copy operators: float32/bfloat16/float16 into preallocated host buffers.

    counts = cast_copy(src, dst)                      # int64 [nonfinite, overflow]
    counts = cast_copy_many([a, b], buf, offsets)     # int64 [n, 2], one launch / one pass

Both run marstore._C's kernels when the extension is usable (through its direct entries,
which skip the Python dispatch of torch.ops.marstore.*, the same operators) and a
pure-torch path with identical results otherwise. Results are bit-identical to torch's
`src.to(dst.dtype)`, with one exception that torch itself is not consistent about: widening
float16 NaNs to float32 on the CPU gives F16C's quiet NaN with sign and payload kept (torch's
vector body does the same; its scalar tail gives 0x7fffffff). For CUDA sources the copy is asynchronous
on `stream` (default: the current stream), the destination must be pinned, and the returned
counts live on the device until that stream reaches them.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator, Sequence

import torch

from marstore import _extension

_C, EXTENSION_STATUS = _extension.load()
_backend = "extension" if _C is not None else "torch"

SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DESTINATION_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
_MODES = {"auto": 0, "direct": 1, "staged": 2}
# Finite values at or above this magnitude become inf in float16 (65520 rounds up to even).
_HALF_OVERFLOW = 65520.0


def backend() -> str:
    """'extension' or 'torch': which implementation the operators use now."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily forces 'extension' or 'torch' (tests and benchmarks compare the two)."""
    global _backend
    if name not in ("extension", "torch"):
        raise ValueError(f"backend {name!r}: use 'extension' or 'torch'")
    if name == "extension" and _C is None:
        raise RuntimeError(f"the extension is not usable: {EXTENSION_STATUS}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def aligned_offsets(srcs: Sequence[torch.Tensor], dst_dtype: torch.dtype, align_bytes: int = 64) -> tuple[list[int], int]:
    """Consecutive region offsets (in dst elements) for srcs, each aligned to align_bytes.

    Returns (offsets, total elements a destination needs)."""
    item = dst_dtype.itemsize
    step = max(1, align_bytes // item)
    offsets, cursor = [], 0
    for s in srcs:
        offsets.append(cursor)
        cursor += -(-s.numel() // step) * step
    return offsets, cursor


def cast_copy(
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    counts: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """Converts src into dst (same element count); returns int64 [nonfinite, overflow].

    counts: a contiguous int64 tensor of 2 elements on src's device that receives the counts
    and is returned, instead of a new tensor every call (the transfer ring keeps one a slot)."""
    code = _mode(mode)
    if _backend == "extension":
        if stream is not None and src.is_cuda:
            with torch.cuda.stream(stream):
                return cast_copy(src, dst, counts=counts, mode=mode)
        if counts is None:
            return _C.cast_copy(src, dst, code)
        _C.cast_copy_into(src, dst, counts, code)
        return counts
    if dst.numel() != src.numel():
        raise RuntimeError(
            f"cast_copy: destination has {dst.numel()} elements but the source has {src.numel()}; they must match"
        )
    result = _torch_cast_copy_many([src], dst, [0], stream, counts)
    return result.view(2) if counts is None else counts


def cast_copy_many(
    srcs: Sequence[torch.Tensor],
    dst: torch.Tensor,
    offsets: Sequence[int] | None = None,
    *,
    counts: torch.Tensor | None = None,
    stream: torch.cuda.Stream | None = None,
    mode: str = "auto",
) -> torch.Tensor:
    """Converts each source into dst.view(-1)[offset : offset + numel]; returns int64 [n, 2].

    offsets default to aligned_offsets(srcs, dst.dtype). Bytes of dst outside every region
    are left alone, except, for CUDA sources in staged mode, the gaps between regions (DMA
    copies move whole stretches of the span): keep nothing there. counts: as for cast_copy, 2n elements."""
    # This wrapper's own cost counts: the transfer ring calls it every batch, and for 24 small
    # sources a per-element int() and a context manager took longer than the C++ entry itself.
    if type(srcs) is not list:
        srcs = list(srcs)
    if offsets is None:
        offsets = aligned_offsets(srcs, dst.dtype)[0]
    elif type(offsets) is not list:
        offsets = _int_offsets(offsets)
    code = _mode(mode)
    if _backend == "extension":
        if stream is not None and srcs and srcs[0].is_cuda:
            with torch.cuda.stream(stream):
                return cast_copy_many(srcs, dst, offsets, counts=counts, mode=mode)
        try:
            if counts is None:
                return _C.cast_copy_many(srcs, dst, offsets, code)
            _C.cast_copy_many_into(srcs, dst, offsets, counts, code)
        except TypeError:
            _int_offsets(offsets)  # names a bad offset in one line; otherwise pybind's error stands
            raise
        return counts
    return _torch_cast_copy_many(srcs, dst, _int_offsets(offsets), stream, counts)


def channel_moments(x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 (sum, sum of squares) of x - shift, x of shape (rows, channels) in
    float16, bfloat16 or float32 on the CPU, shift float32 of shape (channels,).

    Within a batch the sums run in float32 (blocks of rows in the extension, torch's pairwise
    reduction here); a channel that holds a non-finite value, or whose squares pass float32's
    range, gets non-finite sums, which tells the caller to recompute it exactly. The two
    paths agree to float32 rounding, not to the bit."""
    if _backend == "extension":
        return _C.channel_moments(x, shift)
    if x.dim() != 2:
        raise RuntimeError(f"channel_moments: x must be 2-D (rows, channels), got {x.dim()} dimensions")
    if x.dtype not in SOURCE_DTYPES:
        raise RuntimeError(
            f"channel_moments: x dtype {x.dtype} is not supported; accepted: torch.float16, torch.bfloat16, torch.float32"
        )
    if shift.dtype != torch.float32 or shift.shape != (x.shape[1],):
        raise RuntimeError(f"channel_moments: shift must be float32 of shape ({x.shape[1]},)")
    d = x.to(torch.float32, copy=True)  # a copy even for float32: d is modified in place
    d.sub_(shift)
    return d.sum(0).double(), d.mul_(d).sum(0).double()


def moments_update(x: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                   shift: torch.Tensor) -> bool:
    """The store's common statistics step in one extension call: the sums of channel_moments(x,
    shift), shift being the running mean in float32, combined into the float64 running count,
    mean and M2 in place, shift set to the new mean. True when done; False, with nothing
    changed, when a sum is not finite, or always on the pure-torch path: the caller's numpy
    combination, which gives the same bits from the same sums, then takes the batch."""
    if _backend == "extension":
        return _C.moments_update(x, count, mean, m2, shift)
    return False


def _mode(mode: str) -> int:
    code = _MODES.get(mode)
    if code is None:
        raise ValueError(f"mode {mode!r}: use one of {sorted(_MODES)}")
    return code


def _int_offsets(offsets: Sequence[Any]) -> list[int]:
    """Python ints from any integer type (numpy's, 0-d tensors); a float is an error, not truncated."""
    result = []
    for o in offsets:
        try:
            result.append(operator.index(o))
        except TypeError:
            raise TypeError(f"cast_copy_many: offset {o} is a {type(o).__name__}, not an integer") from None
    return result


def _on_stream(src: torch.Tensor | None, stream: torch.cuda.Stream | None):
    if stream is None or src is None or not src.is_cuda:
        return contextlib.nullcontext()
    return torch.cuda.stream(stream)


def _check(srcs: list[torch.Tensor], dst: torch.Tensor, offsets: list[int]) -> None:
    """The extension's checks, with its messages, for the pure-torch path."""
    op = "cast_copy_many"
    if len(srcs) != len(offsets):
        raise RuntimeError(f"{op}: got {len(srcs)} sources and {len(offsets)} offsets; give one offset per source")
    if dst.device.type != "cpu":
        raise RuntimeError(f"{op}: destination is on {dst.device}; it must be a host (CPU) tensor")
    if not dst.is_contiguous():
        raise RuntimeError(f"{op}: destination must be contiguous")
    for i, s in enumerate(srcs):
        if s.device != srcs[0].device:
            raise RuntimeError(
                f"{op}: source {i} is on {s.device} but source 0 is on {srcs[0].device}; all sources must be on one device"
            )
        if s.dtype not in SOURCE_DTYPES:
            raise RuntimeError(
                f"{op}: source dtype {s.dtype} is not supported; accepted: torch.float32, torch.bfloat16, "
                "torch.float16 (cast float64 with .float() first)"
            )
        if dst.dtype not in DESTINATION_DTYPES:
            raise RuntimeError(
                f"{op}: destination dtype {dst.dtype} is not supported; accepted: torch.float16, torch.float32, torch.bfloat16"
            )
        if dst.dtype == torch.bfloat16 and s.dtype != torch.bfloat16:
            raise RuntimeError(
                f"{op}: a torch.bfloat16 destination takes only torch.bfloat16 sources (a plain copy), got "
                f"{s.dtype}; use a torch.float16 or torch.float32 destination"
            )
        if offsets[i] < 0 or offsets[i] + s.numel() > dst.numel():
            raise RuntimeError(
                f"{op}: region {i} [{offsets[i]}, {offsets[i] + s.numel()}) lies outside the destination's "
                f"{dst.numel()} elements"
            )
    if srcs and srcs[0].is_cuda and not dst.is_pinned():
        raise RuntimeError(
            f"{op}: destination is not pinned; a CUDA source needs a pinned host destination "
            "(torch.empty(..., pin_memory=True))"
        )
    order = sorted(range(len(srcs)), key=lambda i: offsets[i])
    for prev, cur in zip(order, order[1:]):
        end = offsets[prev] + srcs[prev].numel()
        if end > offsets[cur] and srcs[cur].numel() and srcs[prev].numel():
            raise RuntimeError(
                f"{op}: region {cur} starting at {offsets[cur]} overlaps region {prev} [{offsets[prev]}, {end})"
            )


def _torch_cast_copy_many(
    srcs: list[torch.Tensor],
    dst: torch.Tensor,
    offsets: list[int],
    stream: torch.cuda.Stream | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(srcs, dst, offsets)
    if out is not None:
        _check_counts(srcs, out)
    if not srcs:
        return torch.zeros(0, 2, dtype=torch.int64) if out is None else out
    flat = dst.view(-1)
    with _on_stream(srcs[0], stream):
        if out is None:
            counts = torch.zeros(len(srcs), 2, dtype=torch.int64, device=srcs[0].device)
        else:
            counts = out.view(len(srcs), 2).zero_()
        for i, (s, off) in enumerate(zip(srcs, offsets)):
            if s.numel() == 0:
                continue
            finite = torch.isfinite(s)
            counts[i, 0] = s.numel() - finite.sum()
            if dst.dtype == torch.float16:
                counts[i, 1] = (finite & (s.abs() >= _HALF_OVERFLOW)).sum()
            region = flat[off : off + s.numel()]
            region.view(s.shape).copy_(s, non_blocking=s.is_cuda)
            if s.dtype == torch.float16 and dst.dtype == torch.float32 and not s.is_cuda and counts[i, 0] > 0:
                _requiet_nans(s.reshape(-1), region)
        return counts if out is None else out


def _check_counts(srcs: list[torch.Tensor], counts: torch.Tensor) -> None:
    """The extension's check of a caller's counts tensor, with its message."""
    device = srcs[0].device if srcs else torch.device("cpu")
    want = 2 * len(srcs)
    if counts.dtype != torch.int64 or not counts.is_contiguous() or counts.numel() != want or counts.device != device:
        raise RuntimeError(
            f"cast_copy_many: counts must be a contiguous torch.int64 tensor of {want} elements (2 per source) on "
            f"{device}, got {counts.dtype} of {counts.numel()} elements on {counts.device}"
        )


def _requiet_nans(src: torch.Tensor, region: torch.Tensor) -> None:
    """float16 NaNs widened as F16C does: sign and payload kept, quiet bit set (see module doc)."""
    nan = torch.isnan(src)
    bits = src[nan].view(torch.int16).to(torch.int32) & 0xFFFF
    region[nan] = (((bits & 0x8000) << 16) | 0x7FC00000 | ((bits & 0x3FF) << 13)).view(torch.float32)
