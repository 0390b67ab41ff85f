"""Extraction: checkpoint -> model -> hooks -> transfer ring -> store, in one pipeline.

    result = extract(ExtractOptions(checkpoint="ckpt.pt", model="marstore.models:video_mar",
                                    dataset="marstore.models:synthetic_video_actions",
                                    layers=["encoder_blocks.*"], out="acts.h5"))
    result = extract_from(model, dataset, "acts.h5", ["encoder_blocks.*"])   # objects in hand

The model runs under torch.inference_mode() in eval mode; each batch's hooked tensors go to a
TransferRing slot (asynchronous on a CUDA side stream), and the store's writer thread writes
the slot and releases it: the model waits only when every slot is in flight. Ctrl-C lets the
batch in hand finish, commits what is written and raises Interrupted with the command that
resumes; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import inspect
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shlex
import signal
import sys
import threading
import time
import traceback
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import collate, default_collate_fn_map
from tqdm import tqdm

from marstore import hooks, loading, scaleout
from marstore.errors import MarstoreError
from marstore.report import human_bytes, text_table
from marstore.store import (LayerSpec, RowShapeError, Store, StoreError, StoreWriter, TargetSpec, TEXT, check_not_being_written,
                            as_ragged, convert_to_ragged, open_store, room_left)
from marstore.transfer import SlotTooSmall, TransferRing, resolve_device

log = logging.getLogger(__name__)

STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class ExtractError(MarstoreError):
    """An extraction that cannot start or go on; the message says why and what to do."""


class RestartNeeded(ExtractError):
    """An extraction that a resume cannot continue: it must start again with other options."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM, as a batch scheduler sends before it kills a job) during extraction:
    committed rows are kept; `resume_command` continues; `signum` is the signal that stopped it."""

    def __init__(self, rows: int, resume_command: str, signum: int = signal.SIGINT):
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        super().__init__(f"{how} after {rows} committed rows; resume with: {resume_command}")
        self.rows, self.resume_command, self.signum = rows, resume_command, signum


@dataclass
class ExtractOptions:
    out: str
    model: str
    dataset: str
    layers: list[str]
    checkpoint: str | None = None
    forward: str | None = None
    collate: str | None = None  # MODULE:CALLABLE that batches a list of items (padding them), for torch's default
    config_key: str | None = None
    state_key: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset_args: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    trust_checkpoint: bool = False
    reduction: str = "none"
    layer_reductions: dict[str, str] = field(default_factory=dict)  # pattern -> its layers' reduction
    exclude_layers: list[str] = field(default_factory=list)  # patterns of modules to leave out of what layers select
    channels_first: bool | list[str] = False  # every layer's activations, or those of the layers these patterns name
    ragged: list[str] = field(default_factory=list)
    multi_fire: str = "error"
    allow_missing: bool = False
    stop_early: bool = False
    # a module's several rows a sample: True (sample-major), a layout ('(m=4 b t)'), or {pattern: layout}
    unfold_batch: bool | str | dict[str, str] = False
    train_mode: bool = False
    redirect_cuda: bool = False  # the model's own CUDA calls keep their tensors on the run's device (MAR on a CPU)
    autocast: str | None = None
    targets: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    num_samples: int | None = None
    sample_seed: int | None = None
    skip_failed: bool = False  # items the data set fails to give are left out and recorded, not fatal
    batch_size: int = 16
    workers: int = 0
    device: str | None = None
    seed: int = 0
    dtype: str = "float16"
    compression: str | None = None
    slots: int = 4
    commit_rows: int = 4096
    resume: bool = False
    dry_run: bool | int = False  # N (True: 2) batches through the model, each selected layer surveyed; nothing written
    progress: bool = True
    malloc_tuning: bool = True
    command: str | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "exclude_layers", "targets", "output_names", "ragged"):
            value = getattr(self, name)
            if isinstance(value, (str, tuple)):  # one name, from Python: not its characters; a tuple as the
                setattr(self, name, [value] if isinstance(value, str) else list(value))  # list a resume reads back
        self.reduction = _reduction_option(self.reduction)
        if isinstance(self.layer_reductions, Mapping):
            self.layer_reductions = {k: _reduction_option(v) for k, v in self.layer_reductions.items()}
        if isinstance(self.channels_first, (str, tuple)):
            self.channels_first = [self.channels_first] if isinstance(self.channels_first, str) else list(self.channels_first)
        _check_option_types(self)
        names = []
        for entry in self.targets:
            name, path = target_entry(entry)
            if not name or not path or "/" in name:
                raise ExtractError(f"--targets {entry!r}: give a dotted path into the batch (label, obs.agent_pos, 1), or "
                                   "NAME=PATH to store it under another name (one without '/')")
            names.append(name)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ExtractError(f"--targets names {', '.join(repeated)} more than once; give each once")
        if self.sample_seed is not None and self.num_samples is None:
            raise ExtractError(f"--sample-seed {self.sample_seed} draws --num-samples items at random; give --num-samples N")
        if not isinstance(self.dry_run, bool) and self.dry_run < 1:
            raise ExtractError(f"--dry-run {self.dry_run}: give the batches to survey, at least 1")
        for name, least in (("batch_size", 1), ("workers", 0), ("slots", 1), ("commit_rows", 1), ("num_samples", 1),
                            ("seed", 0)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ExtractError(f"--{name.replace('_', '-')} {value!r}: give an integer of at least {least}")

    def recorded(self) -> dict:
        """The options that must match for --resume (not where or how fast)."""
        d = asdict(self)
        for key in ("resume", "progress", "workers", "slots", "command", "device", "out", "malloc_tuning", "skip_failed",
                    "dry_run", "redirect_cuda"):
            d.pop(key)
        return d


@dataclass
class ExtractResult:
    rows: int
    seconds: float
    bytes: int
    file_bytes: int
    layers: dict[str, dict]
    load_report: dict
    path: str
    outputs: dict = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (source index, error) of the items left out


def _reduction_option(reduction: Any) -> Any:
    """Token indices as --reduction 0,5,9 writes them (a config file may give [0, 5, 9] or 5)."""
    if isinstance(reduction, (list, tuple)) and reduction and all(type(i) is int for i in reduction):
        return ",".join(map(str, reduction))
    return str(reduction) if type(reduction) is int else reduction


def _check_option_types(options: ExtractOptions) -> None:
    """Options from a --config file or from Python skip argparse: refuse a wrong type in one line
    (a quoted "no" would be a true flag, a seed of "abc" a traceback deep in the run)."""
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value, kind = getattr(options, f.name), hints[f.name]
        kinds = [a for a in typing.get_args(kind) if a is not type(None)] if typing.get_origin(kind) in (types.UnionType, typing.Union) \
            else [kind]
        if value is None and len(kinds) < len(typing.get_args(kind)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if typing.get_origin(kinds[0]) is dict:  # --config's name for it, and the flag that gives it
            flag = f.name
        if not any(_accepts(k, value) for k in kinds):
            raise ExtractError(f"{flag} {value!r}: give {' or '.join(_wanted(k, f.name) for k in kinds)}")


def _accepts(kind: Any, value: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if origin is dict:
        key_kind, value_kind = typing.get_args(kind)
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value) and \
            (value_kind is Any or all(isinstance(v, value_kind) for v in value.values()))
    # bool is an int to Python, but a flag of 1 or a seed of True is a mistake
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _wanted(kind: Any, name: str) -> str:
    origin = typing.get_origin(kind)
    if origin is list:
        return "a list of names"
    if origin is dict:
        key, value = {"layer_reductions": ("PATTERN", "REDUCTION"), "unfold_batch": ("PATTERN", "LAYOUT")}.get(name, ("KEY", "VALUE"))
        flag = name.replace("_", "-") if name == "unfold_batch" else name[:-1].replace("_", "-")
        return f"a mapping of {key}: {value} (--{flag} {key}={value} on the command line)"
    return {bool: "true or false", int: "an integer", str: "a string"}[kind]


def _arguments_taken(forward: Callable) -> tuple[frozenset[str] | None, int | None]:
    """The keyword arguments a forward takes (None: any, **kwargs) and the most positional ones
    it takes (None: any, *args); both None where it has no signature to read."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None, None
    kinds = {p.kind for p in params}
    keywords = frozenset(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                              inspect.Parameter.KEYWORD_ONLY))
    positions = sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params)
    return (None if inspect.Parameter.VAR_KEYWORD in kinds else keywords,
            None if inspect.Parameter.VAR_POSITIONAL in kinds else positions)


# the names of a forward's one argument that takes a dict batch whole: forward(self, batch)
BATCH_PARAMETERS = ("batch", "inputs", "data", "sample", "samples", "example", "examples", "features", "obs",
                    "observation", "observations")
BATCH_PARAMETER_ENDINGS = ("_dict", "_batch", "_inputs")


def _whole_batch_parameter(forward: Callable) -> str | None:
    """The one argument of a forward that takes a dict batch whole (forward(self, batch)): its only
    required one, named as batches are, with no **kwargs beside it; else None."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1 or any(p.kind in (p.VAR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty for p in params):
        return None
    name = required[0].name
    return name if name in BATCH_PARAMETERS or name.endswith(BATCH_PARAMETER_ENDINGS) else None


class DefaultForward:
    """The forward without --forward: a dict batch as keyword arguments, a tuple or list as
    positional ones, a tensor or a dataclass alone. Keys the model's forward does not take
    (labels and other targets beside the inputs) are left out, as Hugging Face's Trainer leaves
    out such columns, and so are a tuple's last values where the forward takes fewer (the label
    of torchvision's (image, label) items), with a warning that names them, once a run. A dict
    batch none of whose keys the forward names goes whole to a forward(self, batch)."""

    def __init__(self) -> None:
        self.said: set[tuple[type, tuple[str, ...]]] = set()
        # a model class's forward, read once, not a batch: its keywords, its most positional values, and
        # the one argument that takes a dict batch whole
        self.taken: dict[type, tuple[frozenset[str] | None, int | None, str | None]] = {}

    def __call__(self, model: torch.nn.Module, batch: Any) -> Any:
        if type(model) not in self.taken:
            self.taken[type(model)] = (*_arguments_taken(model.forward), _whole_batch_parameter(model.forward))
        taken, most, whole = self.taken[type(model)]
        if isinstance(batch, Mapping) and whole is not None and taken is not None and not taken & batch.keys():
            if (type(model), ()) not in self.said:
                self.said.add((type(model), ()))
                log.info("the default forward passes the batch whole to %s.forward%s, as %s: none of its keys (%s) names "
                         "an argument of it", type(model).__name__, inspect.signature(model.forward), whole,
                         ", ".join(map(str, batch)))
            args, kwargs = (batch,), {}
        elif isinstance(batch, Mapping):
            args, kwargs = (), dict(batch)
            left_out = tuple(sorted(k for k in kwargs if taken is not None and k not in taken))
            if left_out and taken & kwargs.keys():  # a batch of none of its keys is the user's to fix (below)
                self._say_once(model, left_out, "the default forward leaves out the batch's keys %s, which %s.forward%s "
                               "does not take (--targets stores them; --forward MODULE:CALLABLE passes the batch "
                               "otherwise)", list(left_out), type(model).__name__, inspect.signature(model.forward))
                kwargs = {k: v for k, v in kwargs.items() if k not in left_out}
        elif isinstance(batch, (tuple, list)):
            args, kwargs = tuple(batch), {}
            if most and most < len(args):  # a forward of no positional arguments is the user's to fix (below)
                left_out = tuple(str(i) for i in range(most, len(args)))
                self._say_once(model, left_out, "the default forward passes the first %d of the batch's %d values, as "
                               "many as %s.forward%s takes, and leaves out values %s (--targets %s stores them; --forward "
                               "MODULE:CALLABLE passes the batch otherwise)", most, len(args), type(model).__name__,
                               inspect.signature(model.forward), ", ".join(left_out), " ".join(left_out))
                args = args[:most]
        else:
            args, kwargs = (batch,), {}
        try:
            return model(*args, **kwargs)
        except TypeError as exc:
            # Only a batch that does not fit forward's signature is the user's to fix with --forward;
            # a TypeError from inside the forward keeps its traceback.
            try:
                signature = inspect.signature(model.forward)
                signature.bind(*args, **kwargs)
            except ValueError:  # no signature to check against
                raise exc from None
            except TypeError:
                given = f"keys {sorted(kwargs)}" if kwargs else f"{len(args)} positional value{'s' * (len(args) != 1)}"
                raise ExtractError(
                    f"the default forward calls the model with the batch's {given}, and {type(model).__name__}.forward"
                    f"{signature} rejects them ({exc}); give --forward MODULE:CALLABLE, called as fn(model, batch), "
                    "to choose what the model gets") from exc
            raise

    def _say_once(self, model: torch.nn.Module, left_out: tuple[str, ...], message: str, *args: Any) -> None:
        """A warning of what the forward leaves out, once a run for each model class and batch layout."""
        if (type(model), left_out) not in self.said:
            self.said.add((type(model), left_out))
            log.warning(message, *args)


default_forward = DefaultForward()  # what extract() calls without --forward (each run has its own)


def forward_scalars(out: Any, names: Sequence[str] = (), left_out: dict[str, str] | None = None) -> dict[str, Any]:
    """The forward's return as named scalars: a tensor is the loss; a tuple or list is
    (loss, parts...), nested tuples flattened (UVA returns (loss, video_loss, act_loss)); a
    dict keeps its keys ('/' made '.', which HDF5 would read as a group), and a namedtuple or a
    dataclass its field names, as a dict of them would. Non-scalar tensors and
    other values are left out, and described in left_out ({name: what it was, the first time}).
    names (--output-names) name a tensor's or a tuple's scalars in order, in place of loss,
    loss_1... One-element tensors stay tensors, where they are: reading a GPU loss would make the
    host wait for the forward."""
    named: dict[str, Any] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            named[name] = value.detach()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            named[name] = float(value)
        elif (fields := hooks.fields_of(value)) is not None:
            add(name, fields)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                key = str(k).replace("/", ".")
                add(f"{name}.{key}" if name else key, v)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                add(("loss" if i == 0 else f"loss_{i}") if not name else f"{name}_{i}", v)
        elif left_out is not None:
            what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else \
                ("None" if value is None else f"a {type(value).__name__}")
            left_out.setdefault(name or "the return value", what)

    # a bare scalar is the loss; anything else bare (logits, say) is not named as one
    scalar = (isinstance(out, torch.Tensor) and out.numel() == 1) or (isinstance(out, (int, float)) and not isinstance(out, bool))
    add("loss" if scalar else "", out)
    if not names:
        if "row_start" in named:
            raise ExtractError("the forward returned an output named row_start, which the store keeps for the "
                               "batches' first rows; rename it")
        return named
    if isinstance(out, Mapping) or hooks.fields_of(out) is not None:
        raise ExtractError(f"--output-names: the forward returned a {type(out).__name__}, whose keys ({', '.join(named)}) "
                           "name its values already; leave --output-names out")
    if len(names) != len(named):
        raise ExtractError(f"--output-names gives {len(names)} names ({' '.join(names)}) but the forward returned "
                           f"{len(named)} scalar values ({', '.join(named) or 'none'}); give one name for each")
    return dict(zip(names, named.values()))


def _check_output_names(names: Sequence[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    bad = [n for n in names if not n or "/" in n or n == "row_start"]
    if repeated or bad:
        why = f"{', '.join(repeated)} given twice" if repeated else \
            f"{bad[0]!r} cannot name an HDF5 dataset beside /outputs/row_start (no '/', not empty, not row_start)"
        raise ExtractError(f"--output-names {' '.join(names)}: {why}; give distinct plain names")


# A row's random draws depend on --seed and its source index alone, not on the rows before it:
# torch's, numpy's and Python's global generators are seeded before each item is read and
# before each batch's forward (MAR draws its masks from numpy's), so a second run, a resume, a
# dry run and any number of workers draw what one uninterrupted run does.
SEEDING = "per item and per batch, from the seed and the source index"
_ITEM, _BATCH = 0, 1


def seed_generators(seed: int, index: int, stream: int, device: torch.device | None = None) -> None:
    """Seeds torch's CPU generator and the device's, numpy's and Python's global generators from
    (seed, source index, stream): the same draws wherever it runs. (torch.manual_seed would visit
    every backend torch knows: 0.1 ms a call, where this takes 0.02.)"""
    derived = int(np.random.SeedSequence((seed, index, stream)).generate_state(1)[0])
    torch.random.default_generator.manual_seed(derived)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed_all(derived)
    elif device is not None and device.type != "cpu":
        torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)


class _Indexed(Dataset):
    """Yields (source index, item): the store records where every row came from."""

    def __init__(self, base: Dataset, indices: Sequence[int], seed: int):
        self.base, self.indices, self.seed = base, list(indices), seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        j = self.indices[i]
        seed_generators(self.seed, j, _ITEM)
        try:
            return j, self.base[j]
        except Exception as exc:  # noqa: BLE001 - handed to the loop, which raises it in one line or records it
            return j, _FailedItem(f"{type(exc).__name__}: {' '.join(str(exc).split())}", traceback.format_exc())


_END = object()  # an iterator's end, told from any item it can yield


class _Stream(IterableDataset):
    """The iterable data set's counterpart of _Indexed: reads its first `num_samples` items in
    order and yields (stream position, item) for the positions given (a range)."""

    def __init__(self, base: Any, positions: range, num_samples: int, seed: int):
        self.base, self.positions, self.num_samples, self.seed = base, positions, num_samples, seed

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        position = -1
        try:
            items = iter(self.base)
            for upcoming in range(self.num_samples):
                seed_generators(self.seed, upcoming, _ITEM)  # before the iterator makes the item
                item = next(items, _END)
                if item is _END:
                    break
                position = upcoming
                if position in self.positions:
                    yield position, item
        except Exception as exc:  # an iterator that raised is done: nothing after it can be read
            log.error("the data set's traceback:\n%s", traceback.format_exc().rstrip())
            raise ExtractError(f"the iterable data set failed on item {position + 1}: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())}; fix it (its traceback is logged above): an "
                               "iterator cannot go on past an error, so --skip-failed does not apply") from None
        if position + 1 < self.num_samples:
            log.warning("the data set ended after %d items, before --num-samples %d: the store holds fewer rows",
                        position + 1, self.num_samples)


def _check_dataset(dataset: Any, opts: "ExtractOptions", given: str) -> bool:
    """Refuses, before any item is read, a data set that cannot be extracted as asked; says
    whether it is map-style (else iterable)."""
    what = f"{given} {type(dataset).__name__}"
    if isinstance(dataset, DataLoader):  # its items are batches, and its sampler's order is not recorded
        raise ExtractError(f"{what}: give its data set (loader.dataset); marstore batches the items itself (--batch-size, "
                           "--workers) and records each sample's index")
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return True
    if not hasattr(dataset, "__iter__"):
        raise ExtractError(f"{what}: neither a map-style data set (__len__ and __getitem__) nor an iterable one (__iter__)")
    if opts.num_samples is None:
        raise ExtractError(f"{what}, an iterable data set with no length: pass --num-samples N to take its first N items")
    if opts.sample_seed is not None:
        raise ExtractError(f"{what}, an iterable data set: --sample-seed draws from a known length, so it needs a "
                           "map-style data set (__len__ and __getitem__); an iterable one gives its first --num-samples")
    if opts.workers:
        raise ExtractError(f"{what}, an iterable data set: it is read in order in this process, so --workers must be 0 "
                           "(each worker would read the whole stream)")
    return False


def _collate_none(batch: list, *, collate_fn_map: dict | None = None) -> None:
    # an optional field that is None (UVA's text_latents): None for the batch, as for one sample
    if any(x is not None for x in batch):
        raise TypeError("it is None in some items and not in others")
    return None


_COLLATE_MAP = {**default_collate_fn_map, type(None): _collate_none}


@dataclass
class _FailedItem:
    """What _Indexed hands over for an item that the data set failed to give (an exception raised
    in a DataLoader worker arrives wrapped in its traceback): the loop raises it in one line, or
    leaves the item out and records it (--skip-failed)."""

    error: str  # "OSError: cannot decode video 13.mp4"
    traceback: str


@dataclass
class _Unbatchable:
    """What _collate hands over in place of a batch it could not make, for the loop to raise
    in one line (an exception raised in a DataLoader worker arrives wrapped in its traceback)."""

    message: str
    traceback: str | None = None  # a --collate's own error's

    def error(self) -> "ExtractError":
        if self.traceback is not None:
            log.error("the --collate traceback:\n%s", self.traceback.rstrip())
        return ExtractError(self.message)


def _collate(items, batch_items: Callable[[list], Any] | None = None):
    """(source indices, the batch of the items the data set gave, [(index, _FailedItem)...]),
    batched by batch_items (--collate) where given."""
    failed = [(i, x) for i, x in items if isinstance(x, _FailedItem)]
    items = [(i, x) for i, x in items if not isinstance(x, _FailedItem)]
    index = torch.tensor([i for i, _ in items], dtype=torch.int64)
    samples = [x for _, x in items]
    if not samples:
        return index, None, failed
    if batch_items is not None:
        try:
            return index, batch_items(samples), failed
        except Exception as exc:  # said in one line by the loop, its traceback logged (a worker's would be lost)
            name = getattr(batch_items, "__qualname__", type(batch_items).__name__)
            return index, _Unbatchable(f"--collate {name} failed on a batch of {len(samples)} items (the first is item "
                                       f"{index[0]}): {type(exc).__name__}: {' '.join(str(exc).split())}; fix it (its "
                                       "traceback is logged above)", traceback.format_exc()), failed
    first = samples[0]
    dataclass_items = hooks.fields_of(first) is not None and not isinstance(first, tuple)
    if dataclass_items:  # torch's collate takes namedtuples and dicts, not these: batch their fields
        samples = [hooks.fields_of(x) for x in samples]
    try:
        batch = collate(samples, collate_fn_map=_COLLATE_MAP)
    except (TypeError, RuntimeError, KeyError, AttributeError) as exc:  # AttributeError: a None, in a worker
        return index, _Unbatchable(_not_batched(samples, index.tolist(), exc)), failed
    return index, _rebuilt(first, batch) if dataclass_items else batch, failed


def _rebuilt(like: Any, fields: Mapping[str, Any]) -> Any:
    """A namedtuple or dataclass of like's type holding these fields (a batch of such items, or
    one moved to the device). A dataclass is copied and its fields set, not built again: its
    __post_init__ would compute or check its fields on a batch (a frozen one refuses setattr)."""
    if isinstance(like, tuple):
        return like._replace(**fields)
    rebuilt = copy.copy(like)
    for name, value in fields.items():
        object.__setattr__(rebuilt, name, value)
    return rebuilt


def _field_problem(samples: list[Mapping], key: Any) -> str | None:
    """Why the items' field `key` cannot be batched, or None."""
    if any(key not in s for s in samples):
        return "some items lack it"
    if 0 < sum(s[key] is None for s in samples) < len(samples):
        return "it is None in some items and not in others"
    try:
        collate([s[key] for s in samples], collate_fn_map=_COLLATE_MAP)
    except (TypeError, RuntimeError, AttributeError) as exc:
        return " ".join(str(exc).split())
    return None


def _not_batched(samples: list, index: list[int], exc: Exception) -> str:
    """Which field of the items kept them from being batched, and what would."""
    problems = ((key, _field_problem(samples, key)) for key in samples[0]) if isinstance(samples[0], Mapping) else ()
    field, why = next(((key, why) for key, why in problems if why), (None, " ".join(str(exc).split())))
    what = f"their field {field!r}" if field is not None else "they"
    return (f"a batch of {len(index)} items (the first is item {index[0]}) cannot be made: {what}: {why}; give every "
            "item the same fields and shapes (a field that is None in all of them stays None), give --collate "
            "MODULE:CALLABLE that batches them (pads them), or use --batch-size 1")


LOGGED_FAILURES = 10  # items left out that are logged one by one; the store records every one
FAILED_BEFORE_ANY_ROW = 64  # with --skip-failed, this many failures and no item read: a broken data set


def _failure(index: int, item: _FailedItem) -> ExtractError:
    """Without --skip-failed, the first item the data set fails to give stops the run, in one
    line (its traceback logged)."""
    log.error("the data set's traceback for item %d:\n%s", index, item.traceback.rstrip())
    return ExtractError(f"the data set failed on item {index}: {item.error}; fix it (its traceback is logged above), "
                        "or pass --skip-failed to leave out the items that fail (each is recorded in the store)")


def _left_out(failed: list[tuple[int, _FailedItem]], earlier: int) -> list[tuple[int, str]]:
    """A batch's items that the data set failed to give, as (source index, error) to record."""
    for n, (index, item) in enumerate(failed, earlier):
        if n < LOGGED_FAILURES:
            log.warning("item %d left out (--skip-failed): %s", index, item.error)
        elif n == LOGGED_FAILURES:
            log.warning("more items left out: each is recorded in the store, and `marstore info` lists them")
    return [(index, item.error) for index, item in failed]


def target_entry(entry: str) -> tuple[str, str]:
    """A --targets entry, PATH or NAME=PATH, as (the target's name in the store, its dotted path in
    the batch): a tuple batch's label, `--targets label=1`, is stored as `label`, not `1`."""
    name, renamed, path = entry.partition("=")
    return (name, path) if renamed else (entry, entry)


def _get_dotted(batch: Any, path: str) -> Any:
    obj = batch
    for part in path.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        elif part in (hooks.fields_of(obj) or ()):  # a namedtuple's or a dataclass's field
            obj = getattr(obj, part)
        else:
            keys = sorted(obj) if isinstance(obj, Mapping) else list(hooks.fields_of(obj) or ()) or f"a {type(obj).__name__}"
            raise ExtractError(f"--targets {path!r}: {part!r} is not in the batch (it has {keys})")
    return obj


def _to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The batch with fn applied to each of its tensors, in dicts, lists, tuples and dataclasses."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    fields = hooks.fields_of(batch)
    if fields is not None:
        return _rebuilt(batch, {k: _map_tensors(v, fn) for k, v in fields.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def _source_indices(n: int, num_samples: int | None, sample_seed: int | None) -> list[int]:
    if sample_seed is not None:
        order = list(range(n))
        random.Random(sample_seed).shuffle(order)
        return sorted(order[: num_samples or n])
    return list(range(min(n, num_samples) if num_samples else n))


# glibc's malloc gives freed blocks above a moving threshold back to the OS and trims the top
# of its heap. Activations held until their batch is copied then make the forward fault in
# fresh pages every batch: the built-in model's forward ran 12-24% slower with its block
# outputs held, and 3% slower with these thresholds fixed. The process keeps its peak heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30}


def tune_malloc() -> bool:
    """Keeps freed memory in the heap for reuse (glibc's mallopt); False where not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_SETTINGS["M_MMAP_THRESHOLD"])) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_SETTINGS["M_TRIM_THRESHOLD"])
    )


def _device(name: str | None) -> torch.device:
    """--device (default: the GPU where there is one), checked before anything else runs."""
    try:
        return resolve_device(name)
    except ValueError as exc:
        raise ExtractError(str(exc)) from None


def resume_command(opts: ExtractOptions) -> str:
    if opts.command is None and opts.model.startswith(loading.IN_HAND):
        return f"extract_from(model, dataset, {opts.out!r}, ..., resume=True)"
    base = opts.command or "marstore extract ..."
    return base if "--resume" in base else base + " --resume"


@dataclass
class InHand:
    """The model, data set and forward that extract_from hands over in place of the options'
    MODULE:CALLABLE specs (which then hold their in_hand_name, for the record)."""
    model: torch.nn.Module
    dataset: Any
    forward: Callable[[torch.nn.Module, Any], Any] | None = None
    collate: Callable[[list], Any] | None = None
    move: bool = False  # moved to the run's device (device= was given); else left where its weights are


# options that build what extract_from is handed already
_NOT_IN_HAND = ("model", "dataset", "forward", "collate", "model_args", "dataset_args", "command")


def extract_from(model: torch.nn.Module, dataset: Any, out: str, layers: Sequence[str] | str, *,
                 forward: Callable[[torch.nn.Module, Any], Any] | None = None,
                 collate: Callable[[list], Any] | None = None, dataset_name: str | None = None,
                 on_batch: Callable[[int], None] | None = None, **options: Any) -> ExtractResult | Survey:
    """Extraction from a model and a data set in hand (built in a notebook or a script), not
    from MODULE:CALLABLE specs (forward=, and collate=, which batches a list of items in place of
    torch's default_collate); the other options are ExtractOptions' (checkpoint=, targets=,
    reduction=, batch_size=, resume=, ...).

    The model stays where its weights are (the inputs go to the first weights' device; a model
    split over GPUs is not gathered) unless device= moves it for the run; it gets its device,
    its train or eval mode, and the tensors it stored during the run as normal (not inference)
    tensors back afterwards, and torch's, numpy's and Python's random generators get their
    states back. The process's malloc is left alone unless malloc_tuning=True. checkpoint= loads that file's
    weights into the model first (reported as the command line's --checkpoint is, and recorded).
    The store records each object by its class ("<object mypkg.models.MAR>"); dataset_name (e.g.
    "libero10/val") records the data set by a name instead, so that `marstore evaluate` takes
    another store of that name for one of the same samples under the same source indices (an
    object's class does not tell its samples)."""
    refused = sorted(set(options) & set(_NOT_IN_HAND))
    if refused:
        raise TypeError(f"extract_from() got {', '.join(refused)}: it takes the model, the data set, the forward and the "
                        "collate as objects (model_args, dataset_args: build them with those first)")
    known = {f.name for f in dataclasses.fields(ExtractOptions)} - set(_NOT_IN_HAND) - {"out", "layers"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"extract_from() got unknown options {', '.join(unknown)}; it takes {', '.join(sorted(known))}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"extract_from(): the model is a {type(model).__name__}, not a torch.nn.Module")
    options.setdefault("malloc_tuning", False)  # the process goes on after the run: its malloc is left as it was
    placed = [t.device for t in itertools.chain(model.parameters(), model.buffers())]
    move = options.get("device") is not None
    if not move and placed:  # inputs go where the first weights are (a model split over GPUs takes them there)
        # (a model built on the meta device runs on the CPU once a checkpoint= gives it values)
        options["device"] = "cpu" if placed[0].type == "meta" else str(placed[0])
    opts = ExtractOptions(out=out, model=loading.in_hand_name(model), dataset=dataset_name or loading.in_hand_name(dataset),
                          forward=loading.in_hand_name(forward) if forward is not None else None,
                          collate=loading.in_hand_name(collate) if collate is not None else None, layers=layers, **options)
    was_training = model.training
    # every GPU's generator: the run seeds them all (a model split over GPUs draws on each)
    cuda = list(range(torch.cuda.device_count())) if opts.device and torch.device(opts.device).type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        # the run seeds the global generators (seed_generators): the caller's states are kept
        with torch.random.fork_rng(devices=cuda):
            return extract(opts, on_batch, in_hand=InHand(model, dataset, forward, collate, move))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        model.train(was_training)
        if move and len(set(placed)) == 1:
            model.to(placed[0])
        _normal_tensors_back(model)


def _normal_tensors_back(model: torch.nn.Module) -> None:
    """Tensors that the model stored while the run's forwards ran under inference mode (a table
    built at the first call, a memory bank) are inference tensors, which autograd refuses when
    the caller trains the model next ("Inference tensors cannot be saved for backward"): each
    buffer and tensor attribute of the kind is replaced by a normal copy, said in the log."""
    replaced = []
    for prefix, module in model.named_modules():
        held = [(key, t, module._buffers) for key, t in module._buffers.items()]
        held += [(key, t, vars(module)) for key, t in vars(module).items() if isinstance(t, torch.Tensor)]
        for key, tensor, where in held:
            if tensor is not None and tensor.is_inference() and not isinstance(tensor, torch.nn.Parameter):
                where[key] = tensor.clone()  # outside inference mode: a normal tensor
                replaced.append(f"{prefix}.{key}" if prefix else key)
    if replaced:
        log.info("the model keeps tensors made during the run under inference mode (%s): given back as normal copies, "
                 "so that autograd can use them", ", ".join(replaced))


def extract(opts: ExtractOptions, on_batch: Callable[[int], None] | None = None, *,
            in_hand: InHand | None = None) -> ExtractResult | Survey:
    """Runs the extraction that opts describes (see the module doc); in_hand: see extract_from.
    Under torchrun, each rank extracts its share into a part file and rank 0 joins the parts
    (marstore.scaleout). With dry_run, the first two batches (or N), surveyed: a Survey, nothing written."""
    rank = scaleout.current_rank()
    if not rank.distributed or opts.dry_run:
        return _extract_rank(opts, rank, on_batch, in_hand)
    import torch.distributed as dist

    cuda = _device(opts.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    part = dataclasses.replace(opts, out=scaleout.part_path(opts.out, rank),
                               device=f"cuda:{rank.local_rank}" if cuda else "cpu")
    result, error = None, None
    try:
        result = _extract_rank(part, rank, on_batch, in_hand)
    except (KeyboardInterrupt, Interrupted):
        raise  # torchrun passes Ctrl-C to every rank; each has committed its rows
    except Exception as exc:  # noqa: BLE001 - reported to every rank below, then raised
        error = str(exc) if isinstance(exc, MarstoreError) else f"{type(exc).__name__}: {exc}"  # ours say what failed
        log.error("rank %d failed: %s", rank.rank, error)
    statuses: list = [None] * rank.world
    dist.all_gather_object(statuses, (rank.rank, error))
    failed = [(r, e) for r, e in statuses if e]
    try:
        if failed:
            raise ExtractError("; ".join(f"rank {r} failed: {e}" for r, e in failed) +
                               "; the rows the ranks committed stay: run the same command with --resume")
        if rank.rank == 0:
            parts = [scaleout.part_path(opts.out, scaleout.Rank(r, rank.world, 0)) for r in range(rank.world)]
            scaleout.write_top_file(opts.out, parts)
            with open_store(opts.out) as store:
                result = dataclasses.replace(result, path=opts.out, rows=store.rows, file_bytes=os.path.getsize(opts.out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return result


def _check_out(opts: ExtractOptions) -> None:
    if os.path.isdir(opts.out):
        raise ExtractError(f"--out {opts.out} is a folder; give the store's file name, e.g. "
                           f"{os.path.join(opts.out, 'activations.h5')}")
    if os.path.exists(opts.out):
        if not opts.resume:
            raise ExtractError(f"{opts.out} exists: pass --resume to continue it (with the options it was written with), "
                               "or choose another --out")
        check_not_being_written(opts.out)
    folder = os.path.dirname(os.path.abspath(opts.out))
    if not os.path.isdir(folder):
        raise ExtractError(f"--out {opts.out}: the folder {folder} does not exist; create it or choose another --out")


def _out_problem(opts: ExtractOptions, survey: Survey) -> str | None:
    """What would stop a dry run's --out: the checks a run makes before it reads the checkpoint,
    then room for the activations the survey expects."""
    try:
        _check_out(opts)
    except ExtractError as exc:
        return str(exc)
    if opts.resume:  # the store holds some rows already: the run checks room for the rest
        return None
    need = survey.planned * survey.row_bytes()
    room, what = room_left(opts.out, 0)
    if need <= room:
        return None
    return (f"{opts.out}: the run needs about {human_bytes(need)} for its activations but only {human_bytes(room)} are {what}; make "
            "room, write elsewhere (--out), reduce the tokens (--reduction), hook fewer layers or extract fewer rows "
            "(--num-samples)")


def _extract_rank(opts: ExtractOptions, rank: "scaleout.Rank", on_batch: Callable[[int], None] | None,
                  in_hand: InHand | None) -> ExtractResult | Survey:
    torch.manual_seed(opts.seed)
    device = _device(opts.device)
    if device.type == "cpu" and opts.malloc_tuning:
        if tune_malloc():
            log.info("malloc: freed memory kept for reuse (%s; --no-malloc-tuning leaves it alone)",
                     ", ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items()))
        else:
            log.info("malloc: thresholds left alone (mallopt is not available here)")
    if opts.dtype not in STORE_DTYPES:
        raise ExtractError(f"--dtype {opts.dtype!r}: use one of {sorted(STORE_DTYPES)}")
    if opts.autocast not in (None, "bfloat16", "float16"):
        raise ExtractError(f"--autocast {opts.autocast!r}: use bfloat16 or float16")
    _check_output_names(opts.output_names)
    if not opts.dry_run:  # which writes nothing
        _check_out(opts)  # before the checkpoint is read: that can take minutes

    # checkpoint -> model
    report = loading.LoadReport()
    config: dict = {}
    state = None
    if opts.checkpoint:
        report.checkpoint = loading.file_digest(opts.checkpoint)
        ckpt = loading.read_checkpoint(opts.checkpoint, trust=opts.trust_checkpoint, report=report)
        config, report.config_key = loading.find_config(ckpt, opts.config_key)
        state, report.state_key = loading.find_state_dict(ckpt, opts.state_key)
        del ckpt
    if in_hand is None:
        model = loading.build_model(opts.model, config, opts.model_args, report.config_key, report)
    else:
        model = in_hand.model
        if config:
            log.info("the checkpoint's config (%r) is recorded; the model handed over was built without it", report.config_key)
    _check_wrappers(model)
    if state is not None:
        loading.load_weights(model, state, strict=opts.strict, report=report)
        del state
    else:
        if in_hand is not None:
            log.info("no checkpoint=: the store records no weights file; the model keeps the weights it has")
        else:  # legitimate for a builder that loads its own weights; a forgotten flag otherwise
            log.warning("no --checkpoint: the model keeps the weights %s gave it (random, unless it loads its own)", opts.model)
        try:
            loading.check_materialized(model, f"no {'checkpoint=' if in_hand is not None else '--checkpoint'} gives them values")
        except loading.CheckpointError as exc:
            raise ExtractError(str(exc)) from None
    if in_hand is None or in_hand.move:
        model.to(device)
    model.train(opts.train_mode)
    if in_hand is not None and in_hand.forward is not None:
        forward = in_hand.forward
    else:
        forward = loading.import_callable(opts.forward, "--forward") if opts.forward else DefaultForward()
    if in_hand is not None and in_hand.collate is not None:
        batch_items = in_hand.collate
    else:
        batch_items = loading.import_callable(opts.collate, "--collate") if opts.collate else None
    collate_fn = functools.partial(_collate, batch_items=batch_items)
    if opts.redirect_cuda and device.type == "cuda":
        log.info("--redirect-cuda: the run's device is %s, where the model's CUDA calls already go", device)
    # a forward that uses CUDA itself on another device (redirected, or said in one line), or that meets float64 data
    redirect = opts.redirect_cuda and device.type != "cuda"
    forward = functools.partial(_call_forward, _CudaCallsTo(forward, device) if redirect else forward, device=device)
    # mixed precision as the model was trained (UVA: bfloat16); the hooks then see bfloat16 where autocast casts
    autocast = (lambda: torch.autocast(device.type, dtype=STORE_DTYPES[opts.autocast])) if opts.autocast \
        else contextlib.nullcontext

    # hooks, checked before any data is read
    reduction = hooks.parse_reduction(opts.reduction)
    layer_reductions = {}
    for pattern, text in opts.layer_reductions.items():
        try:
            layer_reductions[pattern] = hooks.parse_reduction(text)
        except hooks.HookError as exc:
            raise hooks.HookError(f"--layer-reduction {pattern}={text}: {exc}") from None
    problems: dict[str, str] | None = {} if opts.dry_run else None  # a dry run reports them all, and goes on
    selections = hooks.parse_layers(opts.layers, model, reduction, opts.channels_first, layer_reductions,
                                    opts.exclude_layers, problems, opts.unfold_batch)
    hooks.warn_likely_channels_first(selections)
    _asked_ragged(opts, selections)  # a --ragged pattern that names no layer: before any data is read

    # data
    if in_hand is not None:
        dataset = in_hand.dataset
    else:
        try:
            dataset = loading.call_factory(opts.dataset, "--dataset", opts.dataset_args)
        except loading.CheckpointError as exc:  # the loading module's error, about the data set here
            raise ExtractError(str(exc)) from exc.__cause__
    given = "the data set handed over is a" if in_hand else f"--dataset {opts.dataset} returned a"
    map_style = _check_dataset(dataset, opts, given)
    if map_style:
        if opts.num_samples and opts.num_samples > len(dataset):
            log.warning("%s has %d items, fewer than --num-samples %d: all %d are extracted", opts.dataset, len(dataset),
                        opts.num_samples, len(dataset))
        indices = _source_indices(len(dataset), opts.num_samples, opts.sample_seed)[scaleout.rank_positions(rank)]
    else:
        indices = range(opts.num_samples)[scaleout.rank_positions(rank)]
        log.info("%s is an iterable data set: its first %d items, in order", opts.dataset, opts.num_samples)
    if opts.dry_run:
        first = indices[:opts.batch_size * _dry_run_batches(opts.dry_run)]
        survey = _survey(model, forward, collate_fn, selections, problems,
                         _Indexed(dataset, first, opts.seed) if map_style else
                         _Stream(dataset, first, opts.num_samples, opts.seed), opts, device, autocast,
                         planned=len(indices))
        survey.out_problem = _out_problem(opts, survey) if opts.out else None
        survey.weights = (f"{report.state_key} of {opts.checkpoint}: {loading.LoadReport.counts(report.as_dict())}"
                          if report.checkpoint else None)
        return survey
    metadata = {
        "model": opts.model,
        "model_args": opts.model_args,
        "checkpoint": asdict(report.checkpoint) if report.checkpoint else None,
        "config_key": report.config_key,
        "state_key": report.state_key,
        # what loading the weights found and did (counts, first names, stripped prefix, notes)
        "load_report": {k: v for k, v in report.as_dict().items() if k not in ("checkpoint", "config_key", "state_key")},
        "model_config": config,
        "dataset": opts.dataset,
        "dataset_args": opts.dataset_args,
        "forward": opts.forward or "marstore.extract:default_forward",
        "collate": opts.collate or "torch default_collate",
        "layers": [asdict(s) for s in selections],
        "options": opts.recorded(),
        "command": opts.command,
        "rows_planned": len(indices),
        "seeding": SEEDING,
        "state_changes": None,  # what the second batch's forward changed of the model's state (None: not watched)
        # the layers whose captures came out otherwise when that forward ran again from the state it
        # left ([]: none, the rows do not depend on that state; None: not run again)
        "state_dependent_layers": None,
        "forward_order": None,  # the layers' store names in the order the forward made them (when the store opens)
        "rank": rank.rank,
        "world_size": rank.world,
    }
    start_row = 0
    if opts.resume:
        start_row, recorded_ragged = _check_resume(opts, metadata, selections)
        # the batches after the resume point may not show the variation that made a layer ragged
        opts = dataclasses.replace(opts, ragged=sorted(set(opts.ragged) | recorded_ragged))
    if map_style:
        source: Dataset = _Indexed(dataset, indices[start_row:], opts.seed)
    else:
        source = _Stream(dataset, indices[start_row:], opts.num_samples, opts.seed)
        if start_row:
            log.info("--resume: reading the iterable data set past the store's %d committed rows (it must yield "
                     "the same items in the same order as before)", start_row)
    finished = multiprocessing.Event() if opts.workers else None  # set when the workers may go
    loader = DataLoader(source, batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers,
                        collate_fn=collate_fn, pin_memory=device.type == "cuda",
                        worker_init_fn=functools.partial(_quiet_worker, finished) if opts.workers else None)

    started = time.perf_counter()
    out_dtype = STORE_DTYPES[opts.dtype]
    ring = TransferRing(num_slots=opts.slots, device=device)
    writer: StoreWriter | None = None
    total_bytes = 0
    shapes: dict[str, tuple] = {}
    left_out: dict[str, str] = {}  # parts of the forward's return that are not scalars, said once
    batches = iter(loader)
    skipped = 0  # items the data set failed to give, left out (--skip-failed)
    unrecorded: list[tuple[int, str]] = []  # ... and not yet handed to the writer
    forwards = 0
    progress = tqdm(total=len(indices), initial=start_row, unit="row", disable=None if opts.progress else True,
                    dynamic_ncols=True, desc="extract")
    interrupt = _DeferredInterrupt()
    try:
        interrupt.install()
        with hooks.Capture(model, selections, multi_fire=opts.multi_fire, allow_missing=opts.allow_missing,
                           stop_early=opts.stop_early) as capture:
            pending: list[_BatchRows] = []
            stop: ExtractError | None = None  # an item that failed, raised once the batches before it are stored
            for index, batch, failed in batches:
                if failed and not opts.skip_failed:
                    stop = _failure(*failed[0])
                    break
                if failed:
                    unrecorded += _left_out(failed, skipped)
                    skipped += len(failed)
                    if skipped >= FAILED_BEFORE_ANY_ROW and writer is None and not pending:
                        raise ExtractError(f"the data set failed on each of the {skipped} items asked of it so far (the "
                                           f"first: item {unrecorded[0][0]}, {unrecorded[0][1]}): it is broken, not some "
                                           "of its files; fix it before --skip-failed can help")
                    if batch is None:  # every item of the batch failed
                        progress.update(len(failed))
                        continue
                if isinstance(batch, _Unbatchable):
                    raise batch.error()
                # copied before the forward, which may change its inputs in place (UVA's does)
                targets = {name: _target_array(_get_dotted(batch, path)) for name, path in map(target_entry, opts.targets)}
                capture.start_batch(len(index))
                seed_generators(opts.seed, int(index[0]), _BATCH, device)
                watch = _StateWatch(model) if forwards == 1 else None
                replay = _map_tensors(batch, torch.clone) if watch is not None else None  # the forward may change it
                try:
                    tensors, lengths, out, missing = _run_batch(model, forward, capture, _to_device(batch, device),
                                                                len(index), shapes, opts, autocast)
                except Exception as exc:
                    if not isinstance(exc, MarstoreError):  # the model's own error: its traceback, and on what
                        exc.add_note(f"marstore: {_forward_failure(exc, index, batch)}" + (
                            "; --dry-run shows what each hooked layer gave before it" if not forwards else ""))
                    raise
                forwards += 1
                if watch is not None:
                    metadata["state_changes"] = watch.changes()
                    if metadata["state_changes"]:
                        fired = {name: t for name, t in tensors.items() if name not in missing}
                        metadata["state_dependent_layers"] = _rows_on_state(watch, model, forward, replay, index, device,
                                                                            capture, fired, opts, autocast)
                        _say_state(metadata["state_changes"], metadata["state_dependent_layers"])
                    del replay
                outputs = _outputs_of(out, opts.output_names, left_out)
                del out  # it may hold large tensors: not into the next forward
                progress.update(len(failed))
                # items left out before this batch's rows are committed with them (a resume starts after both)
                batch_rows = _BatchRows(index, tensors, targets, outputs, unrecorded, lengths)
                unrecorded = []
                if writer is None:
                    pending.append(batch_rows)
                    if len(pending) < 2 and len(pending) < len(loader):
                        continue  # a second batch shows which layers change shape (ragged)
                    writer = _open_writer(opts, selections, capture, pending, metadata, start_row)
                    todo, pending = pending, []
                else:
                    todo = [batch_rows]
                for queued in todo:
                    writer, nbytes = _submit(ring, writer, queued, out_dtype)
                    total_bytes += nbytes
                    progress.update(len(queued.index))
                    progress.set_postfix_str(_rate(total_bytes, started), refresh=False)
                    if on_batch is not None:
                        on_batch(writer.written)
                if interrupt.requested:  # before asking the loader for another batch
                    raise KeyboardInterrupt
            if writer is None and pending:
                writer = _open_writer(opts, selections, capture, pending, metadata, start_row)
                for queued in pending:
                    writer, nbytes = _submit(ring, writer, queued, out_dtype)
                    total_bytes += nbytes
                    progress.update(len(queued.index))
            if stop is not None:
                raise stop
            if writer is None:
                raise ExtractError("the data set yielded no rows to extract" + (
                    f" (all {skipped} items failed: {unrecorded[0][1]} ...)" if skipped else ""))
            if unrecorded:  # items at the end, after the last rows
                writer.skip(unrecorded)
            interrupt.committing = True
            writer.close()
    except KeyboardInterrupt:
        interrupt.committing = True
        progress.close()
        rows = _close_after_error(writer)
        raise Interrupted(rows, resume_command(opts), interrupt.signum) from None
    except BaseException as exc:
        interrupt.committing = True
        progress.close()
        rows = _close_after_error(writer)
        if writer is not None and not isinstance(exc, RestartNeeded):  # what the error leaves, how to go on once fixed
            log.error("stopped by %s: %s keeps its %d committed rows; once the cause is fixed, resume with: %s",
                      type(exc).__name__, opts.out, rows, resume_command(opts))
        raise
    finally:
        interrupt.restore()
        progress.close()
        ring.close()
        if finished is not None:
            finished.set()
        # the workers end now, not when the iterator is collected: a traceback that a caller (a test
        # runner, a notebook) keeps would hold them until the interpreter's exit
        getattr(batches, "_shutdown_workers", lambda: None)()
    seconds = time.perf_counter() - started
    with open_store(opts.out) as store:
        layers = {name: {"nonfinite": int(info.attrs["nonfinite"]), "overflow": int(info.attrs["overflow"]),
                         "layout": info.layout, "row_shape": list(info.row_shape)} for name, info in store.layers.items()}
        rows = store.rows
        outputs = summarize_outputs(store)
        skipped_items = store.skipped()
    nonfinite_outputs = sum(o["nonfinite"] for o in outputs.values())
    if nonfinite_outputs:
        log.warning("%d forward outputs (losses) in %s are non-finite, or missing from their batch", nonfinite_outputs, opts.out)
    overflowed = {name: info["overflow"] for name, info in layers.items() if info["overflow"]}
    if overflowed:
        log.warning("finite values past float16's range were stored as inf (%s); --dtype bfloat16 or float32 keeps "
                    "them", ", ".join(f"{name}: {n}" for name, n in overflowed.items()))
    if skipped_items:
        log.warning("%s that the data set failed to give left out (the first: item %d, %s); %s lists them under /skipped",
                    _items(len(skipped_items)), *skipped_items[0], opts.out)
    return ExtractResult(rows, seconds, total_bytes, os.path.getsize(opts.out), layers, report.as_dict(), opts.out, outputs,
                         skipped_items)


@dataclass
class TargetSurvey:
    """What a --targets entry gave in a dry run, and how the run would store it."""
    name: str
    row: tuple[int, ...] | None
    dtype: str | None  # the stored dtype ('str' for text)
    problem: str | None  # else the error the run would stop with


@dataclass
class Survey:
    """A dry run's findings: what each selected layer, each target and the forward gave in the
    first batches, and all that would stop the run."""
    rows: int  # the samples surveyed
    layers: list[hooks.LayerSurvey]
    dtype: str  # the stored dtype
    planned: int  # the rows the run would extract
    batches: int = 1  # surveyed
    asked: int = 1  # batches asked for (the data set may have fewer)
    targets: list[TargetSurvey] = field(default_factory=list)
    outputs: list[str] | None = field(default_factory=list)  # the forward's scalars, kept; None: --stop-early keeps none
    left_out: dict[str, str] = field(default_factory=dict)  # the rest of its return: {name: what it was}
    output_problem: str | None = None
    out_problem: str | None = None  # --out, where given: what would stop the run there
    weights: str | None = None  # what loading the checkpoint's weights found; None: no checkpoint
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (item, error) left out (--skip-failed)
    seconds: list[float] = field(default_factory=list)  # each surveyed batch's forward, hooks and all
    batch_rows: list[int] = field(default_factory=list)  # each surveyed batch's samples
    state_changes: list[str] | None = None  # what the second batch's forward changed of the model's state
    state_dependent_layers: list[str] | None = None  # the captures that came out otherwise when it ran again
    forward_problem: str | None = None  # what the forward failed on (batches: those surveyed before it)
    forward_order: list[str] = field(default_factory=list)  # the layers in the order the forward ran them

    def rows_per_second(self) -> float | None:
        """The forward's pace: over the batches after the first (its warm-up), where there are."""
        seconds, rows = (self.seconds[1:], self.batch_rows[1:]) if len(self.seconds) > 1 else (self.seconds, self.batch_rows)
        return sum(rows) / sum(seconds) if seconds and sum(seconds) > 0 else None

    def problems(self) -> list[str]:
        """Each error the run would stop with."""
        return [s.problem for s in self.layers if s.problem] + self._others()

    def _others(self) -> list[str]:
        """The problems that are not a layer's: the targets', the forward's return's, --out's."""
        return [t.problem for t in self.targets if t.problem] + [
            p for p in (self.forward_problem, self.output_problem, self.out_problem) if p]

    def row_bytes(self) -> int:
        """Stored bytes a row of the layers that would be stored, as the surveyed batches gave
        them (a ragged layer: its mean token count)."""
        itemsize = STORE_DTYPES[self.dtype].itemsize
        return round(sum(math.prod(s.row) * itemsize * (s.mean_tokens or 1)
                         for s in self.layers if s.row is not None and not s.problem))

    def describe(self) -> str:
        """The layers and targets as tables, the forward's return, then each problem with its
        fix, what to leave out, and the bytes the run would store."""
        header = ["layer", "module", "calls", "gave (first call)", "stored row"]
        position = {name: i for i, name in enumerate(self.forward_order)}  # the table in the forward's order
        rows = [[s.name, s.module, str(s.calls), s.gave, self._stored(s)]
                for s in sorted(self.layers, key=lambda s: position.get(s.name, len(position)))]
        what, count = "the first batch" if self.batches <= 1 else f"the first {self.batches} batches", f"{self.rows} samples"
        if 0 < self.batches < self.asked and not self.forward_problem:
            what = "the data set's one batch" if self.batches == 1 else f"all {self.batches} batches of the data set"
            count = f"{count}; {self.asked} asked"
        weights = self.weights or "none loaded (no checkpoint): the model runs with the weights it has"
        lines = [f"dry run: {what} ({count}) through the model, every selected layer hooked; nothing written",
                 f"weights: {weights}", "", text_table(header, rows)]
        if self.targets:
            lines += ["", text_table(["target", "stored row"], [
                [t.name, "-" if t.row is None else f"{t.row} {'text' if t.dtype == TEXT else t.dtype}"] for t in self.targets])]
        lines += ["", self._return()]
        if self.skipped:
            lines.append(f"{_items(len(self.skipped))} failed and would be left out (--skip-failed); the first: item "
                         f"{self.skipped[0][0]}: {self.skipped[0][1]}")
        others = self._others()
        if others:
            lines += ["", "the run would stop at:" if len(others) == 1 else f"these {len(others)} would stop the run:",
                      *(f"  {p}" for p in others)]
        bad = [s for s in self.layers if s.problem]
        if bad:
            alike: dict[str, list[hooks.LayerSurvey]] = {}  # one problem of many layers (blocks 0 to N) is said once
            for s in bad:
                alike.setdefault(_problem_kind(s), []).append(s)
            lines += ["", f"{len(bad)} of {len(self.layers)} layers would stop the extraction; each problem says what fixes it:"]
            for group in alike.values():
                lines.append(f"  {group[0].problem}")
                if len(group) > 1:
                    lines.append(f"    and the same for {len(group) - 1} more: {', '.join(s.name for s in group[1:])}")
            leave_out = _covering([s.name for s in bad], [s.name for s in self.layers])
            if leave_out:
                lines += ["", f"or leave them out: --exclude-layers {' '.join(shlex.quote(p) for p in leave_out)}"]
        elif not self.batches:  # the first forward failed
            lines += ["", f"{sum(s.calls > 0 for s in self.layers)} of {len(self.layers)} layers fired before the forward failed"]
        else:
            lines += ["", f"all {len(self.layers)} layers would be stored"]
        late = [s for s in self.layers if s.ragged_from and not s.problem]
        if late:
            flag = " ".join(shlex.quote(p) for p in _covering([s.name for s in late], [s.name for s in self.layers]))
            lines.append(f"token count changing after the first two batches had them stored dense: "
                         f"{', '.join(f'{s.name} (batch {s.ragged_from})' for s in late)}; the run will rewrite their rows "
                         f"ragged then (--ragged {flag} stores them ragged from the start)")
        if self.state_changes:
            lines.append(_state_note(self.state_changes, self.state_dependent_layers))
        if not self.batches:
            return "\n".join(lines)
        shapes = "the first batch's shapes" if self.batches == 1 else "the surveyed batches' shapes"
        lines.append(f"the run's {self.planned} rows: about {human_bytes(self.planned * self.row_bytes())} of activations "
                     f"({human_bytes(self.row_bytes())} a row, as {shapes} give it)")
        pace = self.rows_per_second()
        if pace:
            which = "the surveyed batches after the first" if len(self.seconds) > 1 else "the first batch, warm-up and all"
            lines.append(f"and about {_duration(self.planned / pace)} of forward passes, at the pace of {which} "
                         f"({pace:,.0f} rows/s; storing the rows adds to it)")
        return "\n".join(lines)

    def _stored(self, s: hooks.LayerSurvey) -> str:
        if s.row is None:
            return "-"
        if s.tokens is None:
            return f"{s.row} {self.dtype} (from {s.source_dtype})"
        fewest, most = s.tokens
        count = str(most) if fewest == most else f"{fewest}-{most}"
        when = f" from batch {s.ragged_from}" if s.ragged_from else ""
        return f"{count} tokens of {s.row} {self.dtype}, ragged{when} (from {s.source_dtype})"

    def _return(self) -> str:
        if self.forward_problem and not self.batches:
            return "the forward's return: none (the forward failed: below)"
        if self.outputs is None:
            return "the forward's return: none of it kept (--stop-early cuts the forward short)"
        if self.output_problem:
            return "the forward's return: its scalars cannot be named as given (below)"
        kept = f"{', '.join(self.outputs)}, kept a batch under /outputs" if self.outputs else "no scalars to keep"
        if any(re.fullmatch(r"loss_\d+", name) for name in self.outputs):
            kept += " (--output-names NAME... names them)"
        rest = "; ".join(f"{name}: {what}" for name, what in sorted(self.left_out.items()))
        return f"the forward's return: {kept}" + (f"; not kept (only scalars are): {rest}" if rest else "")


def _covering(chosen: list[str], names: list[str]) -> list[str]:
    """Patterns (for --exclude-layers, --ragged) that name the modules of the chosen store names
    and no other module of names, each as broad as that allows: a subtree ('diffloss'
    'diffloss.**'), like modules of numbered blocks ('encoder_blocks.*.attn'), else the name. A
    module hooked twice (':0' and ':1') is named only if both are chosen."""
    store_names: dict[str, list[str]] = {}
    for name in names:
        store_names.setdefault(hooks.module_name(name), []).append(name)
    modules = list(store_names)
    eligible = {m for m, stored in store_names.items() if set(stored) <= set(chosen)}
    patterns: list[str] = []
    covered: set[str] = set()
    for module in dict.fromkeys(hooks.module_name(name) for name in chosen):
        if module in covered or module not in eligible:
            continue
        top = module.split(".")[0]
        numbered = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", module)
        for candidate in ([top, f"{top}.**"] if top in store_names else [f"{top}.**"]), [numbered], [module]:
            group = {m for pattern in candidate for m in hooks.match_modules(pattern, modules)}
            if module in group and group <= eligible and (len(group) > 1 or candidate == [module]):
                patterns += [p for p in candidate if hooks.match_modules(p, modules)]
                covered |= group
                break
    return patterns


def _problem_kind(survey: hooks.LayerSurvey) -> str:
    """A problem's text without its layer's names (the layer's, its parents', their numbers),
    alike for the same problem of other layers."""
    text, parts = survey.problem or "", survey.name.split(".")
    for k in range(len(parts), 0, -1):
        text = text.replace(".".join(parts[:k]), "\0")
    return re.sub(r"\d+", "#", text)


def _survey(model, forward, collate_fn: Callable, selections: list, problems: dict, source: Any, opts: ExtractOptions,
            device: torch.device, autocast: Callable[[], Any], planned: int) -> Survey:
    """--dry-run [N]: the first N batches (2) through the model with every selected layer hooked,
    each layer's, target's and the forward's errors recorded rather than raised, so that one
    run says all that stands in the way."""
    asked = _dry_run_batches(opts.dry_run)
    loader = DataLoader(source, batch_size=opts.batch_size, shuffle=False, collate_fn=collate_fn)
    per_batch: list[list[hooks.LayerSurvey]] = []
    batch_rows: list[int] = []
    paths = dict(map(target_entry, opts.targets))
    targets = {name: TargetSurvey(name, None, None, None) for name in paths}
    outputs: dict[str, None] = {}  # the scalars' names, in the order first seen
    left_out: dict[str, str] = {}
    output_problem = None
    skipped: list[tuple[int, str]] = []
    seconds: list[float] = []  # each batch's forward
    state_changes = dependent = forward_problem = reached = None
    with hooks.Capture(model, selections, multi_fire=opts.multi_fire, survey=True) as capture:
        for index, batch, failed in itertools.islice(loader, asked):
            if failed and not opts.skip_failed:
                raise _failure(*failed[0])
            skipped += [(i, item.error) for i, item in failed]
            if batch is None:  # every item of the batch failed
                continue
            if isinstance(batch, _Unbatchable):
                raise batch.error()
            for name, seen in targets.items():  # before the forward, which may change the batch in place
                targets[name] = seen if seen.problem else _surveyed_target(seen, batch, len(per_batch), paths[name])
            capture.start_batch(len(index))
            seed_generators(opts.seed, int(index[0]), _BATCH, device)
            watch = _StateWatch(model) if len(per_batch) == 1 else None
            replay = _map_tensors(batch, torch.clone) if watch is not None else None  # the forward may change it
            started = time.perf_counter()
            try:
                with torch.inference_mode(not opts.train_mode), autocast():
                    out = forward(model, _to_device(batch, device))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # said with what else stands in the way; the layers as far as it went
                log.debug("the forward's traceback", exc_info=True)
                forward_problem = (f"in batch {len(per_batch) + 1}: " if per_batch else "") + (
                    str(exc) if isinstance(exc, MarstoreError) else _forward_failure(exc, index, batch))
                reached = capture.survey_batch(problems) if not per_batch else None
                break
            seconds.append(time.perf_counter() - started)
            first = capture.captured() if watch is not None else None  # before the survey forgets them
            per_batch.append(capture.survey_batch(problems))
            if watch is not None:
                state_changes = watch.changes()
                if state_changes:
                    dependent = _rows_on_state(watch, model, forward, replay, index, device, capture, first, opts, autocast)
            del first, replay
            batch_rows.append(len(index))
            if output_problem is None:
                try:
                    outputs.update(dict.fromkeys(forward_scalars(out, opts.output_names, left_out)))
                except ExtractError as exc:
                    output_problem = str(exc)
            del out  # it may hold large tensors: not into the next forward
    if reached is not None:  # the first forward failed: what the layers that fired before it gave
        layers = [s if s.calls else dataclasses.replace(s, gave="- (not reached)", problem=None) for s in reached]
        return Survey(len(index), layers, opts.dtype, planned, batches=0, asked=asked, targets=list(targets.values()),
                      outputs=None, skipped=skipped, forward_problem=forward_problem)
    if not per_batch:
        raise ExtractError("--dry-run: the data set yielded no items" if not skipped else
                           f"--dry-run: the data set failed on all {len(skipped)} items asked of it (the first: item "
                           f"{skipped[0][0]}, {skipped[0][1]})")
    ragged = _asked_ragged(opts, selections)
    layers = [_surveyed_layer(list(batches), batch_rows, sel, opts, ragged) for sel, batches in zip(selections, zip(*per_batch))]
    return Survey(sum(batch_rows), layers, opts.dtype, planned, batches=len(per_batch), asked=asked,
                  targets=list(targets.values()), outputs=None if opts.stop_early else list(outputs), left_out=left_out,
                  output_problem=output_problem, skipped=skipped, seconds=seconds, batch_rows=batch_rows,
                  state_changes=state_changes, state_dependent_layers=dependent, forward_problem=forward_problem,
                  forward_order=capture.forward_order)


def _dry_run_batches(dry_run: bool | int) -> int:
    """--dry-run alone surveys two batches: the run decides from its first two whether a layer's
    token count varies (stored ragged) and whether the forward changes the model's state."""
    return 2 if dry_run is True else int(dry_run)


def _surveyed_target(seen: TargetSurvey, batch: Any, k: int, path: str) -> TargetSurvey:
    """A target as batch k gives it at path, checked against the batches before."""
    try:
        value = _target_array(_get_dotted(batch, path))
        dtype = _target_dtype(seen.name, value, path)
    except ExtractError as exc:
        return dataclasses.replace(seen, problem=str(exc) if not k else f"in batch {k + 1}: {exc}")
    row = tuple(value.shape[1:])
    if k and (row != seen.row or (dtype == TEXT) != (seen.dtype == TEXT)):
        return dataclasses.replace(seen, problem=f"--targets {seen.name!r}: batch {k + 1} gives {row} {dtype} a row, the "
                                   f"first {seen.row} {seen.dtype}; a target keeps one shape (and numbers or text)")
    return TargetSurvey(seen.name, row, dtype, None)


def _surveyed_layer(batches: list[hooks.LayerSurvey], batch_rows: list[int], sel: hooks.LayerSelection,
                    opts: ExtractOptions, ragged: set[str]) -> hooks.LayerSurvey:
    """One layer over the surveyed batches, as the run would meet them: the first problem; a
    module that stops firing; rows that change shape (stored ragged, where the first two
    batches show it, as the run decides; an error where a later batch does)."""
    first, name = batches[0], batches[0].name
    for k, s in enumerate(batches):
        if s.problem and not (k and s.calls == 0):  # a later batch without a firing is said below
            return dataclasses.replace(first, problem=s.problem if not k else f"in batch {k + 1}: {s.problem}")
    silent = [k for k, s in enumerate(batches) if s.calls == 0]
    if silent and not opts.allow_missing:
        return dataclasses.replace(first, problem=(
            f"{sel.label} did not fire in batch {silent[0] + 1} (it fired in {len(batches) - len(silent)} of {len(batches)}; "
            "some modules run only in some task modes): pass --allow-missing to store NaN rows where it does not fire, "
            "or leave it out"))
    # the run decides from its first two batches, a module's silent one taking the first's shape
    asked = name in ragged or any(s.lengths for s in batches[:2])  # samples of different lengths: ragged
    try:
        ragged, row = _layout(name, [s.row if s.calls else first.row for s in batches[:2]], asked)
    except ExtractError as exc:
        return dataclasses.replace(first, problem=str(exc))
    ragged_from = None
    for k, s in enumerate(batches[2:], 2):
        if not s.calls or ((s.row[1:] if ragged else s.row) == row and (ragged or not s.lengths)):
            continue
        if ragged or len(row) < 2 or len(s.row) != len(row) or s.row[1:] != row[1:]:
            return dataclasses.replace(first, problem=(
                f"{name}: batch {k + 1} gives rows of shape {s.row}, the first two batches {'tokens of ' if ragged else ''}"
                f"{row}; its rows must keep one shape: reduce it (--reduction) or capture another module"))
        ragged, row, ragged_from = True, row[1:], k + 1  # its token count changes: the run rewrites it ragged there
    if not ragged:
        return dataclasses.replace(first, row=row)
    counts = [c for s, n in zip(batches, batch_rows) if s.calls for c in (s.lengths or [s.row[0]] * n)]
    return dataclasses.replace(first, row=row, tokens=(min(counts), max(counts)), mean_tokens=sum(counts) / len(counts),
                               ragged_from=ragged_from)


def summarize_outputs(store: Store) -> dict[str, dict]:
    """Each forward output of the store's committed batches as {batches, mean (of the finite
    values), nonfinite}, in the forward's order."""
    summaries = {}
    for name, values in store.outputs().items():
        if name != "row_start":
            finite = values[np.isfinite(values)]
            summaries[name] = {"batches": len(values), "mean": float(finite.mean()) if finite.size else None,
                               "nonfinite": len(values) - finite.size}
    return summaries


def describe_output(name: str, summary: dict) -> str:
    mean = "n/a" if summary["mean"] is None else f"{summary['mean']:.4g}"
    return f"  output {name}: mean {mean} over {summary['batches']} batches, {summary['nonfinite']} non-finite"


def _rate(nbytes: int, started: float) -> str:
    return _mb_per_s(nbytes, time.perf_counter() - started)


def _mb_per_s(nbytes: int, seconds: float) -> str:
    rate = nbytes / max(seconds, 1e-9) / 2**20
    return f"{rate:.0f} MB/s" if rate >= 10 else f"{rate:.2f} MB/s"  # reduced layers move well under 1 MB/s


class _DeferredInterrupt:
    """Turns the first Ctrl-C or SIGTERM (what SLURM and Kubernetes send before they kill a job)
    into a request that the loop honours between batches, so that it never lands inside an
    HDF5 call or the ring's bookkeeping; a second one raises at once, and any during the
    closing commit only say to wait for it. Only in the main thread, and only over Python's
    own handling of each signal (a caller's handler stays in charge)."""

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self) -> None:
        self.signum: int = signal.SIGINT  # the signal that asked for the stop
        self.requested = False
        self.committing = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, default in self.DEFAULTS.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.committing:
            log.warning("%s: the rows written are being committed; wait for it to finish", name)
        elif self.requested:
            raise KeyboardInterrupt
        else:
            self.requested, self.signum = True, signum
            log.warning("%s: stopping after the batch in hand and committing it (%s again stops at once)", name, name)


def _quiet_worker(finished: Any, worker_id: int) -> None:
    """In each data loader worker: a terminal's Ctrl-C, or a scheduler's SIGTERM, reaches the
    whole job, and a worker that it stopped would fail the batch the main process still has to
    finish. So the worker ignores Ctrl-C, and SIGTERM until the extraction is over (`finished`):
    from then on a SIGTERM ends it, with status 0. Killed by the signal, it would make the
    loader's SIGCHLD check raise "worker killed by signal" in the main process while that shuts
    the workers down (the job's SIGTERM, handled late on a busy machine, lands then)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum: int, frame: Any) -> None:
        if finished.is_set():
            os._exit(0)  # asked to end, and ending: not a failure (no atexit of the parent's to run)

    signal.signal(signal.SIGTERM, on_sigterm)


def _close_after_error(writer: StoreWriter | None) -> int:
    if writer is None:
        return 0
    try:
        writer.close(complete=False)
    except StoreError as exc:
        log.error("closing the store after the error: %s", exc)
    return writer.committed


def _target_array(value: Any) -> np.ndarray:
    """A copy: on the CPU the batch's tensors are the ones the forward gets."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).numpy()
    return np.array(value)


def _target_dtype(name: str, value: np.ndarray, path: str | None = None) -> str:
    """How a target is stored: its numbers' dtype, or text."""
    first = value.flat[0] if value.dtype.kind == "O" and value.size else None
    if isinstance(first, Mapping):  # a batch entry of several (obs: {state, agent_pos})
        keys = [str(k) for k in first]
        raise ExtractError(f"--targets {name!r} is a mapping of {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}: "
                           f"name one of its entries, as {path or name}.{keys[0]}")
    if value.dtype.kind == "U" or (value.dtype.kind == "O" and value.size and all(isinstance(v, str) for v in value.flat)):
        return TEXT  # a task name or an instruction: the probe takes each string for a class
    if value.dtype.kind in "biuf":
        return str(value.dtype)
    kind = "bytes (decode them to str in the data set)" if value.dtype.kind == "S" else f"{value.dtype} values"
    raise ExtractError(f"--targets {name!r} holds {kind}; targets are numbers (booleans, integers, floats) or text")


def _outputs_of(out: Any, names: Sequence[str], left_out: dict[str, str]) -> dict[str, Any]:
    """The forward's scalars (none where --stop-early cut it); what is not a scalar is said once
    a run (left_out remembers it)."""
    if out is hooks.StopForward:
        return {}
    known = len(left_out)
    scalars = forward_scalars(out, names, left_out)
    if len(left_out) > known:
        log.info("not kept from the forward's return (only scalars go to /outputs): %s",
                 "; ".join(f"{name}: {what}" for name, what in sorted(left_out.items())))
    return scalars


def _names_cuda(device: Any) -> bool:
    """Whether a device argument names a CUDA device: "cuda", "cuda:1", torch.device("cuda", 0),
    or a bare index (torch reads device=0 as cuda:0)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0].strip() == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToDevice(TorchFunctionMode):
    """--redirect-cuda: while the forward runs, every torch call that would put a tensor on CUDA
    puts it on the run's device instead: Tensor.cuda() (MAR's torch.Tensor(orders).cuda()),
    Tensor.to("cuda") and device="cuda" (or cuda:N, torch.device("cuda"), an index) given to a
    factory such as torch.zeros or x.new_ones; Module.cuda() and Module.to("cuda") come down to
    those. Only device arguments change: dtypes, non_blocking and memory formats are kept."""

    def __init__(self, device: torch.device, said: Callable[[str], None]):
        super().__init__()
        self.device, self.said = device, said

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # cuda(device=None, non_blocking=False, memory_format=...)
            self.said("Tensor.cuda()")
            tensor, rest = args[0], dict(zip(("device", "non_blocking", "memory_format"), args[1:]), **kwargs)
            return tensor.to(self.device, non_blocking=rest.get("non_blocking", False),
                             memory_format=rest.get("memory_format", torch.preserve_format))
        if _names_cuda(kwargs.get("device")):
            self.said(f"{_torch_name(func)}(device={kwargs['device']!r})")
            kwargs = {**kwargs, "device": self.device}
        elif func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            self.said(f"Tensor.to({args[1]!r})")
            args = (args[0], self.device, *args[2:])
        return func(*args, **kwargs)


def _torch_name(func: Callable) -> str:
    """torch.zeros, Tensor.new_zeros: how a model's code names the call."""
    name = getattr(func, "__name__", repr(func))
    return f"Tensor.{name}" if getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor.")) else f"torch.{name}"


class _CudaCallsTo:
    """--redirect-cuda: the forward, run under _CudaToDevice, so that a model's own CUDA calls
    (MAR's .cuda(), a torch.zeros(..., device="cuda")) keep their tensors on the run's device.
    Said at the first such call, naming it."""

    def __init__(self, forward: Callable, device: torch.device):
        self.forward, self.device, self.calls, self.forwards = forward, device, 0, 0

    def _redirected(self, call: str) -> None:
        self.calls += 1
        if self.calls == 1:
            log.info("--redirect-cuda: forward %d called %s; its tensors, and those of every later call to CUDA, stay on %s",
                     self.forwards + 1, call, self.device)

    def __call__(self, model: torch.nn.Module, batch: Any) -> Any:
        try:
            with _CudaToDevice(self.device, self._redirected):
                return self.forward(model, batch)
        finally:
            self.forwards += 1


# what torch says where code asks for CUDA that the run cannot give it
_CUDA_UNAVAILABLE = re.compile(r"Torch not compiled with CUDA enabled|Found no NVIDIA driver|No CUDA GPUs are available|"
                               r"Expected all tensors to be on the same device.*cuda")


# what torch's layers say where an input's dtype is not their weights'
_DTYPE_MISMATCH = re.compile(r"same dtype|should be the same|share same datatype|dtype .* does not match weight dtype")


def _tensor_parts(batch: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """A batch's tensors: (name: 'x', 'obs.pos', '0', or 'the batch' for a tensor batch; tensor)."""
    if isinstance(batch, torch.Tensor):
        return [(path or "the batch", batch)]
    fields = hooks.fields_of(batch)
    items = batch.items() if isinstance(batch, Mapping) else fields.items() if fields is not None else \
        enumerate(batch) if isinstance(batch, (list, tuple)) else ()
    return [part for key, value in items for part in _tensor_parts(value, f"{path}.{key}" if path else str(key))]


def _float_parts(batch: Any) -> list[tuple[str, torch.dtype]]:
    """A batch's floating-point tensors: (name, dtype)."""
    return [(name, t.dtype) for name, t in _tensor_parts(batch) if t.is_floating_point()]


def _forward_failure(exc: BaseException, index: Sequence[int], batch: Any) -> str:
    """What the forward failed on, for a dry run's finding and a run's error: the items, the
    batch's tensors, the model's line and the error."""
    parts = _tensor_parts(batch)
    tensors = ", ".join(f"{name} {hooks.describe_value(t)}".removeprefix("the batch ") for name, t in parts[:6])
    tensors += ", ..." if len(parts) > 6 else ""
    items = f"item {index[0]}" if len(index) == 1 else f"items {index[0]} to {index[-1]}"
    return f"the forward failed on the batch of {items} ({tensors or 'no tensors'}): {_model_line(exc)}{_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    """'Type: the message's first line' (the rest is in its traceback); a bare `assert` has no message."""
    message = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _call_forward(forward: Callable, model: torch.nn.Module, batch: Any, *, device: torch.device) -> Any:
    """forward(model, batch). A layer's dtype error where the batch holds floating-point tensors
    of a dtype that none of the model's weights has (numpy's float64 for float32 weights), and,
    on a run whose device is not a GPU, a forward that moves tensors to the GPU in its own code
    (MAR's calls .cuda()), are said in one line, with the model's line where it failed, as is
    a graph compiled whole (fullgraph=True), where the hooks cannot run; any other error keeps
    its traceback."""
    try:
        return forward(model, batch)
    except (AssertionError, RuntimeError, ValueError) as exc:
        first = _first_line(exc)
        if type(exc).__module__.startswith("torch._dynamo") and "torch.compiler.disable" in str(exc):
            raise ExtractError("the model or the forward is compiled with fullgraph=True (torch.compile), which lets no Python "
                               "run inside its graph, and the hooks must run there: compile it without fullgraph (each "
                               "hooked module then breaks the graph), or hand it over uncompiled") from exc
        if _DTYPE_MISMATCH.search(str(exc)):
            weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
            other = [(name, dtype) for name, dtype in _float_parts(batch) if weights and dtype not in weights]
            if other:
                names = ", ".join(name for name, _ in other[:4]) + (", ..." if len(other) > 4 else "")
                subject = "the batch is" if names == "the batch" else f"the batch's {names} {'is' if len(other) == 1 else 'are'}"
                given, held = ("/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
                               for dtypes in ({d for _, d in other}, weights))
                raise ExtractError(f"the forward failed on the batch's dtype ({_model_line(exc)}{first}): {subject} {given}, "
                                   f"the model's weights {held}; give the data set items of the weights' dtype (numpy "
                                   "and Python floats are float64: .astype(np.float32)), or a --forward that casts "
                                   "them") from exc
        if device.type == "cuda" or not _CUDA_UNAVAILABLE.search(str(exc)):
            raise
        gpu = "" if torch.cuda.is_available() else "; this machine has none"
        fix = (f"--redirect-cuda moves only the tensors that torch calls put on CUDA, not this: run it on a GPU (--device "
               f"cuda{gpu})") if isinstance(forward, _CudaCallsTo) else \
            (f"run it on a GPU (--device cuda{gpu}), or pass --redirect-cuda to keep the tensors it puts on CUDA "
             f"(MAR's .cuda() calls) on {device}")
        raise ExtractError(f"the forward uses CUDA in its own code ({_model_line(exc)}{first}) and this run's device is "
                           f"{device}: {fix}") from exc


def _check_wrappers(model: torch.nn.Module) -> None:
    """Says how a wrapped model's layers and weights are named (loading.unwrapped); refuses
    nn.DataParallel over several GPUs, which runs the hooks on copies of the model in threads,
    each on a part of the batch."""
    if isinstance(model, torch.nn.DataParallel) and len(model.device_ids) > 1:
        raise ExtractError(f"the model is an nn.DataParallel over {len(model.device_ids)} GPUs, which splits each batch "
                           "over copies of the model, the hooks with them: hand over model.module (a run uses one device)")
    inside = loading.unwrapped(model)
    if inside is not model:
        log.info("the model is wrapped (%s): its layers and weights are named as in the %s inside, without '_orig_mod.' "
                 "or 'module.'", type(model).__name__, type(inside).__name__)
    compiled = [name for name, m in inside.named_modules() if loading.unwrapped(m) is not m]
    if compiled:
        log.info("%d of its modules are compiled one by one (torch.compile), as %s: named as the modules they wrap, "
                 "without '_orig_mod'", len(compiled), compiled[0])


def _model_line(exc: BaseException) -> str:
    """Where in the model's or the forward's code the error was raised (loading.code_line), this
    module's default forward left out."""
    return loading.code_line(exc, __file__)


# Buffers up to this many bytes in all are kept for comparison by value while a batch is
# watched; past it, a buffer is compared by its version counter alone (in-place changes).
STATE_COPY_BYTES = 256 << 20
STATE_CHANGES_SHOWN = 5


class _StateWatch:
    """What one forward changes of the model's own state: buffers (by value: a native kernel,
    as batch norm's running statistics, may not bump a version counter), parameters changed in
    place, the tensors, random generators and plain values its modules hold as attributes (a
    memory bank, a step counter, a generator of its own that --seed does not reach), and the
    dicts and lists that its modules' forwards take as default arguments and fill. A run
    watches its second batch: the first may build caches once (rotary tables, UVA's
    self.device), which ties no row to the ones before it."""

    def __init__(self, model: torch.nn.Module):
        self.model = loading.unwrapped(model)  # its state named as the model's own (not '_orig_mod.', 'module.')
        self.before = self._state(copy_budget=STATE_COPY_BYTES)
        # the parts that changed, each as the state after the forward holds it (None: removed)
        self.changed: dict[str, tuple[str, Any, Any, Any] | None] = {}

    def _state(self, copy_budget: int = 0) -> dict[str, tuple[str, Any, Any, Any]]:
        """{name: (kind, what is compared, the holder, the key it is held under)}: the holder is
        a module, or the default argument (dict or list) itself."""
        modules = dict(self.model.named_modules())
        state: dict[str, tuple[str, Any, Any, Any]] = {}
        for name, buffer in self.model.named_buffers():
            size = buffer.numel() * buffer.element_size()
            copied = size <= copy_budget
            copy_budget -= size if copied else 0
            prefix, _, key = name.rpartition(".")
            state[name] = ("a buffer", buffer.detach().clone() if copied else (buffer, _version(buffer)), modules[prefix], key)
        for name, param in self.model.named_parameters():
            prefix, _, key = name.rpartition(".")
            state[name] = ("a parameter", (param, _version(param)), modules[prefix], key)
        for prefix, module in modules.items():
            for key, value in vars(module).items():
                attr = f"{prefix}.{key}" if prefix else key
                if key.startswith("_"):
                    continue
                if isinstance(value, torch.Tensor):
                    state[attr] = ("a tensor attribute", (value, _version(value)), module, key)
                elif isinstance(value, torch.Generator):  # a model's own generator, which no --seed reaches
                    state[attr] = ("a random generator", value.get_state(), module, key)
                elif isinstance(value, (bool, int, float, str)):
                    state[attr] = ("an attribute", value, module, key)
        # a forward's mutable default argument that it fills (UVA's proprioception_input={}) outlives the call
        for cls in dict.fromkeys(type(m) for m in self.model.modules()):
            forward = inspect.getattr_static(cls, "forward", None)  # (a scripted module's class raises on `.forward`)
            try:
                params = inspect.signature(forward).parameters.values()
            except (TypeError, ValueError):  # a forward written in C, or TorchScript's: no Python defaults to fill
                continue
            for param in params:
                if isinstance(param.default, (dict, list)):
                    items = param.default.items() if isinstance(param.default, dict) else enumerate(param.default)
                    state[f"{cls.__name__}.forward's {param.name}"] = (
                        "a mutable default argument", [(key, _identity(value)) for key, value in items], param.default, None)
        return state

    def changes(self) -> list[str]:
        """Each part of the state the forward changed, described."""
        after = self._state()
        changed, self.changed = [], {}
        for name in dict.fromkeys([*self.before, *after]):
            if name not in after or name not in self.before:
                kind = (after.get(name) or self.before[name])[0]
                said = f"{name} ({kind}, {'set' if name in after else 'removed'})"
            else:
                (kind, then, *_), (_, now, *_) = self.before[name], after[name]
                said = None
                if kind == "a random generator":
                    if not torch.equal(then, now):
                        said = f"{name} ({kind}, advanced)"
                elif isinstance(then, torch.Tensor):  # a buffer's copy, against the buffer itself
                    if not _same_bits(then, now[0]):
                        said = f"{name} ({kind})"
                elif isinstance(then, tuple):  # (tensor, its version counter)
                    if then[0] is not now[0]:
                        said = f"{name} ({kind}, replaced)"
                    elif then[1] != now[1]:
                        said = f"{name} ({kind}, changed in place)"
                elif then != now:
                    said = f"{name} ({kind}, filled)" if kind == "a mutable default argument" else \
                        f"{name} ({kind}: {then!r} -> {now!r})"
            if said is not None:
                changed.append(said)
                self.changed[name] = after.get(name)
        return changed

    def keep(self) -> Callable[[], None] | None:
        """What the changed parts hold now, and a function that puts it back (after a replay of
        the forward); None where a part was removed, or where copies of its tensors would take
        more than STATE_COPY_BYTES. Called right after changes(), whose walk of the state it uses."""
        puts: list[Callable[[], None]] = []
        budget = STATE_COPY_BYTES
        for part in self.changed.values():
            if part is None:
                return None
            kind, _, holder, key = part
            if kind == "a mutable default argument":
                kept = dict(holder) if isinstance(holder, dict) else list(holder)
                puts.append(functools.partial(_refill, holder, kept))
                continue
            value = getattr(holder, key)
            if isinstance(value, torch.Tensor):
                budget -= value.numel() * value.element_size()
                if budget < 0:
                    return None
                puts.append(functools.partial(_put_tensor, holder, key, value, value.detach().clone()))
            elif isinstance(value, torch.Generator):
                puts.append(functools.partial(value.set_state, value.get_state()))
            else:
                puts.append(functools.partial(setattr, holder, key, value))

        def put_back() -> None:
            for put in puts:
                put()

        return put_back


def _refill(holder: dict | list, kept: dict | list) -> None:
    if isinstance(holder, dict):
        holder.clear()
        holder.update(kept)
    else:
        holder[:] = kept


def _put_tensor(module: torch.nn.Module, key: str, tensor: torch.Tensor, kept: torch.Tensor) -> None:
    """The tensor a module held under key, holding its kept values again."""
    if getattr(module, key) is not tensor:
        setattr(module, key, tensor)
    with torch.inference_mode(tensor.is_inference()), torch.no_grad():  # an inference tensor changes only in inference mode
        tensor.copy_(kept)


def _identity(value: Any) -> Any:
    """A plain value as itself (a mode's name set again each call is no change), anything else by id."""
    return value if isinstance(value, (str, bytes, int, float, bool, type(None))) else id(value)


def _version(t: torch.Tensor) -> int | None:
    """Its version counter, which in-place changes bump (a tensor made under inference mode has none)."""
    return None if t.is_inference() else t._version


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes, devices and bytes (NaN equal to the same NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(
        a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def _state_note(changes: list[str], dependent: list[str] | None) -> str:
    """What the watched forward changed of the model's state, and whether the rows depend on it."""
    def listed(items: list[str]) -> str:
        more = len(items) - STATE_CHANGES_SHOWN
        return ", ".join(items[:STATE_CHANGES_SHOWN]) + (f" and {more} more" if more > 0 else "")

    shown = listed(changes)
    depends = ("a row depends on the batches before it, and a resume, another --batch-size or another order of the "
               "data gives other rows")
    if dependent is None:
        return f"the forward changes the model's own state ({shown}): where a later forward reads it, {depends}"
    if dependent:
        return (f"the forward changes the model's own state ({shown}), and the rows depend on it (the second batch, "
                f"run again from the state it left, gave other values for {listed(dependent)}): {depends}")
    return (f"the forward changes the model's own state ({shown}), but the rows do not depend on it: the second "
            "batch, run again from the state it left, gave the same activations")


def _say_state(changes: list[str], dependent: list[str] | None) -> None:
    """A warning where the rows may depend on the batches before them; a note where they do not."""
    (log.info if dependent == [] else log.warning)(_state_note(changes, dependent))


def _rows_on_state(watch: _StateWatch, model: torch.nn.Module, forward: Callable, batch: Any, index: Sequence[int],
                   device: torch.device, capture: hooks.Capture, first: Mapping[str, torch.Tensor], opts: ExtractOptions,
                   autocast: Callable[[], Any]) -> list[str] | None:
    """Runs the watched batch's forward once more, from the state its first run left, then puts
    that state back: the layers whose captures came out otherwise (their rows depend on the
    state); [] where every capture came out the same bits (the state is written, or read only
    past the hooked layers); None where the changed state is too large to keep a copy of (the
    forward is not run again), or where running it again fails."""
    put_back = watch.keep()
    if put_back is None:
        return None
    log.info("the forward changed the model's own state: running the second batch again, to see whether the rows depend on it")
    capture.start_batch(len(index))
    seed_generators(opts.seed, int(index[0]), _BATCH, device)
    try:
        with torch.inference_mode(not opts.train_mode), autocast():
            try:
                forward(model, _to_device(batch, device))
            except hooks.StopForward:
                pass
        again = capture.captured()
    except Exception as exc:  # noqa: BLE001 - the check must not stop a run that goes on without it
        log.warning("running the second batch again failed (%s: %s): whether the rows depend on the state it changed "
                    "is not known", type(exc).__name__, " ".join(str(exc).split()))
        return None
    finally:
        capture.forget()
        put_back()
    return [name for name in dict.fromkeys([*first, *again])
            if name not in first or name not in again or not _same_bits(first[name], again[name])]


def _run_batch(model, forward, capture: hooks.Capture, batch: Any, rows: int, shapes: dict, opts: ExtractOptions,
               autocast: Callable[[], Any]) -> tuple[dict, dict, Any, list[str]]:
    """(the hooked tensors, the token counts of the samples of the uneven ones, nested tensors and
    packed sequences (their tensors padded), the forward's return (hooks.StopForward where --stop-early cut it),
    the layers that did not fire, whose `rows` rows are NaN)."""
    with torch.inference_mode(not opts.train_mode), autocast():
        try:
            out = forward(model, batch)
        except hooks.StopForward:
            out = hooks.StopForward  # every hooked module has fired: the rest of the forward is not needed
        tensors = capture.finish_batch()
        missing = [sel.store_name for sel in capture.layers if sel.store_name not in tensors]
        for sel in capture.layers:  # --allow-missing: a module that did not fire gives NaN rows
            if sel.store_name in missing:
                if sel.store_name not in shapes:
                    raise ExtractError(f"{sel.label} did not fire in the first batch, so its shape is unknown")
                shape, dtype, device = shapes[sel.store_name]
                tensors[sel.store_name] = torch.full((rows, *shape[1:]), float("nan"), dtype=dtype, device=device)
                log.warning("%s did not fire in this batch: its rows are NaN", sel.label)
            t = tensors[sel.store_name]
            shapes.setdefault(sel.store_name, (tuple(t.shape), t.dtype, t.device))
    return tensors, capture.lengths, out, missing


def _asked_ragged(opts: ExtractOptions, selections: list[hooks.LayerSelection]) -> set[str]:
    """The store names of the layers --ragged names (by module or store name, or a pattern of them)."""
    return {sel.store_name for pattern in opts.ragged for sel in hooks.selected_by(pattern, selections, "--ragged")}


def _layout(name: str, shapes: Sequence[tuple[int, ...]], ragged: bool) -> tuple[bool, tuple[int, ...]]:
    """(stored ragged, the stored row's shape) of a layer whose first batches gave rows of these
    shapes (the batch axis left out): ragged where asked or where the token count (the rows'
    first axis) varies; any other change is an error."""
    distinct = sorted(set(shapes))
    if any(len(s) != len(distinct[0]) or s[1:] != distinct[0][1:] for s in distinct):
        raise ExtractError(f"{name}: its row shape changes between batches in more than the token axis ({distinct}); "
                           "reduce it (--reduction) or capture another module")
    ragged = ragged or len(distinct) > 1
    if ragged and len(shapes[0]) < 2:
        raise ExtractError(f"{name}: ragged storage needs (batch, tokens, ...) activations, got rows of shape {shapes[0]}")
    return ragged, shapes[0][1:] if ragged else shapes[0]


class _BatchRows(NamedTuple):
    """One batch, from its forward to the store."""
    index: torch.Tensor  # the source index of each row
    tensors: dict[str, torch.Tensor]  # {store name: the hooked tensor}
    targets: dict[str, Any]
    outputs: dict[str, Any]  # the forward's scalars
    skipped: list[tuple[int, str]]  # items left out before the batch, committed with its rows
    lengths: dict[str, list[int]]  # an uneven capture's token count for each sample (its tensor padded)


def _layer_specs(opts, selections, capture: hooks.Capture, pending: list[_BatchRows]) -> list[LayerSpec]:
    specs = []
    ragged_asked = _asked_ragged(opts, selections)
    for sel in selections:
        shapes = [tuple(p.tensors[sel.store_name].shape[1:]) for p in pending]
        asked = sel.store_name in ragged_asked
        uneven = any(sel.store_name in p.lengths for p in pending)
        ragged, row_shape = _layout(sel.store_name, shapes, asked or uneven)
        if uneven and not asked:
            log.info("%s: samples of different lengths (a nested tensor or a packed sequence): stored ragged",
                     sel.store_name)
        elif ragged and not asked:
            log.info("%s: token count varies between batches (%s): stored ragged", sel.store_name,
                     sorted({s[0] for s in shapes}))
        first = pending[0].tensors[sel.store_name]
        source = str(capture.source_dtypes.get(sel.store_name, first.dtype)).replace("torch.", "")
        specs.append(LayerSpec(sel.store_name, row_shape, dtype=opts.dtype, source_dtype=source,
                               reduction=hooks.recorded_reduction(sel.reduction, sel.channels_first), ragged=ragged,
                               compression=opts.compression,
                               channel_axis=None if ragged else capture.channel_axes.get(sel.store_name),
                               **_unfolded(capture.unfolded.get(sel.store_name))))
    return specs


def _unfolded(layout: hooks.UnfoldLayout | None) -> dict[str, Any]:
    """A LayerSpec's record of an unfolded capture: its rows a sample, and its layout."""
    return {} if layout is None else {"unfolded": layout.per_sample, "unfold_layout": str(layout)}


def _open_writer(opts, selections, capture: hooks.Capture, pending: list[_BatchRows], metadata,
                 start_row: int) -> StoreWriter:
    specs = _layer_specs(opts, selections, capture, pending)
    metadata["forward_order"] = capture.forward_order  # (a resume keeps the order its store recorded)
    targets = []
    for name, path in map(target_entry, opts.targets):
        value = pending[0].targets[name]
        targets.append(TargetSpec(name, tuple(value.shape[1:]), _target_dtype(name, value, path)))
    _check_room(opts, specs, targets, pending, metadata["rows_planned"] - start_row, metadata["world_size"])
    # On --resume the options were compared already (_check_resume); the store keeps the run
    # description it was started with (its command line has no --resume).
    # On the CPU the model's threads use every core: batches are written between forwards
    # rather than by a thread that competes with them (measured in benchmarks/RESULTS.md).
    cpu = all(t.device.type == "cpu" for t in pending[0].tensors.values())
    return StoreWriter(opts.out, specs, targets, None if opts.resume else metadata, commit_rows=opts.commit_rows,
                       resume=opts.resume, background=not cpu, expected_rows=metadata["rows_planned"])


def _check_room(opts: ExtractOptions, specs: list[LayerSpec], targets: list[TargetSpec], pending: list[_BatchRows],
                rows: int, world: int) -> None:
    """Says how much the run will write, and refuses to start one that the disk cannot take
    (hours in, it would stop there). Exact for uncompressed dense layers in one process; ragged
    layers' token counts are taken from the first batches, so with them (or compression, or
    ranks that share the filesystem) it is an estimate and only a warning."""
    itemsize = STORE_DTYPES[opts.dtype].itemsize
    first_rows = sum(len(p.index) for p in pending)
    row_bytes = 8  # the source index
    for spec in specs:
        values = math.prod(spec.row_shape) * itemsize
        if spec.ragged:  # tokens per row in the first batches, and one offset a row
            tokens = sum(sum(p.lengths[spec.name]) if spec.name in p.lengths else math.prod(p.tensors[spec.name].shape[:2])
                         for p in pending) / first_rows
            row_bytes += round(tokens * values) + 8
        else:
            row_bytes += values
    for t in targets:
        if t.dtype == TEXT:  # a 16-byte reference a string in the dataset, the string and its header in the heap
            texts = [v for p in pending for v in p.targets[t.name].flat]
            row_bytes += round(math.prod(t.row_shape) * (32 + sum(len(v.encode()) for v in texts) / max(1, len(texts))))
        else:
            row_bytes += math.prod(t.row_shape) * np.dtype(t.dtype).itemsize
    need = row_bytes * rows * world
    file_size = os.path.getsize(opts.out) if opts.resume and os.path.exists(opts.out) else 0
    room, what = room_left(opts.out, file_size)
    scope = f"{rows} rows" + (f" on each of {world} ranks" if world > 1 else "")
    log.info("this run writes about %s (%s of %s) to %s; %s %s", human_bytes(need), scope, human_bytes(row_bytes), opts.out,
             human_bytes(room), what)
    if need <= room:
        return
    estimate = opts.compression or world > 1 or any(spec.ragged for spec in specs) or any(t.dtype == TEXT for t in targets)
    message = (f"{opts.out}: this run needs {'about ' if estimate else ''}{human_bytes(need)} ({scope} of "
               f"{human_bytes(row_bytes)}) but only {human_bytes(room)} are {what}; make room, write elsewhere (--out), "
               "reduce the tokens (--reduction), hook fewer layers or extract fewer rows (--num-samples)")
    if estimate:
        log.warning("%s", message)
    else:
        raise ExtractError(message)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _submit(ring: TransferRing, writer: StoreWriter, batch: _BatchRows, out_dtype: torch.dtype) -> tuple[StoreWriter, int]:
    """The batch's tensors and the forward's scalars into a ring slot, the slot to the writer
    (with the batch's targets, index, items left out before it and uneven captures' token
    counts): (the writer, the bytes). A layer whose token count changed after the first batches
    had it stored dense is rewritten ragged first, and the writer that goes on returned."""
    tensors, lengths = batch.tensors, batch.lengths
    background = not all(t.device.type == "cpu" for t in tensors.values())
    dense = {spec.name for spec in writer.layers_spec if not spec.ragged}
    if set(lengths) & dense:  # an uneven capture where the first batches gave dense rows
        writer = _now_ragged(writer, sorted(set(lengths) & dense), None, background)
    try:
        writer.check_shapes({name: tuple(t.shape) for name, t in tensors.items()})
    except RowShapeError as exc:
        if not exc.tokens_vary:
            raise RestartNeeded(f"{exc.layer}: a batch gave rows of shape {exc.row_shape}, but {writer.path} keeps this "
                                f"layer dense with rows of {exc.expected}, as the first batches gave them; its rows must "
                                "keep one shape") from None
        varying = []  # every layer whose token count changed in this batch, rewritten at once
        for name, t in tensors.items():
            try:
                writer.check_shapes({name: tuple(t.shape)})
            except RowShapeError as other:
                if other.tokens_vary:
                    varying.append(name)
        writer = _now_ragged(writer, varying, exc, background)
    try:
        slot = ring.submit(tensors, dtype=out_dtype, scalars=batch.outputs)
    except SlotTooSmall:
        _, need = ring.layout(tensors, {n: out_dtype for n in tensors})
        log.info("transfer ring: a batch needs %s, more than a slot's %s: slots made anew, a quarter larger than that",
                 human_bytes(need), human_bytes(ring.slot_bytes))
        ring.reserve(int(need * 1.25))
        slot = ring.submit(tensors, dtype=out_dtype, scalars=batch.outputs)
    writer.append(slot, targets=batch.targets, index=batch.index.numpy(), skipped=batch.skipped, lengths=lengths)
    return writer, sum(t.numel() for t in tensors.values()) * out_dtype.itemsize


def _now_ragged(writer: StoreWriter, layers: list[str], change: RowShapeError | None, background: bool) -> StoreWriter:
    """A token count changed after the first batches had these layers stored dense (MAR's
    encoder, whose first two batches kept as many tokens; change None: samples of different
    lengths, a nested tensor or a packed sequence): the rows written so far are committed and
    rewritten ragged, the store's options record it (--ragged, so that a resume agrees), and a
    writer reopens the store to go on. Said in a warning, which names the flag that would have
    stored them ragged from the start."""
    writer.close(complete=False)
    flag = " ".join(shlex.quote(p) for p in _covering(layers, [spec.name for spec in writer.layers_spec]))
    gave = ("samples of different lengths (a nested tensor or a packed sequence) where the first batches gave dense rows"
            if change is None else f"rows of {change.row_shape[0]} tokens where the first batches gave {change.expected[0]}")
    log.warning("%s: a batch gave %s, and they were stored dense; rewriting the %d rows stored so far ragged, then going "
                "on (--ragged %s stores them ragged from the start)", ", ".join(layers), gave, writer.committed, flag)
    with open_store(writer.path) as store:
        run = store.metadata
    options = run.get("options", {})
    ragged = list(options.get("ragged", [])) + [name for name in layers if name not in options.get("ragged", [])]
    try:
        convert_to_ragged(writer.path, layers, {**run, "options": {**options, "ragged": ragged}})
    except StoreError as exc:
        raise ExtractError(f"{layers[0]}: its token count changed after the first batches had it stored dense, and "
                           f"its rows cannot be rewritten ragged: {exc}") from None
    specs = [LayerSpec(**as_ragged(asdict(spec))) if spec.name in layers else spec for spec in writer.layers_spec]
    return StoreWriter(writer.path, specs, writer.targets_spec, commit_rows=writer.commit_rows, resume=True,
                       background=background, expected_rows=writer.expected_rows)


def _option_defaults() -> dict:
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(ExtractOptions) if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING}


def _json(value: Any) -> Any:
    """As the store's JSON attributes give it back."""
    return json.loads(json.dumps(value, default=str))


def _check_resume(opts: ExtractOptions, metadata: dict, selections: list[hooks.LayerSelection]) -> tuple[int, set[str]]:
    """(the planned items to continue after, the layers the store keeps ragged). A --ragged
    that names layers the store keeps dense has their committed rows rewritten ragged first, as
    a run rewrites a layer whose token count changes after its first batches. A layer stored
    whole keeps the channel axis the store recorded (its selection is changed to match)."""
    if not os.path.exists(opts.out):
        log.info("--resume: %s does not exist yet; starting from the beginning", opts.out)
        return 0, set()
    with open_store(opts.out) as store:
        # an option the store's version did not have yet counts as its default
        now = _json(metadata["options"])
        defaults = {k: v for k, v in _json(_option_defaults()).items() if k in now}
        recorded = {**defaults, **store.metadata.get("options", {})}
        differ = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        ragged = {name for name, info in store.layers.items() if info.layout == "ragged"} | set(store.cut_short)
        convert = []
        if "ragged" in differ:  # layers stored ragged stay so; dense ones it names now are rewritten
            differ.remove("ragged")
            convert = sorted(_asked_ragged(opts, selections) - ragged)
        if differ:
            raise ExtractError(f"--resume: the options differ from the ones {opts.out} was written with: "
                               + ", ".join(f"{k} (recorded {recorded.get(k)!r}, now {now.get(k)!r})" for k in differ))
        _check_same_weights(opts.out, store.metadata.get("checkpoint"), metadata["checkpoint"])
        _check_same_load(opts.out, store.metadata.get("load_report"), metadata["load_report"])
        # a store of an earlier marstore took a sequence module's (sequence, batch, ...) rows from their first axis
        then = {layer["store_name"]: layer.get("batch_axis", 0) for layer in store.metadata.get("layers", [])}
        moved = [sel.store_name for sel in selections if then.get(sel.store_name, sel.batch_axis) != sel.batch_axis]
        if moved:
            raise RestartNeeded(f"--resume: {opts.out} took the rows of {', '.join(moved)} from the first axis of their "
                                "(sequence, batch, ...) tensors, as marstore did before it read torch's batch_first: "
                                "those rows are positions, not samples; extract into a new store")
        # a layer stored whole whose channels this version recognises (a Sequential ending in a
        # convolution) and the store's earlier version did not: the same bytes, and the store's
        # layout is kept, so that its statistics go on over the axis they began on
        unrecorded = [sel for sel in selections if sel.reduction == "none" and sel.channels_first
                      and sel.store_name in store.layers and store.layers[sel.store_name].layout == "dense"
                      and "channel_axis" not in store.layers[sel.store_name].attrs]
        for sel in unrecorded:
            sel.channels_first = False
        if unrecorded:
            log.info("--resume: %s records no channel axis for %s (an earlier marstore's store): kept so", opts.out,
                     ", ".join(sel.store_name for sel in unrecorded))
        if store.status == "complete":
            raise ExtractError(f"--resume: {opts.out} is already complete ({store.rows} rows)")
        # every item before the resume point is a committed row or a committed item left out
        left_out = len(store.skipped())
        log.info("--resume: continuing %s after %d committed rows%s", opts.out, store.rows,
                 f" and {_items(left_out)} left out" if left_out else "")
        if store.metadata.get("seeding") != SEEDING:
            log.warning("--resume: %s was written by an earlier marstore, which seeded torch once at the start: a model or "
                        "data set that draws at random (MAR's masks) draws the rows after its %d otherwise than that run "
                        "would have", opts.out, store.rows)
        start, run = store.rows + left_out, {**store.metadata, "options": {**recorded, "ragged": now["ragged"]}}
    if convert:
        log.warning("--resume: --ragged names %s, which %s keeps dense: rewriting the rows stored so far ragged",
                    ", ".join(convert), opts.out)
        try:
            convert_to_ragged(opts.out, convert, run)
        except StoreError as exc:
            raise ExtractError(f"--resume --ragged: {exc}") from None
    return start, ragged | set(convert)


def _check_same_weights(out: str, then: dict | None, now: dict | None) -> None:
    """A resume must load the checkpoint the store's rows came from: a training run saves over
    latest.ckpt, and rows of two models in one store would read as one."""
    if (then or {}).get("sha256") == (now or {}).get("sha256"):
        return
    if then is None or now is None:
        raise ExtractError(f"--resume: {out} was written {'without a checkpoint' if then is None else 'from ' + then['path']}"
                           f", and this run {'loads ' + now['path'] if now else 'loads none'}; its rows would mix two "
                           "models' activations: extract into another --out")
    raise ExtractError(f"--resume: the checkpoint {now['path']} is not the one {out} was written from (sha256 "
                       f"{then['sha256'][:12]}... then, {now['sha256'][:12]}... now: saved over since?); its rows would "
                       f"mix two models' activations: resume with that checkpoint ({then['path']}, {then['bytes']} bytes), "
                       "or extract into another --out")


# what a resume must find as the store's run found it: which weights went where
LOAD_OUTCOME = ("loaded", "stripped_prefix", "added_prefix", "missing_count", "unexpected_count", "shape_mismatches_count")


def _check_same_load(out: str, then: dict | None, now: dict) -> None:
    """The same checkpoint must load into the model as it did for the store's rows: another
    marstore (one that strips a prefix the store's did not) or another model would give the rows
    after the resume other weights."""
    differ = [k for k in LOAD_OUTCOME if then is not None and k in then and then[k] != now.get(k)]
    if differ:
        raise ExtractError(f"--resume: the checkpoint loads into the model otherwise than when {out} was begun ("
                           + ", ".join(f"{k.replace('_', ' ')} {then[k]!r} then, {now.get(k)!r} now" for k in differ)
                           + "); its rows would mix two models' activations: extract into another --out")


def _items(n: int) -> str:
    return f"{n} item{'s' * (n != 1)}"


def describe(result: ExtractResult) -> str:
    lines = [f"wrote {result.rows} rows ({human_bytes(result.bytes)} of activations) to {result.path} in {result.seconds:.1f} s "
             f"({result.rows / max(result.seconds, 1e-9):.0f} rows/s, {_mb_per_s(result.bytes, result.seconds)}; "
             f"file {human_bytes(result.file_bytes)})"]
    for name, info in result.layers.items():
        lines.append(f"  {name:<28} {info['layout']:<6} row {tuple(info['row_shape'])}  nonfinite {info['nonfinite']}, "
                     f"overflow {info['overflow']}")
    lines += [describe_output(name, o) for name, o in result.outputs.items()]
    if result.skipped:
        lines.append(f"  left out {_items(len(result.skipped))} that the data set failed to give (the first: item "
                     f"{result.skipped[0][0]}, {result.skipped[0][1]}); `marstore info` lists them")
    r = result.load_report
    if r.get("checkpoint"):
        config_source = f"config from {r['config_key']!r}" if r.get("config_key") else "no config (--model-arg values only)"
        lines.append(f"  checkpoint {r['checkpoint']['path']} (sha256 {r['checkpoint']['sha256'][:12]}...), "
                     f"{config_source}, weights from {r['state_key']!r}; {loading.LoadReport.counts(r)}")
    else:
        lines.append("  checkpoint: none recorded (the model ran with the weights it had)")
    return "\n".join(lines)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["marstore", *sys.argv[1:]])


