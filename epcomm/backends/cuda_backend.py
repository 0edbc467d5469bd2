"""The ``cuda`` backend: epcomm's kernels on GPUs, the same plumbing as ``sim``.

:class:`CudaRuntime` is :class:`~epcomm.backends.sim_backend.SimRuntime` with the device runtime
of ``epcomm._C_cuda`` (csrc/runtime/cuda_runtime.cu): cudaMalloc'ed buffers shared through CUDA
IPC handles, kernels (csrc/runtime/cuda_entries.cu, gin_entries.cu) launched on the runtime's stream.
:class:`CudaDispatchBackend` is :class:`~epcomm.backends.sim_backend.SimDispatchBackend` on that
runtime, with tensors on the current CUDA device.

One node: the intranode kernels over CUDA IPC. Across nodes: the two-hop internode kernels, the NVL
region over CUDA IPC between the ranks of a node (only those are mapped), the network over NCCL GIN:
each runtime makes its own NCCL communicator from an NCCL unique id that rank 0 creates and the
Buffer's process group carries to every rank (no private torch API; any group, gloo included), and a
GIN session on it whose window holds the RDMA workspace (csrc/runtime/gin_network.hpp).

Streams (DeepEP's semantics, ``epcomm/_streams.py``): every kernel of a Buffer runs on one communication
stream (kernels share the buffers, so none may overlap another), which first waits for torch's current
stream (the inputs were written in its order); the Buffer runs an operation's data phase with that
stream current, so the post-processing follows the kernels without the host waiting. The kernels whose outputs the host reads (notify: counts, the call check's
verdict; the peer barrier) are waited for by polling their stream against a host deadline; the data
kernels (dispatch, combine) are only enqueued, and their error slots are read when their event has
passed: by the runtime's next call, or by ``event.synchronize()``. Nothing synchronizes the device or
torch's other streams.

Status: compiled for sm_90 and sm_100 in every build (CI included) but never run on a GPU (none is
lent to development). Without a GPU,
``Buffer(backend="cuda")`` raises :class:`~epcomm.EpcommBackendUnavailable` on every rank; so does a
set-up that finds no GIN, an NCCL older than 2.30, or CUDA IPC refused, naming the cause.
"""

from __future__ import annotations

import torch

from .._comm import GroupComm
from .._streams import CommStreamScope, tensors_in
from ..errors import EpcommError
from ..low_latency import LowLatencyLayout
from ..topology import Topology
from ._kernel_paths import rdma_offset
from .base import BackendOptions
from .cuda_low_latency import CudaLowLatency
from .sim_backend import SimDispatchBackend, SimRuntime

__all__ = ["CudaRuntime", "CudaDispatchBackend"]

# The share of the set-up timeout NCCL's collective set-up calls may take: a rank whose set-up failed
# reaches the status exchange at once, the others after at most this, well within the exchange's own
# deadline (the full timeout).
_NETWORK_SETUP_SHARE = 0.5


class CudaRuntime(SimRuntime):
    """One rank's CUDA device runtime; see :class:`SimRuntime` for the arguments.

    Args:
        network: across nodes, ``(rdma_bytes, num_signals)`` of the GIN session (the RDMA window and the
            transport signals the internode kernels need); ``None`` on one node.
    """

    runtime_kind = "cuda"
    backend_name = "cuda"

    def __init__(self, comm: GroupComm, topo: Topology, num_nvl_bytes: int, *, timeout_s: float | None = None,
                 network: tuple[int, int] | None = None, comm_stream: torch.cuda.Stream | None = None) -> None:
        if (topo.num_nodes > 1) != (network is not None):
            raise ValueError(f"the cuda runtime needs network=(rdma_bytes, num_signals) exactly when the group spans "
                             f"nodes ({topo.num_nodes} here), got {network}")
        self.network = network
        self.comm_stream = comm_stream
        super().__init__(comm, topo, num_nvl_bytes, timeout_s=timeout_s)

    def _new_runtime(self):
        device = torch.cuda.current_device() if torch.cuda.is_available() else -1
        # num_nvl_ranks: CUDA IPC maps this node's ranks only
        return self._ext.DeviceRuntime(self.topo.rank, self.topo.world_size, self.run_token, device,
                                       self.topo.num_nvl_ranks)

    def _set_up(self) -> None:
        super()._set_up()  # buffers, handles, this node's peers mapped
        if self.network is not None:
            self._open_network(*self.network)

    def _open_network(self, rdma_bytes: int, num_signals: int) -> None:
        """The GIN network across nodes: rank 0's NCCL unique id to every rank over the process group, then
        every rank joins the communicator and the GIN session (collective; bounded by the set-up timeout)."""
        error, network_id = None, b""
        if not getattr(self._ext, "GIN_BUILT", False):  # every rank says so, in the same exchange as the id
            error = ("EpcommBackendUnavailable: this epcomm._C_cuda was built without NCCL's headers, so it has no "
                     "internode kernels: rebuild with torch's nvidia-nccl wheel installed (or NCCL_HOME set)")
        elif self.topo.rank == 0:
            try:
                network_id = self._ext.create_network_id()
            except (EpcommError, ValueError, RuntimeError) as err:
                error = f"{type(err).__name__}: {err}"
        network_id = self._gather_status("network id", error, network_id, self._ext.HANDLE_BYTES)[0]
        error = None
        try:
            self._runtime.open_network(network_id, rdma_bytes, num_signals, self.timeout_s * _NETWORK_SETUP_SHARE)
        except (EpcommError, ValueError, RuntimeError) as err:
            error = f"{type(err).__name__}: {err}"
        # a rank that could not join leaves the others timing out inside NCCL: the cause is the former
        self._gather_status("open network", error, timeouts_follow_unavailable=True)

    @property
    def network_rdma_bytes(self) -> int:
        """Bytes of this rank's RDMA window (0 on one node)."""
        return int(self.runtime.network_rdma_bytes)

    @property
    def network_signals(self) -> int:
        """Transport signals of the GIN session (0 on one node)."""
        return int(self.runtime.network_signals)

    host_waits_for_enqueued = False  # stream order: the data kernels' error slots are read later

    def stream(self) -> int:
        """The communication stream, after torch's current stream (a no-op inside a data phase, where it is
        the current one): every kernel of this runtime runs there, in call order."""
        if self.comm_stream is None:
            self.comm_stream = torch.cuda.Stream()
        current = torch.cuda.current_stream()
        if current != self.comm_stream:
            self.comm_stream.wait_stream(current)
        return self.comm_stream.cuda_stream

    def barrier(self, timeout_s: float | None = None, op: str | None = None) -> None:
        """All ranks meet. The peer-barrier kernel meets this node's ranks (IPC reaches no further); across
        nodes the ranks then meet on the host. That is enough for what a barrier orders here: every kernel
        before it in its stream has finished (the barrier kernel follows them and the host waits for it),
        writes to peer memory stay inside a node (the kernel's release/acquire), and across nodes only GIN
        writes, into the RDMA window, whose signals the kernels (and a re-layout's reset) have waited for
        before they ended. Every kernel runs in torch's current stream, so one before the barrier is a kernel
        before it in its stream as long as the Buffer's operations use one stream (the communication stream
        for data phases, whose barriers run inside them too)."""
        super().barrier(timeout_s=timeout_s, op=op)
        if self.network is not None:
            self.comm.all_gather(op or f"{self.backend_name} backend", "meet across nodes",
                                 torch.zeros(1, dtype=torch.int64, device=self.comm.device))

    def zero(self, num_bytes: int) -> None:
        """Zero the NVL data region's first ``num_bytes`` and, across nodes, the whole RDMA window (it holds the
        RDMA workspace: ring counters and signal bases restart at 0 in a new layout)."""
        super().zero(num_bytes)
        self.runtime.zero_network(self.stream())  # in the kernels' stream order, as the data region's zeroing

    def peer_view(self, rank: int, dtype: torch.dtype = torch.uint8, offset: int = 0, count: int = -1) -> torch.Tensor:
        raise NotImplementedError("peer_view is CPU-only; on GPUs read peer memory from a kernel")

    def local_view(self, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
        """A CUDA tensor over ``count`` elements of this rank's data region from byte ``offset`` (no copy; it does
        not own the memory: invalid once the runtime closes), through ``__cuda_array_interface__``."""
        return _device_view(self.local_pointer, self.num_nvl_bytes, "data region", dtype, offset, count)

    def window_view(self, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
        """As :meth:`local_view`, over this rank's RDMA window (across nodes: where the LL region lives)."""
        return _device_view(int(self.runtime.network_local_ptr), self.network_rdma_bytes, "RDMA window", dtype,
                            offset, count)


def _device_view(base: int, capacity: int, what: str, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    """``count`` elements of ``dtype`` at byte ``offset`` of the ``capacity`` device bytes at ``base``, as a CUDA
    tensor that does not own them."""
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if offset < 0 or count < 0 or offset + nbytes > capacity:
        raise ValueError(f"[{offset}, {offset + nbytes}) is outside the {capacity}-byte {what}")
    if nbytes == 0:
        return torch.empty(0, dtype=dtype, device=torch.device("cuda", torch.cuda.current_device()))
    return torch.as_tensor(_DeviceBytes(base + offset, nbytes), device="cuda").view(dtype)


class _DeviceBytes:
    """``nbytes`` of device memory at ``address`` as ``__cuda_array_interface__`` describes it (for
    ``torch.as_tensor``, which then wraps them without a copy or a stream synchronization)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None, "stream": None}


class CudaDispatchBackend(SimDispatchBackend):
    """Dispatch/combine through epcomm's kernels on this rank's current CUDA device.

    ``Buffer`` has checked on every rank that a GPU and the extension are there (the registry's
    availability, agreed collectively), so a machine without one makes every rank raise the same
    EpcommBackendUnavailable before anything is set up. Across nodes the buffers are two: the IPC
    buffer holds the NVL region (sized to the spec's ``rdma_offset``), the GIN window the RDMA region;
    a layout that needs more of either, or more transport signals than the session has, gets a new
    runtime (buffers and session), collectively, as the sim backend's growth does.
    """

    name = "cuda"
    runtime_class = CudaRuntime
    traffic_from_routing = True  # GIN counts no bytes: buffer.traffic's two-hop bytes come from the routing

    def stream_scope(self, device: torch.device, async_finish: bool, op: str) -> CommStreamScope:
        """The data phase on this Buffer's communication stream (``epcomm/_streams.py``); the event's
        ``synchronize()`` raises a failed kernel's error as a failure of ``op``."""
        return CommStreamScope(self.device, self._comm_stream, async_finish,
                               lambda wait: self._report_enqueued(wait, op))

    @property
    def comm_stream(self) -> torch.cuda.Stream:
        """The stream every kernel of this Buffer runs on (``Buffer.get_comm_stream()``)."""
        return self._comm_stream

    def _kernel_reads(self, *tensors: torch.Tensor | None) -> None:
        """Tensors an enqueued kernel uses (the handle's routing, inputs, outputs) are marked as used on the
        communication stream: freed by the caller (a handle dropped after combine), their memory must not go
        to new work before the kernel ends (and while a graph captures, they are kept for its replays)."""
        super()._kernel_reads(*tensors)
        for t in tensors_in(tensors):
            if t.is_cuda:
                t.record_stream(self._comm_stream)

    def _host_readable_zeros(self, n: int) -> torch.Tensor:
        """Pinned host memory (torch's pinned allocator: cudaHostAlloc), which the kernels write through the same
        address (unified virtual addressing maps every such allocation on every device) and the host reads once
        the kernel's stream has been seen done, with no device-to-host copy: the counts a non-cached dispatch
        needs and the call check's verdict (issue 12: no device-wide or extra stream synchronization)."""
        return torch.zeros(n, dtype=torch.int32, pin_memory=True)

    def _report_enqueued(self, wait: bool, op: str) -> None:
        if self._device_runtime is not None:
            self._device_runtime.report_enqueued(wait, op)

    def _new_low_latency(self) -> CudaLowLatency:
        """The LL engine (``cuda_low_latency.py``)."""
        return CudaLowLatency(self)

    @classmethod
    def check_options(cls, topo: Topology, options: BackendOptions) -> None:
        """As sim: one node runs the intranode kernels, several the two-hop ones (``flat`` is refused)."""
        super().check_options(topo, options)

    def __init__(self, comm: GroupComm, topo: Topology, options: BackendOptions) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        # every kernel's stream and the data phases' (kept across runtimes: a new runtime's first kernel
        # must follow the old one's last)
        self._comm_stream = torch.cuda.Stream(self.device)
        self._sizing_spec = None  # the spec the next runtime is sized for (None: the Buffer's explicit sizes)
        self._network_floor = (0, 0, 0)  # (NVL bytes, RDMA bytes, signals) of the last runtime: never shrink
        # across nodes, the LL layout every later session must hold too (its region in the window, its signals
        # above the internode kernels'); set by CudaLowLatency at its first LL call or clean
        self._low_latency_sizing: LowLatencyLayout | None = None
        super().__init__(comm, topo, options)

    # ------------------------------------------------------------ sizing across nodes
    def _normal_spec(self):
        """The normal-mode spec a session is sized for: the one being set up (the default layout before any)."""
        return self._sizing_spec or self.path.spec(self.path.kernel_config(None), 0, 4, 2, 4)

    def signals_needed(self, spec=None, low_latency: LowLatencyLayout | None = None) -> int:
        """GIN signals a session needs: the internode kernels' (of ``spec``, default :meth:`_normal_spec`) at
        ``[0, n)`` and, once LL mode is used, the LL layout's ``4E + 1`` (default the one sized for) at the
        session's top (``csrc/runtime/gin_low_latency_entries.cu``): the two ranges never overlap."""
        low_latency = low_latency or self._low_latency_sizing
        return (int(self._ext.transport_signals(spec or self._normal_spec()))
                + (low_latency.num_signals if low_latency is not None else 0))

    def _sized_at_construction(self, options: BackendOptions) -> bool:
        """Across nodes with ``low_latency_mode``, not even with explicit sizes: the GIN session's signals depend
        on the LL layout (``4E + 1``), unknown until the first LL call or clean, and a session made now would
        have to be replaced then (a second communicator and window)."""
        return not (self.topo.num_nodes > 1 and options.low_latency_mode)

    def _network_sizes(self) -> tuple[int, int, int]:
        """(IPC data bytes, RDMA window bytes, signals) for a new runtime across nodes: the most of the spec
        being set up (the default layout before any) with the LL layout (its region at the window's start),
        the Buffer's explicit sizes and the last runtime's."""
        spec_nvl, spec_rdma = self.path.region_bytes(self._normal_spec())
        low_latency_rdma = self._low_latency_sizing.rdma_bytes if self._low_latency_sizing is not None else 0
        explicit_nvl, explicit_rdma = self.explicit_bytes
        floor_nvl, floor_rdma, floor_signals = self._network_floor
        sizes = (max(rdma_offset(spec_nvl), rdma_offset(explicit_nvl), floor_nvl),
                 max(spec_rdma, low_latency_rdma, explicit_rdma, floor_rdma, 1),
                 max(self.signals_needed(), floor_signals))
        self._network_floor = sizes
        return sizes

    def _new_runtime(self, num_bytes: int) -> SimRuntime:
        if self.topo.num_nodes == 1:
            return self.runtime_class(self.comm, self.topo, num_bytes, timeout_s=self.timeout_s,
                                      comm_stream=self._comm_stream)
        nvl_bytes, rdma_bytes, num_signals = self._network_sizes()
        return self.runtime_class(self.comm, self.topo, nvl_bytes, timeout_s=self.timeout_s,
                                  network=(rdma_bytes, num_signals), comm_stream=self._comm_stream)

    def _holds(self, runtime: SimRuntime, spec) -> bool:
        """Across nodes: the NVL region in the IPC buffer, the RDMA region in the window, the signals in the session."""
        if self.topo.num_nodes == 1:
            return super()._holds(runtime, spec)
        nvl, rdma = self.path.region_bytes(spec)
        return (rdma_offset(nvl) <= runtime.num_nvl_bytes and rdma <= runtime.network_rdma_bytes
                and self.signals_needed(spec) <= runtime.network_signals)

    def _ensure(self, spec, op: str) -> SimRuntime:
        self._sizing_spec = spec
        runtime = self._device_runtime
        if runtime is not None and self.topo.num_nodes > 1 and self.signals_needed(spec) > runtime.network_signals:
            # A GIN session's signal count is fixed: a layout that needs more gets a new session, as a larger
            # buffer gets new buffers (even with explicit sizes, which say nothing about signals). Its window
            # starts zeroed and its signals at 0 (assumed of ncclDevCommCreate), so no reset is needed.
            self._retire_runtime(op)
        return super()._ensure(spec, op)
