"""Imports a CUDA build of marstore._C on a machine without a GPU and checks what it registered."""

import glob
import importlib.util
import sys

import torch

(path,) = glob.glob(f"{sys.argv[1]}/marstore/_C*.so")
spec = importlib.util.spec_from_file_location("marstore._C", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.with_cuda, "the build has no CUDA kernels"
assert module.torch_version == torch.__version__, (module.torch_version, torch.__version__)
for op in ("cast_copy", "cast_copy_many", "cast_copy_into", "cast_copy_many_into"):
    kernels = torch._C._dispatch_dump(f"marstore::{op}")
    assert "CUDA" in kernels and "CPU" in kernels, kernels
assert "CPU" in torch._C._dispatch_dump("marstore::channel_moments")
missing = [name for name in ("cast_copy", "cast_copy_many", "cast_copy_into", "cast_copy_many_into", "channel_moments")
           if not hasattr(module, name)]
assert not missing, f"direct entries missing: {missing}"
print(f"CUDA build of marstore._C imports: built for torch {module.torch_version}, CPU and CUDA kernels registered")
