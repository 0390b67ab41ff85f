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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marstore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check the installation: torch, marstore._C, GPU, HDF5")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)
