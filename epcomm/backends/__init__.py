"""Backend registry: which implementations exist, the devices they run on, and why one is unavailable.

* ``torch``: torch.distributed collectives; any process group (gloo on CPU, NCCL on GPU).
* ``sim``: epcomm's own kernels on the CPU SIMT layer: intranode on one node, two-hop internode across
  nodes. Never chosen by ``"auto"`` (a correctness tool, far slower).
* ``cuda``: the same kernels on GPUs (``epcomm._C_cuda``, built wherever nvcc is found; intranode on one
  node, two-hop across nodes over CUDA IPC and NCCL GIN; never run on a GPU yet). Not chosen by ``"auto"``
  until it has been validated on GPUs.

A backend is a :class:`~epcomm.backends.base.DispatchBackend` subclass; :func:`register_backend`
adds one (out-of-tree backends included). :func:`backend_unavailable_reason` says, on this rank,
why a backend cannot run; ``Buffer`` gathers that answer from every rank, so all ranks raise the
same :class:`~epcomm.EpcommBackendUnavailable` or all proceed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import EpcommBackendUnavailable

__all__ = ["BACKENDS", "BackendEntry", "register_backend", "resolve_backend", "backend_unavailable_reason",
           "backend_class", "agree_available"]


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend.

    Attributes:
        name: what ``Buffer(backend=...)`` takes.
        target: ``"module:Class"`` of its :class:`~epcomm.backends.base.DispatchBackend`, imported on first use.
        devices: device types its tensors may live on.
        unavailable: returns why it cannot run on this rank (``None``: it can); must not communicate.
            ``None`` instead of a function: it runs wherever torch.distributed runs (nothing to agree on).
        auto_rank: position in ``"auto"``'s preference (lower first); ``None``: never chosen by ``"auto"``.
        instead: what to use where it is unavailable (ends the error message).
    """

    name: str
    target: str
    devices: tuple[str, ...]
    unavailable: Callable[[], str | None] | None
    auto_rank: int | None = None
    instead: str = "Use backend='torch'."


def _extension_missing(kind: str) -> str | None:
    from .._ext import load_extension

    try:
        load_extension(kind)
    except EpcommBackendUnavailable as err:
        return str(err)
    return None


def _cuda_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return _extension_missing("cuda")


BACKENDS: dict[str, BackendEntry] = {}


def register_backend(entry: BackendEntry) -> None:
    """Add (or replace) a backend."""
    BACKENDS[entry.name] = entry


register_backend(BackendEntry("torch", "epcomm.backends.torch_backend:TorchBackend", ("cpu", "cuda"), None, 0))
register_backend(BackendEntry("sim", "epcomm.backends.sim_backend:SimDispatchBackend", ("cpu",),
                              lambda: _extension_missing("cpu")))
register_backend(BackendEntry("cuda", "epcomm.backends.cuda_backend:CudaDispatchBackend", ("cuda",), _cuda_missing,
                              instead="Use backend='sim' (the same kernels on the CPU) or backend='torch'."))


def resolve_backend(name: str) -> str:
    """The registered backend ``name`` means (``"auto"``: the preferred one that runs here).

    Raises:
        ValueError: ``name`` is not registered.
    """
    if name == "auto":
        ranked = sorted((e for e in BACKENDS.values() if e.auto_rank is not None), key=lambda e: e.auto_rank)
        for entry in ranked:
            if backend_unavailable_reason(entry.name) is None:
                return entry.name
        raise EpcommBackendUnavailable("no backend chosen by 'auto' can run here: "
                                       + "; ".join(f"{e.name}: {backend_unavailable_reason(e.name)}" for e in ranked))
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    return name


def backend_unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this rank, or None."""
    check = BACKENDS[name].unavailable
    return None if check is None else check()


def backend_class(name: str):
    """The :class:`~epcomm.backends.base.DispatchBackend` subclass registered as ``name``."""
    module, _, cls = BACKENDS[name].target.partition(":")
    return getattr(importlib.import_module(module), cls)


_MESSAGE_BYTES = 400


def agree_available(comm, name: str) -> None:
    """Collective: raise :class:`~epcomm.EpcommBackendUnavailable` on every rank unless ``name`` runs on all.

    One all-gather of each rank's reason (a ``GroupComm`` stage, so a missing peer is a named timeout);
    none for a backend that has no availability check.
    """
    if BACKENDS[name].unavailable is None:
        return
    reason = backend_unavailable_reason(name) or ""
    from .._progress import BUFFER_CONSTRUCTION

    rows = comm.all_gather_bytes(BUFFER_CONSTRUCTION, "backend availability",
                                 reason.encode()[:_MESSAGE_BYTES], _MESSAGE_BYTES)
    failed = {r: row.rstrip(b"\0").decode(errors="replace") for r, row in enumerate(rows) if row.rstrip(b"\0")}
    if failed:
        lines = "\n".join(f"  rank {r}: {message}" for r, message in sorted(failed.items()))
        raise EpcommBackendUnavailable(f"epcomm: backend {name!r} is unavailable on {len(failed)} of {len(rows)} "
                                       f"ranks:\n{lines}\n{BACKENDS[name].instead}")
