"""Lazy loading of epcomm's compiled extensions.

* ``"cpu"`` -> ``epcomm._C``: the cpu device runtime (POSIX shared memory, SIMT-layer kernels).
* ``"cuda"`` -> ``epcomm._C_cuda``: the cuda device runtime (CUDA IPC, sm_90 kernels).

Nothing is imported until a backend asks, so ``import epcomm`` works (and the ``torch`` backend
runs) without a built extension; a missing or broken one becomes a clear
:class:`~epcomm.EpcommBackendUnavailable` instead of an ImportError.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch  # noqa: F401  (the extensions link against libtorch/libc10: load them first)

from .errors import EpcommBackendUnavailable

__all__ = ["load_extension", "EXTENSIONS"]

EXTENSIONS = {"cpu": "epcomm._C", "cuda": "epcomm._C_cuda"}
_HOW_TO_BUILD = "build it with `pip install --no-build-isolation -e .` from the repository root (or `make venv`)"


def load_extension(kind: str) -> ModuleType:
    """The extension module of runtime ``kind`` (``"cpu"`` or ``"cuda"``).

    Raises:
        ValueError: ``kind`` is not one of :data:`EXTENSIONS`.
        EpcommBackendUnavailable: the module is not built or does not load.
    """
    if kind not in EXTENSIONS:
        raise ValueError(f"unknown runtime kind {kind!r}; choose one of {', '.join(map(repr, EXTENSIONS))}")
    name = EXTENSIONS[kind]
    try:
        return importlib.import_module(name)
    except ImportError as err:
        extra = " (it is built only where nvcc is found at install time)" if kind == "cuda" else ""
        raise EpcommBackendUnavailable(
            f"epcomm's {kind} runtime extension {name} cannot be loaded{extra}: {err}. To fix, {_HOW_TO_BUILD}."
        ) from err
