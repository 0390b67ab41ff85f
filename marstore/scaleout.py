"""Scale-out: N ranks (torchrun) write part files; one top file joins them with virtual datasets.
join_layers joins the layers of stores of the same samples (extractions of other layers) the same way.

    torchrun --nproc-per-node 4 -m marstore extract ... --out acts.h5
      -> acts.part000-of-004.h5 ... acts.part003-of-004.h5   (one store per rank)
      -> acts.h5: HDF5 virtual datasets over the parts' committed rows, merged metadata
    marstore merge acts.h5 --out shipped.h5                   (one self-contained copy)

Rank r extracts source positions r, r + N, r + 2N, ...: disjoint, complete, also when N does
not divide the count. Each part resumes on its own. The top file is an ordinary store to
marstore, h5py and any HDF5 reader (virtual datasets need HDF5 1.10 or newer); its sources
are named relative to it, so the directory can be moved whole.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import h5py
import numpy as np

from marstore.store import (
    FORMAT,
    FORMAT_VERSION,
    SKIPPED_PREFIX,
    STATE_PREFIX,
    STATUS_LENGTH,
    LayerSpec,
    Ragged,
    StoreError,
    StoreWriter,
    TailedValues,
    TargetSpec,
    as_ragged,
    committed_values,
    convert_to_ragged,
    fixed_text,
    moments_std,
    open_store,
    utc_now,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current_rank() -> Rank:
    """The rank that torchrun's environment describes (rank 0 of 1 outside torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Rank(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def part_path(out: str, rank: Rank) -> str:
    root, ext = os.path.splitext(out)
    return f"{root}.part{rank.rank:03d}-of-{rank.world:03d}{ext or '.h5'}"


def rank_positions(rank: Rank) -> slice:
    """This rank's share of the source positions: every world-th one, from its rank."""
    return slice(rank.rank, None, rank.world)


def _combine_moments(parts: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chan et al.'s parallel combination of per-part (count, mean, M2)."""
    count = mean = m2 = None
    for p in parts:
        c, m, q = (np.asarray(p[k], np.float64) for k in ("stats_count", "mean", "stats_m2"))
        if count is None:
            count, mean, m2 = c.copy(), m.copy(), q.copy()
            continue
        total = count + c
        delta = m - mean
        safe = np.maximum(total, 1)
        mean = np.where(total > 0, mean + delta * c / safe, mean)
        m2 = m2 + q + delta * delta * count * c / safe
        count = total
    return count, mean, m2


def _agree_on_ragged(parts: list[str]) -> None:
    """A layer that some ranks stored dense (their batches kept one token count) and others
    ragged, or dense with other token counts: its dense parts are rewritten ragged, as one
    process that saw every batch would have stored it."""
    specs = []
    for path in parts:
        with open_store(path) as store:
            specs.append({spec["name"]: spec for spec in json.loads(store.file.attrs["layers"])})

    rewrite: dict[str, list[str]] = {}
    for name in specs[0]:
        given = [part.get(name) for part in specs]
        if None in given or all(spec == given[0] for spec in given):
            continue
        wanted = [as_ragged(spec) for spec in given]
        if None in wanted or any(spec != wanted[0] for spec in wanted):
            continue  # not a matter of token counts: write_top_file refuses the parts
        for path, spec in zip(parts, given):
            if not spec.get("ragged"):
                rewrite.setdefault(path, []).append(name)
    for path, names in rewrite.items():
        log.warning("%s stored %s dense, where other ranks' token counts varied: rewriting its rows ragged", path,
                    ", ".join(names))
        convert_to_ragged(path, names)


def write_top_file(out: str, parts: list[str]) -> int:
    """Builds the virtual store `out` over the committed rows of `parts`; returns its rows. A
    layer that some parts hold dense and others ragged is first rewritten ragged in them all."""
    _agree_on_ragged(parts)
    stores = [open_store(p) for p in parts]
    try:
        first = stores[0].file
        layer_specs = json.loads(first.attrs["layers"])
        target_specs = json.loads(first.attrs["targets"])
        for s in stores[1:]:
            if json.loads(s.file.attrs["layers"]) != layer_specs or json.loads(s.file.attrs["targets"]) != target_specs:
                raise StoreError(f"{s.path} holds other layers or targets than {stores[0].path}; the parts do not belong together")
        for s in stores:  # a virtual dataset reads the datasets alone, which lack such a layer's last rows
            tailed = [n for n in s.layers if isinstance(committed_values(s.file, n, s.rows), TailedValues)]
            if tailed:
                raise StoreError(f"{s.path} is incomplete, and its compressed layers {', '.join(tailed)} hold their last "
                                 "rows apart from their datasets until it is finished: resume it first")
        rows = [s.rows for s in stores]
        total = sum(rows)
        tmp = out + ".tmp"
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            f.attrs.update({k: v for k, v in first.attrs.items()
                           if k not in ("rows", "status", "skipped", "skipped_at") and not k.startswith(SKIPPED_PREFIX)})
            f.attrs.update({
                "format": FORMAT, "format_version": FORMAT_VERSION, "rows": total,
                "status": "complete" if all(s.status == "complete" for s in stores) else "incomplete",
                "parts": json.dumps([os.path.relpath(p, os.path.dirname(os.path.abspath(out))) for p in parts]),
            })
            acts, tg = f.create_group("activations"), f.create_group("targets")

            def virtual(group: h5py.Group, name: str, source_name: str, counts: list[int]) -> h5py.Dataset:
                return _virtual(group, name, out, stores, source_name, counts)

            for spec in layer_specs:
                name = spec["name"]
                objs = [s.file["activations"][name] for s in stores]
                committed = [s.layers[name].attrs for s in stores]  # over each part's committed rows
                attrs = {k: v for k, v in objs[0].attrs.items() if not k.startswith(STATE_PREFIX)}
                if spec["ragged"]:
                    g = acts.create_group(name)
                    tokens = [int(o["offsets"][r]) for o, r in zip(objs, rows)]
                    virtual(g, "values", f"activations/{name}/values", tokens)
                    starts = np.concatenate([[0], np.cumsum(tokens)[:-1]])
                    offsets = [np.zeros(1, np.int64)] + [o["offsets"][1 : r + 1] + base for o, r, base in zip(objs, rows, starts)]
                    g.create_dataset("offsets", data=np.concatenate(offsets))
                    target = g
                else:
                    target = virtual(acts, name, f"activations/{name}", rows)
                count, mean, m2 = _combine_moments(committed)
                attrs.update({"nonfinite": sum(int(a["nonfinite"]) for a in committed),
                              "overflow": sum(int(a["overflow"]) for a in committed),
                              "stats_count": count, "mean": mean, "stats_m2": m2, "std": moments_std(count, m2)})
                target.attrs.update(attrs)
            for spec in target_specs:
                virtual(tg, spec["name"], f"targets/{spec['name']}", rows)
            virtual(f, "index", "index", rows)
            _join_outputs(f, stores)
            _join_skipped(f, stores)
        os.replace(tmp, out)
        log.info("%s: virtual store over %d parts, %d rows", out, len(parts), total)
        return total
    finally:
        for s in stores:
            s.close()


def _virtual(group: h5py.Group, name: str, out: str, stores: list, source_name: str, counts: list[int]) -> h5py.Dataset:
    """A virtual dataset of the first counts[i] rows of source_name in each store, one after the
    other, its sources named relative to `out` (the folder can move whole)."""
    sources = [s.file[source_name] for s in stores]
    layout = h5py.VirtualLayout(shape=(sum(counts), *sources[0].shape[1:]), dtype=sources[0].dtype)
    offset = 0
    for s, ds, n in zip(stores, sources, counts):
        if n:
            rel = os.path.relpath(s.path, os.path.dirname(os.path.abspath(out)))
            layout[offset : offset + n] = h5py.VirtualSource(rel, source_name, shape=ds.shape)[:n]
        offset += n
    return group.create_virtual_dataset(name, layout)


def join_layers(out: str, paths: list[str]) -> list[str]:
    """Builds the virtual store `out` with the layers of every store in paths: extractions of the
    same samples in the same order (another layer asked for after the first run, say), whose
    layers can then be probed together. Refuses stores of other samples, a layer or target name
    held twice with other values, and incomplete stores. Returns the layers, in order."""
    if len(paths) < 2:
        raise StoreError("join: give two or more stores whose layers to join")
    if os.path.exists(out):
        raise StoreError(f"{out} exists; choose another --out")
    stores = []
    try:
        for p in paths:
            stores.append(open_store(p))
        first = stores[0]
        index = first.index()
        layer_specs, target_specs = [], []
        layer_in, target_in = {}, {}  # the store that holds each layer, each target
        for s in stores:
            if s.status != "complete":
                raise StoreError(f"{s.path} is incomplete ({s.rows} committed rows): finish it (--resume) before joining")
            other = s.index()
            if len(other) != len(index) or not np.array_equal(other, index):
                row = np.flatnonzero(other != index)[0] if len(other) == len(index) else None
                where = f"{len(other)} rows against {len(index)}" if row is None else \
                    f"row {row} is sample {other[row]} against {index[row]}"
                raise StoreError(f"{s.path} holds other samples than {first.path} ({where}); join stores extracted from "
                                 "the same samples in the same order (the same --dataset, --num-samples, --sample-seed)")
            for spec in json.loads(s.file.attrs["layers"]):
                if spec["name"] in layer_in:
                    raise StoreError(f"{s.path} and {layer_in[spec['name']].path} both hold layer {spec['name']!r}; "
                                     "join stores of different layers")
                layer_in[spec["name"]] = s
                layer_specs.append(spec)
            for spec in json.loads(s.file.attrs["targets"]):
                name = spec["name"]
                if name not in target_in:
                    target_in[name] = s
                    target_specs.append(spec)
                elif not np.array_equal(s.target(name), target_in[name].target(name)):
                    raise StoreError(f"target {name!r} differs between {target_in[name].path} and {s.path}: they hold "
                                     "other samples, or other labels")
        runs = [s.metadata for s in stores]
        checkpoints = {json.dumps(r.get("checkpoint") and r["checkpoint"].get("sha256")) for r in runs}
        if len(checkpoints) > 1 or len({r.get("model") for r in runs}) > 1:
            log.warning("the stores come from different models or checkpoints: the joined store's layers are of more than "
                        "one model (each layer's joined_from says which store it came from)")
        folder = os.path.dirname(os.path.abspath(out))
        tmp = out + ".tmp"
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            f.attrs.update({k: v for k, v in first.file.attrs.items()
                           if k not in ("parts", "skipped", "skipped_at") and not k.startswith(SKIPPED_PREFIX)})
            f.attrs.update({
                "format": FORMAT, "format_version": FORMAT_VERSION, "rows": first.rows, "status": "complete",
                "created": utc_now(), "committed_at": utc_now(),
                "layers": json.dumps(layer_specs), "targets": json.dumps(target_specs),
                # the first store's run with every store's layers, and each store's run; their files sit beside this one
                "run": json.dumps({**runs[0], "layers": [spec for r in runs for spec in r.get("layers", [])],
                                   "joined": [{"path": os.path.relpath(s.path, folder), "run": r}
                                              for s, r in zip(stores, runs)]}, default=str),
                "parts": json.dumps([os.path.relpath(s.path, folder) for s in stores]),
            })
            acts, tg = f.create_group("activations"), f.create_group("targets")
            for spec in layer_specs:
                name, s = spec["name"], layer_in[spec["name"]]
                obj = s.file["activations"][name]
                if spec["ragged"]:
                    target = acts.create_group(name)
                    _virtual(target, "offsets", out, [s], f"activations/{name}/offsets", [s.rows + 1])
                    _virtual(target, "values", out, [s], f"activations/{name}/values", [int(obj["offsets"][s.rows])])
                else:
                    target = _virtual(acts, name, out, [s], f"activations/{name}", [s.rows])
                target.attrs.update({**obj.attrs, "joined_from": os.path.relpath(s.path, folder)})
            for spec in target_specs:
                _virtual(tg, spec["name"], out, [target_in[spec["name"]]], f"targets/{spec['name']}", [first.rows])
            _virtual(f, "index", out, [first], "index", [first.rows])
            _join_outputs(f, [first])
            _join_skipped(f, [first])
        os.replace(tmp, out)
        names = [spec["name"] for spec in layer_specs]
        log.info("%s: virtual store of %d layers from %d stores, %d rows", out, len(names), len(stores), first.rows)
        return names
    finally:
        for s in stores:
            s.close()


def _join_outputs(f: h5py.File, stores: list) -> None:
    """The parts' per-batch outputs (small) copied into /outputs, their row starts shifted."""
    parts = [s.outputs() for s in stores]  # the committed batches of each part
    names = list(dict.fromkeys(n for part in parts for n in part if n != "row_start"))  # in the parts' order
    if not names:
        return
    starts, values = [], {n: [] for n in names}
    base = 0
    for store, part in zip(stores, parts):
        if part:
            batches = len(part["row_start"])
            starts.append(part["row_start"] + base)
            for n in names:
                values[n].append(part[n] if n in part else np.full(batches, np.nan))
        base += store.rows
    out = f.create_group("outputs", track_order=True)
    out.create_dataset("row_start", data=np.concatenate(starts))
    for n in names:
        out.create_dataset(n, data=np.concatenate(values[n]))


def _join_skipped(f: h5py.File, stores: list) -> None:
    """The items each part left out (--skip-failed), copied into /skipped, part by part."""
    items = [item for s in stores for item in s.skipped()]
    if items:
        group = f.create_group("skipped")
        group.create_dataset("index", data=np.array([i for i, _ in items], np.int64))
        group.create_dataset("error", data=np.array([e for _, e in items], dtype=object), dtype=h5py.string_dtype())
        f.attrs["skipped"] = len(items)


def merge(store_path: str, out: str, rows_per_copy: int = 4096) -> int:
    """Copies a (virtual) store into one self-contained store, a bounded number of rows at a time."""
    if os.path.exists(out):
        raise StoreError(f"{out} exists; choose another --out")
    with open_store(store_path) as src:
        layers = [LayerSpec(**{k: tuple(v) if k == "row_shape" else v for k, v in spec.items()})
                  for spec in json.loads(src.file.attrs["layers"])]
        targets = [TargetSpec(**{k: tuple(v) if k == "row_shape" else v for k, v in spec.items()})
                   for spec in json.loads(src.file.attrs["targets"])]
        with StoreWriter(out, layers, targets, src.metadata, commit_rows=1 << 30, expected_rows=src.rows) as w:
            w.skip(src.skipped())
            for a in range(0, src.rows, rows_per_copy):
                b = min(src.rows, a + rows_per_copy)
                acts = {}
                for spec in layers:
                    data = src.read(spec.name, a, b)
                    if spec.ragged:
                        acts[spec.name] = Ragged(np.concatenate(data) if data else np.zeros((0, *spec.row_shape)),
                                                 [len(x) for x in data])
                    else:
                        acts[spec.name] = data
                w.append(acts, targets={t.name: src.target(t.name, a, b) for t in targets}, index=src.index(a, b))
        complete = src.status == "complete"
        with h5py.File(out, "r+", locking=False) as f:
            if src.outputs():
                del f["outputs"]  # the writer's, empty
                src.file.copy("outputs", f)
            if not complete:
                f.attrs.modify("status", fixed_text("incomplete", STATUS_LENGTH))
    log.info("%s: %d rows copied from %s", out, src.rows, store_path)
    return src.rows
