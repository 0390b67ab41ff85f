"""Builds marstore._C against the torch that is installed (see README: Building)."""

import os
import shutil
import sys

from setuptools import find_packages, setup

EXACT_COMMAND = "pip install --no-build-isolation -e ."


def _import_build_torch():
    """Returns torch, refusing one that pip's build isolation brought in for this build only."""
    try:
        import torch
    except ImportError:
        sys.exit(
            "marstore: torch is not importable in this build environment. marstore._C must be "
            "built against the torch that will import it: install torch first, then run: "
            f"{EXACT_COMMAND}"
        )
    if "pip-build-env" in (torch.__file__ or ""):
        sys.exit(
            f"marstore: this build found a temporary torch ({torch.__file__}) that pip installed "
            f"for the build alone; the extension would not match your torch. Run: {EXACT_COMMAND}"
        )
    return torch


def _extension():
    torch = _import_build_torch()
    from torch.utils import cpp_extension

    wanted = os.environ.get("MARSTORE_BUILD", "auto").lower()
    if wanted not in ("auto", "cpu", "cuda"):
        sys.exit(f"marstore: MARSTORE_BUILD={wanted!r}; use auto, cpu or cuda")
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if wanted == "cuda" and not cuda_possible:
        sys.exit(
            f"marstore: MARSTORE_BUILD=cuda but torch {torch.__version__} has "
            f"{'no CUDA' if torch.version.cuda is None else 'CUDA'} and CUDA_HOME is "
            f"{cpp_extension.CUDA_HOME!r} (nvcc: {shutil.which('nvcc')})"
        )
    use_cuda = wanted == "cuda" or (wanted == "auto" and cuda_possible)
    print(f"marstore: building a {'CUDA' if use_cuda else 'CPU'} extension against torch "
          f"{torch.__version__}", file=sys.stderr)

    sources = ["csrc/cast_copy.cpp", "csrc/channel_moments.cpp", "csrc/checks.cpp", "csrc/module.cpp"]
    macros = [("MARSTORE_TORCH_VERSION", f'"{torch.__version__}"')]
    # at::parallel_for is an OpenMP region compiled into our code: without -fopenmp it runs
    # serially. The libgomp.so.1 it links resolves to the one torch has already loaded.
    # No fused multiply-adds unless written as such: the statistics' float64 combination must
    # give the bits of the same formula in numpy (where a processor has FMA, GCC would fuse).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]
    if use_cuda:
        return cpp_extension.CUDAExtension(
            "marstore._C",
            sources + ["csrc/cuda/cast_copy.cu"],
            define_macros=macros + [("MARSTORE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        ), cpp_extension
    return cpp_extension.CppExtension(
        "marstore._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}, extra_link_args=link
    ), cpp_extension


extension, cpp_extension = _extension()


class BuildExtension(cpp_extension.BuildExtension):
    """Links libstdc++ dynamically even where Python's own link flags say static: a statically
    linked copy beside torch's shared one crashed formatting numbers (seen on a GPU machine)."""

    def build_extensions(self):
        for attr in ("linker_so", "linker_so_cxx"):
            flags = getattr(self.compiler, attr, None)
            if flags and "-static-libstdc++" in flags:
                print(f"marstore: dropping -static-libstdc++ from the {attr} command", file=sys.stderr)
                setattr(self.compiler, attr, [f for f in flags if f != "-static-libstdc++"])
        super().build_extensions()

setup(
    packages=find_packages(include=["marstore", "marstore.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
