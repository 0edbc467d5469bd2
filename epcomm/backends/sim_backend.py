"""The ``sim`` backend's runtime plumbing: epcomm's kernels on the CPU, one process per rank.

:class:`SimRuntime` sets up the device runtime of ``epcomm._C`` (csrc/runtime/cpu_runtime.cpp) on
every rank of the group, collectively (all ranks, of every emulated node, map each other's buffers:
within a node they stand for NVLink peer memory, across nodes for registered network memory):

1. the ranks agree on a run token (rank 0's random bytes): it names every rank's shared-memory
   segment (``/dev/shm/epcomm-<token>-<rank>``), so any rank can remove all of them on failure;
2. each rank allocates its peer-visible buffer and the ranks all-gather the handles;
3. each rank maps every peer's buffer; once all ranks report success the names are unlinked, so
   nothing is left in ``/dev/shm`` after the processes exit, even after a SIGKILL.

Every exchange goes through :class:`~epcomm._comm.GroupComm`, so a peer that does not arrive within
the buffer's timeout makes every other rank raise :class:`~epcomm.EpcommTimeoutError` naming the
stage. A rank that fails locally (say ``/dev/shm`` is full) makes every rank raise
:class:`~epcomm.EpcommError` with that rank's message.

Kernels run through :meth:`SimRuntime.run` (typed spec and params, see _kernel_paths.py; the
entries are csrc/runtime/intranode_entries.hpp and internode_entries.hpp, registered for the cpu
runtime by cpu_entries.cpp) and the peer barrier through :meth:`SimRuntime.barrier`.
:class:`SimDispatchBackend` builds dispatch and combine on them (the DispatchBackend protocol,
epcomm/backends/base.py): intranode kernels on one node, two-hop internode kernels across nodes;
``Buffer(backend="sim")`` uses it.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.distributed as dist

from .._comm import GroupComm
from .._ext import load_extension
from .._streams import tensors_in
from .._validate import Invalid
from ..config import Config
from ..errors import EpcommBackendUnavailable, EpcommError, EpcommTimeoutError
from ..graphs import capturing_sim_graph, is_capturing
from ..topology import LinkClass, Topology
from ._kernel_paths import (CALL_NEEDS_LAYOUT, CALL_REFUSED, InternodePath, IntranodePath, NotifyOutputs, rdma_offset,
                            row_bytes)
from .base import BackendOptions, CallCheck, DispatchBackend, DispatchCall, ExpertCounts

__all__ = ["SimRuntime", "SimDispatchBackend", "SimPlan", "SIM_DEFAULT_CONFIG"]

# The alignment the kernels need of a row: they copy 16-byte vectors where both ends of a copy are
# 16-byte aligned and 4-byte words otherwise (kernels/channel.cuh warp_copy_words), so 4 bytes suffice;
# 16-byte aligned rows (rows of a multiple of 16 bytes in fresh tensors) take the fast path.
KERNEL_LOAD_BYTES = 4

_TOKEN_BYTES = 12  # 24 hex digits in segment names
_MESSAGE_BYTES = 240  # per-rank failure message carried by the setup exchanges


class SimRuntime:
    """One rank's device runtime: its NVL buffer, the peers' buffers, and kernel launches.

    Collective: every rank of ``comm``'s group constructs it with the same ``num_nvl_bytes``.

    Args:
        comm: the buffer's collectives (deadlines, progress board).
        topo: where this rank sits; must be a single node (``topo.num_nodes == 1``).
        num_nvl_bytes: bytes of each rank's peer-visible data region (``Buffer(num_nvl_bytes=...)``).
        timeout_s: how long kernels wait for peers (default: the comm's timeout).
    Raises:
        EpcommBackendUnavailable: more than one node, or the extension is not built.
        EpcommTimeoutError / EpcommPeerError: a peer did not take part in the set-up.
        EpcommError: some rank could not allocate or map its buffers (every rank raises it).
    """

    runtime_kind = "cpu"
    backend_name = "sim"

    def __init__(self, comm: GroupComm, topo: Topology, num_nvl_bytes: int, *, timeout_s: float | None = None) -> None:
        if num_nvl_bytes < 0:
            raise ValueError(f"num_nvl_bytes must be >= 0, got {num_nvl_bytes}")
        self.comm = comm
        self.topo = topo
        self.num_nvl_bytes = num_nvl_bytes
        self.timeout_s = comm.timeout.total_seconds() if timeout_s is None else float(timeout_s)
        self._ext: ModuleType = load_extension(self.runtime_kind)
        self._op = f"{self.backend_name} backend setup"
        self.run_token: str | None = None
        self._runtime = None
        self.captured = False  # a graph captured kernels on these buffers (its replays would use them)
        try:
            self._set_up()
        except BaseException:
            self._clean_up_failed_setup()
            raise

    # ------------------------------------------------------------ set-up
    def _gather_bytes(self, stage: str, payload: bytes, size: int) -> list[bytes]:
        """All-gather ``size`` bytes from every rank (through GroupComm: deadlines apply)."""
        return self.comm.all_gather_bytes(self._op, stage, payload, size)

    def _gather_status(self, stage: str, error: str | None, payload: bytes = b"", size: int = 0,
                       timeouts_follow_unavailable: bool = False) -> list[bytes]:
        """All-gather (ok flag, failure message, payload); raise on every rank if any rank failed.

        ``timeouts_follow_unavailable``: a stage that is one collective call inside a library (NCCL's
        communicator set-up), where a rank that cannot take part leaves the others waiting until their
        deadline: when some rank found the backend unavailable and every other failure is such a timeout,
        the cause is the unavailable one, and every rank raises EpcommBackendUnavailable."""
        message = (error or "").encode()[: _MESSAGE_BYTES - 1]
        rows = self._gather_bytes(stage, bytes([error is None]) + message.ljust(_MESSAGE_BYTES, b"\0") + payload,
                                  1 + _MESSAGE_BYTES + size)
        failed = {r: row[1 : 1 + _MESSAGE_BYTES].rstrip(b"\0").decode(errors="replace")
                  for r, row in enumerate(rows) if row[0] != 1}
        if failed:
            lines = "\n".join(f"  rank {r}: {msg}" for r, msg in sorted(failed.items()))
            is_unavailable = lambda msg: msg.startswith(EpcommBackendUnavailable.__name__)  # noqa: E731
            follows = (lambda msg: is_unavailable(msg) or msg.startswith(EpcommTimeoutError.__name__)  # noqa: E731
                       if timeouts_follow_unavailable else is_unavailable)
            unavailable = (any(map(is_unavailable, failed.values())) and all(map(follows, failed.values())))
            raise (EpcommBackendUnavailable if unavailable else EpcommError)(
                f"epcomm {self._op}: stage '{stage}' failed on {len(failed)} of {self.topo.world_size} ranks:\n{lines}"
            )
        return [row[1 + _MESSAGE_BYTES :] for row in rows]

    def _set_up(self) -> None:
        # 1. Agree on the run token (rank 0's)
        mine = os.urandom(_TOKEN_BYTES)
        self.run_token = self._gather_bytes("agree run token", mine, _TOKEN_BYTES)[0].hex()
        # 2. Allocate this rank's buffer and exchange handles
        error, handle = None, b""
        try:
            self._runtime = self._new_runtime()
            self._runtime.allocate(self.num_nvl_bytes)
            handle = self._runtime.export_handle()
        except (EpcommError, ValueError, RuntimeError) as err:
            error = f"{type(err).__name__}: {err}"
        handles = self._gather_status("exchange handles", error, handle, self._ext.HANDLE_BYTES)
        # 3. Map every peer; once every rank did, drop the names
        error = None
        try:
            self._runtime.open_peers(handles)
        except (EpcommError, ValueError, RuntimeError) as err:
            error = f"{type(err).__name__}: {err}"
        self._gather_status("open peers", error)
        self._runtime.release_names()

    def _new_runtime(self):
        return self._ext.DeviceRuntime(self.topo.rank, self.topo.world_size, self.run_token)

    def _clean_up_failed_setup(self) -> None:
        if self._runtime is not None:
            self._runtime.abandon()  # some peer may have mapped it
            self._runtime = None
        if self.run_token is not None and self.runtime_kind == "cpu":
            # Names follow from the token: remove every rank's segment, a dead peer's included.
            self._ext.unlink_segments(self.run_token, self.topo.world_size)

    # ------------------------------------------------------------ use
    @property
    def runtime(self):
        """The extension's ``DeviceRuntime`` (see csrc/bindings/bindings.cpp)."""
        if self._runtime is None:
            raise EpcommError(f"epcomm {self.backend_name} backend on rank {self.topo.rank}: closed")
        return self._runtime

    @property
    def peer_pointers(self) -> list[int]:
        """Every rank's data region as mapped in this process (``[world_size]`` addresses)."""
        return list(self.runtime.peer_ptrs)

    @property
    def local_pointer(self) -> int:
        return self.runtime.local_ptr

    @property
    def peer_table_pointer(self) -> int:
        """Address of a kernel-accessible ``void*[world_size]`` array of :attr:`peer_pointers`."""
        return self.runtime.peer_table_ptr

    def peer_view(self, rank: int, dtype: torch.dtype = torch.uint8, offset: int = 0, count: int = -1) -> torch.Tensor:
        """A CPU tensor over ``rank``'s data region (no copy; invalid after :meth:`close`).

        Args:
            rank: whose buffer (this rank's own included).
            dtype: element type; ``offset`` is in bytes, ``count`` in elements (``-1``: to the end).
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        if count < 0:
            count = (self.num_nvl_bytes - offset) // itemsize
        nbytes = count * itemsize
        if offset < 0 or offset + nbytes > self.num_nvl_bytes:
            raise ValueError(f"[{offset}, {offset + nbytes}) is outside the {self.num_nvl_bytes}-byte NVL buffer")
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        raw = (ctypes.c_char * nbytes).from_address(self.peer_pointers[rank] + offset)
        return torch.frombuffer(raw, dtype=dtype, count=count)

    # Whether the host waits for an enqueued kernel before its call returns (see :meth:`enqueue`). The cpu
    # runtime's grids have finished when the launch returns, so waiting costs nothing and a kernel's error
    # reaches the call that ran it; the cuda runtime says False (stream order, no host wait).
    host_waits_for_enqueued = True

    def stream(self) -> int | None:
        """The stream kernels run on, as the runtime takes it (None: its own; cuda: the communication stream)."""
        return None

    def run(self, spec, params, timeout_s: float | None = None, op: str | None = None) -> None:
        """Run the kernel of ``params`` on this rank and wait for it (collective when the kernel waits on peers).

        Args:
            spec: the ``IntranodeSpec`` / ``InternodeSpec`` every rank runs this call with.
            params: the kernel's ``*Params`` (its type picks the kernel; see _kernel_paths.py).
            timeout_s: how long the kernel waits for peers (default: this backend's ``timeout_s``).
            op: the epcomm operation this kernel serves (``"dispatch"``, ...). With it, the kernel is a
                stage of ``op`` on the progress board: a failure names the operation, the kernel and
                the dead or late peers, and marks the process group broken (as a failed collective does).
        Raises:
            EpcommTimeoutError: a peer did not arrive in time (the message names rank and peers), in this
                kernel or in one enqueued earlier (:meth:`enqueue`) whose outcome was not reported yet.
            EpcommPeerError: a peer failed first and aborted the kernel (``op`` given).
            ValueError: no such kernel for this runtime, or bad arguments.
        """
        self._refuse_host_wait_in_capture(type(params).KERNEL, op)
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        stream = self.stream()
        self._wait_on_peers(type(params).KERNEL, lambda: self.runtime.run(spec, params, limit, stream), op)

    def _refuse_host_wait_in_capture(self, kernel: str, op: str | None) -> None:
        """A SimGraph capture cannot hold a kernel the host waits for (the cuda runtime refuses a capturing
        stream itself)."""
        if capturing_sim_graph() is not None:
            raise EpcommError(f"epcomm {self.backend_name} {op or 'call'} on rank {self.topo.rank}: the host waits "
                              f"for kernel {kernel}, which a graph capture cannot hold")

    def enqueue(self, spec, params, timeout_s: float | None = None, op: str | None = None,
                stream: int | None = None) -> None:
        """Like :meth:`run`, but the kernel is only issued, in the order of ``stream`` (None: :meth:`stream`):
        its error slot is read by :meth:`report_enqueued` (at once here, where :attr:`host_waits_for_enqueued`;
        on cuda by the runtime's next call, or the event of the call)."""
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        stream, runtime = self.stream() if stream is None else stream, self.runtime

        def issue() -> None:
            runtime.run(spec, params, limit, stream, True)
            if self.host_waits_for_enqueued:
                runtime.check_pending(True)

        kernel, graph = type(params).KERNEL, capturing_sim_graph()
        if graph is not None and self.runtime_kind != "cpu":
            raise EpcommError("a SimGraph captures the CPU runtime's kernels only; on GPUs use torch.cuda.graph")
        self._wait_on_peers(kernel, issue, op)
        if is_capturing():
            self.captured = True  # growth must not free what the graph's kernels point at
            if graph is not None:
                graph.add_kernel(lambda: self._wait_on_peers(kernel, issue, op))

    def report_enqueued(self, wait: bool, op: str | None = None) -> None:
        """Raise the first error of the enqueued kernels that have finished (``wait``: wait for all of
        them first, each against its host deadline); forget every one reported. Nothing (no round trip)
        when none is pending."""
        if self.runtime.num_pending:
            self._wait_on_peers("enqueued kernel", lambda: self.runtime.check_pending(wait), op)

    def local_view(self, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
        """A tensor over ``count`` elements of this rank's data region from byte ``offset`` (no copy; on the
        device kernels see; invalid after :meth:`close`)."""
        return self.peer_view(self.topo.rank, dtype, offset, count)

    def barrier(self, timeout_s: float | None = None, op: str | None = None) -> None:
        """All ranks meet in peer memory (the peer barrier kernel); writes before it are visible after it."""
        self._refuse_host_wait_in_capture("peer_barrier", op)
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        stream = self.stream()
        self._wait_on_peers("peer_barrier", lambda: self.runtime.barrier(limit, stream), op)

    def _wait_on_peers(self, kernel: str, launch, op: str | None) -> None:
        if op is None:
            launch()
        else:
            self.comm.run_local(op, f"kernel {kernel}", launch)

    def registered_kernels(self) -> list[str]:
        return list(self._ext.registered_kernels())

    def zero(self, num_bytes: int) -> None:
        """Zero the first ``num_bytes`` of this rank's data region (a re-layout), in :meth:`stream`'s order."""
        self.runtime.zero(0, num_bytes, self.stream())

    def close(self, collective: bool = False, op: str | None = None) -> None:
        """Release the buffers; idempotent.

        Args:
            collective: every rank calls it together: each closes its mappings of the peers' buffers, all
                meet on the host, then each frees its own, so no rank frees memory a peer still maps
                (undefined behaviour for CUDA IPC). Otherwise (garbage collection, a failed peer) the
                buffers are abandoned: peers' mappings closed, this rank's buffer never freed while a peer
                may map it (cuda: left to the process's exit; cpu: unmapped, POSIX keeps the pages alive).
            op: the operation a collective close serves (names it in errors).
        """
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        try:  # no kernel may still use the buffers (an error nobody asked for is dropped: teardown goes on)
            runtime.check_pending(True)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"epcomm {self.backend_name} backend on rank {self.topo.rank}: a kernel failed and nobody "
                          f"waited for its event: {err}", RuntimeWarning, stacklevel=2)
        if not collective:
            runtime.abandon()
            return
        try:
            runtime.close_peers()  # (cuda across nodes: also the network's collective teardown, which may fail)
            self.comm.all_gather(op or f"{self.backend_name} backend teardown", "close buffers",
                                 torch.zeros(1, dtype=torch.int64, device=self.comm.device))
        except BaseException:
            runtime.abandon()  # a peer did not arrive: it may still map this buffer
            raise
        runtime.close()


# ---------------------------------------------------------------------------------------------
# Dispatch / combine on epcomm's kernels (one node: the intranode path; several: the two-hop
# internode path; see _kernel_paths.py), with the same interface as TorchBackend.

SIM_DEFAULT_CONFIG = Config(
    num_sms=2 * IntranodePath.default_kernel[0], num_max_nvl_chunked_send_tokens=IntranodePath.default_kernel[1],
    num_max_nvl_chunked_recv_tokens=IntranodePath.default_kernel[2],
    num_max_rdma_chunked_send_tokens=InternodePath.default_kernel[3],
    num_max_rdma_chunked_recv_tokens=InternodePath.default_kernel[4])
"""The :class:`~epcomm.Config` a kernel-backend call without ``config`` runs with (for buffer-size hints)."""


class SimPlan:
    """Routing of one kernel-backend dispatch (kept in the handle)."""

    def __init__(self, num_tokens: int, num_recv: int, is_token_in_rank: torch.Tensor, notify_outputs: NotifyOutputs,
                 spec, recv_counts: list[int] | None, forward_counts: list[int] | None = None,
                 recv_capacity: int = -1) -> None:
        self.num_tokens = num_tokens
        self.num_recv = num_recv  # rows of the outputs (the padded count, for a dispatch counted on the device)
        # >= 0: a dispatch counted on the device (one node): the host never read how many rows arrive; the outputs
        # hold this many (num_worst_tokens) and the kernels check the count against it. Nothing below is read
        # on the host then (no per-rank or per-expert counts: no traffic record, no per-expert list).
        self.recv_capacity = recv_capacity
        host_counts = recv_capacity < 0
        self.is_token_in_rank = is_token_in_rank  # [N, R] bool, contiguous
        self.recv_channel_prefix = notify_outputs.channel_prefix  # [R, C + 1]
        self.forward_channel_prefix = notify_outputs.forward_prefix  # [nodes, C + 1] | None
        # rows received per local expert, rounded up to the alignment (notify summed every rank's counts)
        self.expert_counts = (notify_outputs.expert_counts.tolist()
                              if notify_outputs.expert_counts is not None and host_counts else None)
        # internode: which local ranks each row this rank forwarded went to (written by dispatch, read by
        # combine); at least one element, as the kernels take a non-null pointer even when nothing is forwarded
        self.num_forwarded = 0
        self.forward_peer_masks: torch.Tensor | None = None
        self.spec = spec  # the workspace spec of the dispatch (calls along this handle cover it)
        self.recv_counts = recv_counts  # rows from each rank
        # Two-hop routing the host knows (buffer.traffic where the transport counts nothing): this rank's tokens
        # to each node (network rows of dispatch), rows it forwarded from each source node (network partials of
        # combine), and rows it forwards to each rank of its node (NVLink hop of dispatch). One host read.
        self.forward_counts = forward_counts
        self.node_send_counts: list[int] | None = None
        self.forwarded_per_node: list[int] | None = None
        if self.forward_channel_prefix is None:
            self.send_counts = is_token_in_rank.sum(0).tolist() if host_counts else None  # rows to each rank
            return
        sent = is_token_in_rank.sum(0)
        prefix = self.forward_channel_prefix
        num_nodes, num_ranks = prefix.size(0), is_token_in_rank.size(1)
        to_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks // num_nodes).any(2).sum(0)
        counts = torch.cat([sent, to_node, (prefix[:, -1] - prefix[:, 0]).to(sent.dtype)]).tolist()
        self.send_counts = counts[:num_ranks]
        self.node_send_counts = counts[num_ranks : num_ranks + num_nodes]
        self.forwarded_per_node = counts[num_ranks + num_nodes :]
        self.num_forwarded = sum(self.forwarded_per_node)
        self.forward_peer_masks = torch.zeros(max(self.num_forwarded, 1), dtype=torch.int32,
                                              device=is_token_in_rank.device)


class SimDispatchBackend(DispatchBackend):
    """Dispatch/combine through epcomm's kernels on the CPU.

    The :class:`~epcomm.backends.base.DispatchBackend` operations, bit-identical to
    :class:`~epcomm.backends.torch_backend.TorchBackend`'s; received ``topk_idx`` are local ids
    (the kernels localise them). One node runs the intranode kernels, several the two-hop internode
    kernels (network rings between same-index ranks of every node, NVLink forwarding, node
    partials); across nodes a "network" put is a copy into the peer's shared memory, counted by the
    transport. Buffers are allocated at construction when ``num_nvl_bytes`` (and, across nodes,
    ``num_rdma_bytes``) are given (a call that needs more is rejected on every rank before anything
    moves, saying how much to give), else at the first call and grown (collectively) when a later
    call needs more.

    A kernel that fails (a peer died or stopped answering) raises EpcommTimeoutError /
    EpcommPeerError naming the operation, the kernel and the dead or late peers; the buffer's
    process group is then marked broken, as after any failed collective.
    """

    name = "sim"
    local_expert_ids = True
    runtime_class = SimRuntime  # the device runtime the kernels run on
    device = torch.device("cpu")  # where the kernels read and write tensors

    def __init__(self, comm: GroupComm, topo: Topology, options: BackendOptions) -> None:
        super().__init__(comm, topo, options)
        num_nvl_bytes, num_rdma_bytes = options.num_nvl_bytes, options.num_rdma_bytes
        self.timeout_s = float(options.timeout_s)
        self._ext = load_extension(self.runtime_class.runtime_kind)  # its types are the ones its runtime runs
        self.path = (IntranodePath(self._ext, topo) if topo.num_nodes == 1
                     else InternodePath(self._ext, topo, options.max_nodes_per_token, options.combine_node_partials))
        self.explicit_bytes = (num_nvl_bytes, num_rdma_bytes if topo.num_nodes > 1 else 0)
        self._device_runtime: SimRuntime | None = None
        self._low_latency = None  # the LL engine, from the first LL call
        self._last_spec = None
        self._captured_normal_mode = False  # a graph captured normal-mode kernels: their layout is fixed from then on
        self._graph_uses: list[torch.Tensor] = []  # what kernels captured in CUDA graphs use (_kernel_reads)
        self._agreed: tuple | None = None  # (op, is_token_in_rank, notify outputs) of agree_in_barrier's "yes"
        self._verdict: tuple | None = None  # (op, [3] int32 on the device) of agree_on_device, for the data kernel
        if (num_nvl_bytes > 0 or num_rdma_bytes > 0) and self._sized_at_construction(options):
            # (num_nvl_bytes=0 with num_rdma_bytes: DeepEP's low-latency-only buffer; normal calls on it are refused
            # before anything moves, naming num_nvl_bytes)
            if topo.num_nodes > 1 and num_rdma_bytes <= 0:
                raise ValueError(f"the {self.name} backend across nodes needs num_rdma_bytes with num_nvl_bytes "
                                 f"(got {num_nvl_bytes} and {num_rdma_bytes}), or neither (sized automatically)")
            self._device_runtime = self._new_runtime(self._total_bytes(self.explicit_bytes))

    def _sized_at_construction(self, options: BackendOptions) -> bool:
        """Whether explicit sizes make the buffers at construction (else at the first call, as without them)."""
        return True

    def low_latency(self):
        """The LL kernels' engine (:meth:`_new_low_latency`), created at the first LL call, kept after."""
        if self._low_latency is None:
            self._low_latency = self._new_low_latency()
        return self._low_latency

    def _new_low_latency(self):
        from .sim_low_latency import SimLowLatency

        return SimLowLatency(self)

    def _settle_low_latency(self, runtime: SimRuntime, op: str) -> None:
        """Before the LL region may be zeroed or freed: the adds still owed to this rank's LL signals have
        landed and the signals are 0 (``SimLowLatency.settle_signals``; a no-op without LL calls)."""
        if self._low_latency is not None:
            self._low_latency.settle_signals(runtime, op)

    @classmethod
    def algorithms(cls, topo: Topology) -> dict[str, str]:
        """One node: the intranode kernels under either name (flat rows); across nodes: two-hop only."""
        return {"flat": "flat", "two_hop": "flat"} if topo.num_nodes == 1 else {"two_hop": "two_hop"}

    @classmethod
    def check_options(cls, topo: Topology, options: BackendOptions) -> None:
        """The kernels run the two-hop path across nodes (raises ValueError for 'flat')."""
        if options.algorithm not in cls.algorithms(topo):
            raise ValueError(f"backend {cls.name!r} runs the two-hop kernels across nodes: pass algorithm="
                             f"'two_hop' or 'auto' (got {options.algorithm!r}); 'flat' is the torch backend's")

    # ------------------------------------------------------------ sizing and checks
    @staticmethod
    def _total_bytes(regions: tuple[int, int]) -> int:
        nvl, rdma = regions
        return rdma_offset(nvl) + rdma if rdma else nvl

    def _new_runtime(self, num_bytes: int) -> SimRuntime:
        return self.runtime_class(self.comm, self.topo, num_bytes, timeout_s=self.timeout_s)

    def required_bytes(self, spec) -> int:
        """Bytes per rank a call of ``spec`` needs (the NVL region, then the RDMA region)."""
        return self._total_bytes(self.path.region_bytes(spec))

    def _check_size(self, spec, what: str) -> None:
        if not any(self.explicit_bytes):
            return
        regions = (("num_nvl_bytes", "get_nvl_buffer_size_hint"), ("num_rdma_bytes", "get_rdma_buffer_size_hint"))
        for ((name, hint), given), need in zip(zip(regions, self.explicit_bytes), self.path.region_bytes(spec)):
            if need > given:
                raise Invalid(
                    f"the {self.name} backend needs {name}={need} for this {what} ({self.path.describe(spec)}) "
                    f"but Buffer({name}={given}) was given: raise {name} to at least {need} "
                    f"(Config.{hint}), or pass 0 to size it automatically")

    def _check_kernel_config(self, config: Config | None) -> None:
        problem = self.path.config_problem(self.path.kernel_config(config))
        if problem:
            raise Invalid(f"config {config} does not fit the {self.path.prefix} kernels: {problem}")

    def _check_device(self, tensors: dict[str, torch.Tensor]) -> None:
        """Each tensor on the kernels' device and, where the kernels read it in place (contiguous:
        anything else is copied first), aligned for their loads: rows move in 4-byte words, ids
        and weights as whole elements. A misaligned address traps on a GPU (on the CPU it would
        merely be slow), so it is refused on every backend alike, before the ranks agree."""
        for name, t in tensors.items():
            if t.device != self.device:
                raise Invalid(f"the {self.name} backend's kernels run on {self.device}: {name} is on {t.device}; "
                              f"move it there or use backend='torch'")
            alignment = max(KERNEL_LOAD_BYTES, t.element_size())
            if t.is_contiguous() and t.numel() and t.data_ptr() % alignment:
                raise Invalid(f"the {self.name} backend's kernels load {name} in {alignment}-byte words, but it starts "
                              f"at an address {t.data_ptr() % alignment} bytes past a multiple of {alignment} (a view "
                              f"at storage offset {t.storage_offset()}); pass {name}.clone()")

    def check_dispatch(self, tensors: dict[str, torch.Tensor], num_topk: int, plan: object = None,
                       config: Config | None = None, num_experts: int = 0) -> None:
        """Raise Invalid for inputs the kernels cannot take (called before the ranks agree)."""
        self._check_device(tensors)
        hidden_bytes, _ = row_bytes(tensors)
        if hidden_bytes % 4:
            raise Invalid(f"the {self.name} backend moves rows in 4-byte words: x rows are {hidden_bytes} bytes "
                          f"(hidden={tensors['x'].size(1)}, {tensors['x'].dtype}); use an even hidden size")
        if isinstance(plan, SimPlan):
            spec = self.path.spec_for_cached_dispatch(self._along(plan, config, "a cached dispatch"), tensors)
        else:
            self._check_kernel_config(config)
            spec = self.path.dispatch_spec(self.path.kernel_config(config), tensors, num_topk,
                                           num_experts // self.topo.world_size)
        self._check_size(spec, "dispatch")

    def _along(self, plan: SimPlan, config: Config | None, what: str = ""):
        """The spec of a call along ``plan``'s handle: the dispatch's channels (received rows are placed per
        channel), the chunk and ring sizes of ``config`` when one is given (a tuning loop's), else the
        dispatch's. Raises Invalid (``what`` given) when the kernels cannot run that config."""
        spec = self.path.along_handle(plan.spec, config)
        if what and config is not None:
            problem = self.path.config_problem(spec.config)
            if problem:
                raise Invalid(f"{what} keeps its dispatch's {self.path.num_channels(plan.spec)} channels; with "
                              f"config {config} the {self.path.prefix} kernels cannot run: {problem}")
        return spec

    def check_combine(self, tensors: dict[str, torch.Tensor], plan: object, config: Config | None = None,
                      node_partial_dtype: torch.dtype | None = None) -> None:
        self._check_device(tensors)
        x = tensors["x"]
        if x.size(1) * x.element_size() % 4:
            raise Invalid(f"the {self.name} backend moves rows in 4-byte words: combine's x rows are "
                          f"{x.size(1) * x.element_size()} bytes (hidden={x.size(1)}, {x.dtype}); use an even hidden size")
        partial = self.path.node_partial_dtype(x, node_partial_dtype) if isinstance(self.path, InternodePath) else None
        if partial is not None and x.size(1) * partial.itemsize % 4:
            raise Invalid(f"the {self.name} backend's two-hop combine sends node partials in 4-byte words: {partial} "
                          f"partials of hidden={x.size(1)} are {x.size(1) * partial.itemsize} bytes; use an even hidden "
                          "size (or Buffer(combine_node_partials='float32'))")
        weights = tensors.get("topk_weights")
        if isinstance(plan, SimPlan):
            base = self._along(plan, config, "combine")
            # the layout depends on the weights' width, which the ranks do not agree on: pin it to
            # the dispatch's num_topk (agreed), so every rank lays out the buffers alike
            num_topk = self.path.num_topk(plan.spec)
            if weights is not None and weights.size(1) != num_topk:
                raise Invalid(f"the {self.name} backend's combine takes topk_weights with the dispatch's "
                              f"num_topk={num_topk} columns, got {weights.size(1)}")
            self._check_size(self.path.spec_for_combine(base, x), "combine")

    # ------------------------------------------------------------ kernels
    def _ensure(self, spec, op: str) -> SimRuntime:
        """Buffers that hold ``spec``'s workspace, in a state the kernels expect; collective (every rank
        calls it with the same spec).

        New (zeroed) buffers when the current ones are too small; when only the layout changed, the
        regions move (the RDMA region starts after the NVL one; barrier signals and ring signals
        persist across calls), so the buffers are re-laid out (:meth:`_relayout`).
        """
        need = self.required_bytes(spec)
        if self._device_runtime is None or not self._holds(self._device_runtime, spec):
            if any(self.explicit_bytes) and self._device_runtime is not None:
                raise EpcommError(f"epcomm {self.name} backend: the buffers hold {self._device_runtime.num_nvl_bytes} bytes, "
                                  f"this call needs {need}; raise Buffer(num_nvl_bytes=..., num_rdma_bytes=...)")
            if self._device_runtime is not None:
                self._retire_runtime(op)
            self._device_runtime = self._new_runtime(max(need, self._total_bytes(self.explicit_bytes)))
        elif self._last_spec is not None and spec != self._last_spec:
            self._relayout(op, self._device_runtime.num_nvl_bytes)
        self._last_spec = spec
        return self._device_runtime

    def _retire_runtime(self, op: str) -> None:
        """Close the device runtime for a new one (growth), collectively: an enqueued kernel's error is raised
        first (not dropped), and nobody uses or maps the old buffers after. Refused while CUDA graphs captured
        on it may be replayed (their kernels point at its buffers)."""
        runtime = self._device_runtime
        if runtime.captured:
            raise EpcommError(f"epcomm {self.name} {op} on rank {self.topo.rank}: this call needs larger buffers (or, "
                              "across nodes on cuda, more GIN signals), but a graph captured kernels on the current "
                              "ones, which a replay would still use; size the Buffer for every call up front "
                              "(num_nvl_bytes / num_rdma_bytes, Buffer.get_low_latency_rdma_size_hint) and make one "
                              "call of each kind (normal-mode configs, LL shapes) before capturing")
        runtime.report_enqueued(wait=True, op=op)
        self._settle_low_latency(runtime, op)  # no LL add may still be on its way into the freed buffers
        runtime.close(collective=True, op=op)
        self._device_runtime = None

    def _relayout(self, op: str, num_bytes: int, reset_signals: Callable[[], None] | None = None) -> None:
        """Every rank leaves the current layout, zeroes its first ``num_bytes`` and counts epochs from 0
        again; all meet once more before anyone signals a peer. Collective. ``reset_signals`` (LL mode's
        clean) runs once every rank has left, before the zeroing.

        Leaving LL mode (the last layout was LL's) first settles the LL signals (:meth:`_settle_low_latency`):
        the adds still owed to them have landed, so the zeroing races no late add (shm), and they are 0 (GIN
        keeps them in its session, where zeroing the window does not reach).

        Across nodes, leaving a normal-mode layout is a notify in it that also zeroes this rank's
        transport signals once the adds still due to them have landed (a transport may keep signals
        outside the buffer, where zeroing does not reach: NCCL GIN); the meeting after is a peer-memory
        barrier, which adds to no transport signal."""
        runtime = self._device_runtime
        if self._captured_normal_mode:
            raise EpcommError(f"epcomm {self.name} {op} on rank {self.topo.rank}: this call needs another buffer layout "
                              "(another Config, hidden size, top-k or expert count, or low-latency mode), but a graph "
                              "captured normal-mode kernels in the current one, which its replays assume; make one "
                              "call of each kind before capturing, or use a second Buffer for the other calls")
        if self.path.transport_signals and hasattr(self._last_spec, "workspace"):  # not LL mode's layout
            self._run(runtime, self._last_spec, self.path.notify_params(reset_signals=True), op)
        else:
            runtime.barrier(op=op)
            self._settle_low_latency(runtime, op)
        if reset_signals is not None:
            reset_signals()
        runtime.zero(num_bytes)  # the notifies' epoch counter too (kernels/epoch.cuh)
        runtime.barrier(op=op)

    def _holds(self, runtime: SimRuntime, spec) -> bool:
        """Whether ``runtime``'s buffers hold ``spec``'s workspace (else new buffers are needed)."""
        return self.required_bytes(spec) <= runtime.num_nvl_bytes

    def _call_spec(self, op: str, tensors: dict[str, torch.Tensor], plan: SimPlan | None, config: Config | None,
                   num_topk: int = 0, experts: ExpertCounts | None = None):
        """The workspace spec of a call: ``op`` "dispatch" (with ``num_topk``; room for notify's per-expert
        counts with ``experts``), or along ``plan``'s handle "cached dispatch" or "combine"."""
        if op == "dispatch":
            num_local = experts.num_local(self.topo.world_size) if experts is not None else 0
            return self.path.dispatch_spec(self.path.kernel_config(config), tensors, num_topk, num_local)
        base = self._along(plan, config)
        if op == "combine":
            return self.path.spec_for_combine(base, tensors["x"])  # num_topk == the dispatch's (check_combine)
        return self.path.spec_for_cached_dispatch(base, {k: v for k, v in tensors.items() if k in ("x", "scales")})

    def agree_in_barrier(self, call: CallCheck) -> bool:
        """See :meth:`DispatchBackend.agree_in_barrier`: the notify the call needs anyway carries every
        rank's call header (digest; flags: refused, needs another layout) and says whether all agree
        (kernels/call_check.cuh), in the current layout; a dispatch's also exchanges its counts (kept for
        :meth:`dispatch`). Before any normal-mode layout exists (first call, after an LL call: the same
        state on every rank) it returns False without communicating."""
        self._agreed, self._verdict = None, None
        runtime, layout = self._device_runtime, self._last_spec
        if runtime is None or layout is None or not hasattr(layout, "workspace"):  # none yet, or LL mode's
            return False
        flags, _ = self._call_flags(call, runtime, layout)
        in_rank = call.is_token_in_rank.contiguous() if flags == 0 and call.op == "dispatch" else None
        agreed = self._host_readable_zeros(1)
        outputs = (self._notify_outputs(layout) if in_rank is not None else None)
        num_tokens = in_rank.size(0) if in_rank is not None else 0
        params = self.path.notify_params(in_rank, num_tokens, outputs,
                                         call=(call.digest, flags, agreed), experts=call.experts)
        self._run(runtime, layout, params, call.op)
        if not bool(agreed.item()):
            return False
        self._agreed = (call.op, in_rank, outputs)
        return True

    def _call_flags(self, call: CallCheck, runtime: SimRuntime, layout) -> tuple[int, str | None]:
        """This rank's call-check flags for ``call`` in the current ``layout`` (0: it accepts the call and the
        call fits the buffers as laid out), with the error that made the call's spec fail, if one did."""
        if call.refused:
            return CALL_REFUSED, None
        try:
            spec = self._call_spec(call.op, call.tensors, call.plan, call.config, call.num_topk, call.experts)
        except Exception as err:  # noqa: BLE001 - said as this rank's problem (the host agreement names it too)
            return CALL_NEEDS_LAYOUT, str(err)
        return (CALL_NEEDS_LAYOUT if spec != layout or not self._holds(runtime, spec) else 0), None

    judges_on_device = True

    def agree_on_device(self, call: CallCheck) -> str | None:
        """See :meth:`DispatchBackend.agree_on_device`: the call check's notify is only enqueued; its verdict
        (``[3]`` int32 on the device: agreed, the first rank that differed, its flags) is the data kernel's
        ``call_verdict`` (kernels/call_check.cuh), which on "no" moves nothing on any rank and reports
        EpcommCallRejected (:meth:`_judge_on_device`)."""
        self._verdict = None
        why, verdict, _, _ = self._judge_on_device(call, exchange_counts=False)
        if why is None:
            self._verdict = (call.op, verdict)
        return why

    def dispatch_on_device(self, call: CallCheck, capacity: int,
                           num_experts: int) -> tuple[dict[str, torch.Tensor] | None, SimPlan | None, str | None]:
        """A dispatch counted on the device (one node; ``capacity`` = num_worst_tokens, under host_sync_free or a
        graph capture): one notify, only enqueued, exchanges the counts and judges the call (the verdict gates
        the data kernel, :meth:`_judge_on_device`); the dispatch kernel places the rows by the notify's
        prefixes into outputs of ``capacity`` rows prefilled as padding (x 0, top-k ids -1, weights 0) and
        checks on the device that they fit (kRecvOverflow otherwise). The host reads no count. Returns (the
        received rows, the plan, None), or (None, None, why this rank refuses)."""
        why, verdict, outputs, in_rank = self._judge_on_device(call, exchange_counts=True)
        if why is not None:
            return None, None, why
        plan = SimPlan(in_rank.size(0), capacity, in_rank, outputs, self._last_spec, None, recv_capacity=capacity)
        recv = self._dispatch_rows(self._device_runtime, call.tensors, plan, call.num_topk, num_experts,
                                   spec=self._last_spec, op=call.op, verdict=verdict)
        return recv, plan, None

    def _judge_on_device(self, call: CallCheck, exchange_counts: bool):
        """The call check of a call made without a host wait: its notify (with the dispatch's counts when
        ``exchange_counts``) is only enqueued and writes the verdict the data kernel takes. Returns (why this
        rank refuses, or None; the verdict ``[3]`` int32; the notify's outputs; is_token_in_rank).

        A call that needs another layout is refused (a re-layout waits on the host); before any normal-mode
        layout (the same state on every rank) every rank refuses without communicating. A rank that refuses
        still enqueues its notify, which tells its peers' kernels (not while capturing: see below)."""
        runtime, layout = self._device_runtime, self._last_spec
        if runtime is None or not hasattr(layout, "workspace"):
            return ("no normal-mode buffer layout yet (first call, or LL calls since): make a call of this shape "
                    "outside host_sync_free first"), None, None, None
        flags, why = self._call_flags(call, runtime, layout)
        if flags == CALL_REFUSED:
            why = "its inputs were refused"
        elif flags and why is None:
            why = ("this call needs another buffer layout than the current one, and a re-layout waits on the host: "
                   "make it once outside host_sync_free first")
        if flags and is_capturing():
            # Nothing is captured for a refused call (no kernel, no stream forked into the capture left unjoined),
            # and the Buffer stays usable. Peers that accepted the call captured their notify: their replays
            # wait for this rank's and time out naming it (on a SimGraph, whose capture runs, at once).
            return why, None, None, None
        in_rank = call.is_token_in_rank.contiguous() if exchange_counts and not flags else None
        outputs = self._notify_outputs(layout, host_reads=False) if in_rank is not None else None
        verdict = torch.full((3,), -1, dtype=torch.int32, device=self.device)
        self._kernel_reads(verdict, in_rank, tuple(outputs) if outputs is not None else None)
        self._note_capture()
        runtime.enqueue(layout, self.path.notify_params(in_rank, in_rank.size(0) if in_rank is not None else 0, outputs,
                                                        call=(call.digest, flags, verdict)),
                        op=call.op, timeout_s=self.timeout_s * self.path.timeout_share)  # (no per-expert list here)
        if flags:
            if not runtime.host_waits_for_enqueued:
                # its peers learn it from their kernels' reports at a later call (cuda), when the ranks are no
                # longer in step: this Buffer is done on every rank (they mark themselves, GroupComm.start)
                self.comm.broken = f"{call.op}: this rank's call differed from its peers' under host_sync_free"
            return why, None, None, None
        return None, verdict, outputs, in_rank

    def _verdict_or_barrier(self, runtime: SimRuntime, spec, op: str) -> torch.Tensor | None:
        """Before ``op``'s data kernel: the device verdict :meth:`agree_on_device` left for it (its notify ran;
        the verdict gates the kernel), or else the barrier (:meth:`_barrier_unless_agreed`) and None."""
        verdict, self._verdict = self._verdict, None
        if verdict is not None and verdict[0] == op:
            return verdict[1]
        self._barrier_unless_agreed(runtime, spec, op)
        return None

    def agreed_expert_counts(self) -> list[int] | None:
        """See :meth:`DispatchBackend.agreed_expert_counts`: from the call check's notify."""
        if self._agreed is None or self._agreed[0] != "dispatch" or self._agreed[2].expert_counts is None:
            return None
        return self._agreed[2].expert_counts.tolist()

    def received_expert_counts(self, plan: object) -> list[int] | None:
        """See :meth:`DispatchBackend.received_expert_counts`: from the dispatch's notify."""
        return plan.expert_counts if isinstance(plan, SimPlan) else None

    def _notify_outputs(self, spec, host_reads: bool = True) -> NotifyOutputs:
        """Zeroed outputs of a notify with counts in ``spec``'s layout (per-expert counts when it has room);
        ``host_reads``: the host reads the rank prefix and per-expert counts once it waited for the notify
        (:meth:`_host_readable_zeros`), else all stay on the device (an enqueued notify nobody waits for:
        pinned memory would go back to torch's cache before the kernel writes it)."""
        return self.path.notify_outputs(self.path.num_channels(spec), self.device, self.path.num_local_experts(spec),
                                        self._host_readable_zeros if host_reads else None)

    def _host_readable_zeros(self, n: int) -> torch.Tensor:
        """int32 ``[n]`` zeros a kernel writes and the host reads once the kernel is waited for (here: memory both
        see; the cuda backend's are pinned host memory, read without a device-to-host copy)."""
        return torch.zeros(n, dtype=torch.int32, device=self.device)

    def _take_agreed(self, op: str) -> tuple | None:
        """(is_token_in_rank, notify outputs) when :meth:`agree_in_barrier` just said "yes" for ``op``:
        its notify was this call's (in the current layout, which the call fits), else None."""
        agreed, self._agreed = self._agreed, None
        return agreed[1:] if agreed is not None and agreed[0] == op else None

    def _barrier_unless_agreed(self, runtime: SimRuntime, spec, op: str) -> None:
        """The barrier before a call along a handle, unless :meth:`agree_in_barrier` ran it for this call."""
        if self._take_agreed(op) is None:
            self._barrier(runtime, spec, op)

    def notify_epoch(self) -> int:
        """The notifies run on this rank's buffers in the current normal-mode layout, as the kernels count them
        (``kernels/epoch.cuh``; 0 before any layout or in LL mode's). A host read of the buffer: CPU runtimes only."""
        runtime, layout = self._device_runtime, self._last_spec
        if runtime is None or not hasattr(layout, "workspace"):
            return 0
        offset = int(self._ext.epoch_counter_offset(layout))
        return int(runtime.peer_view(self.topo.rank, torch.int64, offset, 1)[0])

    def _run(self, runtime: SimRuntime, spec, params, op: str) -> None:
        runtime.run(spec, params, op=op, timeout_s=self.timeout_s * self.path.timeout_share)

    def _enqueue(self, runtime: SimRuntime, spec, params, op: str, plan: SimPlan, *tensors) -> None:
        """A data kernel (dispatch, combine): nothing on the host reads its outputs, so it is only issued
        (:meth:`SimRuntime.enqueue`). ``plan`` and ``tensors``: what it reads and writes (:meth:`_kernel_reads`)."""
        self._kernel_reads(plan.is_token_in_rank, plan.recv_channel_prefix, plan.forward_channel_prefix,
                           plan.forward_peer_masks, *tensors)
        self._note_capture()
        runtime.enqueue(spec, params, op=op, timeout_s=self.timeout_s * self.path.timeout_share)

    def _note_capture(self) -> None:
        """A normal-mode kernel is being issued: while a graph captures, the current layout becomes the one its
        replays assume (:meth:`_relayout` refuses to change it)."""
        if is_capturing():
            self._captured_normal_mode = True

    def _kernel_reads(self, *tensors) -> None:
        """Tensors an enqueued kernel uses. While a graph captures it they must outlive the call, as its replays
        use them (the handle's routing too, which the caller may drop): a SimGraph keeps them as long as it lives,
        this backend as long as it lives for a CUDA graph (whose pool holds only what the capture allocated).
        Otherwise nothing to do where kernels have finished when the call returns (the cuda backend marks them
        as used by its stream)."""
        if not is_capturing():
            return
        graph = capturing_sim_graph()
        if graph is not None:
            graph.keep(*tensors_in(tensors))
        else:
            self._graph_uses.extend(tensors_in(tensors))

    def _barrier(self, runtime: SimRuntime, spec, op: str) -> None:
        """notify without counts: all ranks meet and reset their NVL ring counters."""
        self._run(runtime, spec, self.path.notify_params(), op)

    def _counters(self) -> torch.Tensor | None:
        """Bytes the internode transport puts per link class (self, nvlink, network), or None (intranode)."""
        return torch.zeros(3, dtype=torch.int64) if isinstance(self.path, InternodePath) else None

    def dispatch(self, call: DispatchCall):
        """See :meth:`DispatchBackend.dispatch`; rows ordered by source rank, then token; ``topk_idx``
        as this rank's local ids (the kernel localises them with ``call.placement``)."""
        tensors, config, counts = call.tensors, call.config, call.counts
        world, me = self.topo.world_size, self.topo.rank
        num_topk = tensors["topk_idx"].size(1) if "topk_idx" in tensors else 0
        spec = self._call_spec("dispatch", tensors, None, config, num_topk, call.experts)
        runtime = self._ensure(spec, "dispatch")
        agreed = self._take_agreed("dispatch")
        if agreed is not None:  # the call check's notify exchanged this call's counts already
            in_rank, outputs = agreed
        else:
            in_rank = call.is_token_in_rank.contiguous()
            outputs = self._notify_outputs(spec)
            self._run(runtime, spec, self.path.notify_params(in_rank, in_rank.size(0), outputs,
                                                             experts=call.experts), "dispatch")
        num_tokens = in_rank.size(0)
        num_recv = int(outputs.rank_prefix[world])
        expected = int(counts[:, me].sum())
        if num_recv != expected:
            raise EpcommError(f"epcomm {self.name} dispatch on rank {me}: notify counted {num_recv} rows to receive, "
                              f"the agreed counts say {expected}")
        topo = self.topo
        # rows this rank forwards to each rank of its node: those of its rail's sources (any node) bound there
        forward_counts = (counts[list(topo.rail_ranks(topo.local_rank)), topo.rank_of(topo.node, 0):
                                 topo.rank_of(topo.node, 0) + topo.num_nvl_ranks].sum(0).tolist()
                          if isinstance(self.path, InternodePath) else None)
        plan = SimPlan(num_tokens, num_recv, in_rank, outputs, spec, counts[:, me].tolist(), forward_counts)
        num_experts = call.placement.num_experts if call.placement is not None else 0
        return self._dispatch_rows(runtime, tensors, plan, num_topk, num_experts, op="dispatch"), plan

    def _dispatch_rows(self, runtime: SimRuntime, tensors, plan: SimPlan, num_topk: int, num_experts: int = 0, *,
                       spec=None, op: str, verdict: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        spec = spec or plan.spec
        contiguous = lambda name: tensors[name].contiguous() if name in tensors else None  # noqa: E731
        x, scales = contiguous("x"), contiguous("scales")
        hidden_bytes, scale_bytes = row_bytes(tensors)
        inputs = dict(x=x, scales=scales, topk_idx=contiguous("topk_idx") if num_topk else None,
                      topk_weights=contiguous("topk_weights") if num_topk else None, hidden_bytes=hidden_bytes,
                      scale_bytes=scale_bytes, num_topk=num_topk, num_experts=num_experts if num_topk else 0)
        m = plan.num_recv
        padded = plan.recv_capacity >= 0  # counted on the device: rows past the count keep these values
        new = lambda *shape, dtype, pad=0: (  # noqa: E731
            torch.full(shape, pad, dtype=dtype, device=self.device) if padded
            else torch.empty(*shape, dtype=dtype, device=self.device))
        recv = dict(x=new(m, x.size(1), dtype=x.dtype),
                    scales=new(m, scales.size(1), dtype=scales.dtype) if scales is not None else None,
                    topk_idx=new(m, num_topk, dtype=torch.int64, pad=-1) if num_topk else None,
                    topk_weights=new(m, num_topk, dtype=torch.float32) if inputs["topk_weights"] is not None else None,
                    src_idx=new(m, dtype=torch.int32, pad=-1))
        counters = self._counters()
        self._enqueue(runtime, spec, self.path.dispatch_params(plan, counters, inputs, recv, verdict), op, plan, inputs,
                      recv)
        if is_capturing() or padded:
            pass  # not counted: a graph's calls and their replays, and where the host never read the counts
        elif counters is None:
            # a slot carries the row, its source index and the top-k ids (and weights)
            meta_bytes = 4 + 8 * num_topk + (4 * num_topk if inputs["topk_weights"] is not None else 0)
            self.comm.record_rows_to_peers(op, plan.send_counts, hidden_bytes + scale_bytes, meta_bytes)
        else:
            self._record_two_hop_dispatch(op, runtime, plan, counters, hidden_bytes + scale_bytes, spec)
        recv.pop("src_idx")
        return {name: t for name, t in recv.items() if t is not None}

    # Where the transport counts no bytes (GIN), the two-hop traffic comes from the routing the host knows
    # (SimPlan); the sim backend's transport counts, and a test checks that both agree.
    traffic_from_routing = False

    def _record_two_hop_dispatch(self, op: str, runtime: SimRuntime, plan: SimPlan, counters: torch.Tensor,
                                 row_bytes_: int, spec) -> None:
        """The network hop as the transport counted it; the NVLink hop from the rows this rank forwarded (the
        dispatch kernel's masks: only where the host has waited for it, as reading them would wait). Or
        both from the routing (:attr:`traffic_from_routing`)."""
        if self.traffic_from_routing:
            return self._record_two_hop_dispatch_from_routing(op, plan, row_bytes_, self.path.put_metadata(spec)[0])
        self._record_puts(op, counters, row_bytes_, self.path.put_metadata(spec)[0])
        if not runtime.host_waits_for_enqueued:
            return
        masks = plan.forward_peer_masks[: plan.num_forwarded].to(torch.int64)
        own = (masks >> self.topo.local_rank) & 1
        popcount = sum(((masks >> p) & 1) for p in range(self.topo.num_nvl_ranks))
        to_self, to_peers = int(own.sum()), int((popcount - own).sum())
        if to_self:
            self.comm.traffic.record(op, LinkClass.SELF, to_self, to_self * row_bytes_, 0)
        if to_peers:
            self.comm.traffic.record(op, LinkClass.NVLINK, to_peers, to_peers * row_bytes_, 0)

    def _record_two_hop_dispatch_from_routing(self, op: str, plan: SimPlan, row_bytes_: int, record_bytes: int) -> None:
        """Network hop: each token once per node it reaches (this node's: a put to self), with its record; NVLink
        hop: each forwarded row once per rank of this node that needs it (this rank's: a local copy)."""
        topo, record = self.topo, self.comm.traffic.record
        self._record_rows_per_node(op, plan.node_send_counts, row_bytes_, record_bytes)
        for local, rows in enumerate(plan.forward_counts):
            if rows:
                record(op, LinkClass.SELF if local == topo.local_rank else LinkClass.NVLINK, rows, rows * row_bytes_, 0)

    def dispatch_cached(self, tensors, plan: SimPlan, config: Config | None = None):
        """Dispatch along an earlier dispatch's routing (a barrier, then the dispatch kernel)."""
        op = "cached dispatch"
        rows = {k: v for k, v in tensors.items() if k in ("x", "scales")}
        spec = self._call_spec(op, rows, plan, config)
        runtime = self._ensure(spec, op)
        verdict = self._verdict_or_barrier(runtime, spec, op)
        return self._dispatch_rows(runtime, rows, plan, 0, spec=spec, op=op, verdict=verdict)

    def combine(self, tensors, plan: SimPlan, config: Config | None = None,
                node_partial_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Per field, [num_tokens, width] sums: x's dtype for ``x`` (fp32 sums rounded once), fp32 weights."""
        x = tensors["x"].contiguous()
        weights = tensors.get("topk_weights")
        weights = weights.contiguous() if weights is not None else None
        num_topk = weights.size(1) if weights is not None else 0
        spec = self._call_spec("combine", {"x": x}, plan, config)
        runtime = self._ensure(spec, "combine")
        verdict = self._verdict_or_barrier(runtime, spec, "combine")
        combined = torch.empty(plan.num_tokens, x.size(1), dtype=x.dtype, device=self.device)
        combined_w = (torch.empty(plan.num_tokens, num_topk, dtype=torch.float32, device=self.device)
                      if weights is not None else None)
        counters = self._counters()
        self._enqueue(runtime, spec, self.path.combine_params(plan, counters, x, weights, num_topk, combined, combined_w,
                                                              node_partial_dtype, verdict), "combine", plan,
                      x, weights, combined, combined_w)
        row = x.size(1) * x.element_size()
        if is_capturing() or plan.recv_capacity >= 0:
            pass  # as in dispatch: not counted
        elif counters is None:
            self.comm.record_rows_to_peers("combine", plan.recv_counts, row, 4 * num_topk)
        else:
            self._record_two_hop_combine(plan, counters, x, num_topk, node_partial_dtype)
        out = {"x": combined}
        if combined_w is not None:
            out["topk_weights"] = combined_w
        return out

    def _record_two_hop_combine(self, plan: SimPlan, counters: torch.Tensor, x: torch.Tensor, num_topk: int,
                                node_partial_dtype: torch.dtype | None) -> None:
        """NVLink hop: each received row back to its forwarder; network hop: node partials as counted."""
        topo, row = self.topo, x.size(1) * x.element_size()
        for src, rows in enumerate(plan.recv_counts):  # rows from src went through forwarder (my node, src % L)
            if rows:
                forwarder = topo.rank_of(topo.node, topo.local_of(src))
                self.comm.traffic.record("combine", topo.link_to(forwarder), rows, rows * row, rows * 4 * num_topk)
        # a put is the fp32 weights [the dispatch's num_topk] padded to 16 bytes, then the partial [hidden]
        partial_bytes = x.size(1) * self.path.node_partial_dtype(x, node_partial_dtype).itemsize
        weights_bytes = self.path.put_metadata(plan.spec)[1]
        if not self.traffic_from_routing:
            return self._record_puts("combine", counters, partial_bytes, weights_bytes)
        # one partial per token forwarded from each node
        self._record_rows_per_node("combine", plan.forwarded_per_node, partial_bytes, weights_bytes)

    def _record_rows_per_node(self, op: str, rows_per_node: list[int], payload_bytes: int, meta_bytes: int) -> None:
        """Network puts of ``rows_per_node[n]`` rows to (or from) node ``n``: this node's are puts to self."""
        for node, rows in enumerate(rows_per_node):
            if rows:
                link = LinkClass.SELF if node == self.topo.node else LinkClass.NETWORK
                self.comm.traffic.record(op, link, rows, rows * payload_bytes, rows * meta_bytes)

    def _record_puts(self, op: str, counters: torch.Tensor, payload_bytes: int, meta_bytes: int) -> None:
        """The transport's byte counters (self, nvlink, network) as rows of ``payload + meta`` bytes each."""
        row = payload_bytes + meta_bytes
        for link, put in zip((LinkClass.SELF, LinkClass.NVLINK, LinkClass.NETWORK), counters.tolist()):
            if put:
                rows, rest = divmod(put, row)
                if rest:
                    raise EpcommError(f"epcomm {self.name} {op}: the transport put {put} bytes over {link.value}, "
                                      f"not a whole number of {row}-byte rows")
                self.comm.traffic.record(op, link, rows, rows * payload_bytes, rows * meta_bytes)

    def close(self, collective: bool = False) -> None:
        """Release the buffers (see :meth:`SimRuntime.close`); ``collective`` when every rank closes together."""
        if self._device_runtime is not None:
            self._device_runtime.close(collective=collective, op="destroy")
            self._device_runtime = None
