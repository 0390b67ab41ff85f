"""Loads marstore._C, or explains once why the pure-torch path is used instead."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Callable

import torch

REBUILD_COMMAND = "pip install --no-build-isolation -e ."
# What this package's Python calls in the module; a build from older sources lacks some.
REQUIRED_ENTRIES = ("cast_copy", "cast_copy_many", "cast_copy_into", "cast_copy_many_into", "channel_moments",
                    "moments_update")


def load(import_module: Callable[[str], ModuleType] = importlib.import_module) -> tuple[ModuleType | None, str]:
    """Returns (module or None, a one-line status). Warns once when the module is not usable."""
    if os.environ.get("MARSTORE_NO_EXTENSION"):
        return None, "disabled by MARSTORE_NO_EXTENSION"
    try:
        module = import_module("marstore._C")
    except ImportError as exc:  # missing, or linked against another torch (undefined symbols)
        status = f"marstore._C is not importable ({exc})"
    else:
        built_for = getattr(module, "torch_version", "unknown")
        missing = [name for name in REQUIRED_ENTRIES if not hasattr(module, name)]
        if built_for != torch.__version__:
            status = f"marstore._C was built for torch {built_for}, but torch {torch.__version__} is running"
        elif missing:
            status = f"marstore._C was built from older sources (it lacks {', '.join(missing)})"
        else:
            return module, f"loaded, built for torch {built_for}"
    warnings.warn(
        f"{status}; using the pure-torch path (same results, slower). Rebuild with: {REBUILD_COMMAND}",
        RuntimeWarning,
        stacklevel=2,
    )
    return None, status
