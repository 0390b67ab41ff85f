import os

import pytest
import torch

from marstore import ops

BACKENDS = ["extension", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test once on marstore._C's kernels and once on the pure-torch path."""
    if request.param == "extension" and ops._C is None:
        if os.environ.get("MARSTORE_NO_EXTENSION"):
            pytest.skip("extension disabled by MARSTORE_NO_EXTENSION")
        pytest.fail(f"marstore._C is not usable: {ops.EXTENSION_STATUS}")
    with ops.use_backend(request.param):
        yield request.param


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
