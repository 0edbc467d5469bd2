"""The ``cuda`` backend: epcomm's intranode kernels on GPUs, the same plumbing as ``sim``.

:class:`CudaBackend` is :class:`~epcomm.backends.sim_backend.SimBackend` with the device runtime
of ``epcomm._C_cuda`` (csrc/runtime/cuda_runtime.cu): cudaMalloc'ed buffers shared through CUDA
IPC handles, kernels (csrc/runtime/cuda_intranode.cu) launched on the runtime's stream.
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
from .sim_backend import SimBackend, SimDispatchBackend

__all__ = ["CudaBackend", "CudaDispatchBackend"]

_MESSAGE_BYTES = 240


class CudaBackend(SimBackend):
    """One rank's CUDA device runtime; see :class:`SimBackend` for the arguments."""

    runtime_kind = "cuda"
    backend_name = "cuda"

    def _new_runtime(self):
        device = torch.cuda.current_device() if torch.cuda.is_available() else -1
        return self._ext.DeviceRuntime(self.topo.rank, self.topo.world_size, self.run_token, device)

    def run_kernel(self, name: str, *args, timeout_s: float | None = None, op: str | None = None) -> None:
        # inputs were written on torch's stream; the runtime's stream must not start before them
        torch.cuda.current_stream().synchronize()
        super().run_kernel(name, *args, timeout_s=timeout_s, op=op)

    def peer_view(self, rank: int, dtype: torch.dtype = torch.uint8, offset: int = 0, count: int = -1) -> torch.Tensor:
        raise NotImplementedError("peer_view is CPU-only; on GPUs read peer memory from a kernel")


class CudaDispatchBackend(SimDispatchBackend):
    """Dispatch/combine through the intranode kernels on this rank's current CUDA device.

    Collective: every rank checks that it has a GPU and the ranks agree before anything is set up,
    so a machine without one makes every rank raise the same EpcommBackendUnavailable.
    """

    name = "cuda"
    runtime_class = CudaBackend

    def __init__(self, comm: GroupComm, topo: Topology, num_nvl_bytes: int = 0, **kwargs) -> None:
        if topo.num_nodes != 1:
            raise EpcommBackendUnavailable(
                f"the cuda backend is intranode-only for now: this group has {topo.num_nodes} nodes ({topo.world_size} "
                f"ranks, {topo.num_nvl_ranks} per node). The two-hop internode kernels run on backend='sim' (CPU); "
                f"their GPU transport (NCCL GIN) is compiled but not wired yet. Use backend='torch' across nodes."
            )
        _agree_on_gpus(comm, topo)
        self.device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(comm, topo, num_nvl_bytes, **kwargs)


def _agree_on_gpus(comm: GroupComm, topo: Topology) -> None:
    problem = "" if torch.cuda.is_available() else (
        f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})")
    rows = comm.all_gather_bytes("cuda backend setup", "check GPUs", problem.encode()[:_MESSAGE_BYTES], _MESSAGE_BYTES)
    failed = {r: row.rstrip(b"\0").decode(errors="replace") for r, row in enumerate(rows) if row.rstrip(b"\0")}
    if failed:
        lines = "\n".join(f"  rank {r}: {message}" for r, message in sorted(failed.items()))
        raise EpcommBackendUnavailable(
            f"epcomm cuda backend: no usable CUDA GPU on {len(failed)} of {topo.world_size} ranks:\n{lines}\n"
            f"Use backend='sim' (the same kernels on the CPU) or backend='torch'."
        )
