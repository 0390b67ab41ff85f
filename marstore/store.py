"""The store: activations streamed into one self-describing, chunked HDF5 file.

    layers = [LayerSpec("encoder_blocks.0", row_shape=(768,)), LayerSpec("enc", (768,), ragged=True)]
    with StoreWriter("run.h5", layers, targets=[TargetSpec("action", (16, 7), "float32")],
                     metadata={"model": ...}) as writer:
        writer.append({"encoder_blocks.0": a, "enc": b}, targets={"action": y}, index=idx)
    store = open_store("run.h5")          # validated; exposes only committed rows

The writer runs a background thread behind a bounded queue: append() returns while the
thread writes, and memory stays bounded (background=False writes in append() instead, for
CPU extraction, where the model's threads use every core). Rows are gathered per chunk and
each chunk written once. Commit points (every `commit_rows` rows or
`commit_bytes` bytes) flush the data, then advance the root attribute `rows` and flush
again, changing no HDF5 structure (values in place), so a process killed at any write leaves a
file that opens with plain h5py and holds exactly the committed rows (docs/FORMAT.md says
what is not covered). The file is written in plain mode, not SWMR: a killed SWMR writer
leaves a file that a plain open refuses (docs/FORMAT.md). `resume=True` reopens such a file
and continues after its last committed row. docs/FORMAT.md describes the layout.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import datetime
import fcntl
import io
import json
import logging
import math
import os
import queue
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch

from marstore import __version__, ops
from marstore.errors import MarstoreError
from marstore.report import human_bytes

log = logging.getLogger(__name__)

FORMAT = "marstore"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk suits training reads (FIELD-NOTES §4)
STORED_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
TEXT = "str"  # a target's dtype for strings, stored as variable-length UTF-8
STATE_PREFIX = "state_at_row_"  # earlier versions' per-commit layer attributes (read, not written)
SKIPPED_PREFIX = "skipped_at_row_"  # the same for the root's count of /skipped
LAYER_STATE = "layer_state"  # the group of each layer's committed counters and statistics
# A compressed layer's committed rows never lie in a chunk that a later commit rewrites: HDF5
# writes a compressed chunk that grew at a new place and frees the old one for reuse, and a kill
# in that commit's flushes left its committed rows unreadable (114 of 269 replayed prefixes of a
# 10-batch store). Its dataset gets whole chunks only, each written once; at each commit the rows
# of its last, part-filled chunk go to /layer_tail/<layer> instead, (2, *chunk shape) uncompressed,
# written in place, slot k with /layer_state slot k. The final commit writes that chunk as well,
# so a complete store's datasets hold every row; in one that is not, the rows past a compressed
# layer's last whole chunk are read from its tail (committed_values).
LAYER_TAIL = "layer_tail"
# A commit changes no HDF5 structure, only values in place: HDF5 writes a flush's metadata in
# address order, not in the order it depends on, so a kill in the middle of a flush that grew
# an object header (a new attribute, h5py's replacement of one) left a layer whose header
# pointed at a block not yet written, and the whole file refused to open (tests replay every
# prefix of a writer's writes). Per-channel arrays of more channels than this (60 KiB) are not
# kept as attributes at all: the earliest file format refused them ("object header message is
# too large"), and the 1.10 format keeps them in a heap apart from the header, not replayed.
ATTR_CHANNELS_MAX = 7680
# The objects are made in HDF5 1.10's format: a dataset of one unlimited axis indexes its chunks
# in an extensible array, which never moves an entry once written; the earliest format's B-tree
# moves half a node into a new one when it splits, and a kill in that flush (the parent written
# first) lost committed chunks. Readable by HDF5 1.10 (2016) and later. (The superblock stays the
# earliest format's: StoreWriter._create.)
LIBVER = ("v110", "v110")
# The root's strings that commits rewrite are fixed-length: a variable-length string lives in the
# global heap, which a flush can write after the attribute that points into it.
STATUS_LENGTH = 10  # "incomplete"
TIME_LENGTH = 32  # utc_now(): 25
OUTPUT_CHUNK = 4096  # batches a chunk of /outputs/<name>


def fixed_text(text: str, length: int) -> np.ndarray:
    """An ASCII string attribute value of a fixed length (HDF5 pads it with NULs, h5py reads it as bytes)."""
    if len(text) > length:
        raise ValueError(f"{text!r} is longer than {length} characters")
    return np.array(text.encode("ascii"), dtype=f"S{length}")


def text_attr(value: Any) -> str:
    """A string attribute as str, fixed-length (bytes) or variable-length (str, earlier versions)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def moments_std(count: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Each channel's standard deviation from its count of finite values and M2 (0 where none)."""
    return np.sqrt(m2 / np.maximum(count, 1))


# a layer's attributes that a commit's last flush rewrites, and that its committed state holds
COMMITTED_LAYER_KEYS = ("nonfinite", "overflow", "stats_count", "mean", "stats_m2", "std")


def _pack_state(nonfinite: int, overflow: int, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """[nonfinite, overflow, count..., mean..., m2...] as float64 (exact to 2**53), a layer's state in one array."""
    return np.concatenate([[nonfinite, overflow], count, mean, m2]).astype(np.float64)


def _unpack_state(packed: np.ndarray) -> dict[str, Any]:
    """_pack_state's array as the layer keys above."""
    packed = np.asarray(packed, np.float64)
    count, mean, m2 = np.split(packed[2:], [(len(packed) - 2) // 3, 2 * (len(packed) - 2) // 3])
    return {"nonfinite": int(packed[0]), "overflow": int(packed[1]), "stats_count": count, "mean": mean,
            "stats_m2": m2, "std": moments_std(count, m2)}


def committed_layer_state(file: h5py.File, name: str, attrs: Mapping[str, Any], rows: int) -> dict[str, Any] | None:
    """A layer's counters and statistics over exactly its first `rows` rows: the slot of
    /layer_state/<name> whose first value is `rows` (the layer's attributes can be a commit
    ahead after a kill, or while a writer commits), an earlier version's state_at_row_<rows>
    attribute, or None where the store has neither (the attributes are then the state)."""
    group = file.get(LAYER_STATE)
    if group is not None and name in group:
        return _unpack_state(group[name][_committed_slot(file, name, rows)][1:])
    packed = attrs.get(f"{STATE_PREFIX}{rows}")
    return None if packed is None else _unpack_state(packed)


def _committed_slot(file: h5py.File, name: str, rows: int) -> int:
    """The slot of /layer_state/<name> (and /layer_tail/<name>) that holds the state at `rows`."""
    held = file[LAYER_STATE][name][:, 0]
    if rows not in held:
        raise StoreError(f"{file.filename}: /{LAYER_STATE}/{name} holds the state at rows {held.astype(int).tolist()}, "
                         f"not at the {rows} committed when it was opened: a writer has committed since (open it again), "
                         "or the file is damaged")
    return int(np.flatnonzero(held == rows)[0])


def _values(obj: h5py.HLObject) -> h5py.Dataset:
    """A layer's dataset of stored rows: the dense dataset, or a ragged layer's token rows."""
    return obj["values"] if isinstance(obj, h5py.Group) else obj


def _stored_rows(obj: h5py.HLObject, rows: int) -> tuple[int, int]:
    """(first row of the last part-filled chunk, rows stored) of a layer's stored rows (_values)
    when `rows` are committed: the rows themselves, or a ragged layer's token rows."""
    stored = int(obj["offsets"][rows]) if isinstance(obj, h5py.Group) else rows
    return stored - stored % _values(obj).chunks[0], stored


class TailedValues:
    """A compressed layer's stored rows in a store that is not complete: its whole chunks from
    the dataset, the rest from /layer_tail (module notes at LAYER_TAIL). Read like the h5py
    dataset it stands for: shape, dtype, size, slices of rows, read_direct. Rows [start, stop)
    are rows [0, stop - start) of the tail slot that holds the state at `rows`, read at the first
    read that needs them, then kept: a writer still running overwrites that slot two commits on."""

    def __init__(self, values: h5py.Dataset, start: int, stop: int, file: h5py.File, name: str, rows: int):
        self.values, self.start, self.file, self.name, self.rows = values, start, file, name, rows
        self.shape = (stop, *values.shape[1:])
        self.dtype, self.size = values.dtype, math.prod(self.shape)
        self._tail: np.ndarray | None = None

    @property
    def tail(self) -> np.ndarray:
        if self._tail is None:
            slot = _committed_slot(self.file, self.name, self.rows)
            tail = self.file[LAYER_TAIL][self.name][slot, : self.shape[0] - self.start]
            _committed_slot(self.file, self.name, self.rows)  # still that slot's rows: not overwritten meanwhile
            self._tail = tail
        return self._tail

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"a compressed layer's rows in a store that is not complete are read by slices, not {key!r}")
        a, b, _ = key.indices(self.shape[0])
        b = max(a, b)
        parts = ([self.values[a : min(b, self.start)]] if a < self.start else []) + \
                ([self.tail[max(a, self.start) - self.start : b - self.start]] if b > self.start else [])
        return np.concatenate(parts) if len(parts) == 2 else parts[0] if parts else self.values[0:0]

    def read_direct(self, dest: np.ndarray, source_sel: slice, dest_sel: slice) -> None:
        dest[dest_sel] = self[source_sel]


def committed_values(file: h5py.File, name: str, rows: int) -> h5py.Dataset | TailedValues:
    """The stored rows of layer `name` as a store of `rows` committed rows holds them: its dataset,
    or, for a compressed layer of a store that is not complete, the dataset and its tail."""
    obj = file["activations"][name]
    values = _values(obj)
    tails = file.get(LAYER_TAIL)
    if tails is None or name not in tails or text_attr(file.attrs["status"]) == "complete":
        return values
    start, stored = _stored_rows(obj, rows)
    tail = tails[name]
    if tail.shape != (2, *values.chunks):
        raise StoreError(f"{file.filename}: /{LAYER_TAIL}/{name} has shape {tail.shape}, not that of two chunks of its "
                         f"layer {(2, *values.chunks)}: the file is damaged")
    if start == stored:
        return values
    return TailedValues(values, start, stored, file, name, rows)


def _new_tail(group: h5py.Group, values: h5py.Dataset, name: str) -> h5py.Dataset:
    """group/name, the tail of the layer dataset `values` (LAYER_TAIL): contiguous, its space
    allocated now, as every place a commit writes, and not written (the file holds a hole there
    until a commit fills a slot)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple((2, *values.chunks))
    return h5py.Dataset(h5py.h5d.create(group.id, name.encode(), values.id.get_type(), space, dcpl=dcpl))


def _make_chunk_index(values: h5py.Dataset) -> None:
    """Makes the dataset's chunk index now, which HDF5 makes with the first chunk written: a
    compressed layer's first chunk can be written commits later (whole or final only), and a
    kill in that flush left the dataset's header pointing at an index not yet written (a chunk
    written raw and dropped at once: HDF5 reads neither)."""
    rows, *row_shape = values.chunks
    values.resize((rows, *row_shape))
    values.id.write_direct_chunk((0,) * values.ndim, b"\0", 0xFFFFFFFF)
    values.resize((0, *row_shape))


def _lacks_tail(f: h5py.File, name: str, values: h5py.Dataset) -> bool:
    """Whether the compressed layer dataset `values` has no tail (an earlier version's store)."""
    return values.compression is not None and (LAYER_TAIL not in f or name not in f[LAYER_TAIL])


def _lacks_state_slots(f: h5py.File, name: str) -> bool:
    """Whether layer `name` has no /layer_state slots (an earlier version's store)."""
    return LAYER_STATE not in f or name not in f[LAYER_STATE]


def _add_tails(f: h5py.File, specs: Sequence[LayerSpec]) -> None:
    """Gives each compressed layer of an earlier version's store its tail, holding the rows of its
    last part-filled chunk, in the new file of the store's _rewrite before a writer resumes it;
    the writer then drops that chunk from the dataset."""
    rows = int(f.attrs["rows"])
    for spec in specs:
        obj = f["activations"][spec.name]
        values = _values(obj)
        if not _lacks_tail(f, spec.name, values):
            continue
        start, stored = _stored_rows(obj, rows)
        tail = _new_tail(f.require_group(LAYER_TAIL), values, spec.name)
        tail[_committed_slot(f, spec.name, rows), : stored - start] = values[start:stored]
        log.info("store %s: layer %s given a tail for its part-filled chunk (module notes at LAYER_TAIL)", f.filename, spec.name)


def committed_skipped(attrs: Mapping[str, Any], rows: int) -> int:
    """The entries of /skipped that go with the first `rows` rows: from the root's 'skipped_at'
    slots ([rows, skipped] at the last two commits; 'skipped' reaches the disk with 'rows', in
    one flush but not one write), an earlier version's 'skipped_at_row_<rows>', or 'skipped'."""
    for slot_rows, skipped in np.asarray(attrs.get("skipped_at", np.zeros((0, 2))), np.int64).reshape(-1, 2):
        if slot_rows == rows:
            return int(skipped)
    return int(attrs.get(f"{SKIPPED_PREFIX}{rows}", attrs.get("skipped", 0)))


_METADATA_SLACK = 1 << 20  # room kept for the metadata that a commit and a close write


class StoreError(MarstoreError):
    """A store that cannot be opened or used as asked; the message says why and what to do."""


class StoreWriteError(StoreError):
    """Writing failed (disk full, file size limit, ...); the committed rows stay readable."""


class RowShapeError(StoreError):
    """A batch whose rows do not have its layer's shape; tokens_vary: only the token axis differs."""

    def __init__(self, message: str, layer: str, row_shape: tuple[int, ...], expected: tuple[int, ...], tokens_vary: bool):
        super().__init__(message)
        self.layer, self.row_shape, self.expected, self.tokens_vary = layer, row_shape, expected, tokens_vary


@dataclass(frozen=True)
class LayerSpec:
    """One hooked layer: its name in named_modules() and the shape of one stored row.

    For a ragged layer, row_shape is the shape of one token row (the per-sample token count
    varies); a dense layer has one fixed row_shape per sample."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str = "float16"  # float16, float32, or bfloat16 (kept exactly, as uint16 bits)
    source_dtype: str = "float32"
    reduction: str = "none"
    ragged: bool = False
    chunk_rows: int | None = None
    compression: str | None = None  # None, "lzf" or "gzip"
    # a layer stored with its positions whose channels come first, as convolutions give: the
    # row axis of the channels (0 for (C, h, w), 1 for k unfolded rows (k, C, h, w)); None: features last
    channel_axis: int | None = None
    # k, for a module that ran on k rows a sample (UVA's action head: B*4), unfolded to (B, k, ...)
    # before its reduction; None: one row a sample
    unfolded: int | None = None
    # the order of those rows in the module's batch, as einops writes it: (b k=4) sample-major,
    # (m=4 b t=64) for MAR's diffusion loss (stored (B, 4, 64, ...))
    unfold_layout: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in STORED_DTYPES:
            raise StoreError(f"layer {self.name!r}: dtype {self.dtype!r} is not one of {sorted(STORED_DTYPES)}")
        if self.compression not in (None, "lzf", "gzip"):
            raise StoreError(f"layer {self.name!r}: compression {self.compression!r}; use None, 'lzf' or 'gzip'")
        if not self.name or "/" in self.name:
            raise StoreError(f"layer name {self.name!r} must be non-empty and contain no '/'")
        object.__setattr__(self, "row_shape", tuple(int(s) for s in self.row_shape))


@dataclass(frozen=True)
class TargetSpec:
    """A per-row target or label: of any numeric dtype, or TEXT (variable-length UTF-8 strings:
    a task name, an instruction, an episode id as the data set gives it)."""

    name: str
    row_shape: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype != TEXT and np.dtype(self.dtype).kind not in "biuf":
            raise StoreError(f"target {self.name!r}: dtype {self.dtype!r} is neither numeric nor {TEXT!r}")
        object.__setattr__(self, "row_shape", tuple(int(s) for s in self.row_shape))

    @property
    def storage_dtype(self) -> Any:
        return h5py.string_dtype() if self.dtype == TEXT else np.dtype(self.dtype)


def is_text(ds: h5py.Dataset) -> bool:
    """Whether a target dataset holds strings (h5py reads them as bytes unless asked for str)."""
    return h5py.check_string_dtype(ds.dtype) is not None


def _text_rows(name: str, t: Any) -> np.ndarray:
    """A batch of a text target as an object array of str, or a one-line error."""
    rows = np.asarray(t, dtype=object)
    odd = next((v for v in rows.flat if not isinstance(v, str)), None)
    if odd is not None:
        raise StoreError(f"target {name!r} holds text, and this batch has a {type(odd).__name__} ({odd!r}) among its strings")
    return rows


@dataclass
class Ragged:
    """A batch of a ragged layer: the token rows of every sample, concatenated, and their counts."""

    values: Any  # (sum(lengths), *row_shape)
    lengths: Sequence[int]


def default_chunk_rows(row_shape: tuple[int, ...], itemsize: int, chunk_rows: int | None,
                       expected_rows: int | None = None) -> int:
    """Rows a chunk holds: chunk_rows if given, else about CHUNK_BYTES worth, but no more than
    the rows the store expects (HDF5 allocates whole chunks: a small store would be mostly
    empty chunk space)."""
    if chunk_rows:
        return int(chunk_rows)
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    rows = max(1, CHUNK_BYTES // row_bytes)
    return min(rows, expected_rows) if expected_rows else rows


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of an array or CPU tensor; bfloat16 tensors become their uint16 bits."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            raise StoreError(f"a {x.device} tensor reached the store; transfer it to host memory first")
        if x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
            return x.numpy().view(np.uint16)
        return x.numpy()
    return np.asarray(x)


class _Moments:
    """Per-channel (last axis) count, mean and M2 of the finite stored values, combined batch
    by batch in float64 (Chan et al.), so that a resumed store ends with the same bits (_Layer
    hands small batches over in groups, each group ending at the latest at a commit).

    Within a batch the sums run in float32 (ops.channel_moments: one fused pass in the
    extension) on values shifted by the running mean, which keeps M2 free of cancellation;
    float64 sums of float16 data were 20x slower and would bound the writer. Channels holding
    a non-finite value (their float32 sums are not finite) are recomputed exactly in float64
    without those values."""

    def __init__(self, channels: int):
        self.restore(np.zeros(channels, np.float64), np.zeros(channels, np.float64), np.zeros(channels, np.float64))

    def restore(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        # arrays of this object's own, updated in place; ops.moments_update writes through the tensors
        self.count, self.mean, self.m2 = (np.array(a, np.float64) for a in (count, mean, m2))
        self._state = tuple(torch.from_numpy(a) for a in (self.count, self.mean, self.m2))
        self._shift = self._next_shift()

    def _next_shift(self) -> torch.Tensor | None:
        """The running mean in float32, the next batch's shift; None while a channel has no
        finite value yet (it is then shifted by the batch's first row)."""
        return torch.from_numpy(self.mean.astype(np.float32)) if self.count.all() else None

    def update(self, x: np.ndarray) -> int:
        """Adds a batch of rows; returns how many of its values are not finite."""
        rows = np.ascontiguousarray(x).reshape(-1, self.count.shape[0])
        if rows.shape[0] == 0:
            return 0
        t = torch.from_numpy(rows)
        t = t.view(torch.bfloat16) if x.dtype == np.uint16 else t
        shift = self._shift
        # The common case (every channel seen, every sum finite) in one extension call; the
        # rest, and everything without the extension, below in numpy (small torch operations
        # cost several times more). A batch with a non-finite sum is summed again there: a
        # second pass, on a path whose exact recount of those channels costs more than one.
        if shift is not None and ops.moments_update(t, *self._state, shift):
            return 0
        if shift is None:
            first = np.nan_to_num(t[0].float().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
            shift = torch.from_numpy(np.where(self.count == 0, first, self.mean).astype(np.float32))
        ref = shift.numpy()
        s, ss = (v.numpy() for v in ops.channel_moments(t, shift))
        n: np.ndarray | float = float(rows.shape[0])
        nonfinite = 0
        with np.errstate(invalid="ignore"):  # inf - inf is NaN, as non-finite as either
            finite_sums = math.isfinite(s.sum() + ss.sum())
        if not finite_sums:  # one check for the common case: every sum finite
            bad = ~(np.isfinite(s) & np.isfinite(ss))
            cols = (t.float()[:, torch.from_numpy(bad)] - torch.from_numpy(ref[bad])).double()
            finite = torch.isfinite(cols)
            nonfinite = int(finite.numel() - finite.sum())
            cols = torch.where(finite, cols, 0.0)
            n = np.full_like(s, n)
            n[bad], s[bad], ss[bad] = finite.sum(0).double().numpy(), cols.sum(0).numpy(), (cols * cols).sum(0).numpy()
        safe_n = np.maximum(n, 1)
        batch_mean = ref.astype(np.float64) + s / safe_n
        batch_m2 = np.maximum(ss - s * s / safe_n, 0.0)
        total = self.count + n
        delta = batch_mean - self.mean
        every = isinstance(n, float)  # every channel got n >= 1 values: total >= 1, none to leave as it was
        denominator = total if every else np.maximum(total, 1)
        mean = self.mean + delta * n / denominator
        m2 = self.m2 + batch_m2 + delta * delta * self.count * n / denominator
        if not every:  # a channel with no finite value in this batch keeps what it had
            keep = n > 0
            mean, m2 = np.where(keep, mean, self.mean), np.where(keep, m2, self.m2)
        self.mean[:], self.m2[:], self.count[:] = mean, m2, total
        self._shift = self._next_shift()
        return nonfinite

    def std(self) -> np.ndarray:
        return moments_std(self.count, self.m2)


class _Layer:
    """Writer-side state of one layer: its datasets, counters and statistics."""

    def __init__(self, spec: LayerSpec, group: h5py.Group, state: h5py.Dataset, tail: h5py.Dataset | None):
        self.spec = spec
        self.np_dtype = np.dtype(STORED_DTYPES[spec.dtype])
        if spec.ragged:
            self.group = group
            self.values = group["values"]
            self.offsets = group["offsets"]
        else:
            self.values = group
        self.moments = _Moments(layer_channels(spec))
        # /layer_state/<name>: two slots of [rows, packed_state()]; a commit writes the one that
        # does not hold the committed rows' state (a new store's slot 0 holds the state at 0 rows)
        self.state = state
        self.free_slot = 1
        self.tail = tail  # a compressed layer's: the rows of its part-filled chunk at each commit (LAYER_TAIL)
        self.pending: list[np.ndarray] = []  # small batches' rows not yet in the moments
        self.pending_size = 0
        self.nonfinite = 0
        self.overflow = 0
        self.tokens = 0  # ragged only: committed + pending token rows

    def add_stats(self, data: np.ndarray, counts: tuple[int, int] | None) -> None:
        """Adds a batch to the statistics and the counters. counts: (nonfinite, overflow)
        from the transfer; without them the stored values' non-finite ones are counted.

        A small batch's rows are kept and summed with the next ones: an update has a fixed
        cost whatever its size (about 20 µs through the extension's one call, 60 µs of numpy
        bookkeeping without it), which for 24 layers of (8, 768) token means was two thirds of
        the writer's 3 ms a batch before that call existed (on the CPU the writer runs between
        the forwards; on an H200 the model did not wait for it either way)."""
        if self.spec.channel_axis is not None:  # the channels last, as _Moments takes them (a copy, in update)
            data = np.moveaxis(data, 1 + self.spec.channel_axis, -1)
        if data.size >= _STATS_DIRECT_SIZE:
            self.settle_stats()
            nonfinite = self.moments.update(data)
        else:
            nonfinite = None if counts is not None else _count_nonfinite(data)
            self.pending.append(np.array(data))  # a copy: data may be a view into a transfer slot
            self.pending_size += data.size
            if self.pending_size >= _STATS_PENDING_SIZE:
                self.settle_stats()
        nonfinite, overflow = counts or (nonfinite, 0)
        self.nonfinite += int(nonfinite)
        self.overflow += int(overflow)

    def packed_state(self) -> np.ndarray:
        """The counters and statistics in one array, as a state slot holds them (_pack_state)."""
        m = self.moments
        return _pack_state(self.nonfinite, self.overflow, m.count, m.mean, m.m2)

    def summary(self) -> dict[str, Any]:
        """The attributes a commit sets (as _create_layer made them: per-channel arrays only where they fit)."""
        m = self.moments
        arrays = {"stats_count": m.count, "mean": m.mean, "std": m.std(), "stats_m2": m.m2}
        return {"nonfinite": self.nonfinite, "overflow": self.overflow,
                **(arrays if len(m.count) <= ATTR_CHANNELS_MAX else {})}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Counters and statistics as committed_layer_state gives them."""
        self.nonfinite, self.overflow = int(state["nonfinite"]), int(state["overflow"])
        self.moments.restore(state["stats_count"], state["mean"], state["stats_m2"])

    def settle_stats(self) -> None:
        """Sums the kept small batches into the moments, in order (a commit records them)."""
        if self.pending:
            self.moments.update(np.concatenate(self.pending))
            self.pending, self.pending_size = [], 0

    @property
    def attrs(self) -> h5py.AttributeManager:
        return (self.group if self.spec.ragged else self.values).attrs


def _index_chunk(expected_rows: int | None, extra: int = 0) -> int:
    """Chunk length of a per-row int64 dataset (the index, ragged offsets)."""
    return min(65536, expected_rows + extra) if expected_rows else 65536


def layer_channels(spec: LayerSpec) -> int:
    """The channels a layer's statistics are kept for: the last axis, or the channel axis of a channels-first layer."""
    return spec.row_shape[-1 if spec.channel_axis is None else spec.channel_axis] if spec.row_shape else 1


def _create_layer(f: h5py.File, spec: LayerSpec, expected_rows: int | None) -> None:
    """Layer `spec`'s empty dataset (or ragged group) in /activations, and a compressed layer's
    tail and chunk index, made with it (every place a commit writes exists before the first)."""
    root = f["activations"]
    np_dtype = np.dtype(STORED_DTYPES[spec.dtype])
    # a ragged layer's rows are tokens, as many as the samples' token counts add up to
    rows = default_chunk_rows(spec.row_shape, np_dtype.itemsize, spec.chunk_rows, None if spec.ragged else expected_rows)
    kwargs = dict(dtype=np_dtype, chunks=(rows, *spec.row_shape), maxshape=(None, *spec.row_shape))
    if spec.compression:
        kwargs["compression"] = spec.compression
    if spec.ragged:
        group = root.create_group(spec.name)
        group.create_dataset("values", shape=(0, *spec.row_shape), **kwargs)
        offsets = group.create_dataset("offsets", shape=(1,), dtype=np.int64, chunks=(_index_chunk(expected_rows, 1),),
                                       maxshape=(None,))
        offsets[0] = 0
        obj = group
    else:
        obj = root.create_dataset(spec.name, shape=(0, *spec.row_shape), **kwargs)
    obj.attrs.update(
        {
            "layout": "ragged" if spec.ragged else "dense",
            "dtype": spec.dtype,
            "encoding": "bfloat16-bits" if spec.dtype == "bfloat16" else "ieee",
            "source_dtype": spec.source_dtype,
            "reduction": spec.reduction,
            "nonfinite": 0,
            "overflow": 0,
            **_stats_attrs(layer_channels(spec)),
            **({"channel_axis": spec.channel_axis} if spec.channel_axis is not None else {}),
            **({"unfolded": spec.unfolded} if spec.unfolded is not None else {}),
            **({"unfold_layout": spec.unfold_layout} if spec.unfold_layout is not None else {}),
        }
    )
    if spec.compression:
        values = _values(obj)
        _new_tail(f.require_group(LAYER_TAIL), values, spec.name)
        _make_chunk_index(values)


def _stats_attrs(channels: int) -> dict[str, np.ndarray]:
    """A new layer's per-channel statistics attributes, at their final size (a commit only
    rewrites them), where an attribute can hold them; the state slots hold them always."""
    if channels > ATTR_CHANNELS_MAX:
        log.info("a layer of %d channels: its per-channel statistics are kept in /%s only (more than %d channels "
                 "do not fit an attribute)", channels, LAYER_STATE, ATTR_CHANNELS_MAX)
        return {}
    zeros = np.zeros(channels, np.float64)
    return {"stats_count": zeros, "mean": zeros, "std": zeros, "stats_m2": zeros}


def _variable_length_text(f: h5py.File, key: str) -> bool:
    """Whether the root's string attribute `key` is variable-length (an earlier version's)."""
    return h5py.check_string_dtype(f.attrs.get_id(key).dtype).length is None


def _lacking_commit_places(f: h5py.File, specs: Sequence[LayerSpec]) -> list[str]:
    """What a store of an earlier version lacks of the places that this version's commits write
    in place (_add_commit_places and _add_tails add them); empty for a store of this version."""
    lacking = []
    for spec in specs:
        obj = f["activations"][spec.name]
        if _lacks_state_slots(f, spec.name):
            lacking.append(f"/{LAYER_STATE}/{spec.name}")
        if any(key not in obj.attrs for key in _stats_attrs(1)) or any(k.startswith(STATE_PREFIX) for k in obj.attrs):
            lacking.append(f"the statistics attributes of {spec.name}")
        if _lacks_tail(f, spec.name, _values(obj)):
            lacking.append(f"/{LAYER_TAIL}/{spec.name}")
    lacking += [f"a fixed-length {key}" for key in ("status", "committed_at") if _variable_length_text(f, key)]
    if "skipped_at" not in f.attrs:
        lacking.append("skipped_at")
    if "index" not in f.get("skipped", {}) or "row_start" not in f.get("outputs", {}):
        lacking.append("/skipped or /outputs")
    return lacking


def _add_commit_places(f: h5py.File, specs: Sequence[LayerSpec]) -> None:
    """Gives a store of an earlier version, in the new file of its _rewrite before a writer
    resumes it, the attributes and state slots that commits now write in place, from what it
    recorded (the stores of this version have them from the start)."""
    rows = int(f.attrs["rows"])
    added = []
    for spec in specs:
        a = f["activations"][spec.name].attrs
        if _lacks_state_slots(f, spec.name):
            # where there is no state_at_row_N either, the attributes hold the committed rows' state
            state = committed_layer_state(f, spec.name, a, rows) or {
                "nonfinite": a["nonfinite"], "overflow": a["overflow"],
                **{k: a.get(k, np.zeros(layer_channels(spec))) for k in ("stats_count", "mean", "stats_m2")}}
            _create_layer_state(f, spec, rows, _pack_state(*(state[k] for k in ("nonfinite", "overflow", "stats_count", "mean", "stats_m2"))))
            added.append(spec.name)
        for key, value in _stats_attrs(layer_channels(spec)).items():
            if key not in a:
                a[key] = value
        for name in [k for k in a if k.startswith(STATE_PREFIX)]:
            del a[name]
    for key, length in (("status", STATUS_LENGTH), ("committed_at", TIME_LENGTH)):
        if _variable_length_text(f, key):
            f.attrs[key] = fixed_text(text_attr(f.attrs[key]), length)
    _create_skipped_and_outputs(f)
    if "skipped_at" not in f.attrs:
        skipped = committed_skipped(f.attrs, rows)
        f.attrs.update({"skipped": skipped, "skipped_at": np.array([[rows, skipped], [-1, 0]], np.int64)})
        for name in [k for k in f.attrs if k.startswith(SKIPPED_PREFIX)]:
            del f.attrs[name]
    f.flush()
    if added:
        log.info("store %s: state slots added for %d layers (a store of an earlier version)", f.filename, len(added))


def _forget_strings_after(ds: h5py.Dataset, rows: int) -> None:
    """Clears the heap references of a string dataset's rows past `rows` in the chunk that holds
    row `rows`, in place (past the dataset's extent too, which can be a commit behind the chunk
    on disk): a killed writer can have left them pointing at heap objects never written, and
    HDF5 frees the object that a string it overwrites points at, which then fails."""
    if not is_text(ds) or rows % ds.chunks[0] == 0:
        return
    first = rows - rows % ds.chunks[0]
    offset = (first,) + (0,) * (ds.ndim - 1)
    if ds.id.get_chunk_info_by_coord(offset).byte_offset is None:
        return  # never written
    mask, raw = ds.id.read_direct_chunk(offset)
    kept = (rows - first) * (len(raw) // ds.chunks[0])
    ds.id.write_direct_chunk(offset, raw[:kept] + bytes(len(raw) - kept), mask)  # zeros: a null reference, no string


def _recorded_rows(path: str) -> int | None:
    """The root's committed row count of a marstore store, read without validating the rest;
    None where even that cannot be read (the caller then reports the validation's error)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["rows"]) if f.attrs.get("format") == FORMAT else None
    except (OSError, KeyError, ValueError):
        return None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_EOA_OFFSET = 40  # a version 0 superblock's end-of-allocation address, after 8-byte base and free-space addresses


def _short_end_of_allocation(path: str, fh: Any) -> tuple[int, int] | None:
    """(recorded end of allocation, file size) where the superblock of the open file fh records
    an end before the file's end, as a writer killed inside a flush leaves it (HDF5 writes the
    superblock last in a flush, so what the flush allocated lies past the end it records); None
    where it does not, or where the superblock is not marstore's (version 0, 8-byte addresses,
    base 0), which is then logged."""
    head = fh.read(_EOA_OFFSET + 8)
    size = os.fstat(fh.fileno()).st_size
    if len(head) < _EOA_OFFSET + 8 or head[:8] != HDF5_SIGNATURE:
        return None  # not an HDF5 file at its start: the open that follows says so
    eoa = int.from_bytes(head[_EOA_OFFSET:], "little")
    if eoa >= size:
        return None
    if head[8] != 0 or head[13] != 8 or any(head[24:32]):
        log.warning("store %s: HDF5's end of allocation (%d bytes) lies before the file's end (%d bytes), "
                    "and its superblock (version %d) is not one marstore can read past", path, eoa, size, head[8])
        return None
    return eoa, size


def _raise_end_of_allocation(path: str) -> None:
    """Raises the superblock's end-of-allocation address to the file's end, as `h5clear
    --increment` does, before a writer reopens a store: HDF5 refuses to write past the recorded
    end ("addr overflow"), and the resume failed. What lies there was written for rows past the
    last commit (a string heap grown in place reaches there too, its committed strings before
    it); the space is kept."""
    with open(path, "r+b") as fh:
        short = _short_end_of_allocation(path, fh)
        if short is None:
            return
        fh.seek(_EOA_OFFSET)
        fh.write(short[1].to_bytes(8, "little"))
    log.warning("store %s: HDF5's end of allocation lay %d bytes before the file's end, as a writer killed inside "
                "a flush leaves it; raised to the file's end (%d bytes)", path, short[1] - short[0], short[1])


class _RaisedEndView(io.RawIOBase):
    """A killed writer's store, read only, its superblock's end of allocation read as the file's
    size: what _raise_end_of_allocation writes, without writing. HDF5 refuses to read past the
    recorded end, where a string heap that the killed flush grew in place reaches, committed
    strings and all. Reads go through h5py's file-object driver (225 MB in 0.034 s against 0.033
    read plainly, from the page cache), until a resume (or `h5clear --increment`) mends the file."""

    def __init__(self, path: str, size: int):
        self._path, self._file = path, open(path, "rb")
        self._end = size.to_bytes(8, "little")

    def __repr__(self) -> str:  # what h5py gives as the file's name
        return self._path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer: Any) -> int:
        at = self._file.tell()
        n = self._file.readinto(buffer)
        lo, hi = max(at, _EOA_OFFSET), min(at + n, _EOA_OFFSET + 8)
        if lo < hi:
            memoryview(buffer).cast("B")[lo - at : hi - at] = self._end[lo - _EOA_OFFSET : hi - _EOA_OFFSET]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


_VIEWED: set[str] = set()  # the stores open_for_reading has said it reads through the view


def open_for_reading(path: str) -> h5py.File:
    """The store's file as marstore's readers open it: read only, HDF5's file locking off (a
    writer may be running). A store whose writer was killed inside a flush (no writer holds its
    lock, and the recorded end of allocation lies before the file's end) is read through
    _RaisedEndView, and a warning says so; while a writer runs, a short recorded end is its flush
    under way, and the file opens as it is."""
    with open(path, "rb") as fh:
        short = _short_end_of_allocation(path, fh)
    if short is None or _being_written(path):
        return h5py.File(path, "r", locking=False)
    if path not in _VIEWED:  # said once a process: a probe opens the store once per layer
        _VIEWED.add(path)
        log.warning("store %s: its writer was stopped inside a flush (HDF5's recorded end lies %d bytes before the "
                    "file's end), so it is read through a view that moves that end; resuming the extraction, or "
                    "`h5clear --increment %s`, mends the file", path, short[1] - short[0], path)
    return h5py.File(_RaisedEndView(path, short[1]), "r")


def _new_store_file(path: str) -> h5py.File:
    """The empty file at path (made by _WriterLock), opened to write a store into it. Made in the
    earliest format, whose superblock (version 0) a reopened file keeps, then reopened to make its
    objects in LIBVER's: a version 3 superblock would mark the file open for writing, and HDF5
    refuses readers of such a file, and any open of a killed writer's file until h5clear repairs
    it. Closing the first open at once also spends the flush that ext4 (its auto_da_alloc
    heuristic) makes at the close after an O_TRUNC on an empty file, not on the store's final
    close (0.07-0.13 s per 268 MB written)."""
    h5py.File(path, "w", libver="earliest", locking=False).close()
    return h5py.File(path, "r+", libver=LIBVER, locking=False)


def _create_skipped_and_outputs(f: h5py.File) -> None:
    """/skipped and /outputs with its row_start, empty, where they are not yet (made before any
    commit: only the outputs' own datasets are made later, when the first batch names them)."""
    group = f.require_group("skipped")
    if "index" not in group:
        group.create_dataset("index", shape=(0,), dtype=np.int64, chunks=(1024,), maxshape=(None,))
        group.create_dataset("error", shape=(0,), dtype=h5py.string_dtype(), chunks=(256,), maxshape=(None,))
    # track_order: /outputs lists the forward's outputs in its order (loss first), not by name
    group = f["outputs"] if "outputs" in f else f.create_group("outputs", track_order=True)
    if "row_start" not in group:
        group.create_dataset("row_start", shape=(0,), dtype=np.int64, chunks=(OUTPUT_CHUNK,), maxshape=(None,))


def _create_layer_state(file: h5py.File, spec: LayerSpec, rows: int, packed: np.ndarray) -> None:
    """/layer_state/<name>: slot 0 the state at `rows`, slot 1 unused (rows -1), written now so
    that its storage is allocated before any commit."""
    slots = np.zeros((2, 1 + len(packed)), np.float64)
    slots[0] = np.concatenate([[rows], packed])
    slots[1, 0] = -1
    file.require_group(LAYER_STATE).create_dataset(spec.name, data=slots)


class _ChunkBuffer:
    """The rows of a dataset's current chunk that HDF5 has not been given whole yet: batches
    smaller than a chunk are gathered here, so that each chunk is written once (with
    write_direct_chunk when it can), not once per batch through h5py's selections."""

    def __init__(self, ds: h5py.Dataset):
        # HDF5's answers are kept: asking for a shape or a chunk layout costs 5-20 us a time,
        # and every batch of a store writes a dozen datasets or more.
        self.ds = ds
        self.rows = ds.chunks[0]
        self.row_shape = ds.shape[1:]
        self.length = ds.shape[0]  # the dataset's extent; only this writer resizes it
        self.text = is_text(ds)
        self.direct = ds.compression is None and not self.text  # whole chunks can go as raw bytes; strings cannot
        self.data = np.zeros((self.rows, *ds.chunks[1:]), ds.dtype)
        self.chunk_bytes = self.data.nbytes
        self.start: int | None = None  # the chunk's first row
        self.filled = 0  # rows [start, start + filled) are here
        self.handed = 0  # ... of which HDF5 has rows [start, start + handed) already


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Batch:
    activations: Mapping[str, Any]
    targets: Mapping[str, Any]
    index: np.ndarray
    counts: Mapping[str, tuple[int, int]]
    on_written: Callable[[], None] | None
    slot: Any = None
    nbytes: int = 0
    outputs: Mapping[str, float] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # items left out before this batch's rows
    lengths: Mapping[str, Sequence[int]] = field(default_factory=dict)  # padded ragged layers' token counts


_STOP = object()


class StoreWriter:
    """Streams batches into a store (see the module doc). Use as a context manager.

    expected_rows: the rows the caller plans to write, if known; chunks then hold no more
    rows than that (the store still grows past it)."""

    def __init__(
        self,
        path: str | os.PathLike,
        layers: Sequence[LayerSpec],
        targets: Sequence[TargetSpec] = (),
        metadata: Mapping[str, Any] | None = None,
        *,
        commit_rows: int = 4096,
        commit_bytes: int = 256 << 20,
        queue_batches: int = 4,
        resume: bool = False,
        fsync: bool = False,
        direct_chunks: bool = True,
        background: bool = True,
        expected_rows: int | None = None,
    ):
        self.path = os.fspath(path)
        self.layers_spec = list(layers)
        self.targets_spec = list(targets)
        self.commit_rows = commit_rows
        self.commit_bytes = commit_bytes
        self.fsync = fsync
        self.direct_chunks = direct_chunks
        self.expected_rows = expected_rows
        for kind, specs in (("layer", self.layers_spec), ("target", self.targets_spec)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise StoreError(f"{kind} names must be unique; {sorted({n for n in names if names.count(n) > 1})} "
                                 "given more than once")
        resuming = resume and os.path.exists(self.path)
        if not resuming and os.path.exists(self.path):
            raise StoreError(f"{self.path} exists; pass resume=True to continue it, or choose another path")
        self._lock = _WriterLock(self.path, create=not resuming)
        self._file: h5py.File | None = None
        # by id(): hashing an h5py dataset asks HDF5 for its object number (a few µs, 26 times a
        # batch); the writer keeps every dataset object it writes for the file's lifetime
        self._chunks: dict[int, _ChunkBuffer] = {}
        try:
            self._file = self._open_for_resume(metadata) if resuming else self._create(metadata or {})
            tails = self._file.get(LAYER_TAIL, {})
            self._layers = {s.name: _Layer(s, self._file["activations"][s.name], self._file[LAYER_STATE][s.name],
                                           tails.get(s.name)) for s in self.layers_spec}
            self._tailed = {id(layer.values): layer for layer in self._layers.values() if layer.tail is not None}
            self._targets = {s.name: self._file["targets"][s.name] for s in self.targets_spec}
            self._text_targets = {s.name for s in self.targets_spec if s.dtype == TEXT}
            # append() checks batches against these, not the datasets: the writer thread closes the
            # file when it fails, and an h5py dataset of a closed file cannot tell its shape
            self._target_row_shapes = {s.name: s.row_shape for s in self.targets_spec}
            self._index = self._file["index"]
            self.committed = int(self._file.attrs["rows"])
            # items the data set failed to give, left out: /skipped holds those committed, this list the rest
            self.skipped_committed = committed_skipped(self._file.attrs, self.committed)
            self._skipped: list[tuple[int, str]] = []
            if resume:
                self._restore_state()
        except BaseException:  # a store that cannot be continued: let go of the file and its lock
            if self._file is not None:
                self._file.close()
            if not resuming:  # the file is this writer's own, and not yet a store: leave nothing behind
                os.remove(self.path)
            self._lock.release()
            raise
        self.written = self.committed  # rows handed to HDF5, committed or not
        self._uncommitted_bytes = 0
        self._last_nbytes = 0  # the batch being written, for the error message
        # /outputs/<name>, and the batches in it (its datasets grow on disk only as their chunks are written)
        self._outputs = dict(self._file["outputs"].items())
        self._output_rows = self._outputs["row_start"].shape[0]
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._error: BaseException | None = None
        self._closed = False
        # background=False writes in append() itself: on the CPU, where the model's threads
        # already use every core, a writer thread beside them only makes them wait for it.
        self._stats = self._thread = None
        self._stats_threads = _stats_threads() if background else 0
        if background:
            self._stats = concurrent.futures.ThreadPoolExecutor(self._stats_threads, thread_name_prefix="marstore-stats")
            self._thread = threading.Thread(target=self._run, name=f"marstore-writer:{os.path.basename(self.path)}", daemon=True)
            self._thread.start()

    # ---- creating and reopening -------------------------------------------------------
    def _create(self, metadata: Mapping[str, Any]) -> h5py.File:
        f = _new_store_file(self.path)  # the file _WriterLock made
        try:
            self._fill(f, metadata)
        except BaseException:  # the caller removes the file; HDF5 must let go of it first
            f.close()
            raise
        return f

    def _fill(self, f: h5py.File, metadata: Mapping[str, Any]) -> None:
        """Makes the store's attributes and objects in the new, empty file f."""
        f.attrs.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "status": fixed_text("incomplete", STATUS_LENGTH),
                "rows": 0,
                "skipped": 0,
                "skipped_at": np.array([[0, 0], [-1, 0]], np.int64),
                "created": utc_now(),
                "committed_at": fixed_text(utc_now(), TIME_LENGTH),
                "marstore_version": __version__,
                "torch_version": str(torch.__version__),
                "h5py_version": h5py.version.version,
                "hdf5_version": h5py.version.hdf5_version,
                "run": json.dumps(metadata, sort_keys=True, default=str),
                "layers": json.dumps([s.__dict__ for s in self.layers_spec]),
                "targets": json.dumps([s.__dict__ for s in self.targets_spec]),
            }
        )
        f.create_group("activations")
        for spec in self.layers_spec:
            _create_layer(f, spec, self.expected_rows)
            zeros = np.zeros(layer_channels(spec))
            _create_layer_state(f, spec, 0, _pack_state(0, 0, zeros, zeros, zeros))
        tg = f.create_group("targets")
        for spec in self.targets_spec:
            itemsize = spec.storage_dtype.itemsize  # a string's: its 16-byte reference to the heap
            rows = default_chunk_rows(spec.row_shape, itemsize, None, self.expected_rows)
            tg.create_dataset(spec.name, shape=(0, *spec.row_shape), dtype=spec.storage_dtype,
                              chunks=(rows, *spec.row_shape), maxshape=(None, *spec.row_shape))
        f.create_dataset("index", shape=(0,), dtype=np.int64, chunks=(_index_chunk(self.expected_rows),), maxshape=(None,))
        _create_skipped_and_outputs(f)
        f.flush()
        log.info("store %s created: %d layers, %d targets", self.path, len(self.layers_spec), len(self.targets_spec))

    def _take_rewrite(self, lock: "_WriterLock") -> None:
        """The lock of the file that _rewrite renamed over the store becomes this writer's."""
        self._lock.release()  # held on the replaced file
        self._lock = lock

    def _open_for_resume(self, metadata: Mapping[str, Any] | None) -> h5py.File:
        remove_stale_rewrite(self.path)
        if _recorded_rows(self.path) == 0:
            # nothing to keep, and a writer killed in its first commit can have left the objects made
            # for its first batch (the outputs' datasets) damaged: begun again, as a new file
            log.info("store %s has no committed rows: it is written again from the start", self.path)
            self._take_rewrite(_rewrite(self.path, "writing it again", lambda dst: self._fill(dst, metadata or {})))
            return h5py.File(self.path, "r+", libver=LIBVER, locking=False)
        store = open_store(self.path)  # validates the file first, with clear errors
        store.close()
        _raise_end_of_allocation(self.path)
        f = h5py.File(self.path, "r+", libver=LIBVER, locking=False)
        try:
            _finish_swap(f)
            recorded = json.loads(f.attrs["layers"])
            # only the fields the store's version recorded are compared (a later one, such as
            # unfolded, is not known of the rows written before)
            wanted = _jsonable([{k: v for k, v in s.__dict__.items() if i >= len(recorded) or k in recorded[i]}
                                for i, s in enumerate(self.layers_spec)])
            if recorded != wanted:  # (recorded is JSON as read)
                names = ([r["name"] for r in recorded], [w["name"] for w in wanted])
                if names[0] != names[1]:
                    what = f"recorded {names[0]}, asked {names[1]}"
                else:  # the same layers: the first that differs, and how
                    r, w = next((r, w) for r, w in zip(recorded, wanted) if r != w)
                    what = f"{r['name']}: " + ", ".join(f"{k} recorded {r.get(k)!r}, asked {w.get(k)!r}"
                                                        for k in sorted(set(r) | set(w)) if r.get(k) != w.get(k))
                raise StoreError(f"{self.path} was written with other layers than this writer's; {what}")
            if _jsonable(json.loads(f.attrs["targets"])) != _jsonable([s.__dict__ for s in self.targets_spec]):
                raise StoreError(f"{self.path} was written with other targets than this writer's")
            if metadata is not None and json.loads(f.attrs["run"]) != json.loads(json.dumps(metadata, sort_keys=True, default=str)):
                raise StoreError(f"{self.path} records another run description; resume it with the same options")
            lacking = _lacking_commit_places(f, self.layers_spec)
            if lacking:
                f.close()
                log.info("store %s: written by an earlier version, it lacks %s; written anew with them before the "
                         "resume", self.path, ", ".join(lacking))

                def build(dst: h5py.File) -> None:
                    _copy_store(self.path, dst, set()).close()
                    _add_commit_places(dst, self.layers_spec)
                    _add_tails(dst, self.layers_spec)

                self._take_rewrite(_rewrite(self.path, "bringing it to this version's layout", build))
                f = h5py.File(self.path, "r+", libver=LIBVER, locking=False)
            f.attrs.modify("status", fixed_text("incomplete", STATUS_LENGTH))
        except BaseException:
            f.close()
            raise
        log.info("store %s: resuming after %d committed rows", self.path, int(f.attrs["rows"]))
        return f

    def _restore_state(self) -> None:
        """Drops rows past the last commit and reloads the counters and statistics."""
        rows = self.committed
        for layer in self._layers.values():
            # the counters and statistics of exactly the committed rows
            layer.restore_state(committed_layer_state(self._file, layer.spec.name, layer.attrs, rows))
            layer.free_slot = 0 if layer.state[1, 0] == rows else 1
            if layer.spec.ragged:
                layer.tokens = int(layer.offsets[rows])
                layer.offsets.resize((rows + 1,))
            stored = layer.tokens if layer.spec.ragged else rows
            if layer.tail is not None:
                self._restore_tail(layer, stored)
            else:
                layer.values.resize((stored, *layer.spec.row_shape))
        for ds in self._targets.values():
            _forget_strings_after(ds, rows)
            ds.resize((rows, *ds.shape[1:]))
        self._index.resize((rows,))
        for ds in self._file["skipped"].values():
            _forget_strings_after(ds, self.skipped_committed)
            ds.resize((self.skipped_committed,))
        group = self._file["outputs"]
        keep = int(np.searchsorted(group["row_start"][:], rows))  # batches that start before `rows`
        for ds in group.values():
            ds.resize((keep,))
        self._file.flush()

    def _restore_tail(self, layer: _Layer, stored: int) -> None:
        """A compressed layer's dataset cut to its whole chunks (a chunk past them, written
        before a kill or by the final commit, goes unread), and its part-filled chunk's rows
        taken from the tail slot of the committed rows into the chunk buffer."""
        start = stored - stored % layer.values.chunks[0]
        layer.values.resize((start, *layer.spec.row_shape))
        buf = self._buffer(layer.values)
        if stored > start:
            buf.data[: stored - start] = layer.tail[1 - layer.free_slot, : stored - start]
            buf.start, buf.filled, buf.handed = start, stored - start, stored - start

    # ---- the caller's side ------------------------------------------------------------
    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuses a batch whose dense layers' rows do not fit the store (RowShapeError), before
        it is transferred; append() checks every batch again, dtypes and ragged layers too."""
        for name, shape in shapes.items():
            layer = self._layers[name]
            if not layer.spec.ragged:
                _check_shape(tuple(shape), layer, name, shape[0])

    def append(
        self,
        activations: Mapping[str, Any] | Any,
        targets: Mapping[str, Any] | None = None,
        index: Sequence[int] | np.ndarray | None = None,
        *,
        counts: Mapping[str, tuple[int, int]] | None = None,
        outputs: Mapping[str, float] | None = None,
        on_written: Callable[[], None] | None = None,
        skipped: Sequence[tuple[int, str]] = (),
        lengths: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Queues one batch. activations: {layer: array or CPU tensor (or Ragged)}, or a
        TransferRing slot (waited for and released by the writer thread). index: the source
        data set's index of each row. counts: {layer: (nonfinite, overflow)} from the transfer.
        outputs: per-batch scalars (the forward's losses), kept under /outputs with the batch's
        first row. skipped: (source index, error) of items left out since the last batch,
        committed with this batch's rows, under /skipped. lengths: {ragged layer: each sample's
        token count} where that layer's batch is padded, (batch, most tokens, ...): each sample's
        first tokens are stored (a nested tensor's or a packed sequence's samples, padded on the
        device).
        Blocks only while the queue is full."""
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"{self.path}: the writer is closed")
        if index is None:
            raise StoreError("append() needs the source index of every row (index=...)")
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        n = len(index)
        slot = None
        if hasattr(activations, "wait") and hasattr(activations, "release"):  # a TransferRing slot
            slot, activations = activations, {}
            names = list(slot.layout)
        else:
            names = list(activations)
        missing = [name for name in self._layers if name not in names]
        extra = [name for name in names if name not in self._layers]
        if missing or extra:
            raise StoreError(f"batch layers do not match the store: missing {missing}, unexpected {extra}")
        lengths = {name: [int(v) for v in tokens] for name, tokens in (lengths or {}).items()}
        if set(lengths) - set(names):
            raise StoreError(f"token counts for layers not in the batch: {sorted(set(lengths) - set(names))}")
        if slot is None:
            activations = {name: _batch_part(v, self._layers[name], name, lengths.get(name))
                           for name, v in activations.items()}
            parts = {name: (tuple(d.shape), d.dtype, tokens) for name, (d, tokens) in activations.items()}
        else:
            parts = {}
            for name, (_, shape, dtype) in slot.layout.items():
                shape, tokens = _split_tokens(tuple(shape), self._layers[name], name, lengths.get(name))
                parts[name] = (shape, _numpy_dtype_of(dtype), tokens)
        for name, (shape, dtype, tokens) in parts.items():
            if tokens is not None and len(tokens) != n:
                raise StoreError(f"layer {name!r}: {len(tokens)} samples, but index has {n}")
            _check_batch(shape, dtype, self._layers[name], name, n if tokens is None else int(sum(tokens)))
        targets = targets or {}
        if sorted(targets) != sorted(self._targets):
            raise StoreError(f"batch targets {sorted(targets)} do not match the store's {sorted(self._targets)}")
        targets = {name: _text_rows(name, t) if name in self._text_targets else _as_numpy(t) for name, t in targets.items()}
        for name, t in targets.items():
            expected = (n, *self._target_row_shapes[name])
            if t.shape != expected and t.shape[:1] == expected[:1] and t.ndim == len(expected):
                raise StoreError(f"target {name!r}: rows of shape {t.shape[1:]} in this batch, {expected[1:]} in the store; a "
                                 "target keeps one shape a row (a batch padded to its longest item has another length "
                                 "each time): pad it to one length (in --collate, or the tokenizer's max_length), or leave "
                                 "it out of --targets")
            if t.shape != expected:
                raise StoreError(f"target {name!r}: batch shape {t.shape}, expected {expected}")
        nbytes = sum(v[0].nbytes for v in activations.values()) if slot is None else slot.nbytes
        batch = _Batch(activations, targets, index, dict(counts or {}), on_written, slot, nbytes,
                       {str(k): float(v) for k, v in (outputs or {}).items()}, [(int(i), str(e)) for i, e in skipped],
                       lengths)
        while True:  # wake up now and then to notice a writer that died
            try:
                self._queue.put(batch, timeout=0.5)
                break
            except queue.Full:
                self._raise_if_failed()
        self._pump()

    def flush(self) -> None:
        """Waits until every queued batch is written and committed."""
        self._raise_if_failed()
        done = threading.Event()
        self._queue.put(("commit", done))
        self._pump()
        while not done.wait(0.5):
            self._raise_if_failed()
        self._raise_if_failed()

    def skip(self, items: Sequence[tuple[int, str]]) -> None:
        """Records (source index, error) of items left out after the last batch, at the next
        commit (items left out between batches go with the next batch: append(skipped=))."""
        self._raise_if_failed()
        self._queue.put(("skipped", [(int(i), str(e)) for i, e in items]))
        self._pump()

    def close(self, complete: bool = True) -> None:
        """Writes what is queued, commits it, and marks the store complete (or not)."""
        if self._closed:
            return
        self._closed = True
        while True:  # a writer that failed reads the queue no more, and it may be full
            try:
                self._queue.put((_STOP, complete), timeout=0.5)
                break
            except queue.Full:
                if self._error is not None:
                    break
        if self._thread is not None:
            self._thread.join()
        self._pump()
        if self._error is not None:
            self._drain()  # a batch queued as the writer failed: release its transfer slot
            self._raise_if_failed()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error or Ctrl-C, keep what was written (committed), but not "complete".
        try:
            self.close(complete=exc_type is None)
        except StoreError as close_error:
            if exc_type is None:
                raise
            if close_error.__cause__ is not None and close_error.__cause__ is getattr(exc, "__cause__", None):
                return  # the writer's failure that is already on its way up, logged when it happened
            log.exception("store %s: closing after an error also failed", self.path)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, StoreError):
                raise StoreWriteError(str(err)) from err
            raise StoreWriteError(f"writing {self.path} failed: {err}") from err

    # ---- the writer thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._handle(self._queue.get()):
                pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, never lost
            self._fail(exc)
        finally:
            self._shut()

    def _pump(self) -> None:
        """Without a writer thread: handles what is queued, here and now."""
        if self._thread is not None or self._file is None:
            return
        try:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if not self._handle(item):
                    self._shut()
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, never lost
            self._fail(exc)
            self._shut()
            self._raise_if_failed()

    def _handle(self, item: Any) -> bool:
        """Writes a batch, or commits; False after the last item."""
        if isinstance(item, tuple) and item[0] is _STOP:
            self._commit(final=bool(item[1]))
            return False
        if isinstance(item, tuple) and item[0] == "commit":
            self._commit()
            item[1].set()
            return True
        if isinstance(item, tuple) and item[0] == "skipped":
            self._skipped += item[1]
            return True
        self._write(item)
        if self.written - self.committed >= self.commit_rows or self._uncommitted_bytes >= self.commit_bytes:
            self._commit()
        return True

    def _fail(self, exc: BaseException) -> None:
        self._error = _describe_error(exc, self.path, self._last_nbytes)
        log.error("store %s: %s", self.path, self._error)
        self._drain()

    def _shut(self) -> None:
        if self._stats is not None:
            self._stats.shutdown(wait=True)
        try:
            self._file.close()
        except Exception as exc:  # noqa: BLE001 - the error that matters is already kept
            log.warning("store %s: close after the writer stopped: %s", self.path, exc)
        self._file = None
        self._lock.release()

    def _drain(self) -> None:
        """After a failure, empties the queue so that no producer stays blocked."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple) and item[0] == "commit":
                item[1].set()
            elif isinstance(item, _Batch) and item.slot is not None:
                item.slot.release()

    def _write(self, batch: _Batch) -> None:
        try:
            if batch.slot is not None:  # checked in append() against the slot's layout
                parts = {name: _batch_part(v, self._layers[name], name, batch.lengths.get(name))
                         for name, v in batch.slot.wait().items()}
                counts = batch.slot.counts()
            else:
                parts, counts = batch.activations, batch.counts
            n = len(batch.index)
            self._last_nbytes = batch.nbytes
            start = self.written
            self._ensure_room(parts, batch, start)
            # The statistics of a large batch are summed while HDF5 writes it (the sums and
            # HDF5 both run outside the GIL), each stats thread a share of the layers; the
            # writer waits for them before the next batch, so that every layer adds its batches
            # in order. A small batch's are summed here after the writes: handing them to
            # threads cost more in GIL handovers than the sums themselves.
            shares = min(self._stats_threads, batch.nbytes // _STATS_SHARE_BYTES)
            stats = [self._stats.submit(self._update_stats, share, counts) for share in _shares(parts, shares)]
            for name, (data, lengths) in parts.items():
                layer = self._layers[name]
                if not layer.spec.ragged:
                    self._write_rows(layer.values, start, data)
                else:
                    first = layer.tokens
                    self._write_rows(layer.values, first, data)
                    ends = first + np.cumsum(np.asarray(lengths, np.int64))
                    self._write_rows(layer.offsets, start + 1, ends)
                    layer.tokens = int(ends[-1]) if n else first
            for name, t in batch.targets.items():
                self._write_rows(self._targets[name], start, t.astype(self._targets[name].dtype, copy=False))
            self._write_rows(self._index, start, batch.index)
            outputs = {**batch.outputs, **batch.slot.scalars()} if batch.slot is not None else batch.outputs
            if outputs:
                self._write_outputs(start, outputs)
            if stats:
                concurrent.futures.wait(stats)  # all, even when one failed: they hold the batch's views
                for done in stats:
                    done.result()
            else:
                self._update_stats(parts, counts)
            self.written = start + n
            self._uncommitted_bytes += batch.nbytes
            self._skipped += batch.skipped
        finally:
            if batch.slot is not None:
                batch.slot.release()
            if batch.on_written is not None:
                batch.on_written()

    def _write_outputs(self, start: int, outputs: Mapping[str, float]) -> None:
        """One value per batch in /outputs/<name>, aligned with /outputs/row_start (NaN where a
        batch lacks that output), through the chunk buffers like every other dataset."""
        n = self._output_rows
        self._write_rows(self._outputs["row_start"], n, np.array([start], np.int64))
        for name in [k for k in outputs if k not in self._outputs]:  # first seen now: NaN for the batches before
            self._outputs[name] = self._new_output(name, n)
        for name, ds in self._outputs.items():
            if name != "row_start":
                self._write_rows(ds, n, np.array([outputs.get(name, np.nan)], np.float64))
        self._output_rows = n + 1

    def _new_output(self, name: str, batches: int) -> h5py.Dataset:
        """/outputs/<name>, NaN for the batches before, made whole on disk before /outputs links
        it: HDF5 writes the superblock, which says how far the file's allocations reach, last in a
        flush, so a link or chunk index written in the same flush as what it points at can be
        read, after a kill, as pointing past the file's end ("addr overflow")."""
        ds = self._file["outputs"].create_dataset(
            None, shape=(batches,), dtype=np.float64, chunks=(OUTPUT_CHUNK,), maxshape=(None,), fillvalue=np.nan)
        first = batches - batches % OUTPUT_CHUNK
        if first < batches:  # the chunk that committed batches share with the next ones: allocated now
            ds[first:batches] = np.nan
        self._file.flush()
        self._file["outputs"][name] = ds
        return ds

    def _update_stats(self, parts: Mapping[str, Any], counts: Mapping[str, tuple[int, int]]) -> None:
        # No torch.set_num_threads here: it also sets MKL's thread count, which is global, so
        # the model's matrix products ran on one thread while the statistics ran (its linear
        # and attention ops took 25% longer). The sums run in marstore._C's one-thread kernel.
        for name, (data, _) in parts.items():
            self._layers[name].add_stats(data, counts.get(name))

    def _ensure_room(self, parts: Mapping[str, Any], batch: _Batch, start: int) -> None:
        """Refuses a batch that the disk or the file size limit cannot take, before HDF5 fails
        half-way (a failed HDF5 write leaves a file handle that cannot be closed cleanly)."""

        def new_chunk_bytes(ds: h5py.Dataset, first: int, rows: int) -> int:
            buf = self._buffer(ds)
            return (-(-(first + rows) // buf.rows) - -(-first // buf.rows)) * buf.chunk_bytes

        n = len(batch.index)
        need = _METADATA_SLACK + new_chunk_bytes(self._index, start, n)
        for name, (data, lengths) in parts.items():
            layer = self._layers[name]
            if lengths is None:
                need += new_chunk_bytes(layer.values, start, n)
            else:
                need += new_chunk_bytes(layer.values, layer.tokens, len(data)) + new_chunk_bytes(layer.offsets, start + 1, n)
        need += sum(new_chunk_bytes(self._targets[name], start, n) for name in batch.targets)
        room, what = room_left(self.path, self._file.id.get_filesize())
        if need > room:
            raise StoreError(
                f"writing {self.path} stopped: the next batch needs up to {need} more bytes, but only {room} "
                f"are {what}. The rows committed before stay readable; resume with resume=True once there is room"
            )

    def _write_rows(self, ds: h5py.Dataset, start: int, data: np.ndarray) -> None:
        """Hands rows [start, start + len(data)) to the dataset's chunk buffer; a chunk goes to
        HDF5 once it is full, or at the next commit (_flush_chunks) if it is not."""
        if not len(data):
            return
        buf = self._buffer(ds)
        data = np.ascontiguousarray(data, dtype=buf.data.dtype)
        pos, stop = start, start + len(data)
        while pos < stop:
            first = pos - pos % buf.rows
            if pos == first and stop - pos >= buf.rows and buf.start != first:
                self._write_chunk(buf, first, data[pos - start : pos - start + buf.rows])  # whole, no copy
                pos += buf.rows
                continue
            if buf.start != first:  # a new chunk; rows before pos in it are on disk already (a resume)
                buf.start, buf.handed = first, pos - first
                if pos > first:
                    buf.data[: pos - first] = (ds.asstr() if buf.text else ds)[first:pos]
            n = min(stop - pos, first + buf.rows - pos)
            buf.data[pos - first : pos - first + n] = data[pos - start : pos - start + n]
            buf.filled = pos - first + n
            pos += n
            if buf.filled == buf.rows:
                self._write_chunk(buf, buf.start, buf.data)
                buf.start, buf.filled, buf.handed = None, 0, 0

    def _buffer(self, ds: h5py.Dataset) -> _ChunkBuffer:
        buf = self._chunks.get(id(ds))
        if buf is None:
            buf = self._chunks[id(ds)] = _ChunkBuffer(ds)
        return buf

    def _write_chunk(self, buf: _ChunkBuffer, first: int, rows: np.ndarray) -> None:
        """Writes rows from first on: a whole chunk, or the part-filled start of one."""
        stop = first + len(rows)
        if stop > buf.length:
            buf.ds.resize((stop, *buf.row_shape))
            buf.length = stop
        if len(rows) == buf.rows and self.direct_chunks and buf.direct:
            # h5py's selection machinery costs more than the copy; a whole chunk goes as raw bytes
            buf.ds.id.write_direct_chunk((first,) + (0,) * len(buf.row_shape), rows)
        elif buf.text:
            # Only the strings not handed over yet: a string rewritten gets a new object in the
            # global heap, which a flush can write after the chunk that points at it, so a kill in
            # between would leave committed rows pointing at nothing.
            done = buf.handed if buf.start == first else 0
            buf.ds[first + done : stop] = rows[done:]
        else:
            buf.ds[first:stop] = rows
        if buf.start == first:
            buf.handed = len(rows)

    def _flush_chunks(self, final: bool = False) -> None:
        """Writes the part-filled chunks (a commit needs every row on disk); they stay in their
        buffers and are written whole once full. A compressed layer's go to its tail slot, and
        into the dataset only at the final commit (LAYER_TAIL)."""
        for buf in self._chunks.values():
            if not buf.filled:
                continue
            layer = self._tailed.get(id(buf.ds))
            if layer is not None:
                layer.tail[layer.free_slot, : buf.filled] = buf.data[: buf.filled]
                if not final:
                    continue
            self._write_chunk(buf, buf.start, buf.data[: buf.filled])

    def _commit(self, final: bool = False) -> None:
        """Flushes the rows written so far, then advances the committed count and flushes again:
        a crash between the two leaves the old count, whose rows are all on disk. Every value
        a commit writes has its place in the file from the start (module notes at ATTR_CHANNELS_MAX)."""
        self._flush_chunks(final)
        skipped = self._write_skipped()
        # Each layer's counters and statistics at the new row count go into its free state slot
        # before the count moves: HDF5 writes a flush's attributes one by one, so a kill during
        # the second flush can leave a layer's "mean" new and the root's "rows" old, and a resume
        # that reloaded "mean" counted the rows after the old count twice. The slot of the rows
        # committed before stays as it is until the new count is on disk.
        for layer in self._layers.values():
            layer.settle_stats()
            layer.state[layer.free_slot] = np.concatenate([[self.written], layer.packed_state()])
        self._file.attrs.modify("skipped_at", np.array([[self.committed, self.skipped_committed], [self.written, skipped]], np.int64))
        self._file.flush()
        self._sync()
        for layer in self._layers.values():
            for key, value in layer.summary().items():
                layer.attrs.modify(key, value)
        self._file.attrs.modify("rows", self.written)
        self._file.attrs.modify("skipped", skipped)
        self._file.attrs.modify("committed_at", fixed_text(utc_now(), TIME_LENGTH))
        self._file.flush()
        self._sync()
        if final:  # flushed on its own after the count: a kill cannot leave "complete" over an old count
            self._file.attrs.modify("status", fixed_text("complete", STATUS_LENGTH))
            self._file.flush()
            self._sync()
        for layer in self._layers.values():
            layer.free_slot ^= 1
        self.committed = self.written
        self.skipped_committed = skipped
        self._uncommitted_bytes = 0
        log.debug("store %s: committed %d rows%s", self.path, self.committed, " (complete)" if final else "")

    def _write_skipped(self) -> int:
        """Appends the items left out since the last commit to /skipped (source index, error);
        the root attribute 'skipped', set with 'rows', says how many of them are committed."""
        total = self.skipped_committed + len(self._skipped)
        if self._skipped:
            group = self._file["skipped"]
            for name, values in (("index", np.array([i for i, _ in self._skipped], np.int64)),
                                 ("error", np.array([e for _, e in self._skipped], dtype=object))):
                group[name].resize((total,))
                group[name][self.skipped_committed :] = values
            self._skipped = []
        return total

    def _sync(self) -> None:
        if self.fsync:
            os.fsync(self._file.id.get_vfd_handle())


_STATS_DIRECT_SIZE = 1 << 16  # a layer's batch of fewer values waits to be summed with the next ones
_STATS_PENDING_SIZE = 1 << 18  # ... until they hold this many (512 KiB of float16 a layer at most)
_STATS_SHARE_BYTES = 8 << 20  # the least a stats thread is given: below it, the writer sums inline


# stored dtype: (its bits as an unsigned integer, the exponent mask); the exponent all ones is
# an infinity or a NaN (counted on the bits: np.isfinite converts float16 to float32 first, 3x slower)
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.uint16): (np.uint16, 0x7F80),
                  np.dtype(np.float32): (np.uint32, 0x7F800000)}


def _count_nonfinite(x: np.ndarray) -> int:
    bits, mask = _EXPONENT_BITS[x.dtype]
    return int(np.count_nonzero((x.view(bits) & mask) == mask))


def _stats_threads() -> int:
    """Threads for a background writer's statistics: a quarter of the cores, 1 to 4. On an
    H100 machine (16 cores) full-token batches of 302 MB went through the writer at 1024 MB/s
    with their sums on one thread that held the GIL, and at 1517 with 4 threads that released
    it; a quarter leaves the other threads their cores."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _shares(parts: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """parts split into at most n dicts of about equal bytes (largest first, each to the lightest
    share); none for n = 0."""
    shares: list[dict[str, Any]] = [{} for _ in range(min(n, len(parts)))]
    if not shares:
        return shares
    loads = [0] * len(shares)
    for name, part in sorted(parts.items(), key=lambda kv: -kv[1][0].nbytes):
        i = loads.index(min(loads))
        shares[i][name] = part
        loads[i] += part[0].nbytes
    return shares


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _split_tokens(shape: tuple[int, ...], layer: "_Layer", name: str,
                  lengths: list[int] | None = None) -> tuple[tuple[int, ...], list[int] | None]:
    """A batch's shape as stored, and each sample's token count for a ragged layer: a ragged
    layer's (batch, tokens, ...) batch holds that many token rows a sample, or, padded, the
    first `lengths[i]` of sample i's."""
    if not layer.spec.ragged:
        if lengths is not None:
            raise StoreError(f"layer {name!r} is dense; per-sample token counts need a layer made with ragged=True")
        return shape, None
    if len(shape) < 2:
        raise StoreError(f"ragged layer {name!r}: a batch needs shape (batch, tokens, ...) or Ragged, got {shape}")
    if lengths is None:
        return (shape[0] * shape[1], *shape[2:]), [shape[1]] * shape[0]
    if len(lengths) != shape[0] or any(not 0 <= n <= shape[1] for n in lengths):
        raise StoreError(f"ragged layer {name!r}: token counts {lengths} for a padded batch of shape {shape} (one count a "
                         f"sample, 0 to {shape[1]})")
    return (sum(lengths), *shape[2:]), lengths


def _batch_part(value: Any, layer: "_Layer", name: str,
                lengths: list[int] | None = None) -> tuple[np.ndarray, list[int] | None]:
    """(rows as numpy, per-sample token counts for a ragged layer, else None)."""
    if isinstance(value, Ragged):
        if not layer.spec.ragged:
            raise StoreError(f"layer {name!r} is dense; a Ragged batch needs a layer made with ragged=True")
        return _as_numpy(value.values), [int(v) for v in value.lengths]
    data = _as_numpy(value)
    shape, lengths = _split_tokens(tuple(data.shape), layer, name, lengths)
    if lengths is None or sum(lengths) == data.shape[0] * data.shape[1]:
        return data.reshape(shape), lengths
    kept = np.arange(data.shape[1]) < np.asarray(lengths)[:, None]  # each sample's first tokens, in order
    return data[kept], lengths


def _numpy_dtype_of(torch_dtype: Any) -> np.dtype:
    name = str(torch_dtype).replace("torch.", "")
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def _check_shape(shape: tuple[int, ...], layer: _Layer, name: str, rows: int) -> None:
    expected = (rows, *layer.spec.row_shape)
    if tuple(shape) != expected:
        varies = not layer.spec.ragged and len(shape) == len(expected) >= 2 and shape[0] == rows and shape[2:] == expected[2:]
        hint = "; if this layer's token count varies between batches, store it with ragged=True" if varies else ""
        raise RowShapeError(f"layer {name!r}: batch shape {tuple(shape)}, expected {expected}{hint}", name,
                            tuple(shape[1:]), layer.spec.row_shape, varies)


def _check_batch(shape: tuple[int, ...], dtype: np.dtype, layer: _Layer, name: str, rows: int) -> None:
    _check_shape(shape, layer, name, rows)
    if np.dtype(dtype) != layer.np_dtype:
        raise StoreError(f"layer {name!r}: batch dtype {np.dtype(dtype)}, the store keeps {layer.spec.dtype}; "
                         "convert it in the transfer (TransferRing dtype=...)")


def _describe_error(exc: BaseException, path: str, nbytes: int) -> BaseException:
    """A one-line StoreError for a failed write (HDF5's own messages span lines)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, (OSError, RuntimeError)):
        text = " ".join(str(exc).split())
        return StoreError(f"writing {path} failed while storing a batch of {nbytes} bytes: {text}. "
                          "The rows committed before stay readable; resume with resume=True once fixed")
    return exc


def rows_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of two target arrays of one shape: whether every value is equal (NaN equal
    to NaN): two stores' targets for samples matched by source index."""
    same = (a == b) | ((a != a) & (b != b)) if a.dtype.kind == "f" and b.dtype.kind == "f" else a == b
    return np.asarray(same).reshape(len(a), -1).all(1)


def room_left(path: str, file_size: int) -> tuple[int, str]:
    """Bytes the file may still grow by, and what limits it: free space or the file size limit."""
    stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
    room, what = stat.f_bavail * stat.f_frsize, "free on its filesystem"
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and soft - file_size < room:
        room, what = soft - file_size, f"left under the file size limit of {soft} bytes"
    return room, what


# ---- reading ----------------------------------------------------------------------------


@dataclass
class LayerInfo:
    name: str
    layout: str  # dense or ragged
    row_shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    compression: str | None
    attrs: Mapping[str, Any] = field(default_factory=dict)


class _LayerAttrs(collections.abc.Mapping):
    """A layer's HDF5 attributes, each read when first asked for (arrays as lists, numpy's scalars
    as Python's, which JSON takes), while the store is open: a store of thousands of layers opens
    in a fraction of the time it took to read a dozen attributes of each, and a probe opens it
    once per layer. The counters and statistics are those of the store's first `rows` rows
    (committed_layer_state), where it records them apart."""

    def __init__(self, obj: h5py.HLObject, name: str, rows: int):
        self._obj, self._attrs, self._name, self._read, self._rows = obj, obj.attrs, name, {}, rows
        self._committed: dict[str, Any] | None = None

    def _committed_state(self) -> dict[str, Any]:
        if self._committed is None:
            self._committed = committed_layer_state(self._obj.file, self._name, self._attrs, self._rows) or {}
        return self._committed

    def __getitem__(self, key: str) -> Any:
        if key not in self._read:
            if not self._obj:  # closed: h5py's KeyError would read as an absent attribute (.get's default)
                raise StoreError(f"attribute {key!r} of {self._obj!r} asked for after its store was closed")
            committed = self._committed_state() if key in COMMITTED_LAYER_KEYS else {}
            value = committed[key] if key in committed else self._attrs[key]
            self._read[key] = value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
        return self._read[key]

    def _keys(self) -> list[str]:
        # a wide layer's per-channel statistics are in its state slots only (ATTR_CHANNELS_MAX)
        return list(dict.fromkeys([*self._attrs, *self._committed_state()]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: object) -> bool:
        return key in self._read or key in self._attrs or (key in COMMITTED_LAYER_KEYS and key in self._committed_state())


class _WriterLock:
    """An exclusive flock on the store while a writer has it open, so that a second writer (an
    extraction resumed while the first still runs) is refused instead of interleaving its rows
    with the first's. Readers (HDF5 locking off) read on; the lock goes with a killed process.
    HDF5's own lock cannot serve: a reader in the writer's process must open the file with the
    writer's locking flags, and marstore's readers open theirs with locking off."""

    def __init__(self, path: str, create: bool):
        try:  # creating: O_EXCL reserves the name, so another process's new store is never truncated
            self._fd: int | None = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o644)
        except FileExistsError:
            raise StoreError(f"{path} was created by another process just now; choose another path") from None
        except OSError as exc:  # no such folder, no permission, a read-only filesystem
            raise StoreError(f"{path}: cannot {'create' if create else 'open'} it for writing ({exc.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise StoreError(_BEING_WRITTEN.format(path)) from None
        except OSError as exc:  # a filesystem without locks (some network ones)
            log.warning("store %s: this filesystem gives no file locks (%s); a second writer would not be refused",
                        path, exc)

    @property
    def fd(self) -> int | None:
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_BEING_WRITTEN = ("{} is being written by another process (it holds the file's lock); let that extraction finish, "
                  "or stop it and resume")


def _being_written(path: str | os.PathLike) -> bool:
    """Whether a writer holds the store's lock (see _WriterLock): a shared lock, taken and
    dropped at once, fails while a writer holds its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this filesystem: nothing to ask
        pass
    finally:
        os.close(fd)
    return False


def check_not_being_written(path: str | os.PathLike) -> None:
    """Refuses a store whose writer still runs, before a resume spends minutes loading a model."""
    if _being_written(path):
        raise StoreError(_BEING_WRITTEN.format(os.fspath(path)))


CONVERTING = "converting"  # the root group where convert_to_ragged builds a layer before it replaces the dense one


def as_ragged(spec: Mapping[str, Any]) -> dict | None:
    """A layer's record (LayerSpec's fields) as the record of the same layer stored ragged: its
    rows (tokens, ...) become token rows; None where its rows have no token axis to vary."""
    if spec.get("ragged"):
        return dict(spec)
    if len(spec["row_shape"]) < 2 or spec.get("channel_axis") is not None:
        return None
    return {**spec, "row_shape": list(spec["row_shape"][1:]), "ragged": True, "channel_axis": None}


def _finish_swap(f: h5py.File) -> None:
    """Completes a rewrite to ragged that was cut inside its swap (convert_to_ragged): the
    ragged group, complete before the dense dataset goes, is moved in where the dense one has
    gone, and the layer's record follows where the group has moved in. What else /converting
    holds was cut while it was built, its dense layer intact: removed."""
    recorded = json.loads(f.attrs["layers"])
    changed = False
    for n, spec in enumerate(recorded):
        name = spec["name"]
        if name not in f["activations"] and CONVERTING in f and name in f[CONVERTING]:
            f.move(f"{CONVERTING}/{name}", f"activations/{name}")
        obj = f["activations"].get(name)
        if obj is not None and not spec.get("ragged") and obj.attrs.get("layout") == "ragged":
            recorded[n] = as_ragged(spec)
            changed = True
            log.warning("store %s: finished rewriting layer %s ragged, which a stopped process had left half done",
                        f.filename, name)
        if obj is not None:
            _drop_stale_tail(f, name)
    if CONVERTING in f:
        del f[CONVERTING]
    if changed:
        f.attrs["layers"] = json.dumps(recorded)
    f.flush()


def _drop_stale_tail(f: h5py.File, name: str) -> None:
    """Removes /layer_tail/<name> where its layer has been rewritten ragged: its slots hold
    chunks of the dense rows."""
    tails = f.get(LAYER_TAIL)
    if tails is not None and name in tails and tails[name].shape != (2, *_values(f["activations"][name]).chunks):
        del tails[name]


def _rewrite_path(path: str) -> str:
    """Where _rewrite builds a store's new file: beside it, on its filesystem (a rename)."""
    return path + ".rewrite"


def remove_stale_rewrite(path: str | os.PathLike) -> None:
    """Removes the new file that a rewrite killed before its rename left beside the store (the
    caller holds the store's lock, so no process is building it)."""
    stale = _rewrite_path(os.path.realpath(os.fspath(path)))
    if os.path.exists(stale):
        log.warning("store %s: removing %s, the unfinished rewrite of a stopped process (the store is as it was "
                    "before it)", path, stale)
        os.remove(stale)


def _rewrite(path: str, what: str, build: Callable[[h5py.File], None]) -> "_WriterLock":
    """Changes a store's structure safely against a kill: HDF5 writes a flush's metadata in
    address order, so a structure changed in place can be left half written (replayed: 9 of 109
    prefixes of an in-place rewrite to ragged did not open, 34 of 152 of an earlier version's
    store brought to this layout at its resume). build(new file) writes the changed store into a
    new file beside it (<path>.rewrite; _copy_store copies what stays), which is synced and renamed
    over the store in one step. A kill before that leaves the store as it was (and the
    new file, which the next rewrite or resume removes). The caller holds the store's lock and,
    where build reads the store, has raised its end of allocation; the lock of the new file, now
    the store's, is returned.
    what: the change, for the message when the disk cannot take the copy."""
    real = os.path.realpath(path)  # a link to the store stays one: its target is replaced
    new = _rewrite_path(real)
    need = os.path.getsize(path)
    room, where = room_left(new, 0)
    if need > room:
        raise StoreError(f"{path}: {what} writes a new copy of the store, about {human_bytes(need)}, but only "
                         f"{human_bytes(room)} are {where}; make room, then resume")
    lock = _WriterLock(new, create=True)
    try:
        with _new_store_file(new) as dst:
            build(dst)
        os.fsync(lock.fd)  # the rows reach the disk before the name does
        os.chmod(new, os.stat(path).st_mode & 0o7777)
        os.replace(new, real)
    except BaseException:
        lock.release()
        if os.path.exists(new):
            os.remove(new)
        raise
    _sync_directory(real)
    return lock


def _copy_store(path: str, dst: h5py.File, skip: set[str]) -> h5py.File:
    """Copies the store at path into dst, its root attributes and every object but those in skip
    (HDF5's object copy: chunks, filters, attributes); returns the store, open to read."""
    src = h5py.File(path, "r", locking=False)
    try:
        _copy_attrs(src, dst)
        _copy_except(src, dst, skip)
    except BaseException:
        src.close()
        raise
    return src


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    """Every attribute of src onto dst, each with its HDF5 type (fixed-length strings stay so:
    commits modify them in place)."""
    for key in src.attrs:
        dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)


def _copy_except(src: h5py.Group, dst: h5py.Group, skip: set[str]) -> None:
    """Copies src's members into dst (HDF5's object copy: chunks, filters, attributes), leaving
    out the objects whose paths are in skip; the groups above them are made member by member."""
    for name, obj in src.items():
        path = obj.name.lstrip("/")
        if path in skip:
            continue
        if isinstance(obj, h5py.Group) and any(s.startswith(path + "/") for s in skip):
            group = dst.create_group(name)
            _copy_attrs(obj, group)
            _copy_except(obj, group, skip)
        else:
            src.copy(obj, dst, name)


def _write_ragged_copy(src: h5py.File, dst: h5py.File, name: str, spec: Mapping[str, Any], rows: int,
                       block_bytes: int) -> None:
    """Layer `name`'s committed dense rows (rows, tokens, ...) as a ragged layer in dst, each row
    its tokens, with the dense layer's attributes (counters, statistics) and where it was
    rewritten, laid out as a writer leaves it after a commit at `rows`: a compressed layer's
    dataset holds its whole chunks, and the tail slot of that commit the rest (unless complete)."""
    dense = committed_values(src, name, rows)
    tokens, token_shape = spec["row_shape"][0], tuple(spec["row_shape"][1:])
    _create_layer(dst, LayerSpec(**as_ragged(spec)), None)
    group = dst["activations"][name]
    group.attrs.update({k: v for k, v in src["activations"][name].attrs.items() if k not in ("layout", "channel_axis")})
    group.attrs["rewritten_at_row"] = rows  # provenance: the rows before it were stored dense
    group["offsets"].resize((rows + 1,))
    group["offsets"][:] = np.arange(rows + 1, dtype=np.int64) * tokens
    values = group["values"]
    start, stored = _stored_rows(group, rows)
    if values.compression is None or text_attr(dst.attrs["status"]) == "complete":
        start = stored
    values.resize((start, *token_shape))
    rest = np.empty((stored - start, *token_shape), values.dtype)  # under a chunk: the tail slot's rows
    step = max(1, block_bytes // max(1, dense.dtype.itemsize * math.prod(spec["row_shape"])))
    for first in range(0, rows, step):
        block = dense[first : min(rows, first + step)].reshape(-1, *token_shape)
        a, b = first * tokens, first * tokens + len(block)
        if a < start:
            values[a : min(b, start)] = block[: min(b, start) - a]
        if b > start:
            rest[max(a, start) - start : b - start] = block[max(a, start) - a :]
    if len(rest):
        dst[LAYER_TAIL][name][_committed_slot(dst, name, rows), : len(rest)] = rest


def _sync_directory(path: str) -> None:
    """Syncs the folder that holds path, so that a rename into it survives a power cut."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_to_ragged(path: str | os.PathLike, names: Sequence[str], run: Mapping[str, Any] | None = None,
                      block_bytes: int = 64 << 20) -> None:
    """Rewrites dense layers of a store as ragged, so that a resumed extraction can append rows
    of other token counts: each committed row (tokens, ...) becomes its tokens' rows. Rows past
    the last commit are dropped (a resume drops them too); counters and statistics are kept.
    run: the run description to record in place of the old (the resumed run's options). The
    store is written anew (_rewrite: a kill leaves it as it was, or converted), so the rewrite
    needs room for a copy of it."""
    path = os.fspath(path)
    check_not_being_written(path)
    with open_store(path):  # validates it, with clear errors
        pass
    lock = _WriterLock(path, create=False)
    try:
        _raise_end_of_allocation(path)
        with h5py.File(path, "r", locking=False) as f:
            cut_in_swap = CONVERTING in f
        if cut_in_swap:  # an earlier version's rewrite, in place, was killed: finished as that version would
            with h5py.File(path, "r+", libver=LIBVER, locking=False) as f:
                _finish_swap(f)
        remove_stale_rewrite(path)
        with h5py.File(path, "r", locking=False) as f:
            if "parts" in f.attrs:
                raise StoreError(f"{path} joins the part files of several ranks; their layers cannot be rewritten: "
                                 "extract again with --ragged")
            rows = int(f.attrs["rows"])
            recorded = json.loads(f.attrs["layers"])
            specs = {spec["name"]: spec for spec in recorded}
            for name in names:
                spec = specs.get(name)
                if name not in f["activations"] or spec is None:
                    raise StoreError(f"{path} has no layer {name!r}; it has {sorted(specs)}")
                if as_ragged(spec) is None:
                    raise StoreError(f"{path}: layer {name!r} has rows of shape {tuple(spec['row_shape'])}, not (tokens, "
                                     "features...): it cannot be stored ragged")
            todo = [name for name in dict.fromkeys(names) if not specs[name].get("ragged")]
            recorded_run = json.loads(f.attrs["run"])
        if not todo and (run is None or recorded_run == json.loads(json.dumps(run, sort_keys=True, default=str))):
            return

        def build(dst: h5py.File) -> None:
            # the dense rows' tail goes with them; the ragged layer gets its own
            skip = {f"activations/{n}" for n in todo} | {f"{LAYER_TAIL}/{n}" for n in todo}
            with _copy_store(path, dst, skip) as src:
                for name in todo:
                    _write_ragged_copy(src, dst, name, specs[name], rows, block_bytes)
                    log.info("store %s: layer %s rewritten ragged (%d rows of %d tokens)", path, name, rows,
                             specs[name]["row_shape"][0])
                    specs[name] = as_ragged(specs[name])
            dst.attrs["layers"] = json.dumps([specs[s["name"]] for s in recorded])
            if run is not None:
                dst.attrs["run"] = json.dumps(run, sort_keys=True, default=str)

        _rewrite(path, f"rewriting {', '.join(todo)} ragged", build).release()
    finally:
        lock.release()


class Store:
    """A validated, read-only view of a store's committed rows (see open_store)."""

    def __init__(self, path: str, file: h5py.File):
        self.path = path
        self.file = file
        a = file.attrs
        self.status = text_attr(a["status"])
        self.rows = int(a["rows"])
        self.metadata = json.loads(a["run"])
        self.layers: dict[str, LayerInfo] = {}  # in the order the writer was given them (the model's)
        order = {spec["name"]: i for i, spec in enumerate(json.loads(a["layers"]))}
        group = file["activations"]
        for name in sorted(group, key=lambda n: order.get(n, len(order))):
            obj = group[name]
            attrs = _LayerAttrs(obj, name, self.rows)
            ragged = attrs.get("layout") == "ragged"
            values = obj["values"] if ragged else obj
            self.layers[name] = LayerInfo(
                name, "ragged" if ragged else "dense", tuple(values.shape[1:]), str(attrs["dtype"]),
                tuple(values.chunks or ()), values.compression, attrs,  # chunks () for a virtual dataset
            )
        self.targets = {name: ds for name, ds in file["targets"].items()}
        self._stored: dict[str, h5py.Dataset | TailedValues] = {}  # read() fills it
        # layers whose rewrite to ragged was cut inside its swap: missing until a writer finishes it
        self.cut_short = [n for n in order if n not in group and CONVERTING in file and n in file[CONVERTING]]
        if self.cut_short:
            log.warning("%s: the rewrite of %s to ragged was cut short, and the layer is missing until it is finished: "
                        "resume the extraction (--resume) to finish it", path, ", ".join(self.cut_short))

    def run_of(self, layer: str) -> dict:
        """The run (metadata) of the extraction that wrote a layer: the store's own, or in a
        joined store (marstore join) the joined store's that holds it."""
        for joined in self.metadata.get("joined", []):
            if any(spec.get("store_name") == layer for spec in joined["run"].get("layers", [])):
                return joined["run"]
        return self.metadata

    def _span(self, start: int, stop: int | None) -> tuple[int, int]:
        """[start, stop) as a slice of the committed rows takes it (negative: from the last
        committed row, not from the end of a dataset that a writer has grown further)."""
        rows = range(self.rows)[start:stop]
        return rows.start, max(rows.start, rows.stop)

    def read(self, layer: str, start: int = 0, stop: int | None = None) -> np.ndarray | list[np.ndarray]:
        """Committed rows [start, stop) of a layer (a list of per-sample arrays if ragged)."""
        start, stop = self._span(start, stop)
        if layer not in self.layers:
            raise StoreError(f"{self.path} has no layer {layer!r}; it has {sorted(self.layers)}")
        if layer not in self._stored:  # a compressed layer's tail is read once
            self._stored[layer] = committed_values(self.file, layer, self.rows)
        stored = self._stored[layer]
        if self.layers[layer].layout == "dense":
            return stored[start:stop]
        offsets = self.file["activations"][layer]["offsets"][start : stop + 1]
        values = stored[offsets[0] : offsets[-1]] if len(offsets) else stored[0:0]
        return [values[a - offsets[0] : b - offsets[0]] for a, b in zip(offsets[:-1], offsets[1:])]

    def target(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        start, stop = self._span(start, stop)
        if name not in self.targets:
            raise StoreError(f"{self.path} has no target {name!r}; it has {sorted(self.targets)}")
        ds = self.targets[name]
        if not is_text(ds):
            return ds[start:stop]
        try:
            return ds.asstr()[start:stop]
        except OSError as exc:
            if "exceeds EOA" not in str(exc):
                raise
            # HDF5 grows the heap collection that holds the strings where it ends the file, and
            # writes the superblock, which says where the file ends, last in a flush; a killed
            # writer's store is read past that end (open_for_reading), a running writer's is not
            raise StoreError(f"{self.path}: the strings of target {name!r} lie past the end the file records, as its "
                             "writer leaves them while it flushes; open the store again") from None

    def index(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        start, stop = self._span(start, stop)
        return self.file["index"][start:stop]

    def token_counts(self, layer: str) -> np.ndarray:
        """The tokens each committed row of a ragged layer holds (its token rows: the offsets' steps)."""
        return np.diff(self.file["activations"][layer]["offsets"][: self.rows + 1])

    def outputs(self) -> dict[str, np.ndarray]:
        """The forward's per-batch outputs of the committed batches (row_start first, then each
        output in the forward's order; NaN where a batch lacked one)."""
        # none, or only row_start (the forward gave none); or no row committed, where the outputs'
        # datasets, made in the first commit, can be damaged by a kill in its flush (none is read)
        if len(self.file.get("outputs", ())) < 2 or not self.rows:
            return {}
        group = self.file["outputs"]
        batches = int(np.searchsorted(group["row_start"][:], self.rows))  # batches that start before rows
        return {name: ds[:batches] for name, ds in group.items()}

    def skipped(self) -> list[tuple[int, str]]:
        """(source index, error) of each committed item that the data set failed to give and the
        extraction left out (--skip-failed), in the order met."""
        count = committed_skipped(self.file.attrs, self.rows)
        if not count:
            return []
        group = self.file["skipped"]
        return list(zip(group["index"][:count].tolist(), group["error"].asstr()[:count].tolist()))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(path: str | os.PathLike, retries: int = 20) -> Store:
    """Opens and validates a store for reading (also while a writer is running).

    A file that a writer is flushing can look inconsistent for a moment (it is written in plain
    mode, not SWMR), so a failed open is retried `retries` times, 50 ms apart, before the
    error is reported."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise StoreError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        with open(path, "rb") as f:
            head = f.read(4)
        # a zip archive or a pickle: what torch.save writes (the store readers get handed checkpoints)
        what = ("it looks like a checkpoint, as torch.save writes: `marstore extract --checkpoint` reads those and writes "
                "the .h5 store") if head.startswith((b"PK\x03\x04", b"\x80")) else "is it truncated, or another format?"
        raise StoreError(f"{path} is not an HDF5 file, so not a marstore store ({what})")
    for attempt in range(retries + 1):
        try:
            return _open_once(path)
        except StoreError as exc:
            if not getattr(exc, "transient", False) or attempt == retries:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _open_once(path: str) -> Store:
    try:
        f = open_for_reading(path)
    except OSError as exc:
        err = StoreError(f"{path} is an HDF5 file that cannot be opened; it is truncated or corrupted ({exc})")
        err.transient = True
        raise err from None
    try:
        _validate(path, f)
        return Store(path, f)
    except StoreError:
        f.close()
        raise
    except (OSError, KeyError, ValueError, RuntimeError, AttributeError, TypeError) as exc:
        f.close()
        err = StoreError(f"{path} is truncated or corrupted: {' '.join(str(exc).split())}")
        err.transient = True
        raise err from None


def _validate(path: str, f: h5py.File) -> None:
    a = f.attrs
    if a.get("format") != FORMAT:
        raise StoreError(f"{path} is an HDF5 file but not a marstore store (no format='marstore' attribute)")
    version = int(a.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(f"{path} has format version {version}, newer than this marstore reads "
                         f"({FORMAT_VERSION}); upgrade marstore")
    if version < 1:
        raise StoreError(f"{path} has an invalid format version {version}")
    for key in ("status", "rows", "run", "layers"):
        if key not in a:
            raise StoreError(f"{path} lacks the root attribute {key!r}; it is corrupted")
    rows = int(a["rows"])
    for group in ("activations", "targets"):
        if group not in f:
            raise StoreError(f"{path} lacks the group /{group}; it is corrupted")
    if "index" not in f or f["index"].shape[0] < rows:
        raise StoreError(f"{path} says {rows} rows are committed but /index holds "
                         f"{f['index'].shape[0] if 'index' in f else 'none'}")
    for group in ("activations", "targets"):
        broken = [name for name, obj in f[group].items() if obj is None]  # linked, but its object cannot be opened
        if broken:
            err = StoreError(f"{path}: {group} {', '.join(map(repr, broken))} cannot be opened (the file's HDF5 objects "
                             "are damaged: a writer killed while it flushed?)")
            err.transient = True  # also what a reader beside a flushing writer can meet for a moment
            raise err
    for name, obj in f["activations"].items():
        if obj.attrs.get("layout") == "ragged":
            offsets = obj["offsets"]
            if offsets.shape[0] < rows + 1:
                raise StoreError(f"{path}: layer {name!r} has {offsets.shape[0] - 1} ragged rows, but {rows} are committed")
            stored = committed_values(f, name, rows).shape[0]
            if int(offsets[rows]) > stored:
                raise StoreError(f"{path}: layer {name!r} offsets point past its {stored} token rows")
        elif (held := committed_values(f, name, rows).shape[0]) < rows:
            raise StoreError(f"{path}: layer {name!r} holds {held} rows, but {rows} are committed")
    for name, ds in f["targets"].items():
        if ds.shape[0] < rows:
            raise StoreError(f"{path}: target {name!r} holds {ds.shape[0]} rows, but {rows} are committed")
    if "parts" in a:
        _check_parts(path, f)


def _check_parts(path: str, f: h5py.File) -> None:
    """A virtual store (scale-out) reads its rows from part files beside it; HDF5 gives fill
    values (zeros), not an error, for rows whose file is missing, so they are checked here."""
    folder = os.path.dirname(os.path.abspath(path))
    sources: set[str] = set()

    def collect(_: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            sources.update(s.file_name for s in obj.virtual_sources())

    f.visititems(collect)
    missing = sorted(name for name in sources if name != "." and not os.path.exists(os.path.join(folder, name)))
    if missing:
        raise StoreError(f"{path} is a virtual store over part files that must sit beside it, and {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not in {folder}; move the parts with it, or make one "
                         "self-contained file with `marstore merge` where they are")
