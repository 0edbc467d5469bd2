"""The ``cuda`` backend: epcomm's intranode kernels on GPUs, the same plumbing as ``sim``.

:class:`CudaRuntime` is :class:`~epcomm.backends.sim_backend.SimRuntime` with the device runtime
of ``epcomm._C_cuda`` (csrc/runtime/cuda_runtime.cu): cudaMalloc'ed buffers shared through CUDA
IPC handles, kernels (csrc/runtime/cuda_entries.cu) launched on the runtime's stream.
:class:`CudaDispatchBackend` is :class:`~epcomm.backends.sim_backend.SimDispatchBackend` on that
runtime, with tensors on the current CUDA device.

Status: compiled for sm_90 in every build (CI included) but never run on a GPU (none is lent to
development). Calls are synchronous: each kernel waits for torch's current stream, runs on the
runtime's stream and is waited for (``async_finish`` has no effect yet). One node only, like sim.
Without a GPU, ``Buffer(backend="cuda")`` raises :class:`~epcomm.EpcommBackendUnavailable` on
every rank.
"""

from __future__ import annotations

import torch

from .._comm import GroupComm
from ..errors import EpcommBackendUnavailable
from ..topology import Topology
from .base import BackendOptions
from .sim_backend import SimRuntime, SimDispatchBackend

__all__ = ["CudaRuntime", "CudaDispatchBackend"]



class CudaRuntime(SimRuntime):
    """One rank's CUDA device runtime; see :class:`SimRuntime` for the arguments."""

    runtime_kind = "cuda"
    backend_name = "cuda"

    def _new_runtime(self):
        device = torch.cuda.current_device() if torch.cuda.is_available() else -1
        return self._ext.DeviceRuntime(self.topo.rank, self.topo.world_size, self.run_token, device)

    def run(self, spec, params, timeout_s: float | None = None, op: str | None = None) -> None:
        # inputs were written on torch's stream; the runtime's stream must not start before them
        torch.cuda.current_stream().synchronize()
        super().run(spec, params, timeout_s=timeout_s, op=op)

    def barrier(self, timeout_s: float | None = None, op: str | None = None) -> None:
        torch.cuda.current_stream().synchronize()
        super().barrier(timeout_s=timeout_s, op=op)

    def peer_view(self, rank: int, dtype: torch.dtype = torch.uint8, offset: int = 0, count: int = -1) -> torch.Tensor:
        raise NotImplementedError("peer_view is CPU-only; on GPUs read peer memory from a kernel")


class CudaDispatchBackend(SimDispatchBackend):
    """Dispatch/combine through the intranode kernels on this rank's current CUDA device.

    ``Buffer`` has checked on every rank that a GPU and the extension are there (the registry's
    availability, agreed collectively), so a machine without one makes every rank raise the same
    EpcommBackendUnavailable before anything is set up.
    """

    name = "cuda"
    runtime_class = CudaRuntime

    def low_latency(self):
        raise NotImplementedError(
            "the 'cuda' backend has no low-latency mode yet: the LL kernels build for sm_90 (make -C csrc "
            "kernels-check) but the cuda runtime does not register them (they need a GIN signal range and "
            "device peer tables); use Buffer(backend='torch') on NCCL")

    @classmethod
    def check_options(cls, topo: Topology, options: BackendOptions) -> None:
        if topo.num_nodes != 1:
            raise EpcommBackendUnavailable(
                f"the cuda backend is intranode-only for now: this group has {topo.num_nodes} nodes ({topo.world_size} "
                f"ranks, {topo.num_nvl_ranks} per node). The two-hop internode kernels run on backend='sim' (CPU); "
                f"their GPU transport (NCCL GIN) is compiled but not wired yet. Use backend='torch' across nodes."
            )

    def __init__(self, comm: GroupComm, topo: Topology, options: BackendOptions) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(comm, topo, options)
