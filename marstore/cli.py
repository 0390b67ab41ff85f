"""The `marstore` command line: a thin layer over the library's stages."""

from __future__ import annotations

import argparse
import logging
import sys


def _doctor(args: argparse.Namespace) -> int:
    import h5py
    import torch

    from marstore import ops

    ext = ops._C
    rows = [
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("marstore._C", ops.EXTENSION_STATUS),
        ("operators use", ops.backend()),
    ]
    if ext is not None:
        rows.append(("compiled with CUDA", "yes" if ext.with_cuda else "no"))
        rows.append(("CPU kernels", "AVX2+F16C" if ext.cpu_has_f16c() else "scalar"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"GPU {i}", torch.cuda.get_device_name(i)))
    else:
        rows.append(("GPU", "none seen"))
    rows.append(("h5py / HDF5", f"{h5py.version.version} / {h5py.version.hdf5_version}"))
    usable = ext is not None and (ext.with_cuda or not torch.cuda.is_available())
    if ext is not None and not usable:
        rows.append(("problem", "a GPU is present but marstore._C has no CUDA kernels; rebuild with "
                                "MARSTORE_BUILD=cuda pip install --no-build-isolation -e ."))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("ok" if usable else "NOT OK: the extension is not usable (see above)")
    return 0 if usable else 1


def _info(args: argparse.Namespace) -> int:
    import json
    import os

    from marstore.store import StoreError, open_store

    try:
        store = open_store(args.store)
    except StoreError as exc:
        print(f"marstore info: {exc}", file=sys.stderr)
        return 2
    with store:
        size = os.path.getsize(args.store)
        attrs = store.file.attrs
        info = {
            "path": args.store,
            "format_version": int(attrs["format_version"]),
            "status": store.status,
            "rows": store.rows,
            "file_bytes": size,
            "bytes_per_row": size / store.rows if store.rows else None,
            "created": str(attrs["created"]),
            "committed_at": str(attrs["committed_at"]),
            "layers": {
                name: {
                    "layout": layer.layout,
                    "shape": [store.rows, *layer.row_shape] if layer.layout == "dense" else ["ragged", *layer.row_shape],
                    "dtype": layer.dtype,
                    "source_dtype": layer.attrs.get("source_dtype"),
                    "reduction": layer.attrs.get("reduction"),
                    "chunks": list(layer.chunks),
                    "compression": layer.compression,
                    "nonfinite": int(layer.attrs.get("nonfinite", 0)),
                    "overflow": int(layer.attrs.get("overflow", 0)),
                }
                for name, layer in store.layers.items()
            },
            "targets": {name: {"shape": [store.rows, *ds.shape[1:]], "dtype": str(ds.dtype)} for name, ds in store.targets.items()},
            "run": store.metadata,
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: marstore store, format {info['format_version']}, {info['status']}")
    per_row = f", {info['bytes_per_row']:.0f} bytes a row" if info["bytes_per_row"] else ""
    print(f"  {info['rows']} committed rows, {size / 2**20:.1f} MiB{per_row}; last commit {info['committed_at']}")
    print("  layers:")
    for name, layer in info["layers"].items():
        shape = "x".join(str(s) for s in layer["shape"])
        flags = f", {layer['compression']}" if layer["compression"] else ""
        print(f"    {name:<28} {layer['layout']:<6} {shape:<18} {layer['dtype']:<8} (from {layer['source_dtype']}, "
              f"reduction {layer['reduction']}) chunks {tuple(layer['chunks'])}{flags}; "
              f"nonfinite {layer['nonfinite']}, overflow {layer['overflow']}")
    if info["targets"]:
        print("  targets: " + ", ".join(f"{n} {'x'.join(map(str, t['shape']))} {t['dtype']}" for n, t in info["targets"].items()))
    run = info["run"]
    for key in ("model", "checkpoint", "command"):
        if key in run:
            print(f"  {key}: {json.dumps(run[key]) if not isinstance(run[key], str) else run[key]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marstore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check the installation: torch, marstore._C, GPU, HDF5")
    doctor.set_defaults(func=_doctor)
    info = sub.add_parser("info", help="describe a store: status, rows, layers, targets, the recorded run")
    info.add_argument("store", help="the store's .h5 file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)
