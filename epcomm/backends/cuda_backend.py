"""The ``cuda`` backend's runtime plumbing: the same set-up as ``sim``, on GPUs.

:class:`CudaBackend` is :class:`~epcomm.backends.sim_backend.SimBackend` with the device runtime
of ``epcomm._C_cuda`` (csrc/runtime/cuda_runtime.cu): cudaMalloc'ed buffers shared through CUDA
IPC handles, kernels launched on a CUDA stream. Without a GPU, construction raises
:class:`~epcomm.EpcommBackendUnavailable` ("no CUDA GPU/driver on this machine ...") on every rank.
"""

from __future__ import annotations

import torch

from .sim_backend import SimBackend

__all__ = ["CudaBackend"]


class CudaBackend(SimBackend):
    """One rank's CUDA device runtime; see :class:`SimBackend` for the arguments."""

    runtime_kind = "cuda"
    backend_name = "cuda"

    def _new_runtime(self):
        device = torch.cuda.current_device() if torch.cuda.is_available() else -1
        return self._ext.DeviceRuntime(self.topo.rank, self.topo.world_size, self.run_token, device)

    def peer_view(self, rank: int, dtype: torch.dtype = torch.uint8, offset: int = 0, count: int = -1) -> torch.Tensor:
        raise NotImplementedError("peer_view is CPU-only; on GPUs read peer memory from a kernel")
