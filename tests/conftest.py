import os

import pytest
import torch

from marstore import ops

BACKENDS = ["extension", "torch"]
# The extension's CPU kernel sets below the best one, which "extension" runs: without them a
# processor with AVX-512 would never test the AVX2 loops, nor one with AVX2 the scalar ones.
LESSER_CPU_KERNELS = ["avx2", "scalar"]


def _require_extension() -> None:
    if ops._C is None:
        if os.environ.get("MARSTORE_NO_EXTENSION"):
            pytest.skip("extension disabled by MARSTORE_NO_EXTENSION")
        pytest.fail(f"marstore._C is not usable: {ops.EXTENSION_STATUS}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test once on marstore._C's kernels and once on the pure-torch path."""
    if request.param == "extension":
        _require_extension()
    with ops.use_backend(request.param):
        yield request.param


@pytest.fixture(params=["extension", *(f"extension-{k}" for k in LESSER_CPU_KERNELS), "torch"])
def cpu_backend(request):
    """As `backend`, and once more on each lesser CPU kernel set this processor runs."""
    name, _, kernels = request.param.partition("-")
    if name == "extension":
        _require_extension()
    if kernels:
        available = ops._C.cpu_kernels_available()
        if kernels not in available:
            pytest.skip(f"this processor does not run the {kernels} kernels")
        if kernels == available[-1]:
            pytest.skip(f"{kernels} is this processor's best kernel set, which 'extension' runs")
    with ops.use_backend(name):
        if kernels:
            ops._C.set_cpu_kernels(kernels)
        try:
            yield request.param
        finally:
            if kernels:
                ops._C.set_cpu_kernels(available[-1])


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
