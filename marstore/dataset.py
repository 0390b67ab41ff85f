"""Store -> torch: a Dataset that reopens the store in every process, a chunk-aware sampler, and
TokenStream, a layer's tokens shuffled through a bounded buffer (for sparse autoencoders).

    ds = ActivationDataset("acts.h5", layers=["encoder_blocks.3"], targets=["nactions"])
    splits = ds.split((0.8, 0.1, 0.1), seed=0)               # {"train": idx, "val": idx, "test": idx}
    sampler = ChunkShuffleSampler(splits["train"], ds.chunk_rows, seed=0)
    loader = DataLoader(ds, batch_size=256, sampler=sampler, num_workers=2, collate_fn=collate_rows)

The HDF5 file is opened lazily, in whichever process reads first, and reopened after a fork:
a handle inherited across fork is never used (FIELD-NOTES §4). Only committed rows are seen;
refresh() picks up rows that a running writer has committed since.
"""

from __future__ import annotations

import collections.abc
import json
import logging
import math
import os
from typing import Any, Collection, Iterator, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from marstore.hooks import HookError, did_you_mean, match_modules, nearest_names
from marstore.store import (STORED_DTYPES, Store, StoreError, committed_values, default_chunk_rows, is_text, open_for_reading,
                            open_store)

log = logging.getLogger(__name__)

READ_REDUCTIONS = (None, "mean", "first", "last")
READ_BLOCK_BYTES = 64 << 20  # of stored rows, read_all's unit of reading
GAP_BYTES = 256 << 10  # rows skipped between two runs read as one


def _runs(sorted_rows: np.ndarray, row_bytes: int = 1) -> list[tuple[int, int]]:
    """[start, stop) runs of rows, one HDF5 read each. Neighbouring runs whose gap holds at most
    GAP_BYTES are read as one (a read costs about as much as that many bytes of page cache), and
    the caller picks its rows out: rows spread over a chunk take one read, chunks far apart one
    each, however many rows they hold."""
    if not len(sorted_rows):
        return []
    gaps = np.diff(sorted_rows) - 1  # rows between neighbours
    breaks = np.flatnonzero(gaps * max(row_bytes, 1) > GAP_BYTES) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sorted_rows)]])
    return [(int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1) for a, b in zip(starts, stops)]


def split_sizes(count: int, fractions: Sequence[float]) -> list[int]:
    """How many of count rows (or groups) each split of ActivationDataset.split gets: each
    fraction's share rounded, the last split taking the rest."""
    sizes = [int(round(f * count)) for f in fractions[:-1]]
    return [*sizes, count - sum(sizes)]


def layers_of(store: Store, patterns: str | Sequence[str]) -> list[str]:
    """The store's layers that the patterns name (exact names, globs as in --layers, or re:REGEX;
    one, or several), in the order the patterns give, each pattern's in the store's order; each once."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise StoreError(f"no layers asked of {store.path}; it has {list(store.layers)}")
    names: list[str] = []
    stored = list(store.layers)
    for pattern in patterns:
        try:
            found = match_modules(pattern, stored)
        except HookError as exc:  # a pattern that is no regular expression
            raise StoreError(str(exc)) from None
        if not found:
            raise StoreError(f"{store.path} has no layer {pattern!r}; {did_you_mean(pattern, stored)}"
                             f"nearest: {nearest_names(pattern, stored)}")
        names += [n for n in found if n not in names]
    return names


def in_forward_order(store: Store, names: Sequence[str]) -> list[str]:
    """The layers in the order the model made them in the extraction's forward (the store's
    forward_order), as a depth axis wants them, whatever order --layers gave; layers it does not
    record (a store of an earlier marstore, or joined from another extraction) follow, as given."""
    position = {name: i for i, name in enumerate(store.metadata.get("forward_order") or ())}
    return sorted(names, key=lambda name: position.get(name, len(position)))


def _sides(condition: str) -> tuple[str, str, str]:
    """TARGET=VALUE or TARGET!=VALUE as (TARGET, '=' or '!=', VALUE); the operator empty where absent."""
    return condition.partition("!=") if "!=" in condition else condition.partition("=")


def parse_condition(store: Store, condition: str) -> tuple[str, bool, Any]:
    """--where's TARGET=VALUE or TARGET!=VALUE as (target, negated, value): VALUE as text for a
    text target, as a number (or true, false) of the target's type otherwise."""
    name, op, text = _sides(condition)
    if not name or not op:
        raise StoreError(f"--where {condition!r}: write TARGET=VALUE or TARGET!=VALUE")
    if name not in store.targets:
        raise StoreError(f"--where {condition}: {store.path} has no target {name!r}; it has {sorted(store.targets)}")
    value: Any = text
    if not is_text(store.targets[name]):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, (str, list, dict)) or value is None:
            raise StoreError(f"--where {condition}: target {name!r} holds numbers, and {text!r} is not one")
        dtype = np.dtype(store.targets[name].dtype)
        if dtype.kind == "f":  # 0.1 as the target's float32 holds it, as `marstore info` prints it
            value = dtype.type(value)
    return name, op == "!=", value


def condition_mask(column: np.ndarray, condition: str, negated: bool, value: Any, where: str) -> np.ndarray:
    """Which of column's values (a target's, one a row or one a token) meet a parsed condition; a
    value that none holds is refused with the values it does hold: a typo would select nothing,
    or everything. where: what holds them, for the message ('no row of acts.h5')."""
    match = column == value
    if not match.any():
        held = np.unique(column)
        shown = ", ".join(map(str, held[:12].tolist())) + (f" ... ({len(held)} values)" if len(held) > 12 else "")
        name, _, text = _sides(condition)
        raise StoreError(f"--where {condition}: {where} has {name} = {text}; it holds {shown}")
    return ~match if negated else match


def rows_where(store: Store, conditions: str | Sequence[str], rows: int | None = None) -> np.ndarray:
    """The committed rows (of the first `rows`) whose targets meet every condition, TARGET=VALUE
    or TARGET!=VALUE: the rows of one task, say, for a probe within it. VALUE is compared as text
    for a text target, as a number (or true, false) otherwise. A value that no row holds is
    refused with the values the target does hold: a typo would select nothing, or everything."""
    conditions = [conditions] if isinstance(conditions, str) else list(conditions)
    count = store.rows if rows is None else rows
    keep = np.ones(count, dtype=bool)
    for condition in conditions:
        name, negated, value = parse_condition(store, condition)
        column = store.target(name, 0, count)
        if column.ndim != 1:
            raise StoreError(f"--where {condition}: target {name!r} holds {column.shape[1:]} values a row; --where "
                             "compares a target of one value a row (or, for probe --tokens aligned, one a token)")
        keep &= condition_mask(column, condition, negated, value, f"no row of {store.path}")
    selected = np.flatnonzero(keep)
    if not len(selected):
        raise StoreError(f"--where {' '.join(conditions)}: no row of {store.path} meets them all")
    return selected


def flat_tokens(t: torch.Tensor, axis: int = 1, channel_axis: int | None = None) -> torch.Tensor:
    """Rows whose tokens start at axis (1 for a batch, 0 for one row) as (..., tokens, features).
    Every axis between the tokens' first and the features is a token axis, as extraction's
    reductions take them: UVA's z_proj (frames, tokens, D) has frames * tokens tokens, in
    row-major order; a convolution's (C, h, w), channel_axis 0, has h * w tokens of C features."""
    if channel_axis is not None:
        t = t.movedim(axis + channel_axis, -1)
    return t.flatten(axis, -2)


def row_tokens(row_shape: Sequence[int], channel_axis: int | None = None) -> tuple[int, int]:
    """(tokens, features) of a row of row_shape, as flat_tokens lays it out: 0 tokens for a row
    of features alone."""
    shape = list(row_shape)
    features = shape.pop(-1 if channel_axis is None else channel_axis)
    return (math.prod(shape) if shape else 0), features


def target_row_shape(store: Store, name: str) -> tuple[int, ...]:
    """The shape of one row of a target, or of a layer read as a target."""
    return tuple(store.targets[name].shape[1:] if name in store.targets else store.layers[name].row_shape)


def token_axes(shape: Sequence[int], tokens: int) -> int | None:
    """How many leading axes of a target's row shape hold a row's `tokens` tokens, laid out as
    they are ((tokens, ...), or the tokens' own axes: UVA's mask (4, 256) for z_proj's (4, 256,
    D)); None where they do not: the target is not one value (or row of values) a token."""
    return next((k for k in range(1, len(shape) + 1) if math.prod(shape[:k]) == tokens), None) if tokens else None


def reduce_read_tokens(t: torch.Tensor, reduction: str | None, axis: int = 1, channel_axis: int | None = None) -> torch.Tensor:
    """A read-time token reduction (READ_REDUCTIONS) of rows whose tokens start at axis, laid out
    as flat_tokens takes them. A row without tokens is returned as it is."""
    if not reduction or t.dim() < axis + 2:
        return t
    t = flat_tokens(t, axis, channel_axis)
    if reduction == "mean":  # summed in float32 without a float32 copy of the tokens
        return t.mean(axis, dtype=torch.float32)
    return t.select(axis, 0 if reduction == "first" else -1)


class ActivationDataset(Dataset):
    """Rows of one or more layers and targets of a store, as float32 tensors (see module doc).
    layers are names or patterns, as the probe's --layer takes them ("encoder_blocks.*").

    An item is a dict {name: tensor}, or a tuple in the order layers + targets when
    as_tuple=True; a text target's value is a str, and a batch's a list of them. reduction
    ('mean', 'first', 'last') reduces the token axis of layers stored with tokens at read time;
    ragged layers give one (tokens, ...) tensor per row, padded by collate_rows (or reduced)."""

    def __init__(self, path: str | os.PathLike, layers: str | Sequence[str], targets: str | Sequence[str] = (), *,
                 rows: Sequence[int] | None = None, as_tuple: bool = False, dtype: torch.dtype = torch.float32,
                 reduction: str | None = None, preload: bool = False):
        self.path = os.fspath(path)
        self.target_names = [targets] if isinstance(targets, str) else list(targets)  # one name, not its letters
        self.as_tuple, self.dtype = as_tuple, dtype
        if reduction not in READ_REDUCTIONS:
            raise StoreError(f"read-time reduction {reduction!r}: use one of {READ_REDUCTIONS[1:]}")
        self.reduction = reduction
        with open_store(self.path) as store:  # validate once, in the creating process
            self.layer_names = layers_of(store, layers)
            # a target may be a layer stored dense (what a method returned: MAR's mask), read as stored
            self.layer_targets = {n for n in self.target_names if n not in store.targets and n in store.layers}
            for name in self.target_names:
                if name not in store.targets and name not in self.layer_targets:
                    raise StoreError(f"{self.path} has no target {name!r}; it has {sorted(store.targets)}")
                if name in self.layer_targets and store.layers[name].layout == "ragged":
                    raise StoreError(f"{self.path}: the layer {name!r} is ragged (its token count varies); a layer read "
                                     "as a target needs one shape a row")
            self.committed = store.rows
            self.ragged = {n for n in self.layer_names if store.layers[n].layout == "ragged"}
            self.token_shapes = {n: tuple(store.layers[n].row_shape) for n in self.ragged}  # of one token
            self.stats = {n: (np.asarray(store.layers[n].attrs.get("mean")), np.asarray(store.layers[n].attrs.get("std")))
                          for n in self.layer_names}
            first = store.layers[self.layer_names[0]]
            # a virtual store (scale-out) has no chunks of its own: use the size the parts use
            self.chunk_rows = int(first.chunks[0]) if first.chunks else default_chunk_rows(
                first.row_shape, np.dtype(STORED_DTYPES[first.dtype]).itemsize, None)
            self.bfloat16 = {n for n in [*self.layer_names, *self.layer_targets]
                             if store.layers[n].attrs.get("encoding") == "bfloat16-bits"}
            self.channel_axes = {n: store.layers[n].attrs["channel_axis"] for n in self.layer_names
                                 if "channel_axis" in store.layers[n].attrs}
            # read as str, batched as lists
            self.text = {n for n in self.target_names if n not in self.layer_targets and is_text(store.targets[n])}
        self.rows = np.arange(self.committed) if rows is None else self._row_positions(rows)
        self.follows_writer = rows is None  # refresh() extends only a view of every row
        if len(self.rows) and self.rows.min() < 0:
            raise StoreError(f"row selection holds the negative row {int(self.rows.min())}; rows count from 0 "
                             f"to {self.committed - 1}, the committed rows of {self.path}")
        if len(self.rows) and self.rows.max() >= self.committed:
            raise StoreError(f"row selection reaches past the {self.committed} committed rows of {self.path} "
                             f"(row {int(self.rows.max())})")
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._objects: dict = {}
        self._memory: dict[str, np.ndarray] | None = None
        if preload:
            self.preload()

    def _row_positions(self, rows: Any) -> np.ndarray:
        """Row numbers as int64: a boolean mask over the committed rows gives the rows it marks,
        as in numpy; floats are refused (casting would truncate 2.7 to row 2 without a word)."""
        given = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
        if given.dtype == bool:
            if given.shape != (self.committed,):
                raise StoreError(f"a boolean row mask of shape {given.shape} for {self.path}, whose committed rows are "
                                 f"{self.committed}; give one value for each row")
            return np.flatnonzero(given)
        if given.size and not np.issubdtype(given.dtype, np.integer):
            raise StoreError(f"rows of dtype {given.dtype}: give row numbers as integers, or a boolean mask")
        if given.ndim > 1:
            raise StoreError(f"rows of shape {given.shape}: give a flat list of row numbers")
        return given.astype(np.int64).reshape(-1)

    # ---- opening, per process -------------------------------------------------------------
    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # after a fork the parent's handle must not be touched, not even closed
            self._file = open_for_reading(self.path)
            self._pid = os.getpid()
            self._objects = {}
        return self._file

    def _object(self, kind: str, name: str):
        """The h5py dataset or group, looked up once per open (a lookup costs as much as a read)."""
        f = self._handle()
        key = (kind, name)
        if key not in self._objects:
            obj = f[kind][name]
            if kind == "targets":
                obj = obj.asstr() if name in self.text else obj
            else:  # a compressed layer of a store not complete reads its last rows from their tail
                values = committed_values(f, name, self.committed)
                obj = {"values": values, "offsets": obj["offsets"]} if name in self.ragged else values
            self._objects[key] = obj
        return self._objects[key]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"], state["_objects"] = None, None, {}  # spawn: the child opens its own
        return state

    def refresh(self) -> int:
        """Re-reads the committed count (a writer may still be running); returns it. A view of
        every row (rows=None) grows with it; a chosen selection or a subset stays as it is."""
        self.close()
        with open_store(self.path) as store:
            grew = store.rows > self.committed
            self.committed = store.rows
        if grew and self.follows_writer:
            self.rows = np.arange(self.committed)
            if self._memory is not None:  # preloaded: the new rows too
                self.preload()
        return self.committed

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    # ---- reading --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, rows: Sequence[int]) -> "ActivationDataset":
        """The same dataset restricted to some of its positions (e.g. a split)."""
        new = ActivationDataset.__new__(ActivationDataset)
        new.__dict__.update(self.__getstate__())
        new.rows = self.rows[np.asarray(rows, dtype=np.int64)]
        new.follows_writer = False
        return new

    def _read(self, name: str, kind: str, sorted_rows: np.ndarray) -> list[np.ndarray] | np.ndarray:
        """The rows sorted_rows (increasing, each once) of one layer or target."""
        if self._memory is not None:
            return self._memory[f"{kind}/{name}"][np.searchsorted(self._memory["rows"], sorted_rows)]
        if kind == "targets" or name not in self.ragged:
            ds = self._object(kind, name)
            runs = _runs(sorted_rows, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
            if not runs:
                return ds[0:0]
            if len(runs) == 1 or ds.dtype.kind not in "fiu":
                parts = [ds[a:b] for a, b in runs]
                data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            else:  # each run read into its place: no second copy of a buffer of many runs
                data = np.empty((sum(b - a for a, b in runs), *ds.shape[1:]), dtype=ds.dtype)
                at = 0
                for a, b in runs:
                    ds.read_direct(data, np.s_[a:b], np.s_[at : at + b - a])
                    at += b - a
            span = np.concatenate([np.arange(a, b) for a, b in runs])
            return data if len(span) == len(sorted_rows) else data[np.searchsorted(span, sorted_rows)]
        obj = self._object(kind, name)
        stored = obj["values"]
        runs = _runs(sorted_rows, stored.size * stored.dtype.itemsize // max(1, self.committed))  # a row's mean bytes
        out = []
        for a, b in runs:
            offsets = obj["offsets"][a : b + 1]
            values = obj["values"][offsets[0] : offsets[-1]]
            wanted = sorted_rows[(sorted_rows >= a) & (sorted_rows < b)] - a
            out += [values[offsets[i] - offsets[0] : offsets[i + 1] - offsets[0]] for i in wanted]
        return out

    def _to_tensor(self, name: str, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        if name in self.bfloat16:
            t = t.view(torch.int16).view(torch.bfloat16)
        axis = 0 if name in self.ragged else 1  # the token axis: of one ragged row, or of a dense batch
        return reduce_read_tokens(t, self.reduction, axis, self.channel_axes.get(name)).to(self.dtype)

    def _kind(self, target: str) -> str:
        """Where a target's rows lie: a layer read as a target lies among the activations."""
        return "activations" if target in self.layer_targets else "targets"

    def __getitems__(self, positions: Sequence[int]) -> "RowBatch":
        """Many items with one HDF5 read per run of consecutive rows (DataLoader calls this).
        The result is a sequence of items; collate_rows turns it into a batch without copies."""
        # each row read once, in order, even when asked for twice (a sampler with replacement)
        sorted_rows, back = np.unique(self.rows[np.asarray(positions, dtype=np.int64)], return_inverse=True)
        in_order = np.array_equal(back, np.arange(len(sorted_rows)))  # rows asked in order, each once: no copy
        columns: dict[str, Any] = {}
        for name in self.layer_names:
            data = self._read(name, "activations", sorted_rows)
            if name in self.ragged:
                rows = [self._to_tensor(name, data[i]) for i in back]
                if self.reduction:  # a row each, all alike now
                    rows = torch.stack(rows) if rows else torch.empty(0, *self.token_shapes[name], dtype=self.dtype)
                columns[name] = rows
            else:
                columns[name] = self._to_tensor(name, data if in_order else data[back])
        for name in self.target_names:
            data = self._read(name, self._kind(name), sorted_rows)
            data = data if in_order else data[back]
            columns[name] = data if name in self.text else torch.from_numpy(np.ascontiguousarray(data))
            if name in self.layer_targets:  # as stored, in float32: never reduced
                bits = name in self.bfloat16
                columns[name] = (columns[name].view(torch.int16).view(torch.bfloat16) if bits else columns[name]).float()
        return RowBatch(columns, self.layer_names + self.target_names, len(positions), self.as_tuple)

    def __getitem__(self, position: int):
        return self.__getitems__([position])[0]

    def read_all(self, positions: Sequence[int] | None = None,
                 block_bytes: int = READ_BLOCK_BYTES) -> dict[str, torch.Tensor | np.ndarray]:
        """{name: tensor of every selected row} for dense layers and targets (a text target: an
        object array of str). Read in blocks of about block_bytes of stored rows, in row order,
        each block reduced before the next is read: the token means of a layer stored whole
        (gigabytes) take the memory of the means."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions, dtype=np.int64)
        if self.ragged and not self.reduction:
            raise StoreError(f"read_all needs dense rows; {sorted(self.ragged)} are ragged: give reduction=")
        block = max(1, block_bytes // max(1, self.row_bytes()))
        if len(positions) <= block:
            return dict(self.__getitems__(positions).columns)
        order = np.argsort(self.rows[positions], kind="stable")
        parts = [self.__getitems__(positions[order[i : i + block]]).columns for i in range(0, len(order), block)]
        back = torch.from_numpy(np.argsort(order, kind="stable"))  # from row order to the order asked
        return {name: np.concatenate([part[name] for part in parts])[back.numpy()] if name in self.text
                else torch.cat([part[name] for part in parts])[back] for name in parts[0]}

    def row_bytes(self) -> int:
        """Stored bytes of one row of the selected layers and targets (a ragged layer's mean)."""
        total = 0
        for kind, names in (("activations", self.layer_names), ("targets", self.target_names)):
            for name in names:
                obj = self._object(self._kind(name) if kind == "targets" else kind, name)
                if kind == "activations" and name in self.ragged:
                    values = obj["values"]
                    total += values.size * values.dtype.itemsize // max(1, self.committed)
                else:
                    total += int(np.prod(obj.shape[1:])) * obj.dtype.itemsize
        return total

    def preload(self, max_bytes: int | None = None) -> int:
        """Reads the selected rows into memory (when they fit); returns and logs the bytes taken."""
        if self.ragged:
            raise StoreError(f"preload keeps dense rows only; {sorted(self.ragged)} are ragged")
        self._memory = None  # read from the file, also when preloading again
        sorted_rows = np.unique(self.rows)
        objects = [self._object("activations", n) for n in self.layer_names] + [self._object(self._kind(n), n) for n in self.target_names]
        need = sum(int(np.prod(o.shape[1:])) * o.dtype.itemsize for o in objects)
        need *= len(sorted_rows)
        limit = max_bytes if max_bytes is not None else available_memory() // 2
        if need > limit:
            raise StoreError(f"preload needs {need / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB allowed; "
                             "read from disk instead (preload=False)")
        memory = {"rows": sorted_rows}
        for name in self.layer_names:
            memory[f"activations/{name}"] = self._read(name, "activations", sorted_rows)
        for name in self.target_names:
            memory[f"{self._kind(name)}/{name}"] = self._read(name, self._kind(name), sorted_rows)
        self._memory = memory
        log.info("preloaded %d rows of %s: %.1f MiB in memory", len(sorted_rows), self.path, need / 2**20)
        return need

    # ---- splits ---------------------------------------------------------------------------
    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, group: str | None = None) -> dict[str, np.ndarray]:
        """Deterministic positions for train/val/test (three fractions) or train/val (two); by
        row, or keeping each value of the target `group` (an episode id, say) within one split."""
        if len(fractions) not in (2, 3) or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
            raise StoreError(f"split fractions {tuple(fractions)} must be two (train, val) or three (train, val, test) "
                             "non-negative numbers summing to 1")
        rng = np.random.default_rng(seed)
        if group is None:
            units = rng.permutation(len(self))
        else:
            if group not in self._handle()["targets"]:
                raise StoreError(f"group {group!r} is not a target of {self.path}; its targets are "
                                 f"{sorted(self._handle()['targets'])}")
            stored, back = np.unique(self.rows, return_inverse=True)
            keys = self._read(group, "targets", stored)[back]
            units = rng.permutation(np.unique(keys))
        parts = np.split(units, np.cumsum(split_sizes(len(units), fractions))[:-1])
        if group is not None:
            parts = [np.nonzero(np.isin(keys, g))[0] for g in parts]
        return {name: np.sort(p) for name, p in zip(("train", "val", "test"), parts)}


class RowBatch(collections.abc.Sequence):
    """The rows that __getitems__ read, kept as batched columns; indexing gives one item."""

    def __init__(self, columns: dict[str, Any], names: list[str], size: int, as_tuple: bool):
        self.columns, self.names, self.size, self.as_tuple = columns, names, size, as_tuple

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not -self.size <= i < self.size:
            raise IndexError(i)
        item = {n: self.columns[n][i] for n in self.names}
        return tuple(item[n] for n in self.names) if self.as_tuple else item


def collate_rows(batch: Any) -> Any:
    """collate_fn for DataLoader(ActivationDataset): the columns that were read, as they are (a
    dict, or a tuple with as_tuple). Ragged layers are padded as collate_padded does, with
    their `<name>.mask` in every batch; with as_tuple the masks follow the named columns, in
    the order of their layers."""
    if not isinstance(batch, RowBatch):
        return torch.utils.data.default_collate(batch)
    ragged = [n for n in batch.names if isinstance(batch.columns[n], list)]
    columns = {n: c.tolist() if isinstance(c, np.ndarray) else c for n, c in batch.columns.items()}  # text: list of str
    for name in ragged:
        columns[name], columns[f"{name}.mask"] = _pad(batch.columns[name])
    if batch.as_tuple:
        return tuple(columns[n] for n in batch.names + [f"{n}.mask" for n in ragged])
    return columns


def available_memory() -> int:
    """Bytes of memory available: Linux's MemAvailable, else free pages, else a guess, said."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        log.warning("available memory unknown here (no /proc/meminfo, no sysconf): taken as 8 GiB; pass max_bytes to preload")
        return 8 << 30


def collate_padded(items: list[dict], ragged: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Stacks the items' values. Ragged (tokens, ...) rows are padded to the longest in the batch,
    with `<name>.mask` (True = real). ragged names them, so that every batch has their masks,
    also one whose rows happen to be alike in length (those of one extraction batch are); by
    default a value is taken as ragged where its rows differ in shape."""
    out = {}
    for name in items[0]:
        values = [it[name] for it in items]
        if isinstance(values[0], str):  # a text target, batched as default_collate does
            out[name] = values
            continue
        pad = any(v.shape != values[0].shape for v in values) if ragged is None else name in ragged
        if pad:
            out[name], out[f"{name}.mask"] = _pad(values)
        else:
            out[name] = torch.stack(values)
    return out


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(v.shape[0] for v in rows)
    padded = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, v in enumerate(rows):
        padded[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    return padded, mask


class ChunkShuffleSampler(Sampler[int]):
    """Shuffles the order of chunks and the rows within each chunk, so that shuffled training
    reads whole chunks; every position exactly once per epoch. With num_replicas > 1 each rank
    takes every num_replicas-th chunk (DistributedSampler style, padded to equal lengths)."""

    def __init__(self, positions: int | Sequence[int], chunk_rows: int, seed: int = 0, *, num_replicas: int = 1,
                 rank: int = 0, rows: Sequence[int] | None = None):
        self.positions = np.arange(positions) if isinstance(positions, int) else np.asarray(positions, dtype=np.int64)
        # the chunk of a position is the chunk of its store row (rows: position -> store row)
        self.store_rows = self.positions if rows is None else np.asarray(rows, dtype=np.int64)[self.positions]
        if chunk_rows < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"chunk_rows={chunk_rows}, rank={rank}, num_replicas={num_replicas} are not valid")
        self.chunk_rows, self.seed, self.num_replicas, self.rank = chunk_rows, seed, num_replicas, rank
        self.epoch = 0
        chunk_of = self.store_rows // chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.nonzero(np.diff(chunk_of[order]))[0] + 1
        self.chunks = np.split(self.positions[order], bounds) if len(order) else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _mine(self) -> list[np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch))
        chunks = [self.chunks[i] for i in rng.permutation(len(self.chunks))]
        chunks = [rng.permutation(c) for c in chunks]
        if self.num_replicas == 1:
            return chunks
        flat = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        per_rank = -(-len(flat) // self.num_replicas)
        flat = np.resize(flat, per_rank * self.num_replicas)  # padded by repeating, like DistributedSampler
        return [flat[self.rank * per_rank : (self.rank + 1) * per_rank]]

    def __iter__(self) -> Iterator[int]:
        for chunk in self._mine():
            yield from chunk.tolist()

    def __len__(self) -> int:
        return sum(len(c) for c in self._mine()) if self.num_replicas > 1 else len(self.positions)


class TokenStream(IterableDataset):
    """The tokens of one layer, each an item, shuffled through a buffer of bounded size: what a
    sparse autoencoder trains on. A token is what extraction's reductions take for one (UVA's
    1024 tokens of a block, a convolution's positions; a ragged layer's tokens of each row).

        stream = TokenStream("acts.h5", "encoder_blocks.3", batch_size=4096, buffer_bytes=256 << 20)
        for batch in DataLoader(stream, batch_size=None):
            batch["encoder_blocks.3"]   # (4096, D) float32; batch["position"]: (4096, 2) store row, token

    Each epoch reads the selected rows whole, a buffer at a time (whole chunks, in a seeded
    order, about buffer_bytes of tokens as stored), shuffles the tokens of the buffer together
    and yields them in float32 batches; every token comes exactly once an epoch (a buffer's last
    tokens join the next buffer's). Memory: the buffer, and a batch at a time.
    Targets come with each token, its row's value; token_targets (a label for each token, such as
    the token ids) come with each token its own value. DataLoader workers (and num_replicas ranks)
    take every k-th buffer: reads stay whole chunks and disjoint. Peers shuffle with such a
    buffer too; here the store needs no shuffling pass of its own."""

    def __init__(self, path: str | os.PathLike, layer: str, targets: str | Sequence[str] = (), *, batch_size: int = 4096,
                 buffer_bytes: int = 256 << 20, rows: Sequence[int] | None = None, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0, token_targets: Sequence[str] = ()):
        targets = [targets] if isinstance(targets, str) else list(targets)
        self.rows_ds = ActivationDataset(path, [layer], list(dict.fromkeys([*targets, *token_targets])), rows=rows)
        self.layer, self.targets = self.rows_ds.layer_names[0], self.rows_ds.target_names
        if "position" in self.targets or self.layer == "position":
            raise StoreError("a target or layer named 'position' would clash with the stream's own (store row, token)")
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise StoreError(f"batch_size={batch_size}, rank={rank}, num_replicas={num_replicas} are not valid")
        with open_store(self.rows_ds.path) as store:
            info = store.layers[self.layer]
            # the buffer keeps the stored dtype (bfloat16 exactly); batches are made float32
            self.rows_ds.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[info.dtype]
            self.ragged = info.layout == "ragged"
            if self.ragged:
                self.counts = store.token_counts(self.layer)[self.rows_ds.rows]
                features = info.row_shape[-1]
            else:
                tokens, features = row_tokens(info.row_shape, self.rows_ds.channel_axes.get(self.layer))
                if not tokens:
                    raise StoreError(f"{self.layer} has rows of shape {info.row_shape}, with no tokens to stream; read its "
                                     "rows with ActivationDataset")
                self.counts = np.full(len(self.rows_ds.rows), tokens, dtype=np.int64)
            self.token_targets = {}  # {name: the shape of one token's value}
            for name in token_targets:
                shape = target_row_shape(store, name)
                axes = None if self.ragged else token_axes(shape, tokens)
                if axes is None:
                    raise StoreError(f"token target {name!r} holds {shape} a row, not a value for each of {self.layer}'s "
                                     f"{'tokens (a ragged layer has no fixed count)' if self.ragged else f'{tokens} tokens'}; "
                                     "give it as a target (each token gets its row's value)")
                self.token_targets[name] = shape[axes:]
        self.num_tokens = int(self.counts.sum())  # an epoch's, over every worker and rank
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        chunk = self.rows_ds.chunk_rows
        row_bytes = self.rows_ds.dtype.itemsize * features * max(1.0, float(self.counts.mean()) if len(self.counts) else 1.0)
        # whole chunks a buffer: about buffer_bytes of tokens as stored, one chunk at the least
        self.buffer_chunks = max(1, int(buffer_bytes // (row_bytes * chunk)))
        positions = np.arange(len(self.rows_ds.rows))
        chunk_of = self.rows_ds.rows // chunk
        order = np.argsort(chunk_of, kind="stable")
        self.chunks = np.split(positions[order], np.flatnonzero(np.diff(chunk_of[order])) + 1) if len(order) else []

    def set_epoch(self, epoch: int) -> None:
        """Another order each epoch (call before iterating; workers copy the stream when they start)."""
        self.epoch = epoch

    def _shard(self) -> tuple[int, int]:
        """(this process's shard, shards): one per DataLoader worker of each rank."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.num_replicas * workers

    def _buffers(self, shard: int, shards: int) -> list[np.ndarray]:
        """A shard's buffers of the epoch: positions (into rows) of whole chunks, in order."""
        rng = np.random.default_rng((self.seed, self.epoch))  # the same chunk order in every shard
        chunks = [self.chunks[i] for i in rng.permutation(len(self.chunks))]
        buffers = [np.sort(np.concatenate(chunks[i : i + self.buffer_chunks]))
                   for i in range(0, len(chunks), self.buffer_chunks)]
        return buffers[shard::shards]

    def _buffer(self, positions: np.ndarray) -> dict[str, Any]:
        """The rows at positions, read whole: their tokens (tokens, D) as stored, each token's row
        (into positions) and place in it, and the rows' targets and store rows."""
        read = self.rows_ds.__getitems__(positions).columns
        x = read[self.layer]
        if self.ragged:
            x = torch.cat(x) if x else torch.empty(0)
        else:  # every row's tokens, in order
            x = flat_tokens(x, 1, self.rows_ds.channel_axes.get(self.layer)).flatten(0, 1)
        counts = torch.from_numpy(self.counts[positions])
        row = torch.repeat_interleave(torch.arange(len(positions)), counts)
        token = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return {"x": x, "row": row, "token": token, "store_row": torch.from_numpy(self.rows_ds.rows[positions]),
                "targets": {name: read[name] for name in self.targets}}

    def _batch(self, buffer: dict[str, Any], picks: torch.Tensor) -> dict[str, Any]:
        """The tokens picks of a buffer, as a batch: float32 tokens, their rows' targets, positions."""
        row = buffer["row"][picks]
        batch: dict[str, Any] = {self.layer: buffer["x"][picks].float(),
                                 "position": torch.stack([buffer["store_row"][row], buffer["token"][picks]], 1)}
        for name, values in buffer["targets"].items():  # text as a list of str, as default_collate gives it
            at = (row,)
            if name in self.token_targets:  # each token its own value
                values, at = values.reshape(len(values), -1, *self.token_targets[name]), (row, buffer["token"][picks])
            batch[name] = values[tuple(a.numpy() for a in at)].tolist() if isinstance(values, np.ndarray) else values[at]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = self._shard()
        rng = np.random.default_rng((self.seed, self.epoch, shard))
        pending: dict[str, Any] | None = None  # the last buffer's remainder, fewer than batch_size tokens
        for positions in self._buffers(shard, shards):
            buffer = self._buffer(positions)
            order = torch.from_numpy(rng.permutation(len(buffer["row"])))
            start = 0
            if pending is not None:  # completed from this buffer first
                start = min(self.batch_size - len(pending["position"]), len(order))
                pending = {k: v + w if isinstance(v, list) else torch.cat([v, w])
                           for (k, v), w in zip(pending.items(), self._batch(buffer, order[:start]).values())}
                if len(pending["position"]) < self.batch_size:
                    continue
                yield pending
            full = start + (len(order) - start) // self.batch_size * self.batch_size
            for i in range(start, full, self.batch_size):
                yield self._batch(buffer, order[i : i + self.batch_size])
            pending = self._batch(buffer, order[full:]) if full < len(order) else None
            del buffer, order  # before the next buffer is read: one buffer in memory, not two
        if pending is not None and not self.drop_last:
            yield pending
