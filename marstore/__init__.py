"""marstore: activation extraction from PyTorch models into HDF5 stores, and probes on them.

The data path, one module per stage:
    transfer   hooked tensors -> float16 in reusable pinned host slots (marstore._C kernels)
    ops        the cast-copy operators themselves, with a pure-torch fallback
"""

__version__ = "0.1.0"
