"""Backend registry: which implementations exist and which devices they run on.

* ``torch``: torch.distributed collectives; any process group (gloo on CPU, NCCL on GPU).
* ``sim``: epcomm's own intranode kernels on the CPU SIMT layer (one node; ``Buffer`` raises
  :class:`EpcommBackendUnavailable` for several nodes). Never chosen by ``"auto"``.
* ``cuda``: the kernels on GPUs. Not part of this build yet; selecting it raises
  :class:`EpcommBackendUnavailable`.
"""

from __future__ import annotations

from ..errors import EpcommBackendUnavailable

__all__ = ["BACKENDS", "resolve_backend"]

# name -> (devices it runs on, why it is unavailable or None)
BACKENDS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "torch": (("cpu", "cuda"), None),
    "sim": (("cpu",), None),
    "cuda": (("cuda",), "the CUDA kernel backend is not built yet (planned: issue 'kernels that run on GPUs and on this CPU')"),
}
# "sim" (CPU-simulated kernels, one node only) is never picked by "auto": it is a correctness tool, far slower.
_AUTO_ORDER = ("cuda", "torch")


def resolve_backend(name: str) -> str:
    """The backend to use for ``name`` (``"auto"`` picks the best available)."""
    if name == "auto":
        return next(n for n in _AUTO_ORDER if BACKENDS[n][1] is None)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    reason = BACKENDS[name][1]
    if reason is not None:
        raise EpcommBackendUnavailable(f"backend {name!r} is unavailable: {reason}. Use backend='torch'.")
    return name
