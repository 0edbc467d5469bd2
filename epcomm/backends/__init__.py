"""Backend registry: which implementations exist and which devices they run on.

* ``torch``: torch.distributed collectives; any process group (gloo on CPU, NCCL on GPU).
* ``sim``: epcomm's own kernels on the CPU SIMT layer: intranode on one node, two-hop internode across
  nodes. Never chosen by ``"auto"``.
* ``cuda``: the same kernels on GPUs (``epcomm._C_cuda``, built wherever nvcc is found; one node;
  never run on a GPU yet). Without the extension or without a GPU, selecting it raises
  :class:`EpcommBackendUnavailable` on every rank. Not chosen by ``"auto"`` until it has been
  validated on GPUs.
"""

from __future__ import annotations

from ..errors import EpcommBackendUnavailable

__all__ = ["BACKENDS", "resolve_backend"]

# name -> (devices it runs on, why it is unavailable or None); the kernel backends check their
# extension and devices collectively when a Buffer is built, so every rank gets the same error.
BACKENDS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "torch": (("cpu", "cuda"), None),
    "sim": (("cpu",), None),
    "cuda": (("cuda",), None),
}
# "sim" (CPU-simulated kernels) is never picked by "auto": it is a correctness tool, far
# slower. "cuda" is not either, until it has run on GPUs.
_AUTO_ORDER = ("torch",)


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
