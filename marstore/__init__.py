"""marstore: activation extraction from PyTorch models into HDF5 stores, and probes on them.

The data path, one module per stage:
    loading    checkpoint -> model: any layout, safe unpickling, a report of every mismatch
    hooks      model -> hooked tensors: names, globs, regexes, reductions on the device
    transfer   hooked tensors -> float16 in reusable pinned host slots (marstore._C kernels; ops)
    store      slots -> a chunked, self-describing HDF5 file that survives a kill and resumes
    dataset    store -> torch Dataset, per-process safe, with a chunk-shuffling sampler; token streams
    probe      dataset -> linear and MLP probes against a control task, reports and plots; probe files
    evaluate   probe files -> the same probes on another store (checkpoint, model, data set), or a running model
extract runs checkpoint -> store in one pipeline (scaleout: over ranks and machines, and join);
similarity compares layers (linear CKA); cli is the `marstore` command.
"""

__version__ = "0.1.0"
