"""Checkpoint -> model: whatever layout the checkpoint has, with every fallback reported.

    ckpt = read_checkpoint("latest.ckpt")                     # safe: weights_only=True
    config, config_key = find_config(ckpt, "cfg.model")      # or the first of CONFIG_KEYS
    state, state_key = find_state_dict(ckpt)                  # EMA weights where there are any
    model = build_model("pkg.mod:factory", config, overrides={"depth": 2})
    report = load_weights(model, state, strict=False)         # prefixes, missing, unexpected, shapes

Every choice made here (the config key, the weights, a stripped prefix) is logged and kept in
the LoadReport, which extraction records in the store.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import difflib
import hashlib
import importlib
import importlib.machinery
import inspect
import json
import logging
import os
import pathlib
import pickle
import re
import sys
import sysconfig
import traceback
import types
import typing
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping

import torch

from marstore.errors import MarstoreError

log = logging.getLogger(__name__)

CONFIG_KEYS = ("model_config", "config", "hyper_parameters", "hparams", "cfg", "args")
# (key path, is EMA), in order of preference for the default choice of weights
STATE_KEYS = (
    ("state_dicts.ema_model", True),
    ("model_ema", True),
    ("ema_state_dict", True),
    ("state_dict_ema", True),  # timm's train.py
    ("ema", True),  # DiT's and its descendants' {"model", "ema", "opt", "args"}
    ("state_dicts.model", False),
    ("model_state_dict", False),
    ("state_dict", False),
    ("model", False),
    ("module", False),  # DeepSpeed's mp_rank_00_model_states.pt
)
# the names of a builder's one parameter that takes the config whole (Net(cfg), build_model(args), Model(config))
CONFIG_PARAMETERS = ("cfg", "config", "conf", "args", "opt", "opts", "options", "hparams", "hp", "params", "settings")
CONFIG_PARAMETER_ENDINGS = ("_cfg", "_config", "_conf", "_args", "_hparams", "_opts", "_options")
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
INDEX_SUFFIX = ".index.json"  # Hugging Face's sharded checkpoints: model.safetensors.index.json
_PREFIX_CHAINS = KNOWN_PREFIXES + tuple(a + b for a in KNOWN_PREFIXES for b in KNOWN_PREFIXES if a != b)


class CheckpointError(MarstoreError):
    """The checkpoint or model cannot be used as asked; the message says why and what to do."""


@dataclass
class CheckpointInfo:
    path: str
    bytes: int
    sha256: str


@dataclass
class LoadReport:
    checkpoint: CheckpointInfo | None = None
    config_key: str | None = None
    state_key: str | None = None
    stripped_prefix: str | None = None
    ignored_outside_prefix: int = 0
    added_prefix: str | None = None  # the checkpoint holds a module that the model holds inside it
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    loaded: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.state_key or 'the state dict'}"]
        if self.stripped_prefix:
            parts.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.added_prefix:
            parts.append(f"added prefix {self.added_prefix!r}")
        for what, names in (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatches", self.shape_mismatches)):
            if names:
                parts.append(f"{len(names)} {what} (first: {', '.join(names[:3])})")
        return "; ".join(parts)

    @staticmethod
    def counts(d: Mapping[str, Any]) -> str:
        """What loading found, from the as_dict() form that a store records: for a summary line."""
        prefix = (f" (prefix {d['stripped_prefix']!r} stripped)" if d.get("stripped_prefix") else
                  f" (prefix {d['added_prefix']!r} added)" if d.get("added_prefix") else "")
        return (f"loaded {d['loaded']} tensors{prefix}, {d['missing_count']} missing, {d['unexpected_count']} unexpected, "
                f"{d['shape_mismatches_count']} shape mismatches" + "".join(f"; {note}" for note in d.get("notes", [])))

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("missing", "unexpected", "shape_mismatches"):
            d[f"{key}_count"] = len(d[key])
            d[key] = d[key][:20]
        return d


# what a folder of weights holds, in order of preference (Hugging Face's save_pretrained writes these,
# diffusers' the diffusion_pytorch_model ones), with the model's config in config.json beside them
FOLDER_CHECKPOINTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
                      "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin")
FOLDER_CONFIG = "config.json"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", INDEX_SUFFIX)


def resolve_checkpoint(path: str, quiet: bool = False) -> str:
    """A checkpoint file, or a folder that torch.distributed.checkpoint wrote (FSDP's sharded
    checkpoints); another folder gives the weights Hugging Face's save_pretrained writes into
    it, and one without them (a training run's checkpoints/) is refused with the files to name."""
    if not os.path.isdir(path) or _is_dcp(path):
        return path
    for name in FOLDER_CHECKPOINTS:
        if os.path.isfile(os.path.join(path, name)):
            if not quiet:
                log.info("checkpoint %s is a folder: reading its %s", path, name)
            return os.path.join(path, name)
    found = sorted(name for name in os.listdir(path) if name.endswith(CHECKPOINT_SUFFIXES))
    raise CheckpointError(f"checkpoint {path} is a folder without the weights save_pretrained writes (model.safetensors, "
                          "pytorch_model.bin, diffusion_pytorch_model.safetensors, or their index) nor a distributed "
                          f"checkpoint's {DCP_METADATA}; name one of its checkpoints: {', '.join(found[:8]) or 'it holds none'}"
                          f"{' ...' if len(found) > 8 else ''}")


def checkpoint_files(path: str) -> list[str]:
    """The file, a sharded checkpoint's index and its shards, or a distributed checkpoint's
    metadata and data files."""
    path = resolve_checkpoint(path, quiet=True)
    if _is_dcp(path):
        return [os.path.join(path, DCP_METADATA), *sorted(os.path.join(path, name) for name in os.listdir(path)
                                                          if name.endswith(".distcp"))]
    return [path, *_shards(path)] if path.endswith(INDEX_SUFFIX) else [path]


def checkpoint_bytes(path: str) -> int:
    """The bytes of the checkpoint's files (checkpoint_files)."""
    return sum(os.path.getsize(name) for name in checkpoint_files(path))


def file_digest(path: str) -> CheckpointInfo:
    """The checkpoint's size and sha256; of a sharded one's index, over the index and its shards
    in order, so that a shard saved over since tells too."""
    h = hashlib.sha256()
    files = checkpoint_files(path)
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    named = path if _is_dcp(path) else files[0]  # a distributed checkpoint: its folder
    return CheckpointInfo(os.path.abspath(named), sum(os.path.getsize(name) for name in files), h.hexdigest())


def _shards(index_path: str) -> list[str]:
    """The shard files an index names, in order, beside it."""
    folder = os.path.dirname(index_path)
    shards = [os.path.join(folder, name) for name in sorted(set(_read_index(index_path).values()))]
    missing = [os.path.basename(shard) for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise CheckpointError(f"checkpoint index {index_path} names the shards {missing}, which are not beside it")
    return shards


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint index {path} cannot be read ({' '.join(str(exc).split())})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"checkpoint index {path} holds no weight_map of tensor names to shard files, as a sharded "
                              "checkpoint's index does")
    return weight_map


def _read_sharded(path: str, trust: bool, report: LoadReport | None) -> dict[str, torch.Tensor]:
    """A sharded checkpoint (an index and the shards it names, .safetensors or torch files) as one
    state dict, each tensor taken from the shard the index names for it."""
    weight_map = _read_index(path)
    state: dict[str, torch.Tensor] = {}
    for shard in _shards(path):
        part = read_checkpoint(shard, trust=trust, report=report)
        if not _is_state(part):
            raise CheckpointError(f"shard {shard} of {path} is not a state dict (a mapping of names to tensors)")
        mine = {name for name, file in weight_map.items() if file == os.path.basename(shard)}
        if set(part) != mine:
            lacks, extra = sorted(mine - set(part)), sorted(set(part) - mine)
            raise CheckpointError(f"shard {shard} does not hold what {os.path.basename(path)} says: it lacks "
                                  f"{lacks[:5]}{' ...' if len(lacks) > 5 else ''} and holds {extra[:5]}"
                                  f"{' ...' if len(extra) > 5 else ''} besides")
        state.update(part)
    log.info("%s: %d tensors from %d shards", path, len(state), len(set(weight_map.values())))
    return state


def read_checkpoint(path: str, trust: bool = False, report: LoadReport | None = None) -> Any:
    """torch.load with weights_only=True (configs allowed: _config_global_names), unless
    trust=True, the file's tensors memory-mapped (_mappable); a .safetensors file is read as the
    flat state dict it holds (it never holds a pickle). In a trusted load, objects whose code is
    not importable here become inert stand-ins (logged, and noted in `report`): a workspace's
    pickled normalizer should not keep its weights from loading. Weights that save_pretrained
    wrote beside a config.json come as {"config": its values, "state_dict": the weights}; a
    torch.distributed.checkpoint folder as the dict it was saved from (_read_dcp)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    path = resolve_checkpoint(path)
    ckpt = _read_resolved(path, trust, report)
    config_path = os.path.join(os.path.dirname(path), FOLDER_CONFIG)
    if os.path.basename(path) not in FOLDER_CHECKPOINTS or not os.path.isfile(config_path):
        return ckpt
    try:  # Hugging Face's and diffusers' folders: the model's config beside its weights
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}, beside the weights {path}, cannot be read as JSON "
                              f"({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}, beside the weights {path}, holds a {type(config).__name__}, not the "
                              "mapping of a model's config")
    log.info("%s: its config is the %s beside it (checkpoint['config'])", path, FOLDER_CONFIG)
    return {"config": config, "state_dict": ckpt}


def _read_resolved(path: str, trust: bool, report: LoadReport | None) -> Any:
    if _is_dcp(path):
        return _read_dcp(path, trust)
    if path.endswith(INDEX_SUFFIX):
        return _read_sharded(path, trust, report)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if not zipfile.is_zipfile(path):  # torch.save's legacy format is a pickle: protocol 2 or later starts with 0x80
        with open(path, "rb") as f:
            head = f.read(8)
        if not head.startswith(b"\x80"):
            what = "an HDF5 file (a marstore store?)" if head.startswith(b"\x89HDF") else f"a file that starts {head!r}"
            raise CheckpointError(f"checkpoint {path} is not a file that torch.save or safetensors writes (a zip archive, "
                                  f"or a pickle of torch's legacy format): it is {what}")
    if trust:
        log.warning("loading %s with full unpickling (--trust-checkpoint): it can run code", path)
        unpickler = _StandInUnpickler.module()
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=unpickler, mmap=_mappable(path))
        except (ImportError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path} needs what this torch or numpy lacks ({exc}); was it saved by "
                                  f"another version? (here: torch {torch.__version__})") from None
        if unpickler.stand_ins:
            names = sorted(unpickler.stand_ins)
            note = (f"stand-ins for {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}, whose code is not "
                    "importable here")
            log.warning("checkpoint %s: %s (install their package if the model needs them)", path, note)
            if report is not None:
                report.notes.append(note)
        return ckpt
    if _is_torchscript(path):
        raise CheckpointError(f"checkpoint {path} is a TorchScript archive (torch.jit.save), which a safe load does not "
                              "read: its code runs as it loads; if you trust its source, pass --trust-checkpoint (its "
                              "weights are then the module's state_dict)")
    try:
        with torch.serialization.safe_globals(_config_global_names()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_mappable(path))
    except Exception as exc:  # noqa: BLE001 - turned into a clear message below
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise CheckpointError(f"checkpoint {path} cannot be read: {' '.join(str(exc).split())[:300]}") from None
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - the names are a courtesy; the refusal stands
            names = []
        # the checkpoint's own classes first (they say what it is), then torch's; each in order
        allowed = {name for _, name in _config_global_names()}
        names = sorted((n for n in names if n not in allowed), key=lambda n: (n.startswith("torch."), n))
        listed = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "classes it does not name"
        missing = "" if not any(n.startswith("omegaconf.") for n in names) or _omegaconf_classes() else \
            " (its config is an OmegaConf one, which a safe load reads where omegaconf is installed: pip install omegaconf)"
        raise CheckpointError(
            f"checkpoint {path} needs unpickling of {listed}, which a safe load refuses{missing}; if you trust "
            "its source, pass --trust-checkpoint"
        ) from None


def _is_torchscript(path: str) -> bool:
    """A torch.jit.save archive (its constants.pkl, as torch.load tells one), which torch.load
    would hand to torch.jit.load."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _mappable(path: str) -> bool:
    """Whether torch.load can map the file's tensors rather than read them: a training
    checkpoint's optimizer moments (twice the weights with AdamW) and the weights not chosen are
    then never read into memory. Files of torch's legacy format are read whole."""
    return zipfile.is_zipfile(path)


# Builtin types by the names dill's pickles give them (diffusion_policy and UVA save their
# workspaces with pickle_module=dill, which writes `dill._dill._load_type('dict')` for dict)
_DILL_TYPES = {t.__name__: t for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bool, type(None))}


def _dill_load_type(name: str) -> type:
    """dill._dill._load_type for a safe load: builtin container and scalar types only."""
    if name not in _DILL_TYPES:
        raise pickle.UnpicklingError(f"dill type {name!r} is not one a safe load reads (only {sorted(_DILL_TYPES)})")
    return _DILL_TYPES[name]


def _omegaconf_classes() -> list[type]:
    """The classes an OmegaConf config (UVA's and diffusion_policy's cfg) pickles as; [] without
    omegaconf. Their unpickling sets state and runs no code of the checkpoint's."""
    try:
        from omegaconf import DictConfig, ListConfig, base, nodes
    except ImportError:
        return []
    return [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, nodes.AnyNode, nodes.StringNode,
            nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, nodes.BytesNode]


def _config_global_names() -> list[tuple[Any, str]]:
    """(object, the name a pickle gives it) of what a safe load allows beside tensors: configs
    (argparse.Namespace as MAR's args; OmegaConf's classes as UVA's cfg) and the builtins and
    types they refer to, dill's way of naming them included; plain values (paths, times); numpy's
    numbers and arrays."""
    plain = [argparse.Namespace, collections.defaultdict, typing.Any, *_DILL_TYPES.values(), *_omegaconf_classes(),
             *PLAIN_VALUES]
    named = [(obj, f"{obj.__module__}.{getattr(obj, '__qualname__', getattr(obj, '_name', None))}") for obj in plain]
    return named + [(_dill_load_type, "dill._dill._load_type")] + _numpy_global_names()


# values that configs and training scripts keep beside the weights (a Namespace's type=Path arguments,
# a run's start time) and whose making runs no code of the checkpoint's
PLAIN_VALUES = (pathlib.PurePosixPath, pathlib.PosixPath, datetime.datetime, datetime.date, datetime.time,
                datetime.timedelta, datetime.timezone, frozenset, slice, range)


def _numpy_global_names() -> list[tuple[Any, str]]:
    """numpy's scalars and arrays of numbers, text and booleans, as numpy 1 and 2 name them in a
    pickle: training scripts keep metrics (np.float64) and their RNG state (np.random.get_state())
    beside the weights. Data, not code: an object array's items still need their own classes."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    named = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for name in ("_reconstruct", "scalar"):
        named += [(getattr(multiarray, name), f"{package}.multiarray.{name}") for package in ("numpy.core", "numpy._core")]
    kinds = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")
             and n not in ("ObjectDType", "VoidDType")]  # (numpy's own dtype classes, pickled by some versions)
    return named + [(kind, f"numpy.dtypes.{kind.__name__}") for kind in kinds]


class StandIn:
    """An object of a class whose code is not importable here: it keeps what the pickle gave it
    (arguments, state, items) and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__.setdefault("_args", args)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (state, slot state)
            state = state[0] if state[0] is not None else state[1]
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {type(self).__module__}.{type(self).__qualname__}>"


class _StandInUnpickler(pickle.Unpickler):
    stand_ins: set[str]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.split(".")[0] in ("torch", "numpy", "builtins", "collections"):
                raise  # not a missing package: a checkpoint from another version of these, said below
            type(self).stand_ins.add(f"{module}.{name}")
            return type(name, (StandIn,), {"__module__": module, "__qualname__": name})

    @classmethod
    def module(cls) -> Any:
        """What torch.load takes as pickle_module, with a fresh record of the stand-ins made."""
        unpickler = type("StandInUnpickler", (cls,), {"stand_ins": set()})
        return types.SimpleNamespace(Unpickler=unpickler, load=pickle.load, stand_ins=unpickler.stand_ins,
                                     __name__="pickle")


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif hasattr(obj, part) and not isinstance(obj, Mapping):
            obj = getattr(obj, part)
        else:
            raise KeyError(part)
    return obj


def to_plain(obj: Any, where: str = "") -> Any:
    """argparse.Namespace, OmegaConf configs and nested mappings -> plain dicts and lists.
    `where` names obj in messages (the config's key in the checkpoint)."""
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if type(obj).__module__.startswith("omegaconf"):
        unresolved: list[str] = []
        _escape_resolver_calls(obj, where, unresolved)
        plain = _plain_omegaconf(obj, where, unresolved)
        if unresolved:
            log.warning("the config keeps %d value%s unresolved, as written: %s; if the model needs them, give them "
                        "with --model-arg KEY=VALUE", len(unresolved),
                        "s" * (len(unresolved) > 1), "; ".join(unresolved[:5]) + (" ..." if len(unresolved) > 5 else ""))
        return plain
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# OmegaConf's own resolvers that read nothing outside the config (oc.env reads the environment)
SAFE_RESOLVERS = ("oc.select", "oc.create", "oc.decode", "oc.deprecated", "oc.dict.keys", "oc.dict.values")
_RESOLVER_CALL = re.compile(r"(?<!\\)\$\{\s*([A-Za-z_][\w.]*)\s*:")


def _escape_resolver_calls(node: Any, path: str, unresolved: list[str]) -> None:
    """Escapes to their text, in the whole config that node is part of, the values that call a
    resolver other than SAFE_RESOLVERS (those of node listed in `unresolved`): a resolver that the
    importing code registered (diffusion_policy registers Python's eval as ${eval:...}) must not
    run what a checkpoint's config says, nor ${oc.env:...} copy the environment into the store's
    record of the config. In place, so that node's references to the rest still resolve."""
    from omegaconf import OmegaConf, open_dict, read_write

    def calls(value: Any, at: tuple) -> Iterator[tuple[tuple, str, str]]:
        if isinstance(value, (dict, list)):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                yield from calls(item, (*at, key))
        elif isinstance(value, str):
            called = [m.group(1) for m in _RESOLVER_CALL.finditer(value) if m.group(1) not in SAFE_RESOLVERS]
            if called:
                yield at, value, called[0]

    for at, value, name in calls(OmegaConf.to_container(node, resolve=False), ()):
        unresolved.append(f"{'.'.join(map(str, (path, *at) if path else at))} = {value!r} (it calls resolver {name!r}, "
                          "which is not run on a checkpoint's config)")
    root = node._get_root() if hasattr(node, "_get_root") else node
    with read_write(root), open_dict(root):
        for at, value, _ in list(calls(OmegaConf.to_container(root, resolve=False), ())):
            parent = root
            for key in at[:-1]:
                parent = parent[key]
            parent[at[-1]] = _RESOLVER_CALL.sub(lambda m: "\\" + m.group(0), value)


def _plain_omegaconf(node: Any, path: str, unresolved: list[str]) -> Any:
    """An OmegaConf config as plain dicts and lists, each interpolation resolved where it can be.
    One that cannot (a key that is not there, a ??? left missing) keeps its text and is listed in
    `unresolved`, so that one such value elsewhere in the config does not stop the run."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(node, resolve=False)
    if raw is None:  # a config that is None as a whole
        return None
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    plain: Any = {} if isinstance(node, DictConfig) else []
    for key in keys:
        where = f"{path}.{key}" if path else str(key)
        try:
            value = node[key]
        except OmegaConfBaseException as exc:
            value = raw[key]
            unresolved.append(f"{where} = {value!r} ({str(exc).splitlines()[0]})")
        if isinstance(value, (DictConfig, ListConfig)):
            value = _plain_omegaconf(value, where, unresolved)
        if isinstance(plain, dict):
            plain[str(key)] = value
        else:
            plain.append(value)
    return plain


DCP_METADATA = ".metadata"  # what torch.distributed.checkpoint writes beside its __R_N.distcp files
# a training checkpoint's parts that no model's weights are in: not read from a distributed checkpoint
TRAINING_STATE_KEYS = ("optimizer", "optimizers", "optim", "optimizer_states", "lr_scheduler", "lr_schedulers", "scheduler")


def _is_dcp(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DCP_METADATA))


class _DcpMetadataUnpickler(pickle.Unpickler):
    """The metadata of a distributed checkpoint (which torch pickles) without running its code:
    torch.distributed.checkpoint's metadata classes, torch's sizes, dtypes and layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module == "torch.distributed.checkpoint.metadata" or (module, name) in {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
            ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _read_dcp(path: str, trust: bool) -> dict[str, Any]:
    """A torch.distributed.checkpoint folder as the nested dict it was saved from, in this one
    process (torch's own dcp_to_torch_save way); its metadata and non-tensor values read as
    safely as a torch file is (unless trust), and the optimizer's and scheduler's state left
    unread, said in the log."""
    try:  # private, as torch's own converter (format_utils.dcp_to_torch_save) uses them
        from torch.distributed.checkpoint import CheckpointException, FileSystemReader
        from torch.distributed.checkpoint._traverse import set_element
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.metadata import StorageMeta
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    except ImportError as exc:
        raise CheckpointError(f"checkpoint {path} is a torch.distributed.checkpoint folder, which this torch "
                              f"({torch.__version__}) cannot read: {exc}") from None

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if trust:
                return super().read_metadata(*args, **kwargs)
            with open(os.path.join(path, DCP_METADATA), "rb") as f:
                try:
                    metadata = _DcpMetadataUnpickler(f).load()
                except pickle.UnpicklingError as exc:
                    raise CheckpointError(f"checkpoint {path}: its {DCP_METADATA} needs unpickling of {exc}, which a "
                                          "safe load refuses; if you trust its source, pass --trust-checkpoint") from None
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:  # torch's unpickles with weights_only=False
            try:
                with torch.serialization.safe_globals(_config_global_names()):
                    loaded = torch.load(value, weights_only=not trust)
            except pickle.UnpicklingError as exc:
                names = sorted(set(re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(exc)))) or ["what it does not name"]
                raise CheckpointError(f"checkpoint {path}: its value {read_item.dest_index.fqn!r} needs unpickling of "
                                      f"{', '.join(names)}, which a safe load refuses; if you trust its source, pass "
                                      "--trust-checkpoint") from None
            if self.flatten_state_dict:  # as torch's: the value into its place in the nested dict
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    reader = Reader(path)
    top = list(dict.fromkeys(keys[0] for keys in reader.read_metadata().planner_data.values()))
    left_out = [key for key in top if key in TRAINING_STATE_KEYS]
    if left_out:
        log.info("checkpoint %s: %s not read (training state, no weights of the model)", path, ", ".join(left_out))
    state: dict[str, Any] = {}
    keep = {key for key in top if key not in left_out}
    with warnings.catch_warnings():  # "torch.distributed is unavailable or uninitialized": one process, as meant
        warnings.simplefilter("ignore", UserWarning)
        try:
            _load_state_dict(state, storage_reader=reader, planner=Planner(keys=keep), no_dist=True)
        except CheckpointException as exc:  # torch's wrapper of each rank's error: ours said in one line
            refused = [e for e, _ in exc.failures.values() if isinstance(e, CheckpointError)]
            if refused:
                raise refused[0] from None
            raise
    shards = len(checkpoint_files(path)) - 1
    log.info("%s: a torch.distributed.checkpoint folder of %d data file%s, read in this process", path, shards,
             "s" * (shards != 1))
    return state


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError(f"checkpoint {path} is a safetensors file, and reading one needs the safetensors package: "
                              "pip install safetensors") from None
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read as safetensors ({exc})") from None
    if metadata:  # strings only (HF writes {"format": "pt"}); no model config to build from
        log.info("%s: safetensors metadata %s", path, metadata)
    return state


def find_config(ckpt: Any, key: str | None = None) -> tuple[dict, str | None]:
    """The model config: under `key` (dotted), else the first of CONFIG_KEYS that exists."""
    if not isinstance(ckpt, Mapping):
        return {}, None
    if key:
        try:
            return _as_config(to_plain(_get_path(ckpt, key), key), key), key
        except KeyError as exc:
            raise CheckpointError(f"config key {key!r}: {exc} is not in the checkpoint; its top-level keys are "
                                  f"{sorted(map(str, ckpt))}") from None
    for candidate in CONFIG_KEYS:
        if candidate in ckpt:
            log.info("model config taken from checkpoint[%r]", candidate)
            return _as_config(to_plain(ckpt[candidate], candidate), candidate), candidate
    log.info("the checkpoint has no config under %s; the model is built from --model-arg values alone", ", ".join(CONFIG_KEYS))
    return {}, None


def _as_config(value: Any, key: str) -> dict:
    if isinstance(value, StandIn):
        raise CheckpointError(f"checkpoint[{key!r}] is a {type(value).__module__}.{type(value).__qualname__}, whose code "
                              f"is not importable here; install its package ({type(value).__module__.split('.')[0]})")
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint[{key!r}] is a {type(value).__name__}, not a config mapping")
    return value


def find_state_dict(ckpt: Any, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The weights: under `key` (dotted, and on into a state dict's names: _named_within), else EMA
    weights where the layout has them. A module saved whole (torch.save(model), which only a
    trusted load reads) gives its state_dict()."""
    if isinstance(ckpt, torch.nn.Module):
        if not key:
            return _module_state(ckpt, "the checkpoint"), "(whole module)"
        ckpt = _module_state(ckpt, "the checkpoint")  # whose names --state-key may choose among
    if _is_state(ckpt) and not key:
        return dict(ckpt), "(bare state dict)"
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"the checkpoint is a {type(ckpt).__name__}, not a state dict or a mapping that holds one")
    if key:
        try:
            state = _get_path(ckpt, key)
        except KeyError:
            state = _named_within(ckpt, key)
            if state is None and _is_state(ckpt):
                heads = sorted({name.split(".")[0] for name in ckpt if "." in name})
                raise CheckpointError(f"--state-key {key!r}: no tensor of the checkpoint's state dict is named {key}.*; "
                                      f"--state-key PREFIX takes those named PREFIX.*, of {heads[:8]}") from None
            if state is None:
                found = [k for k, _ in STATE_KEYS if _has(ckpt, k)] or sorted(map(str, ckpt))
                raise CheckpointError(f"--state-key {key!r} is not in the checkpoint; weights found under: {found}") from None
        return _check_state(_module_state(state, f"checkpoint[{key!r}]"), key), key
    for candidate, ema in STATE_KEYS:
        if _has(ckpt, candidate):
            state = _module_state(_get_path(ckpt, candidate), f"checkpoint[{candidate!r}]")
            if ema and isinstance(state, Mapping) and state and not _is_state(state):
                # an EMA helper's own state (diffusers' EMAModel keeps a list of shadow_params): no names to load by
                log.warning("checkpoint[%r] holds EMA weights but is not a state dict (it holds %s): looking further; "
                            "the weights taken are not the EMA ones", candidate, ", ".join(map(str, list(state)[:6])))
                continue
            if isinstance(state, Mapping) and state:
                others = [k for k, e in STATE_KEYS if _has(ckpt, k) and k != candidate]
                if ema:
                    log.info("using the EMA weights checkpoint[%r] (others: %s; choose with --state-key)", candidate, others)
                return _check_state(state, candidate), candidate
    raise CheckpointError(f"no weights found in the checkpoint: none of {[k for k, _ in STATE_KEYS]} holds a state "
                          f"dict; its top-level keys are {sorted(map(str, ckpt))}; name one with --state-key")


def _named_within(ckpt: Mapping, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a state dict on key's path whose names begin with the rest of it, that
    prefix removed: 'state_dict.teacher' takes a Lightning checkpoint's teacher.* weights, and
    'teacher' a bare state dict's; None where key leads nowhere."""
    obj, parts = ckpt, key.split(".")
    for i, part in enumerate(parts):
        obj = _module_state(obj, f"checkpoint[{'.'.join(parts[:i])!r}]") if i else obj
        if _is_state(obj):
            prefix = ".".join(parts[i:]) + "."
            inside = {name[len(prefix):]: v for name, v in obj.items() if name.startswith(prefix)}
            if inside:
                where = f"checkpoint[{'.'.join(parts[:i])!r}]" if i else "the checkpoint"
                log.info("--state-key %r: the %d of %s's %d tensors named %s*, without that prefix", key, len(inside),
                         where, len(obj), prefix)
            return inside or None
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return None


def _module_state(obj: Any, where: str) -> Any:
    """obj, or the state dict of a module saved whole."""
    if not isinstance(obj, torch.nn.Module):
        return obj
    log.info("%s is a whole %s (saved with torch.save(model)): its state_dict() gives the weights", where, type(obj).__name__)
    return obj.state_dict()


def _has(ckpt: Mapping, dotted: str) -> bool:
    try:
        _get_path(ckpt, dotted)
        return True
    except KeyError:
        return False


def _check_state(state: Any, key: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint[{key!r}] is not a state dict (a mapping of names to tensors)")
    return dict(state)


IN_HAND = "<object "


def in_hand_name(obj: Any) -> str:
    """How a store records a model, data set or forward handed over as an object rather than a
    MODULE:CALLABLE spec: by its class (a function by its own name), "<object pkg.mod.Class>"."""
    named = obj if inspect.isroutine(obj) or isinstance(obj, type) else type(obj)
    return f"{IN_HAND}{named.__module__}.{named.__qualname__}>"


def import_callable(spec: str, what: str) -> Callable:
    """'package.module:name' -> the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(f"{what} {spec!r}: write it as MODULE:CALLABLE, e.g. marstore.models:video_mar")
    try:
        module = _import_module(module_name, what)
    except ImportError as exc:
        raise CheckpointError(f"{what} {spec!r}: cannot import {module_name!r} ({exc})") from None
    try:
        obj = _get_path(module, attr)
    except KeyError:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise CheckpointError(f"{what} {spec!r}: {module_name} has no {attr!r}; it has {public[:12]}") from None
    if not callable(obj):
        raise CheckpointError(f"{what} {spec!r} is not callable")
    return obj


def _import_module(name: str, what: str) -> types.ModuleType:
    """importlib.import_module, and then from the working directory: `python -m marstore` (and
    torchrun) search it, the `marstore` command does not, and a user's model.py sits there."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here, top = os.getcwd(), name.partition(".")[0]
        if exc.name != top or here in sys.path or importlib.machinery.PathFinder.find_spec(top, [here]) is None:
            raise
    sys.path.append(here)
    log.info("%s: %r is imported from the working directory %s, which is now on sys.path", what, name, here)
    return importlib.import_module(name)


def call_factory(spec: str, what: str, kwargs: Mapping[str, Any]) -> Any:
    """MODULE:CALLABLE called with keyword arguments (--dataset with its --dataset-arg, say);
    arguments it does not take fail in one line that names them and its signature."""
    factory = import_callable(spec, what)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        if not _ARGUMENT_MISMATCH.search(str(exc)):
            raise
        try:
            takes = f"it takes {spec.partition(':')[2]}{inspect.signature(factory)}"
        except (TypeError, ValueError):
            takes = "its signature is not known"
        raise CheckpointError(f"{what} {spec} rejects the arguments {dict(kwargs)} ({exc}); {takes}") from exc


def with_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of config with the overrides applied; 'a.b.c' reaches into nested mappings, which
    the copy owns (the checkpoint's config is never changed)."""
    merged = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = merged
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CheckpointError(f"--model-arg {key}: {'.'.join(parents[: i + 1])} is a {type(child).__name__}, "
                                      "not a mapping to set a key in")
            node = child
        node[leaf] = value
    return merged


def build_model(spec: str, config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                config_key: str | None = None, report: LoadReport | None = None) -> torch.nn.Module:
    """Calls the builder with the config as keyword arguments, overrides taking precedence; a
    dotted override (shape_meta.action.shape=[7]) replaces one value inside a nested mapping. A
    builder that passes them on (MAR's mar_base(**kwargs)) to a callee that rejects the config's
    training arguments has those left out, logged and noted in report; one that takes the config
    as one object (Net(cfg): _whole_config_parameter) gets it whole. spec 'hydra' builds the
    config's _target_ with hydra.utils.instantiate, as the training program did."""
    kwargs = with_overrides(config, overrides or {})
    source = f"the config from checkpoint[{config_key!r}]" if config_key else "the given arguments"
    if spec == HYDRA:
        model = _instantiate(kwargs, source, config, config_key, overrides or {})
        if not isinstance(model, torch.nn.Module):
            raise CheckpointError(f"--model hydra built a {type(model).__name__} from {source}'s _target_, not a "
                                  "torch.nn.Module")
        return model
    builder = import_callable(spec, "--model")
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        signature = None
    # keys named with a leading '_' are instructions and records, never the builder's arguments: hydra's
    # (_target_: the class hydra would build), diffusers' (_class_name, _diffusers_version), _name_or_path
    records = {k: kwargs.pop(k) for k in list(kwargs) if isinstance(k, str) and k.startswith("_")
               and not (signature and k in signature.parameters)}
    if records:
        log.info("left out the config's keys %s (hydra's instructions and library records, named with a leading '_'): "
                 "--model %s builds the model", records, spec)
    whole = _whole_config_parameter(signature.parameters.values(), kwargs) if signature is not None else None
    if whole is not None:
        # Net(cfg), build_model(args): one parameter that the config does not name, and none that it does
        log.info("--model %s takes one argument, %s, and none of %s's keys: the config goes whole as %s (its keys "
                 "read as attributes too: %s.%s)", spec, whole, source, whole, whole, next(iter(kwargs)))
        if report is not None:
            report.notes.append(f"the config passed whole as --model's argument {whole}")
        model = _call_builder(builder, {whole: config_object({**records, **kwargs})}, spec, source, config, config_key,
                              overrides or {}, keys=sorted(kwargs))
    else:
        kwargs = _fitting_arguments(signature, kwargs, spec, source, config, config_key, overrides or {}, report)
        model = _call_with_passed_on_keys(builder, signature, kwargs, spec, source, config, config_key, overrides or {},
                                          report)
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _fitting_arguments(signature: inspect.Signature | None, kwargs: dict, spec: str, source: str, config: Mapping[str, Any],
                       config_key: str | None, overrides: Mapping[str, Any], report: LoadReport | None) -> dict:
    """The config's keys that the builder's signature takes. Keys of the config that it does not
    take (a LightningModule's hyper_parameters hold lr and batch_size beside the model's) are left
    out, said and noted, where it takes the others and lacks none; otherwise, or where a --model-arg
    names a key it does not take, the config is refused with the keys it lacks and those it does
    not take."""
    if signature is None:
        return kwargs
    params = signature.parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    lacks = [n for n in required if n not in kwargs]
    extra = [] if takes_any else sorted(k for k in kwargs if k not in named)
    # a key the config names otherwise (embed_size for embed_dim, a typo): the --model-arg that gives it
    unset = sorted(named - kwargs.keys())
    renamed = [(key, near[0]) for key in extra if (near := difflib.get_close_matches(key, unset, n=1, cutoff=0.6))]
    hint = "".join(f"; {key!r} for {param!r}? --model-arg {param}={_argument_text(kwargs[key])}" for key, param in renamed)
    given = [k for k in extra if k in {key.split(".")[0] for key in overrides}]
    if lacks or given or (extra and not named & kwargs.keys()):
        raise CheckpointError(
            f"--model {spec} rejects {source}: it lacks {lacks} and does not accept {extra}{hint}; "
            f"fix them with --model-arg KEY=VALUE or choose the config with --config-key{_sections_hint(config, config_key)}"
        )
    if extra:
        log.warning("--model %s does not take the config's keys %s: those are left out, the other %d passed%s", spec,
                    extra, len(kwargs) - len(extra), hint.replace("; ", " (", 1) + ")" if hint else "")
        if report is not None:
            report.notes.append(f"config keys that {spec} does not take left out: {', '.join(extra)}")
    return {k: v for k, v in kwargs.items() if k not in extra}


def _argument_text(value: Any) -> str:
    """value as --model-arg reads it (JSON), where it is short; else VALUE."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return "VALUE"
    return text if len(text) <= 40 else "VALUE"


def _call_with_passed_on_keys(builder: Callable, signature: inspect.Signature | None, kwargs: dict, spec: str, source: str,
                              config: Mapping[str, Any], config_key: str | None, overrides: Mapping[str, Any],
                              report: LoadReport | None) -> Any:
    """builder(**kwargs); where it passes them on to a callee that rejects some of the config's keys,
    again without those."""
    try:
        return _call_builder(builder, kwargs, spec, source, config, config_key, overrides)
    except _Rejected as rejected:
        if rejected.passed_on is None:
            raise
        # MAR's factories (mar_base(**kwargs) -> MAR(..., **kwargs)) pass the whole config on, and
        # MAR's checkpoint['args'] is the training run's argparse arguments: the config's keys that
        # the callee takes go on, the others are left out, said and recorded
        callee, takes = rejected.passed_on
        given = {key.split(".")[0] for key in overrides}
        named = {p.name for p in signature.parameters.values()} if signature is not None else set()
        from_config = [k for k in kwargs if k not in given]
        left_out = sorted(k for k in from_config if k not in takes and k not in named)
        if not left_out or len(left_out) == len(from_config):  # the callee takes none of it: another config's
            raise
        log.warning("--model %s passes the config on to %s, which does not take its keys %s: those are left out, the "
                    "other %d passed on", spec, callee, left_out, len(kwargs) - len(left_out))
        if report is not None:
            report.notes.append(f"config keys that {callee} does not take left out: {', '.join(left_out)}")
        return _call_builder(builder, {k: v for k, v in kwargs.items() if k not in left_out}, spec, source, config,
                             config_key, overrides)


class _Rejected(CheckpointError):
    """--model's builder rejected the config's keys. passed_on: where it passed them on to a
    callee whose signature tells the keywords it takes, (its name, those keywords); else None."""

    def __init__(self, message: str, passed_on: tuple[str, set[str]] | None):
        super().__init__(message)
        self.passed_on = passed_on


def code_line(exc: BaseException, *left_out: str) -> str:
    """'at FILE:LINE in FUNCTION: `CODE`; ', the last line that the error passed outside torch,
    hydra, this module and the files or folders left out: where in the user's code (a model, a
    builder) it came from; none for an error of torch's own modules."""
    libraries = ("<frozen ",) + left_out + tuple(
        os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules.get("hydra")) if m is not None)
    paths = sysconfig.get_paths()
    installed = (paths["purelib"] + os.sep, paths["platlib"] + os.sep)  # packages, the user's among them

    def library(name: str) -> bool:
        return name.startswith(libraries) or (name.startswith(paths["stdlib"] + os.sep) and not name.startswith(installed))

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not library(f.filename) and f.filename != __file__]
    if not frames and exc.__cause__ is not None:  # a library's wrapper (hydra's InstantiationException): its cause's
        return code_line(exc.__cause__, *left_out)
    return f"at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}: `{frames[-1].line}`; " if frames else ""


def _whole_config_parameter(params: Iterable[inspect.Parameter], kwargs: Mapping[str, Any]) -> str | None:
    """The one parameter of a builder that takes the config as one object (Net(cfg), build(args)):
    its only required one, named as configs are, where the config names none of its parameters;
    else None."""
    params = list(params)
    required = [p.name for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    others = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.KEYWORD_ONLY)]
    if len(required) != 1 or others or not kwargs or any(p.name in kwargs for p in params):
        return None
    # named as configs are: a builder's one other argument (Net(num_classes)) is no config to pass whole
    return required[0] if required[0] in CONFIG_PARAMETERS or required[0].endswith(CONFIG_PARAMETER_ENDINGS) else None


class ConfigObject(dict):
    """A config passed whole to a builder that takes one (Net(cfg), build(args)): a dict whose
    keys read as attributes too (cfg.width as cfg["width"]), as argparse's and OmegaConf's did.
    A key named as a dict method (items, values) stays the method as an attribute, so that json and
    other code that takes it for a dict read it as one: its value is cfg["items"]."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the config has no key {name!r} (its keys: {', '.join(map(str, self))})") from None


def config_object(value: Any) -> Any:
    """value with every mapping in it a ConfigObject."""
    if isinstance(value, Mapping):
        return ConfigObject({k: config_object(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(config_object(v) for v in value)
    return value


def _call_builder(builder: Callable, kwargs: dict, spec: str, source: str, config: Mapping[str, Any],
                  config_key: str | None, overrides: Mapping[str, Any], keys: list[str] | None = None) -> Any:
    """builder(**kwargs), its errors said in one line; keys: the config's, where it goes whole."""
    try:
        return builder(**kwargs)
    except KeyError as exc:  # a constructor that reads the config's nested keys (UVA's shape_meta[...])
        raise CheckpointError(
            f"--model {spec} failed on {source}: it looked up {exc.args[0]!r}, which that config lacks (its keys: "
            f"{keys or sorted(kwargs)}); give it with --model-arg KEY=VALUE or choose the config with --config-key"
            f"{_sections_hint(config, config_key)}"
        ) from exc
    except Exception as exc:
        if isinstance(exc, TypeError) and _ARGUMENT_MISMATCH.search(str(exc)):
            # a builder taking **kwargs passes them on, so only the call inside can reject a key
            passed_on = _rejecting_callee(exc)
            takes = ""
            if passed_on is not None:  # what the callee does take, and the nearest to a misspelt key
                callee, accepted = passed_on
                names = sorted(accepted)
                unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
                near = difflib.get_close_matches(unexpected.group(1), names, n=1) if unexpected else []
                shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
                takes = f"; {callee} takes {shown}" + (f" (did you mean {near[0]!r}?)" if near else "")
            raise _Rejected(f"--model {spec} rejects {source} ({exc}; its keys: {sorted(kwargs)}{takes}); fix them with "
                            f"--model-arg KEY=VALUE or choose the config with --config-key{_sections_hint(config, config_key)}",
                            passed_on) from exc
        # raised in the builder's code: one line that says where (the traceback with -v)
        log.debug("the --model traceback", exc_info=True)
        given = f"; --model-arg gave {', '.join(f'{k}={v!r}' for k, v in overrides.items())}" if overrides else ""
        raise CheckpointError(f"--model {spec} failed on {source}: {code_line(exc)}{type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}{given}") from exc


def _rejecting_callee(exc: TypeError) -> tuple[str, set[str]] | None:
    """(the callee's name, the keywords it takes) for 'NAME() got an unexpected keyword argument',
    NAME looked up in the frame that made the call; None where that cannot be told (a callee that
    takes **kwargs itself, or one not among that frame's names)."""
    match = re.match(r"([\w.]+)\(\) got an unexpected keyword argument", str(exc))
    tb = exc.__traceback__
    if match is None or tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    callee = match.group(1).removesuffix(".__init__")
    first, *rest = callee.split(".")
    obj = frame.f_locals.get(first, frame.f_globals.get(first))
    for part in rest:
        obj = getattr(obj, part, None)
    try:
        params = inspect.signature(obj).parameters.values() if obj is not None else None
    except (TypeError, ValueError):
        params = None
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    takes = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return callee, takes


# What Python says when a call's keyword arguments do not fit the callee's signature.
_ARGUMENT_MISMATCH = re.compile(r"unexpected keyword argument|missing \d+ required (?:positional|keyword-only) argument")


HYDRA = "hydra"  # --model hydra: the config's _target_, built as hydra builds it


def _instantiate(kwargs: dict, source: str, config: Mapping[str, Any], config_key: str | None,
                 overrides: Mapping[str, Any]) -> Any:
    """hydra.utils.instantiate on the config (its _target_ the class or function, nested
    _target_ sections built first), its errors in one line as a builder's are."""
    try:
        from hydra.utils import instantiate
    except ImportError:
        raise CheckpointError("--model hydra builds the config's _target_ with hydra, which is not installed here: "
                              "pip install hydra-core") from None
    if "_target_" not in kwargs:
        raise CheckpointError(f"--model hydra: {source} has no _target_ naming what to build; "
                              f"{_target_hint(config, config_key)}")
    log.info("--model hydra: %s from %s, built by hydra.utils.instantiate", kwargs["_target_"], source)
    return _call_builder(lambda **values: instantiate(values), kwargs, HYDRA, source, config, config_key, overrides)


def hydra_targets(config: Mapping[str, Any], config_key: str | None) -> list[tuple[str, str]]:
    """(dotted path, _target_) of the config and each section in it that names one: what
    --model hydra can build with --config-key PATH."""
    found: list[tuple[str, str]] = []

    def walk(node: Mapping[str, Any], path: str) -> None:
        if "_target_" in node:
            found.append((path, str(node["_target_"])))
        for key, value in node.items():
            if isinstance(value, Mapping) and isinstance(key, str):
                walk(value, f"{path}.{key}" if path else key)

    walk(config, config_key or "")
    return found


def _target_hint(config: Mapping[str, Any], config_key: str | None) -> str:
    """Which sections of the config hydra could build (those with a _target_), for --config-key."""
    found = [f"{path} ({target})" for path, target in hydra_targets(config, config_key)]
    if not found:
        return "none of its sections has one either: write a builder, --model MODULE:CALLABLE"
    return f"choose a section that has one with --config-key: {', '.join(found[:6])}{' ...' if len(found) > 6 else ''}"


def config_sections(config: Mapping[str, Any], config_key: str | None, limit: int = 8) -> list[str]:
    """The config's nested mappings, three levels deep, as --config-key names them (UVA's cfg.policy.model)."""
    paths: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str, depth: int) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and isinstance(key, str) and len(paths) < limit:
                path = f"{prefix}.{key}" if prefix else key
                paths.append(path)
                if depth > 1:
                    walk(value, path, depth - 1)

    walk(config, config_key or "", 3)
    return paths


def _sections_hint(config: Mapping[str, Any], config_key: str | None) -> str:
    paths = config_sections(config, config_key)
    return f" (its sections: {', '.join(paths)})" if paths else ""


def _fitting_prefix(state: Mapping[str, torch.Tensor], wanted: set[str], state_key: str | None = None) -> tuple[str, str, int]:
    """(a prefix to strip from the checkpoint's keys, one to add to them, the model keys they then
    match). The prefix of EMA weights (model_ema.module., ema_pytorch's ema_model.) where it alone
    matches as many keys as any, and more than half the model's. Else any other prefix of up to
    three name components (Lightning's self.net, a checkpoint of a module that the model holds
    inside it) where it matches more than half the model's keys and more than any other does.
    Else a known wrapper's prefix (module., _orig_mod., model., or a chain of them) wherever it
    matches more keys than the names as they are."""
    best = ("", "", len(wanted & state.keys()))
    for prefix in _PREFIX_CHAINS:
        hits = sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in wanted)
        if hits > best[2]:
            best = (prefix, "", hits)
    candidates = sorted([(n, p, "") for p, n in _prefix_matches(state, wanted).items()] +
                        [(n, "", p) for p, n in _prefix_matches(wanted, state).items()], reverse=True)
    most = candidates[0][0] if candidates else 0
    tied = [c for c in candidates if c[0] == most]
    ema = [c for c in tied if _EMA_NAME.search(c[1])]
    if len(ema) == 1 and most >= best[2] and most > len(wanted) / 2:
        others = [c[1] or c[2] for c in tied if c is not ema[0] and (c[1] or c[2]) != best[0]]
        others += [best[0]] if best[2] == most and best[0] else []
        said = [repr(p) for p in others] + (["the names as they are"] if best[2] == most and not best[0] else [])
        if said:
            takes = f"; --state-key {state_key_within(state_key, others[0])} takes those" if others else ""
            log.info("the EMA weights' prefix %r taken; %s fit the model's weights as well (%d of them%s)", ema[0][1],
                     " and ".join(said), most, takes)
        return ema[0][1], "", most
    if best[2] >= most or most <= len(wanted) / 2 or len(tied) > 1:  # (a wrapper's prefix is taken where it fits as many)
        return best
    return tied[0][1], tied[0][2], most


_EMA_NAME = re.compile(r"(^|[._])ema([._]|$)", re.IGNORECASE)


def _prefix_splits(key: str) -> Iterator[tuple[str, str]]:
    """(prefix, rest) of a name, for each prefix of up to three components: 'a.b.c.w' gives
    ('a.', 'b.c.w'), ('a.b.', 'c.w'), ('a.b.c.', 'w')."""
    dot = -1
    for _ in range(3):
        dot = key.find(".", dot + 1)
        if dot < 0:
            return
        yield key[: dot + 1], key[dot + 1:]


def _prefix_matches(keys: Iterable[str], targets: Collection[str]) -> collections.Counter:
    """{prefix of up to three name components: the keys that it, removed, turns into targets}."""
    return collections.Counter(prefix for key in keys for prefix, rest in _prefix_splits(key) if rest in targets)


def _compiled_wrapper() -> type | tuple:
    """torch.compile's wrapper class (OptimizedModule), or () where nothing was compiled."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported wherever a model was compiled
    return eval_frame.OptimizedModule if eval_frame is not None else ()


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside torch.compile's wrapper (its _orig_mod) and inside nn.DataParallel or
    DistributedDataParallel (their .module), else the model: its weights and layers are named as
    the model's checkpoints and other runs name them, not under '_orig_mod.' or 'module.'. The
    wrapper still runs the forward, and the hooks set on the module inside it fire."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, _compiled_wrapper()) or isinstance(model, parallel):
        model = model.module if isinstance(model, parallel) else model._orig_mod
    return model


def _own_name(name: str) -> str:
    """A module's or weight's name without the '._orig_mod' of blocks compiled one by one
    (model.blocks[i] = torch.compile(block)), as the model's own checkpoints name it."""
    return re.sub(r"\._orig_mod(?=\.|$)", "", name)


def named_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """model.named_modules() by the model's own names: the wrappers of the whole model
    (unwrapped) and torch.compile's of its blocks left out, the module each wraps taking its name."""
    return {_own_name(name): module for name, module in unwrapped(model).named_modules()
            if not isinstance(module, _compiled_wrapper())}


def module_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{another name: the name named_modules gives} for a module the model holds under several
    names (tied weights: self.dec = self.enc), which torch lists once, under the first."""
    first: dict[int, str] = {}
    aliases = {}
    for name, module in unwrapped(model).named_modules(remove_duplicate=False):
        if isinstance(module, _compiled_wrapper()):
            continue
        name = _own_name(name)
        if first.setdefault(id(module), name) != name:
            aliases[name] = first[id(module)]
    return aliases


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], strict: bool = False,
                 report: LoadReport | None = None) -> LoadReport:
    """load_state_dict with prefixes stripped and every mismatch reported (an error if strict);
    a wrapped model's weights are loaded into the module it wraps (unwrapped)."""
    report = report or LoadReport()
    model = unwrapped(model)
    model_state = model.state_dict()
    named = {_own_name(k): k for k in model_state}  # blocks compiled one by one: their own names
    own = {plain: model_state[k] for plain, k in named.items()}
    state = {_own_name(k): v for k, v in state.items()}
    wanted = set(own)
    strip, add, hits = _fitting_prefix(state, wanted, report.state_key)
    inferred = (strip or add) and strip not in _PREFIX_CHAINS  # (not a wrapper's: how well it fits is said)
    unknown = f"; {hits} of the model's {len(wanted)} weights fit then" if inferred else ""
    if strip:
        inside = {k[len(strip):]: v for k, v in state.items() if k.startswith(strip)}
        report.stripped_prefix = strip
        report.ignored_outside_prefix = len(state) - len(inside)
        log.info("checkpoint keys carry the prefix %r: stripped (%d keys outside it ignored%s)", strip,
                 report.ignored_outside_prefix, unknown)
        state = inside
    elif add:
        report.added_prefix = add
        log.info("the model's weights carry the prefix %r that the checkpoint's keys lack (it holds the module "
                 "%s of the model): added%s", add, add.rstrip("."), unknown)
        state = {add + k: v for k, v in state.items()}
    usable = {}
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            report.shape_mismatches.append(f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
        else:
            usable[k] = v
    # a model built on the meta device (torchtitan's way: no memory, no init) takes the checkpoint's
    # tensors as its own, each in the dtype the model was built with
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:
        usable = {k: v.to(own[k].dtype) if k in own and own[k].is_floating_point() else v for k, v in usable.items()}
        log.info("the model was built on the meta device: the checkpoint's tensors become its weights "
                 "(load_state_dict(assign=True)), in the dtypes it was built with")
    result = model.load_state_dict({named.get(k, k): v for k, v in usable.items()}, strict=False, assign=on_meta)
    report.missing = [_own_name(k) for k in result.missing_keys]
    report.unexpected = [_own_name(k) for k in result.unexpected_keys]
    report.loaded = len(usable) - len(report.unexpected)
    if own and not report.loaded:  # a model of its own random weights, never what a checkpoint was given for
        hint = _prefix_hint(state, wanted, report.state_key)
        if state and all(v.numel() == 0 for v in state.values()):
            hint += ("; its tensors are all empty, as a DeepSpeed ZeRO-3 checkpoint's model states are (its weights lie "
                     "in its optimizer shards): make one file of them with DeepSpeed's zero_to_fp32.py")
        raise CheckpointError(
            f"none of the checkpoint's {len(state)} tensors loads into the model's {len(own)} weights "
            f"({len(report.unexpected)} under names the model lacks, {len(report.shape_mismatches)} of another shape; the "
            f"checkpoint's keys look like {next(iter(state), None)!r}, the model's like {next(iter(own))!r}){hint}"
            + ("" if "--state-key" in hint else
               "; choose other weights with --state-key, or the model that saved them (--model)"))
    if on_meta:
        check_materialized(model, "the checkpoint gives no values for them")
    if own and len(report.missing) > len(own) / 2:
        hint = _prefix_hint(state, wanted, report.state_key)
        report.notes.append(f"most model keys are missing{hint}")
    if report.missing or report.unexpected or report.shape_mismatches:
        (log.error if strict else log.warning)("weights: %s", report.summary())
        if strict:
            notes = f" ({'; '.join(report.notes)})" if report.notes else ""
            raise CheckpointError(f"--strict: the checkpoint does not fit the model: {report.summary()}{notes}")
    else:
        log.info("weights: %s", report.summary())
    return report


def check_materialized(model: torch.nn.Module, why: str) -> None:
    """Refuses a model that still has tensors on the meta device (built without values), naming them."""
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise CheckpointError(f"the model was built on the meta device, and {len(left)} of its tensors have no values "
                              f"({shown}): {why}; build those with values (buffers that __init__ computes, such as "
                              "rotary frequencies, are not in a checkpoint), or load a checkpoint that holds them")


def state_key_within(state_key: str | None, prefix: str) -> str:
    """The --state-key that takes a state dict's tensors named prefix* (_named_within): the state
    dict's own key, then the prefix without its dot; the prefix alone for a bare state dict."""
    return prefix[:-1] if not state_key or state_key.startswith("(") else f"{state_key}.{prefix[:-1]}"


def _prefix_hint(state: Mapping[str, torch.Tensor], wanted: set[str], state_key: str | None) -> str:
    """Names the prefix that, removed from the checkpoint's keys or added to them, would fit the
    most of the model's weights, and how to choose among prefixes that fit alike."""
    strip, add = _prefix_matches(state, wanted), _prefix_matches(wanted, state)
    if not strip and not add:
        return ""
    removing = bool(strip) and (not add or max(strip.values()) >= max(add.values()))
    counts = strip if removing else add
    most = max(counts.values())
    best = sorted(p for p, n in counts.items() if n == most)
    fits = f"{most} of the model's {len(wanted)} weights"
    if not removing:
        return (f"; adding the prefix {best[0]!r} to the checkpoint's keys would fit {fits} (it holds the model's "
                f"{best[0][:-1]})")
    if len(best) == 1:
        return f"; removing the prefix {best[0]!r} from the checkpoint's keys would fit {fits}"
    keyed = [state_key_within(state_key, p) for p in best]
    return (f"; the prefixes {', '.join(map(repr, best))}, each removed, would fit {fits} alike: take one's tensors with "
            f"--state-key {' or '.join(map(repr, keyed))}")


def describe_checkpoint(ckpt: Any) -> dict:
    """What a checkpoint (as read_checkpoint gives it) holds, for `marstore info`: each top-level
    entry in a few words; the config find_config would take (its key, scalar values, sections,
    and all its values, resolved as a run resolves them);
    every state dict found (tensors, values, dtypes, the prefix its names carry), the one the run
    would load marked; and the top-level modules those weights belong to, numbered blocks
    together: what --layers patterns can name, before a builder is written."""
    top = ({str(k): _what(v) for k, v in ckpt.items()} if isinstance(ckpt, Mapping) and not _is_state(ckpt)
           else {"(checkpoint)": _what(ckpt)})
    info: dict[str, Any] = {"top_level": top, "config": None, "weights": [], "modules": []}
    try:
        config, key = find_config(ckpt)
    except CheckpointError as exc:
        info["config"] = {"problem": str(exc)}
    else:
        if key:
            scalars = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool)) or v is None}
            info["config"] = {"key": key, "keys": len(config), "scalars": scalars,
                              "sections": config_sections(config, key, limit=12), "values": config,
                              "hydra_targets": hydra_targets(config, key)}
    try:
        loaded, chosen = find_state_dict(ckpt)
    except CheckpointError as exc:
        info["weights_problem"], loaded, chosen = str(exc), None, None
    found = [(k, ema) for k, ema in STATE_KEYS if isinstance(ckpt, Mapping) and _has(ckpt, k)]
    states = [(k, ema, loaded if k == chosen else _module_state(_get_path(ckpt, k), k)) for k, ema in found]
    if chosen is not None and chosen not in dict(found):  # a bare state dict, or a module saved whole
        states = [(chosen, False, loaded)]
    for key, ema, state in states:
        if not _is_state(state):
            continue
        copies = _ema_copy(state)
        prefix = copies[0] if copies else _common_prefix(state)
        dtypes = collections.Counter(str(v.dtype).removeprefix("torch.") for v in state.values())
        info["weights"].append({"key": key, "ema": ema, "chosen": key == chosen, "tensors": len(state),
                                "values": sum(v.numel() for v in state.values()),
                                "bytes": sum(v.numel() * v.element_size() for v in state.values()),
                                "dtypes": dict(dtypes.most_common()), "prefix": prefix, "copies": copies})
        if key == chosen:
            info["modules"] = _top_modules(state, prefix)
    return info


def _is_state(obj: Any) -> bool:
    """A state dict of some tensors (names to tensors)."""
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _what(value: Any) -> str:
    """A checkpoint entry in a few words."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, torch.nn.Module):
        return f"a whole {type(value).__name__} module (torch.save(model))"
    if isinstance(value, StandIn):
        return f"{type(value).__module__}.{type(value).__qualname__} (a stand-in: its code is not importable here)"
    if isinstance(value, argparse.Namespace):
        return f"argparse.Namespace of {len(vars(value))} values"
    if type(value).__module__.startswith("omegaconf"):
        return f"OmegaConf config of {len(value)} keys"
    if _is_state(value):
        return f"state dict of {len(value)} tensors"
    if isinstance(value, Mapping):
        keys = [str(k) for k in value]
        return f"mapping of {len(keys)}" + (f": {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" if keys else "")
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _common_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    """The known prefix (module., _orig_mod., model., or a chain of them) that most of the names
    carry, as load_weights would strip it against a model of the names without it."""
    best, best_hits = None, len(state) // 2
    for prefix in _PREFIX_CHAINS:
        hits = sum(k.startswith(prefix) for k in state)
        if hits > best_hits or (hits == best_hits and best and len(prefix) > len(best)):
            best, best_hits = prefix, hits
    return best


def _ema_copy(state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """(the EMA copy's prefix, the other copy's) where a state dict holds the same names twice, once
    under a prefix that names EMA weights (model_ema.module. beside model.): the copy that
    load_weights takes (_fitting_prefix) against a model of those names."""
    names: dict[str, set[str]] = collections.defaultdict(set)
    for key in state:
        for prefix, rest in _prefix_splits(key):
            names[prefix].add(rest)
    for ema in (p for p in names if _EMA_NAME.search(p) and len(names[p]) > 1):
        other = next((p for p in names if p != ema and not _EMA_NAME.search(p) and names[p] == names[ema]), None)
        if other is not None:
            return ema, other
    return None


def _top_modules(state: Mapping[str, torch.Tensor], prefix: str | None) -> list[dict]:
    """The weights' top-level modules in order of first appearance, with their tensors and values;
    numbered blocks of one container together, where the container lies within the first levels
    (encoder_blocks.0-23, diffloss.net.res_blocks.0-5; diffloss then holds the rest of diffloss)."""
    groups: dict[str, dict] = {}
    for name, tensor in state.items():
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
        parts = name.split(".")[:-1]  # the module's path, without the tensor's own name
        numbered = next((i for i, part in enumerate(parts[:4]) if part.isdigit() and i), None)
        if numbered is not None:  # blocks of a container, however deep (transformer.h.0, diffloss.net.res_blocks.0)
            key, number = ".".join(parts[:numbered]), int(parts[numbered])
        else:
            key, number = (parts[0] if parts else "(its own tensors)"), None
        group = groups.setdefault(key, {"numbers": set(), "tensors": 0, "values": 0})
        if number is not None:
            group["numbers"].add(number)
        group["tensors"] += 1
        group["values"] += tensor.numel()
    modules = []
    for key, group in groups.items():
        numbers = sorted(group["numbers"])
        contiguous = numbers and numbers == list(range(numbers[0], numbers[-1] + 1))
        name = (f"{key}.{numbers[0]}-{numbers[-1]}" if contiguous and len(numbers) > 1 else
                f"{key}.{numbers[0]}" if len(numbers) == 1 else f"{key}.{{{','.join(map(str, numbers))}}}" if numbers else key)
        modules.append({"name": name, "blocks": len(numbers) or None, "tensors": group["tensors"], "values": group["values"]})
    return modules
