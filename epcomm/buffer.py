"""``Buffer``: the expert-parallel dispatch/combine API (DeepEP normal-mode contract)."""

from __future__ import annotations

import contextlib
import gc
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Union

import torch
import torch.distributed as dist

from ._agree import FP8_KIND as _FP8_KIND
from ._agree import X_KINDS as _X_KINDS
from ._agree import agree, signature_digest
from ._comm import GroupComm
from ._validate import (Invalid, check_hidden_for_fp8, check_tensor, check_topk_idx, describe, device_of, is_fp8_pair,
                        problem_text)
from ._agree import ALGORITHM_NAMES, NODE_PARTIAL_NAMES, OPERATION_NAMES
from .backends import agree_available, backend_class, resolve_backend
from .backends.base import BackendOptions, CallCheck, DispatchCall, ExpertCounts
from .config import Config
from .errors import EpcommCallRejected, EpcommError, EpcommInputError
from ._async import AsyncRunner, copy_into, private_group
from ._streams import tensors_in
from .event import EventHandle, EventOverlap
from .graphs import is_capturing
from .handle import DispatchHandle
from .layout import DispatchLayout, compute_layout, token_node_mask
from .low_latency import LowLatencyHandle, LowLatencyLayout, LowLatencyOps, is_host_sync_free
from .placement import ExpertPlacement, check_num_experts
from .topology import Topology
from .traffic import TrafficStats

__all__ = ["Buffer", "FP8Tensor"]

FP8Tensor = tuple[torch.Tensor, torch.Tensor]
"""FP8 rows: ``(float8_e4m3fn [N, H], float32 scales [N, H // 128])``."""
XTensor = Union[torch.Tensor, FP8Tensor]

_OPERATIONS = {name: code for code, name in OPERATION_NAMES.items()}  # the call signature's codes
# Why a normal-mode call cannot be captured in a graph, by whether the backend judges calls on the device.
_NOT_CAPTURABLE = {
    False: "this backend's normal-mode calls agree on the host (a collective), which a graph cannot capture: "
           "capture low-latency calls, or cached dispatch and combine on a kernel backend (sim, cuda)",
    True: "async_finish on CPU tensors runs the call on a worker thread, which a graph does not capture",
}
_ALGORITHMS = {name: code for code, name in ALGORITHM_NAMES.items()}
_NODE_PARTIALS = {name: code for code, name in NODE_PARTIAL_NAMES.items()}
_buffer_ids = itertools.count(1)
_live_buffers: dict[int, "weakref.ref[Buffer]"] = {}  # id -> Buffer not yet destroyed (handles check it)


class Buffer:
    """Dispatch tokens to the ranks hosting their experts and combine the results.

    All methods except :meth:`get_dispatch_layout` are collectives: every rank of
    ``group`` calls them in the same order. Bad input on any rank raises
    :class:`~epcomm.EpcommInputError` on every rank before anything is sent; a
    peer that does not arrive within ``timeout_s`` raises
    :class:`~epcomm.EpcommTimeoutError` naming the operation and stage.

    Ranks are grouped into nodes: rank ``r`` is local rank ``r % num_nvl_ranks``
    of node ``r // num_nvl_ranks``. Experts are placed by
    :meth:`ExpertPlacement.uniform <epcomm.placement.ExpertPlacement.uniform>`: split evenly
    and contiguously, expert ``e`` lives on rank ``e // (num_experts // world_size)``.

    The positional arguments are DeepEP's, in DeepEP's order; epcomm's own options are keyword-only.

    Args:
        group: the process group (``None``: the default group, or the one ``comm`` maps to).
        num_nvl_bytes: NVLink buffer bytes for the kernel backends (see
            :meth:`Config.get_nvl_buffer_size_hint`); unused by ``"torch"``.
        num_rdma_bytes: network buffer bytes for the kernel backends; unused by ``"torch"``.
        low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode: DeepEP's low-latency
            settings, kept as attributes for the low-latency calls.
        allow_mnnvl, use_fabric, enable_shrink: DeepEP features no epcomm backend has (multi-node
            NVLink, fabric memory, masking ranks); ``True`` raises ValueError saying so.
        explicitly_destroy: with ``True``, call :meth:`destroy` (collective) to release the buffers;
            without it, they are released when the Buffer is garbage-collected or at exit.
        comm: an ``mpi4py`` communicator instead of ``group``: it must list the ranks of the
            default torch.distributed group in order (it maps to that group); for any other set of
            ranks pass the matching torch group as ``group``.
        backend: ``"torch"``, ``"sim"``, ``"cuda"`` or ``"auto"`` (best available;
            read the choice from :attr:`backend`). ``"sim"`` runs epcomm's intranode kernels on
            the CPU (CPU tensors; the intranode kernels on one node, the two-hop internode kernels
            across nodes), bit-identical to ``"torch"``; ``"cuda"`` the intranode kernels on GPUs
            (one node; not yet run on a GPU; synchronous calls).
        num_nvl_ranks: ranks per node (one NVLink domain); default ``min(world_size, 8)``;
            must divide the world size.
        max_nodes_per_token: a token may go to at most this many nodes (DeepSeek-V3 uses 4).
        algorithm: ``"flat"``, ``"two_hop"``, or ``"auto"`` (two-hop when there is more than one
            node); the kernel backends run two-hop across nodes only.
        timeout_s: how long a rank waits for its peers at any stage before raising.
        combine_node_partials: how combine sums a token's rows across nodes. Each node's rows are
            summed in float32 first (ranks ascending); that *node partial* is then
            ``"rows_dtype"`` (default): rounded to the rows' dtype, which is what crosses the network
            in two-hop combine (one row per (token, node), the bytes of dispatch and of DeepEP);
            the destination sums the node partials in float32 (nodes ascending) and rounds again.
            ``"float32"``: kept in float32 (twice the network bytes for bf16 rows), so the
            token's sum is rounded once. Either way flat and two-hop, and every backend, give the
            same bits; a token whose rows all come from one node is rounded once in both modes.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: object = None,
        *,
        backend: str = "auto",
        num_nvl_ranks: int | None = None,
        max_nodes_per_token: int = 4,
        algorithm: str = "auto",
        timeout_s: float = 30.0,
        combine_node_partials: str = "rows_dtype",
    ) -> None:
        self._impl = None  # set last: a Buffer that failed to construct has nothing to release
        self._destroyed = False
        if not dist.is_initialized():
            raise RuntimeError("epcomm.Buffer needs torch.distributed: call dist.init_process_group first")
        for flag, value, why in (("allow_mnnvl", allow_mnnvl, "multi-node NVLink domains"),
                                 ("use_fabric", use_fabric, "fabric (multi-node NVLink) memory handles"),
                                 ("enable_shrink", enable_shrink, "masking failed ranks out of the group")):
            if value:
                raise ValueError(f"epcomm.Buffer({flag}=True): no epcomm backend supports {why}; pass {flag}=False "
                                 f"(a rank that fails makes every other rank raise EpcommPeerError/EpcommTimeoutError "
                                 f"instead; create a new group and Buffer without it)")
        if num_qps_per_rank < 1:
            raise ValueError(f"num_qps_per_rank must be >= 1, got {num_qps_per_rank}")
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = bool(allow_nvlink_for_low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = False
        if group is None and comm is not None:
            group = _group_of_mpi_comm(comm)
        self.group = group if group is not None else dist.group.WORLD
        world_size = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        if rank < 0:
            raise ValueError("this process is not a member of the group passed to epcomm.Buffer")
        if num_nvl_ranks is None:
            num_nvl_ranks = min(world_size, 8)
        self.topology = Topology(world_size, rank, num_nvl_ranks)
        if max_nodes_per_token < 1:
            raise ValueError(f"max_nodes_per_token must be >= 1, got {max_nodes_per_token}")
        if num_nvl_bytes < 0 or num_rdma_bytes < 0:
            raise ValueError(f"buffer sizes must be >= 0, got num_nvl_bytes={num_nvl_bytes}, num_rdma_bytes={num_rdma_bytes}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if algorithm == "auto":
            algorithm = "two_hop" if self.topology.num_nodes > 1 else "flat"
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be 'flat', 'two_hop' or 'auto', got {algorithm!r}")
        if combine_node_partials not in _NODE_PARTIALS:
            raise ValueError(f"combine_node_partials must be 'rows_dtype' or 'float32', got {combine_node_partials!r}")
        self.combine_node_partials = combine_node_partials
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.max_nodes_per_token = max_nodes_per_token
        self.algorithm = algorithm
        self.timeout_s = timeout_s
        self.backend = resolve_backend(backend)
        self.traffic = TrafficStats()
        self._comm = GroupComm(self.group, self.topology, timeout_s, self.traffic)
        options = BackendOptions(num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, algorithm=algorithm,
                                 max_nodes_per_token=max_nodes_per_token, timeout_s=timeout_s,
                                 combine_node_partials=combine_node_partials,
                                 low_latency_mode=bool(low_latency_mode))
        impl_class = backend_class(self.backend)
        impl_class.check_options(self.topology, options)  # the same verdict on every rank (same arguments)
        agree_available(self._comm, self.backend)  # every rank raises, or none
        self._impl = impl_class(self._comm, self.topology, options)
        self._id = next(_buffer_ids)
        self._runner = AsyncRunner(f"epcomm-buffer-{self._id}")  # async_finish's data phases (epcomm/_async.py)
        self._private_group: dist.ProcessGroup | None = None
        self._layout_seq = 0
        # a handle made by a Buffer that is gone may be used by a Buffer with the same key (see _check_handle)
        self._key = (self.backend, rank, world_size, num_nvl_ranks, algorithm, max_nodes_per_token,
                     tuple(dist.get_process_group_ranks(self.group)) if self.group is not dist.group.WORLD else "world")
        _live_buffers[self._id] = weakref.ref(self)

    # ------------------------------------------------------------ properties
    @property
    def id(self) -> int:
        """Unique per process; names this buffer in ``epcomm.ops`` and in its handles."""
        return self._id

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def group_size(self) -> int:
        return self.topology.world_size

    @property
    def num_nodes(self) -> int:
        return self.topology.num_nodes

    num_sms: int = 20
    """SMs the tuned configs use (:meth:`get_dispatch_config`); set with :meth:`set_num_sms`."""

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set :attr:`num_sms` for every Buffer (what :meth:`get_dispatch_config` and
        :meth:`get_combine_config` put in their configs); even, two blocks per channel."""
        if not isinstance(new_num_sms, int) or new_num_sms < 2 or new_num_sms % 2:
            raise ValueError(f"Buffer.set_num_sms needs an even int >= 2 (two blocks per channel), got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned dispatch :class:`Config` for ``num_ranks`` ranks, with :attr:`num_sms` SMs
        (see :meth:`Config.tuned`; other rank counts take the next tabulated count up)."""
        return Config.tuned("dispatch", num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's tuned combine :class:`Config` for ``num_ranks`` ranks, with :attr:`num_sms` SMs."""
        return Config.tuned("combine", num_ranks, Buffer.num_sms)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether epcomm's GPU kernels (the ``cuda`` backend's extension, built for sm_90) are installed."""
        from ._ext import load_extension
        from .errors import EpcommBackendUnavailable

        try:
            load_extension("cuda")
        except EpcommBackendUnavailable:
            return False
        return True

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of the current stream (complete at once on the CPU)."""
        return EventOverlap(EventHandle())

    def get_comm_stream(self) -> object:
        """The stream epcomm's data phases run on: the ``cuda`` backend's communication stream (its kernels
        run there, after the caller's stream); for the other backends the caller's current stream
        (``torch.cuda.current_stream()`` on a GPU, else ``torch.cpu.current_stream()``)."""
        self._check_alive("get_comm_stream")
        comm_stream = getattr(self._impl, "comm_stream", None)
        if comm_stream is not None:
            return comm_stream
        if getattr(self._impl, "device", torch.device("cpu")).type == "cuda":
            return torch.cuda.current_stream()
        return torch.cpu.current_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """This rank's communication buffer as a tensor (no copy), where the backend has one.

        Args:
            dtype: element type of the view.
            size: shape of the view (``None``: every whole element from ``offset`` to the end).
            offset: where the view starts, in bytes.
            use_rdma_buffer: the network region (across nodes) instead of the NVLink region.
        Raises:
            ValueError: the backend has no such buffer (``torch``), it is not allocated yet (kernel
                backends allocate at the first call unless ``num_nvl_bytes``/``num_rdma_bytes`` are given),
                or the view does not fit.
        """
        self._check_alive("get_local_buffer_tensor")
        from .backends._kernel_paths import rdma_offset

        runtime = getattr(self._impl, "_device_runtime", None)
        if not hasattr(self._impl, "explicit_bytes"):
            raise ValueError(f"the {self.backend!r} backend moves rows with torch.distributed collectives and has no "
                             f"communication buffer to view; use backend='sim' (or 'cuda')")
        if runtime is None:
            raise ValueError(f"the {self.backend!r} backend allocates its buffer at the first dispatch; pass "
                             f"num_nvl_bytes (and num_rdma_bytes across nodes) to Buffer to have it from the start")
        nvl_bytes, rdma_bytes = self._impl.explicit_bytes
        if use_rdma_buffer:
            if self.num_nodes == 1 or not rdma_bytes:
                raise ValueError("this Buffer has no network (RDMA) region: it spans one node, or was sized "
                                 "automatically (pass num_rdma_bytes)")
            start, length = rdma_offset(nvl_bytes), rdma_bytes
        else:
            start, length = 0, nvl_bytes or runtime.num_nvl_bytes
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset > length:
            raise ValueError(f"offset={offset} is outside the {length}-byte region")
        count = (length - offset) // itemsize if size is None else torch.Size(size).numel()
        if offset + count * itemsize > length:
            raise ValueError(f"a view of {count} x {dtype} at byte {offset} does not fit the {length}-byte region")
        view = runtime.peer_view(self.rank, dtype, start + offset, count)
        return view if size is None else view.view(size)

    @property
    def runtime(self) -> object:
        """The backend object that moves the rows (DeepEP's C++ runtime); ``None`` after :meth:`destroy`."""
        return self._impl

    def destroy(self) -> None:
        """Release this Buffer's buffers. Collective: every rank calls it; they meet first, so no rank
        frees memory a peer still reads. Later calls on this Buffer raise; handles it made may be used by
        a new Buffer on the same group with the same settings."""
        self._check_alive("destroy")
        self._runner.close()
        self._comm.all_gather("destroy", "barrier", torch.zeros(1, dtype=torch.int64, device=self._comm.device))
        impl, self._impl = self._impl, None
        self._destroyed = True
        _live_buffers.pop(self._id, None)
        impl.close(collective=True)
        self._close_private_group()

    def __del__(self) -> None:
        if getattr(self, "_destroyed", True) or getattr(self, "_impl", None) is None:
            return
        _live_buffers.pop(getattr(self, "_id", None), None)
        self._close_private_group()
        if self.explicitly_destroy:
            warnings.warn("epcomm.Buffer(explicitly_destroy=True) was dropped without destroy(); call destroy() on "
                          "every rank", ResourceWarning, stacklevel=2)

    def _check_alive(self, op: str) -> None:
        """Raise if destroyed; then wait for an asynchronous data phase in flight (raising its error), so
        this Buffer's collectives keep one order on every rank."""
        if self._destroyed:
            raise EpcommError(f"epcomm {op}: this Buffer was destroyed (Buffer.destroy()); create a new Buffer")
        self._runner.drain()

    def _close_private_group(self) -> None:
        """Drop the private group async calls made (local for gloo; nothing of it may be in flight)."""
        group, self._private_group = getattr(self, "_private_group", None), None
        if group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - teardown: a group already gone is fine
                pass

    def _runs_async(self, async_finish: bool) -> bool:
        """Whether an agreed ``async_finish`` call runs its data phase off the calling thread: CPU tensors
        (the group's device, and the backend's: the cuda backend over a gloo group is stream-ordered on its
        communication stream instead, README "Streams on GPUs")."""
        return (bool(async_finish) and self._comm.device.type == "cpu"
                and getattr(self._impl, "device", self._comm.device).type == "cpu")

    def _submit(self, phase: Callable[[], object], outputs: object) -> EventOverlap:
        """Run the data phase ``phase`` on the worker, copying its results into ``outputs`` (allocated
        by the caller with the shapes the agreement fixed); the event completes when they are filled.
        Every rank agreed ``async_finish`` before this, so all of them reach it on the same call."""
        if self._private_group is None:
            self._private_group = private_group(self.group, self.timeout_s)
            self._comm.group = self._private_group  # from now on this Buffer's collectives use it
        return EventOverlap(self._runner.submit(lambda: copy_into(outputs, phase())))
    def reset_traffic(self) -> None:
        """Zero the byte counters in :attr:`traffic`."""
        self.traffic.reset()

    # ---------------------------------------------------------------- layout
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """Count where this rank's tokens go. Local: no communication.

        Args:
            topk_idx: ``[num_tokens, num_topk]`` torch.int64, expert ids, ``-1`` for none.
            num_experts: total experts; divisible by the world size.
        Returns:
            ``num_tokens_per_rank`` ``[world_size]`` torch.int32;
            ``num_tokens_per_rdma_rank`` ``[num_nodes]`` torch.int32 (tokens per node), ``None`` on one node;
            ``num_tokens_per_expert`` ``[num_experts]`` torch.int32;
            ``is_token_in_rank`` ``[num_tokens, world_size]`` torch.bool;
            the completion event.
        Raises:
            EpcommInputError: on this rank only (this call is local) if the inputs are invalid (the expert ids'
                range is not checked under host_sync_free or a graph capture, as that reads them on the host:
                out-of-range ids then count nowhere).

        No host synchronization: it can be captured in a CUDA graph.
        """
        self._wait(previous_event)
        try:
            check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
            self._check_num_experts(num_experts)
            if not is_host_sync_free():
                check_topk_idx(topk_idx, num_experts)
        except Invalid as err:
            raise EpcommInputError("get_dispatch_layout", {self.rank: str(err)}, self.group_size) from None
        layout = compute_layout(topk_idx, num_experts, self.topology)
        return (*layout, EventOverlap.capture(topk_idx.device))

    # -------------------------------------------------------------- dispatch
    def dispatch(
        self,
        x: XTensor,
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[
        XTensor, torch.Tensor | None, torch.Tensor | None, list[int] | None, DispatchHandle | None, EventOverlap
    ]:
        """Send each token to every rank hosting one of its experts (one row per rank).

        Args:
            x: ``[num_tokens, hidden]`` torch.bfloat16 (float16 and float32 are accepted too), or
                an FP8 tuple ``(float8_e4m3fn [num_tokens, hidden], scales)`` with scales float32
                ``[num_tokens, hidden // 128]``, int32 ``[num_tokens, hidden // 512]`` (UE8M0: four
                power-of-two exponents per int) or float32 ``[num_tokens]`` (one per token), in any
                layout (row- or column-major); scales are carried bit for bit.
            handle: from an earlier dispatch: reuse its routing (cached mode; pass no layout tensors).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                from :meth:`get_dispatch_layout` on the same ``topk_idx``.
            topk_idx: ``[num_tokens, num_topk]`` torch.int64, ``-1`` for none (optional).
            topk_weights: ``[num_tokens, num_topk]`` torch.float32 (optional, needs topk_idx).
            expert_alignment: round each per-expert receive count up to a multiple of this.
            num_worst_tokens: ``0``, or the row count to pad the outputs to (the same on every rank,
                at least the rows any rank receives): padded rows are zero, with ``recv_topk_idx``
                ``-1``, and the per-expert list is empty, as DeepEP's. Cached dispatches along the
                handle are padded alike and combine takes the padded rows. Under
                ``epcomm.low_latency.host_sync_free()`` or a graph capture (kernel backends, one node)
                the dispatch is counted on the device, with no host read or wait: a rank receiving
                more rows raises :class:`~epcomm.EpcommRecvOverflow` (README "Graph capture").
            config: kernel tuning (:class:`Config`), the same on every rank; validated, unused by the
                torch backend; the kernel backends default to their own (see ``README``: Backends).
        Returns:
            ``recv_x``: ``[num_recv, hidden]`` like ``x`` (an FP8 tuple for FP8 input, scales row-major in
            x's scale dtype and shape): one row per (token, this rank) pair, ordered by source rank,
            then source token index;
            ``recv_topk_idx``: ``[num_recv, num_topk]`` int64, this rank's experts as local ids, others ``-1``;
            ``recv_topk_weights``: ``[num_recv, num_topk]`` float32, ``0`` where recv_topk_idx is ``-1``;
            ``num_recv_tokens_per_expert_list``: one int per local expert, rounded up to expert_alignment
            (from the received ids with topk_idx; without it, the sum of every rank's
            ``num_tokens_per_expert`` for this rank's experts, or ``[]`` when that is not given either);
            ``handle``: for cached dispatch and combine (also indexable as DeepEP's tuple);
            ``event``. In cached mode only ``recv_x`` and ``event`` are set; the rest are ``None``.

        Every rank ``d`` receives from every rank ``s`` the rows ``x_s[t]`` with
        ``is_token_in_rank_s[t, d]``, for ``s`` ascending and ``t`` ascending::

            recv_x_d = cat([x_s[is_token_in_rank_s[:, d]] for s in range(world_size)])
        """
        self._check_alive("dispatch")
        self._wait(previous_event)
        if handle is None and is_host_sync_free() and isinstance(num_worst_tokens, int) and num_worst_tokens > 0:
            return self._dispatch_counted_on_device(
                x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                topk_weights, expert_alignment, num_worst_tokens, config, async_finish)
        if handle is None and is_capturing():
            raise EpcommInputError("dispatch", {self.rank: "a dispatch without handle reads its receive counts on "
                                                           "the host, which a graph cannot capture: pass "
                                                           "num_worst_tokens (one node, kernel backends), or capture "
                                                           "cached dispatches (handle=...) or low-latency calls"},
                                   self.group_size)
        if handle is not None:
            return self._cached_dispatch(x, handle, num_tokens_per_rank, is_token_in_rank, topk_idx, config,
                                         async_finish)

        op = "dispatch"
        problem, prepared = None, None
        try:
            prepared = self._prepare_dispatch(
                x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
            )
        except Exception as err:  # any failure here must reach the peers, not strand them
            problem = problem_text(err)
        signature, call = self._dispatch_call(prepared, config, num_worst_tokens, async_finish)
        counts = prepared["counts"] if prepared is not None else None
        # the kernel backends' notify checks the call first (ranks calling different operations meet there);
        # the host agreement follows in any case: it carries every rank's counts
        self._impl.agree_in_barrier(call)
        gathered = agree(self._comm, op, problem, signature, counts, device_of(x))
        self._low_latency.note_normal_call()  # LL calls now need clean_low_latency_buffer first
        world, nodes = self.group_size, self.num_nodes
        _check_worst_tokens(op, num_worst_tokens, gathered[:, :world], world)
        tensors = prepared["tensors"]
        placement = prepared["placement"]  # None without topk_idx
        run_async = self._runs_async(async_finish)
        experts = prepared["experts"]
        # an asynchronous dispatch returns the per-expert counts before its rows arrive: from the call
        # check's notify when it ran (kernel backends), else from every rank's counts
        num_recv_per_expert: list[int] = []
        if run_async and experts is not None:
            num_recv_per_expert = self._impl.agreed_expert_counts() or self._gather_expert_counts(op, experts)
        call = DispatchCall(tensors, prepared["is_token_in_rank"], gathered[:, :world],
                            gathered[:, world : world + nodes], placement, config, experts)
        self._layout_seq += 1
        num_recv = int(gathered[:, self.rank].sum())  # rows every rank sends this one, as agreed
        x_kind, has_weights = prepared["x_kind"], "topk_weights" in tensors

        def data_phase():
            recv, plan = self._impl.dispatch(call)
            recv_x = self._unpack_x(recv, x_kind, num_worst_tokens)
            recv_topk_idx = recv_topk_weights = None
            per_expert = self._impl.received_expert_counts(plan) if experts is not None else None  # from notify
            if placement is not None:
                recv_topk_idx, recv_topk_weights, per_expert = self._localize_experts(
                    recv["topk_idx"], recv.get("topk_weights"), placement, expert_alignment, per_expert)
                recv_topk_idx = _pad_rows(recv_topk_idx, num_worst_tokens, -1)
                recv_topk_weights = _pad_rows(recv_topk_weights, num_worst_tokens, 0)
            return (recv_x, recv_topk_idx, recv_topk_weights), per_expert, plan

        if run_async:
            rows = num_worst_tokens or num_recv
            num_topk = prepared["signature"]["num_topk"]
            outputs = (_empty_rows(x, rows),
                       _empty(rows, num_topk, torch.int64, placement is not None, tensors["x"].device),
                       _empty(rows, num_topk, torch.float32, placement is not None and has_weights, tensors["x"].device))
            plan = None
        else:
            scope = self._impl.stream_scope(tensors["x"].device, async_finish, op)
            with scope:
                outputs, counted, plan = data_phase()
            if experts is not None:
                num_recv_per_expert = counted if counted is not None else self._gather_expert_counts(op, experts)
        if num_worst_tokens:
            num_recv_per_expert = []  # DeepEP: sizes are not synchronised to the host in this mode
        new_handle = DispatchHandle(
            is_token_in_rank=prepared["is_token_in_rank"],
            num_recv_tokens_per_rank=gathered[:, self.rank].clone(),
            num_tokens=prepared["num_tokens"],
            num_recv_tokens=num_recv,
            hidden=prepared["hidden"],
            layout_seq=self._layout_seq,
            buffer_id=self._id,
            plan=plan,
            counts=gathered[:, :world].clone(),
            node_counts=gathered[:, world : world + nodes].clone(),
            num_nvl_ranks=self.topology.num_nvl_ranks,
            num_channels=(config.num_channels if isinstance(config, Config) else Buffer.num_sms // 2),
            num_worst_tokens=num_worst_tokens,
            buffer_key=self._key,
        )
        if run_async:
            def phase_and_plan():
                results, _, plan = data_phase()
                new_handle._set_plan(plan)
                return results

            event = self._submit(phase_and_plan, outputs)
        else:
            event = scope.finish(tensors_in(tensors, prepared["is_token_in_rank"]), tensors_in(outputs))
        recv_x, recv_topk_idx, recv_topk_weights = outputs
        return recv_x, recv_topk_idx, recv_topk_weights, num_recv_per_expert, new_handle, event

    internode_dispatch = dispatch  # DeepEP's public name for the multi-node path; dispatch picks the path itself

    def _dispatch_counted_on_device(
        self, x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
        topk_weights, expert_alignment, num_worst_tokens, config, async_finish,
    ):
        """A dispatch with ``num_worst_tokens`` under host_sync_free or a graph capture (the kernel backends, one
        node, as DeepEP's): the host reads no tensor value and waits for nothing. One notify, only enqueued,
        exchanges the counts and judges the call on the device; the dispatch kernel, gated by that verdict,
        places the rows into outputs of ``num_worst_tokens`` rows prefilled as padding and checks there that
        they fit (a rank receiving more writes none past them and raises EpcommRecvOverflow, a failure of the
        call on every rank: its kernel raises the abort flag). The per-expert
        list is empty, as DeepEP's in this mode, and ``buffer.traffic`` does not count the call."""
        op = "dispatch"
        if not self._impl.judges_on_device or self.num_nodes > 1:  # the Buffer's, the same on every rank
            raise EpcommInputError(op, {self.rank: "a dispatch counted on the device (num_worst_tokens under "
                                                   "host_sync_free or a graph capture) runs on the kernel backends "
                                                   "(sim, cuda) on one node, as DeepEP's"}, self.group_size)
        problem, prepared = None, None
        try:
            if self._runs_async(async_finish):  # (said through the notify: a peer may differ)
                raise Invalid("async_finish on CPU tensors runs a call on a worker thread, which a dispatch counted "
                              "on the device does not (no host wait to hand over)")
            prepared = self._prepare_dispatch(
                x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                topk_weights, expert_alignment, num_worst_tokens, config, read_values=False)
        except Exception as err:  # said to the peers by this rank's notify (refused), and raised below
            problem = problem_text(err)
        _, call = self._dispatch_call(prepared, config, num_worst_tokens, async_finish)
        placement = prepared["placement"] if prepared else None
        num_experts = placement.num_experts if placement is not None else 0
        scope = self._impl.stream_scope(device_of(x), async_finish, op)
        with scope, self._rejected_as_input(op):
            recv, plan, why = self._impl.dispatch_on_device(call, num_worst_tokens, num_experts)
        if why is not None:
            scope.finish([], [])  # (joins the communication stream back, a capture included)
            raise EpcommInputError(op, {self.rank: problem or why}, self.group_size)
        self._low_latency.note_normal_call()
        self._layout_seq += 1
        recv_x = self._unpack_x(recv, prepared["x_kind"])  # already num_worst_tokens rows
        recv_topk_idx, recv_topk_weights = recv.get("topk_idx"), recv.get("topk_weights")  # local ids (the kernel's)
        new_handle = DispatchHandle(
            is_token_in_rank=prepared["is_token_in_rank"], num_recv_tokens_per_rank=None,
            num_tokens=prepared["num_tokens"], num_recv_tokens=num_worst_tokens, hidden=prepared["hidden"],
            layout_seq=self._layout_seq, buffer_id=self._id, plan=plan,
            num_nvl_ranks=self.topology.num_nvl_ranks,
            num_channels=(config.num_channels if isinstance(config, Config) else Buffer.num_sms // 2),
            num_worst_tokens=num_worst_tokens, buffer_key=self._key)
        event = scope.finish(tensors_in(prepared["tensors"], prepared["is_token_in_rank"]),
                             tensors_in(recv_x, recv_topk_idx, recv_topk_weights))
        return recv_x, recv_topk_idx, recv_topk_weights, [], new_handle, event

    def _dispatch_call(self, prepared: dict | None, config, num_worst_tokens, async_finish) -> tuple[dict, CallCheck]:
        """A dispatch's signature (what every rank must agree on) and its call check, from
        :meth:`_prepare_dispatch`'s result (None: this rank refused its inputs)."""
        signature = dict(operation=_OPERATIONS["dispatch"], **self._common_signature(), **_config_signature(config),
                         num_worst_tokens=num_worst_tokens if isinstance(num_worst_tokens, int) else -2,
                         async_finish=int(bool(async_finish)))
        if prepared is not None:
            signature.update(prepared["signature"])
        call = CallCheck("dispatch", signature_digest(signature), refused=prepared is None,
                         tensors=prepared["tensors"] if prepared else {},
                         config=config if isinstance(config, Config) else None,
                         is_token_in_rank=prepared["is_token_in_rank"] if prepared else None,
                         num_topk=max(prepared["signature"]["num_topk"], 0) if prepared else 0,
                         experts=prepared["experts"] if prepared else None)
        return signature, call

    def _prepare_dispatch(
        self, x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
        num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
        read_values: bool = True,
    ) -> dict:
        """The checks and tensors of a dispatch without handle. ``read_values=False`` (a dispatch counted on the
        device): only shapes, dtypes and flags are checked, no tensor value is read on the host (expert ids in
        range, layout tensors that match topk_idx: the caller's to keep), and no counts are gathered."""
        topo = self.topology
        _check_config(config)
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise Invalid(f"expert_alignment must be a positive int, got {expert_alignment!r}")
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise Invalid(f"num_worst_tokens must be an int >= 0, got {num_worst_tokens!r}")
        tensors, num_tokens, hidden, x_kind = self._prepare_x(x)
        device = tensors["x"].device
        if is_token_in_rank is None or num_tokens_per_rank is None:
            raise Invalid(
                "dispatch needs num_tokens_per_rank and is_token_in_rank from get_dispatch_layout "
                "(or handle= for a cached dispatch)"
            )
        check_tensor("is_token_in_rank", is_token_in_rank, dtypes=(torch.bool,), ndim=2,
                     shape=(num_tokens, topo.world_size), device=device)
        check_tensor("num_tokens_per_rank", num_tokens_per_rank, dtypes=(torch.int32,), ndim=1,
                     shape=(topo.world_size,), device=device)
        if topo.num_nodes > 1 and num_tokens_per_rdma_rank is not None:
            check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, dtypes=(torch.int32,), ndim=1,
                         shape=(topo.num_nodes,), device=device)
        num_experts = -1
        num_topk = -1
        expected = None
        placement = None
        if topk_idx is not None:
            if num_tokens_per_expert is None:
                raise Invalid("num_tokens_per_expert (from get_dispatch_layout) is required with topk_idx")
            check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32,), ndim=1, device=device)
            num_experts = num_tokens_per_expert.numel()
            self._check_num_experts(num_experts)
            placement = ExpertPlacement.uniform(num_experts, self.group_size)
            check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2, shape=(num_tokens, None), device=device)
            if read_values:
                check_topk_idx(topk_idx, num_experts)
            num_topk = topk_idx.size(1)
            tensors["topk_idx"] = topk_idx
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2,
                             shape=(num_tokens, num_topk), device=device)
                tensors["topk_weights"] = topk_weights
            expected = compute_layout(topk_idx, num_experts, topo) if read_values else None
        elif topk_weights is not None:
            raise Invalid("topk_weights was given without topk_idx")
        elif num_tokens_per_expert is not None:
            check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32,), ndim=1, device=device)
            num_experts = num_tokens_per_expert.numel()
            self._check_num_experts(num_experts)
        counts = None
        if read_values:
            _check_layout_consistent(expected, is_token_in_rank, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                     num_tokens_per_expert, topo)
            self._check_node_cap(is_token_in_rank)
            node_counts = torch.zeros(topo.world_size, dtype=torch.int64)
            node_counts[: topo.num_nodes] = token_node_mask(is_token_in_rank, topo).sum(0).cpu()
            counts = torch.cat([num_tokens_per_rank.to(torch.int64).cpu(), node_counts])
        self._impl.check_dispatch(tensors, num_topk, config=config, num_experts=max(num_experts, 0))
        return {
            "tensors": tensors,
            "is_token_in_rank": is_token_in_rank,
            "counts": counts,
            "num_tokens": num_tokens,
            "hidden": hidden,
            "placement": placement,
            "x_kind": x_kind,
            "experts": (ExpertCounts(num_tokens_per_expert.contiguous(), expert_alignment)
                        if num_tokens_per_expert is not None else None),
            "signature": dict(num_experts=num_experts, hidden=hidden, x_kind=x_kind, num_topk=num_topk,
                              has_topk_weights=int(topk_weights is not None)),
        }

    def _cached_dispatch(self, x, handle, num_tokens_per_rank, is_token_in_rank, topk_idx, config, async_finish):
        op = "cached dispatch"
        problem, tensors, x_kind = None, None, -1
        try:
            self._check_handle(handle)
            if num_tokens_per_rank is not None or is_token_in_rank is not None or topk_idx is not None:
                raise Invalid("a cached dispatch (handle=...) takes no layout tensors or topk_idx; pass only x and handle")
            _check_config(config)
            tensors, num_tokens, hidden, x_kind = self._prepare_x(x)
            if num_tokens != handle.num_tokens:
                raise Invalid(f"x has {num_tokens} tokens but the handle was made for {handle.num_tokens}")
            self._impl.check_dispatch(tensors, 0, handle.plan, config=config)
        except Exception as err:
            problem = problem_text(err)
        seq = handle.layout_seq if isinstance(handle, DispatchHandle) else -1
        hidden = tensors["x"].size(1) if tensors is not None else -1
        signature = dict(operation=_OPERATIONS[op], handle=seq, hidden=hidden, x_kind=x_kind, **self._common_signature(),
                         **_config_signature(config), async_finish=int(bool(async_finish)))
        self._agree_along_handle(op, problem, signature, tensors, handle, config, device_of(x),
                                 on_device=not self._runs_async(async_finish))
        self._low_latency.note_normal_call()

        def data_phase():
            with self._rejected_as_input(op):
                recv = self._impl.dispatch_cached(tensors, handle.plan, config=config)
            return self._unpack_x(recv, x_kind, handle.num_worst_tokens)

        if self._runs_async(async_finish):
            recv_x = _empty_rows(x, handle.num_worst_tokens or handle.num_recv_tokens)
            return recv_x, None, None, None, None, self._submit(data_phase, recv_x)
        scope = self._impl.stream_scope(tensors["x"].device, async_finish, op)
        with scope:
            recv_x = data_phase()
        return recv_x, None, None, None, None, scope.finish(tensors_in(tensors), tensors_in(recv_x))

    # --------------------------------------------------------------- combine
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Send each received row back to its token's rank and sum per token.

        Args:
            x: ``[num_recv, hidden]`` torch.bfloat16 (float16/float32 accepted), rows in the
                order dispatch returned them (``handle.num_recv_tokens`` rows, or the padded
                ``handle.num_worst_tokens``: padded rows are ignored).
            handle: from the dispatch that delivered these rows (or from a Buffer that has since been
                replaced by one on the same group with the same settings).
            topk_weights: ``[num_recv, num_topk]`` torch.float32, summed the same way (optional).
            bias: ``None``, one tensor or a pair, each ``[num_tokens, hidden]`` in x's dtype, added to
                the float32 sums (``(sum + bias_0) + bias_1``) before the one cast. On the kernel
                backends a combine with bias sends float32 rows, so every rank passes bias or none.
        Returns:
            ``combined_x``: ``[num_tokens, hidden]``, x's dtype: for each original token the sum of
            the rows that came from it, accumulated in float32 (nodes ascending, and inside each
            node ranks ascending; see the torch backend's module docs) and cast once;
            ``combined_topk_weights``: ``[num_tokens, num_topk]`` float32 or ``None``; ``event``.
        """
        self._check_alive("combine")
        self._wait(previous_event)
        op = "combine"
        problem, tensors, x_kind, hidden, biases = None, {}, -1, -1, []
        try:
            self._check_handle(handle)
            _check_config(config)
            dtype = x.dtype if isinstance(x, torch.Tensor) else None
            if dtype not in _X_KINDS:
                raise Invalid(
                    f"combine's x must be a bfloat16, float16 or float32 tensor, got {describe(x)}"
                    + (" (combine takes no FP8 tuple; send expert outputs in bf16)" if isinstance(x, tuple) else "")
                )
            rows = handle.num_recv_tokens
            if handle.num_worst_tokens and x.dim() == 2 and x.size(0) == handle.num_worst_tokens:
                rows = handle.num_worst_tokens
            check_tensor("x", x, dtypes=tuple(_X_KINDS), ndim=2, shape=(rows, None))
            hidden = x.size(1)
            biases = _check_bias(bias, handle.num_tokens, hidden, x.dtype, x.device)
            rows_x = x[: handle.num_recv_tokens]
            if biases and self.backend != "torch":
                rows_x = rows_x.float()  # the kernels round their sums to x's dtype: send fp32 to add bias first
            x_kind = _X_KINDS[rows_x.dtype]
            tensors["x"] = rows_x
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2,
                             shape=(rows, None), device=x.device)
                tensors["topk_weights"] = topk_weights[: handle.num_recv_tokens]
            self._impl.check_combine(tensors, handle.plan, config=config,
                                     node_partial_dtype=self._node_partial_dtype(x.dtype))
        except Exception as err:
            problem = problem_text(err)
        seq = handle.layout_seq if isinstance(handle, DispatchHandle) else -1
        signature = dict(operation=_OPERATIONS[op], handle=seq, hidden=hidden, x_kind=x_kind,
                         has_topk_weights=int(topk_weights is not None), **self._common_signature(),
                         **_config_signature(config), async_finish=int(bool(async_finish)))
        self._agree_along_handle(op, problem, signature, tensors, handle, config, device_of(x),
                                 on_device=not self._runs_async(async_finish))
        self._low_latency.note_normal_call()
        node_partial_dtype = self._node_partial_dtype(x.dtype)

        def data_phase():
            with self._rejected_as_input(op):
                sums = self._impl.combine(tensors, handle.plan, config=config, node_partial_dtype=node_partial_dtype)
            if biases:
                total = sums["x"].float()
                for b in biases:
                    total = total + b.float()
                combined_x = total.to(x.dtype)
            else:
                # copy=True: the sums live in the backend's scratch, reused by the next call
                combined_x = sums["x"].to(x.dtype, copy=True)
            return combined_x, sums["topk_weights"].clone() if "topk_weights" in sums else None

        if self._runs_async(async_finish):
            outputs = (torch.empty(handle.num_tokens, hidden, dtype=x.dtype, device=x.device),
                       _empty(handle.num_tokens, topk_weights.size(1) if topk_weights is not None else 0,
                              torch.float32, topk_weights is not None, x.device))
            return (*outputs, self._submit(data_phase, outputs))
        scope = self._impl.stream_scope(x.device, async_finish, op)
        with scope:
            combined_x, combined_weights = data_phase()
        return combined_x, combined_weights, scope.finish(tensors_in(tensors, biases),
                                                          tensors_in(combined_x, combined_weights))

    internode_combine = combine  # DeepEP's public name for the multi-node path; combine picks the path itself

    # ------------------------------------------------------- low-latency mode
    # (owned by epcomm/low_latency.py; methods here only delegate)
    @property
    def _low_latency(self) -> LowLatencyOps:
        self._runner.drain()  # every LL call comes through here: a normal call's data phase finishes first
        ops = self.__dict__.get("_ll_ops")
        if ops is None:
            ops = self.__dict__["_ll_ops"] = LowLatencyOps(self)
        return ops

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Exact bytes per rank of the kernel backends' LL workspace (two slots, double buffering):
        pass at least this as ``num_rdma_bytes``. See :class:`epcomm.low_latency.LowLatencyLayout`."""
        return LowLatencyLayout(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).rdma_bytes

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: reset the LL buffers (needed after normal-mode calls, before the next LL call).
        Results and handles of earlier LL dispatches become invalid."""
        self._low_latency.clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[XTensor, torch.Tensor, LowLatencyHandle, EventOverlap, Callable[[], None] | None]:
        """Low-latency dispatch (decode): fixed-shape outputs, no host synchronization on kernel backends.

        Args:
            x: ``[N, H]`` torch.bfloat16, ``N <= num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[N, K]`` torch.int64 global expert ids, ``-1`` for none, an expert at most once per row.
            num_max_dispatch_tokens_per_rank: ``M``, the same on every rank.
            num_experts: ``E``, a multiple of the world size ``R``; ``E_loc = E // R`` per rank.
            cumulative_local_expert_recv_stats: int32 ``[E_loc]``, rows received per local expert are added.
            dispatch_wait_recv_cost_stats: int64 ``[R]``, receive wait time per source rank is added
                (torch backend: nanoseconds, the same for every source).
            use_fp8: cast to FP8 e4m3 with one float32 scale per 128 values (amax / 448) while sending.
            round_scale: round each scale up to a power of two. use_ue8m0: return the scales as int32
                ``[E_loc, R*M, H/512]`` packed exponents (needs round_scale, ``H % 512 == 0``).
            async_finish: return at once with an event (exclusive with return_recv_hook).
            return_recv_hook: only send; the returned ``hook()`` receives (compute in between).
        Returns:
            ``recv_x``: ``[E_loc, R*M, H]`` bf16, or with use_fp8 ``(float8_e4m3fn [E_loc, R*M, H], scales)``
            (scales float32 ``[E_loc, R*M, H/128]``, token index fastest); ``recv_count`` int32 ``[E_loc]``;
            ``handle`` (:class:`~epcomm.low_latency.LowLatencyHandle`: ``handle[0]`` src_info int32
            ``[E_loc, R*M]``, ``handle[1]`` layout_range int64 ``[E_loc, R]``); ``event``; ``hook`` or None.
            Rows past ``recv_count[j]`` are unspecified. Valid until the next-but-one LL dispatch.
        """
        return self._low_latency.dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                          cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                                          use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """Low-latency combine: ``[N, H]`` bf16, ``sum_k topk_weights[n, k] * expert_output(n, k)``.

        Args:
            x: ``[E_loc, R*M, H]`` torch.bfloat16 expert outputs, row for row as dispatch delivered them
                (rows past recv_count are never read); with zero_copy, the tensor
                :meth:`get_next_low_latency_combine_buffer` returned, already written.
            topk_idx, topk_weights: ``[N, K]`` int64 (the dispatch's) and float32.
            handle: from the LL dispatch of these rows.
            use_logfmt: not implemented (raises). out: ``[N, H]`` bf16 to write and return.
        Returns:
            ``combined_x`` (float32 accumulation over valid k ascending, from 0, rounded once;
            ``-1`` slots skipped whatever their weight), ``event``, ``hook`` or None.
        """
        return self._low_latency.combine(x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish,
                                         return_recv_hook, out)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The bf16 ``[E_loc, R*M, H]`` buffer a ``zero_copy=True`` combine of ``handle`` sends from."""
        try:
            return self._low_latency.combine_buffer(handle)
        except Invalid as err:
            raise EpcommInputError("get_next_low_latency_combine_buffer", {self.rank: str(err)}, self.group_size) from None
    # ------------------------------------------------ end of low-latency mode

    # --------------------------------------------------------------- helpers
    def _agree_along_handle(self, op: str, problem: str | None, signature: dict[str, int],
                            tensors: dict[str, torch.Tensor] | None, handle: object, config: object,
                            device: torch.device, on_device: bool = True) -> None:
        """The agreement of a call along a handle (cached dispatch, combine): its sizes are known, so
        the kernel backends agree inside the barrier the call needs anyway (no host collective); the
        host agreement runs when they cannot or when any rank differs, and raises the named error."""
        plan = handle.plan if isinstance(handle, DispatchHandle) else None
        refused = problem is not None or plan is None or tensors is None
        call = CallCheck(op, signature_digest(signature), refused, tensors or {}, plan,
                         config if isinstance(config, Config) else None)
        # (not for a data phase on the CPU worker: its errors surface at a later drain, when the ranks may
        # already be in different calls; nor for its collective set-up on first use)
        device_verdict = self._impl.judges_on_device and on_device
        if is_capturing() and not device_verdict:
            raise EpcommInputError(op, {self.rank: _NOT_CAPTURABLE[self._impl.judges_on_device]}, self.group_size)
        if is_host_sync_free() and device_verdict:
            # No host wait at all: the verdict gates the data kernel on the device (a rank that refuses raises
            # here; its peers' kernels move nothing and raise EpcommInputError naming it, see _rejected_as_input).
            # So a graph can capture the call: the notify's epoch is counted on the device too (kernels/epoch.cuh)
            why = self._impl.agree_on_device(call)  # a refusing rank too: its notify tells its peers' kernels
            if why is not None:
                raise EpcommInputError(op, {self.rank: problem or why}, self.group_size)
            return
        if self._impl.agree_in_barrier(call):
            return
        agree(self._comm, op, problem, signature, None, device)

    @contextlib.contextmanager
    def _rejected_as_input(self, op: str) -> Iterator[None]:
        """A data kernel whose device call check said no (host_sync_free) raises EpcommInputError naming the
        rank that differed: nothing moved on any rank, and the Buffer stays usable. Only where the rejection
        surfaces inside its own call on every rank (sim: grids end at launch); where kernel errors are read
        later (cuda), it surfaces at a later call, when the ranks are no longer in step, and breaks the
        Buffer on every rank instead (GroupComm.start, SimDispatchBackend.agree_on_device)."""
        self._comm.expects_rejection = True
        try:
            yield
        except EpcommCallRejected as err:
            raise EpcommInputError(op, {err.rank: f"{err.reason}; seen by rank {self.rank}'s kernel on the device, "
                                                  "which moved nothing (host_sync_free)"}, self.group_size) from err
        finally:
            self._comm.expects_rejection = False

    def _node_partial_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """What the two-hop combine's node partials cross the network in (``combine_node_partials``)."""
        return x_dtype if self.combine_node_partials == "rows_dtype" else torch.float32

    def _common_signature(self) -> dict[str, int]:
        return dict(num_nvl_ranks=self.topology.num_nvl_ranks, max_nodes_per_token=self.max_nodes_per_token,
                    algorithm=_ALGORITHMS[self.algorithm],
                    combine_node_partials=_NODE_PARTIALS[self.combine_node_partials])

    def _check_num_experts(self, num_experts: int) -> None:
        check_num_experts(num_experts, self.group_size)  # raises Invalid, agreed across ranks by the caller

    def _check_handle(self, handle: object) -> None:
        if not isinstance(handle, DispatchHandle):
            hint = (" (a tuple of its tensors is not enough: pass the handle object itself)"
                    if isinstance(handle, (tuple, list)) else "")
            raise Invalid(f"handle must be the DispatchHandle returned by dispatch, got {describe(handle)}{hint}")
        if handle.buffer_id == self._id:
            return
        if _maker_alive(handle.buffer_id):
            raise Invalid("handle was made by a different Buffer; use the Buffer that dispatched")
        if handle.buffer_key != self._key:  # its Buffer is gone: a Buffer with the same settings may take over
            names = ("backend", "rank", "world size", "ranks per node", "algorithm", "max_nodes_per_token", "group")
            diffs = [f"{n} {a!r} vs {b!r}" for n, a, b in zip(names, handle.buffer_key, self._key) if a != b]
            raise Invalid("handle was made by a Buffer that no longer exists, with other settings than this one ("
                          + "; ".join(diffs) + "); use a handle from this Buffer's dispatch")

    def _check_node_cap(self, is_token_in_rank: torch.Tensor) -> None:
        if self.num_nodes <= self.max_nodes_per_token or is_token_in_rank.size(0) == 0:
            return
        nodes_per_token = token_node_mask(is_token_in_rank, self.topology).sum(1)
        worst = int(nodes_per_token.argmax())
        if int(nodes_per_token[worst]) > self.max_nodes_per_token:
            nodes = token_node_mask(is_token_in_rank[worst : worst + 1], self.topology)[0].nonzero().flatten().tolist()
            over = int((nodes_per_token > self.max_nodes_per_token).sum())
            raise Invalid(
                f"{over} token(s) go to more than max_nodes_per_token={self.max_nodes_per_token} nodes, "
                f"e.g. token {worst} -> nodes {nodes}; route with epcomm.routing.node_limited_gate"
                f"(max_nodes={self.max_nodes_per_token}) or raise Buffer(max_nodes_per_token=...)"
            )

    def _prepare_x(self, x: object) -> tuple[dict[str, torch.Tensor], int, int, int]:
        """Tensors (``x``, and ``scales`` for FP8), num_tokens, hidden and kind code of dispatch's ``x``.

        FP8 scales reach the backends as contiguous float32 ``[N, S]`` whatever the caller's layout:
        float32 ``[N, H/128]`` (row- or column-major), int32 UE8M0 ``[N, H/512]`` (reinterpreted, bit for
        bit) or float32 ``[N]``; the kind code (:data:`_FP8_KIND` + 0, 1, 2) says which, to undo it.
        """
        if is_fp8_pair(x):
            data, scales = x
            check_tensor("x[0] (FP8 data)", data, dtypes=(torch.float8_e4m3fn,), ndim=2)
            num_tokens, hidden = data.shape
            check_hidden_for_fp8(hidden)
            if not isinstance(scales, torch.Tensor):
                raise Invalid(f"x[1] (FP8 scales) must be a torch.Tensor, got {describe(scales)}")
            scales = scales.contiguous()  # DeepEP callers pass column-major scales (scales.T.contiguous().T)
            if scales.dtype == torch.int32:
                if hidden % 512:
                    raise Invalid(f"UE8M0 scales (int32, four exponents per int) need hidden % 512 == 0, got {hidden}")
                check_tensor("x[1] (FP8 scales)", scales, dtypes=(torch.int32,), ndim=2,
                             shape=(num_tokens, hidden // 512), device=data.device)
                return {"x": data, "scales": scales.view(torch.float32)}, num_tokens, hidden, _FP8_KIND + 1
            if scales.dtype == torch.float32 and scales.dim() == 1:
                check_tensor("x[1] (FP8 scales)", scales, dtypes=(torch.float32,), ndim=1, shape=(num_tokens,),
                             device=data.device)
                return {"x": data, "scales": scales.view(num_tokens, 1)}, num_tokens, hidden, _FP8_KIND + 2
            check_tensor("x[1] (FP8 scales)", scales, dtypes=(torch.float32, torch.int32), ndim=2,
                         shape=(num_tokens, hidden // 128), device=data.device)
            return {"x": data, "scales": scales}, num_tokens, hidden, _FP8_KIND
        if isinstance(x, tuple):
            raise Invalid(
                "x as a tuple must be (float8_e4m3fn data [N, H], float32 scales [N, H/128] or int32 UE8M0 "
                "scales [N, H/512]); got " + ", ".join(describe(t) for t in x)
            )
        check_tensor("x", x, dtypes=tuple(_X_KINDS), ndim=2)
        num_tokens, hidden = x.shape
        return {"x": x}, num_tokens, hidden, _X_KINDS[x.dtype]

    @staticmethod
    def _unpack_x(recv: dict[str, torch.Tensor], x_kind: int = -1, num_worst_tokens: int = 0) -> XTensor:
        """recv_x as the caller passed x: scales back in their dtype and shape (row-major, as DeepEP
        returns them), padded to ``num_worst_tokens`` rows when given."""
        data = _pad_rows(recv["x"], num_worst_tokens, 0)
        if "scales" not in recv:
            return data
        scales = recv["scales"]
        if x_kind == _FP8_KIND + 1:
            scales = scales.view(torch.int32)
        scales = _pad_rows(scales, num_worst_tokens, 0)
        if x_kind == _FP8_KIND + 2:
            scales = scales.reshape(-1)
        return data, scales

    def _gather_expert_counts(self, op: str, experts: ExpertCounts) -> list[int]:
        """Rows this rank receives per local expert, rounded up to ``experts.alignment``, from every rank's
        ``experts.sent`` (one all_gather; DeepEP's notify sums them the same way)."""
        every = self._comm.all_gather(op, "expert counts", experts.sent.to(torch.int64).to(self._comm.device))
        local = every.shape[1] // self.group_size
        counts = every[:, self.rank * local : (self.rank + 1) * local].sum(0).cpu().tolist()
        return [-(-c // experts.alignment) * experts.alignment for c in counts]

    def _localize_experts(
        self, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, placement: ExpertPlacement,
        expert_alignment: int, counted: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """This rank's view of the received rows' experts.

        Args:
            topk_idx: ``[num_recv, num_topk]`` int64: global expert ids, ``-1`` for none; or, from a
                backend with ``local_expert_ids``, already local ids (``-1`` elsewhere, weights zeroed).
            topk_weights: ``[num_recv, num_topk]`` float32, or ``None``.
            expert_alignment: round each per-expert count up to a multiple of this.
            counted: the rows per local expert (rounded up) when the backend counted them, else None.
        Returns:
            ``recv_topk_idx`` ``[num_recv, num_topk]`` int64 local ids, ``-1`` for other ranks' experts;
            ``recv_topk_weights`` ``[num_recv, num_topk]`` float32, ``0`` where recv_topk_idx is ``-1``
            (``None`` without topk_weights); rows per local expert, rounded up to ``expert_alignment``.
        """
        if self._impl.local_expert_ids:
            recv_topk_idx, recv_topk_weights = topk_idx, topk_weights
            mine = recv_topk_idx >= 0
        else:
            recv_topk_idx, mine = placement.to_local(topk_idx, self.rank)
            recv_topk_weights = None
            if topk_weights is not None:
                recv_topk_weights = torch.where(mine, topk_weights, torch.zeros_like(topk_weights))
        if counted is not None:
            return recv_topk_idx, recv_topk_weights, counted
        per_expert = torch.bincount(recv_topk_idx[mine], minlength=placement.num_local_experts).tolist()
        aligned = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in per_expert]
        return recv_topk_idx, recv_topk_weights, aligned

    @staticmethod
    def _wait(previous_event: EventOverlap | None) -> None:
        if previous_event is not None:
            previous_event.current_stream_wait()


def _maker_alive(buffer_id: int) -> bool:
    """Whether the Buffer ``buffer_id`` still exists and was not destroyed (collects garbage once: a
    replaced Buffer may linger in a reference cycle)."""
    ref = _live_buffers.get(buffer_id)
    if ref is None or ref() is None:
        return False
    gc.collect()
    return buffer_id in _live_buffers and _live_buffers[buffer_id]() is not None


def _empty_rows(like: XTensor, rows: int) -> XTensor:
    """Uninitialised ``rows`` rows shaped like ``like`` (a tensor, or each tensor of an FP8 tuple)."""
    if isinstance(like, tuple):
        return tuple(_empty_rows(t, rows) for t in like)
    return torch.empty((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)


def _empty(rows: int, width: int, dtype: torch.dtype, present: bool, device: torch.device) -> torch.Tensor | None:
    return torch.empty(rows, width, dtype=dtype, device=device) if present else None


def _pad_rows(t: torch.Tensor | None, rows: int, fill: float) -> torch.Tensor | None:
    """``t`` with rows of ``fill`` appended up to ``rows`` (``t`` itself when rows is 0)."""
    if t is None or not rows or t.size(0) >= rows:
        return t
    out = torch.full((rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    out[: t.size(0)] = t
    return out


def _check_worst_tokens(op: str, num_worst_tokens: object, counts: torch.Tensor, world: int) -> None:
    """After agreement (every rank has the same counts and num_worst_tokens): every rank's rows must fit."""
    if not isinstance(num_worst_tokens, int) or num_worst_tokens <= 0:
        return
    received = counts.sum(0).tolist()
    need = max(received)
    problems = {d: f"num_worst_tokens={num_worst_tokens} but this rank receives {n} rows; pass at least {need} "
                   f"(the most any rank receives)" for d, n in enumerate(received) if n > num_worst_tokens}
    if problems:
        raise EpcommInputError(op, problems, world)


def _check_bias(bias: object, num_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list:
    """combine's bias: None, a tensor, or a pair (either may be None), each ``[num_tokens, hidden]`` of x's dtype."""
    if bias is None:
        return []
    parts = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if isinstance(bias, (tuple, list)) and len(parts) != 2:
        raise Invalid(f"bias as a tuple must hold two tensors (either may be None), got {len(parts)}")
    out = []
    for i, b in enumerate(parts):
        if b is not None:
            out.append(check_tensor(f"bias[{i}]" if len(parts) > 1 else "bias", b, dtypes=(dtype,), ndim=2,
                                    shape=(num_tokens, hidden), device=device))
    return out


def _group_of_mpi_comm(comm: object) -> dist.ProcessGroup:
    """The torch group of an mpi4py communicator: the default group when ``comm`` lists its ranks in order."""
    if not all(hasattr(comm, name) for name in ("Get_rank", "Get_size", "allgather")):
        raise TypeError(f"comm must be an mpi4py communicator (Get_rank, Get_size, allgather), got {type(comm).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("epcomm.Buffer(comm=...) moves data with torch.distributed: call dist.init_process_group "
                           "first (for example with epcomm.launch), then pass comm or the matching group")
    ranks = list(comm.allgather(dist.get_rank()))
    if ranks != list(range(dist.get_world_size())):
        raise ValueError(f"epcomm.Buffer(comm=...): this communicator holds torch ranks {ranks}, not the default group "
                         f"0..{dist.get_world_size() - 1} in order; create the group on every rank with "
                         f"dist.new_group({ranks}) and pass it as Buffer(group, ...)")
    return dist.group.WORLD


def _check_config(config: object) -> None:
    if config is not None and not isinstance(config, Config):
        raise Invalid(f"config must be an epcomm.Config or None, got {describe(config)}")


def _config_signature(config: object) -> dict[str, int]:
    """The Config fields every rank must share (the kernels lay out peer memory from them)."""
    if not isinstance(config, Config):
        return {}  # None (the backend's default), or invalid: reported by _check_config
    return dict(config_num_sms=config.num_sms, config_nvl_send_tokens=config.num_max_nvl_chunked_send_tokens,
                config_nvl_recv_tokens=config.num_max_nvl_chunked_recv_tokens,
                config_rdma_send_tokens=config.num_max_rdma_chunked_send_tokens,
                config_rdma_recv_tokens=config.num_max_rdma_chunked_recv_tokens)


def _check_layout_consistent(
    expected: DispatchLayout | None,
    is_token_in_rank: torch.Tensor,
    num_tokens_per_rank: torch.Tensor,
    num_tokens_per_rdma_rank: torch.Tensor | None,
    num_tokens_per_expert: torch.Tensor | None,
    topo: Topology,
) -> None:
    """The layout tensors must describe the same routing (and match topk_idx when given)."""
    if expected is not None and not torch.equal(expected.is_token_in_rank, is_token_in_rank):
        raise Invalid("is_token_in_rank does not match topk_idx; compute both with get_dispatch_layout(topk_idx)")
    if not torch.equal(is_token_in_rank.sum(0, dtype=torch.int32), num_tokens_per_rank):
        raise Invalid("num_tokens_per_rank does not match is_token_in_rank; pass get_dispatch_layout's outputs unchanged")
    if num_tokens_per_rdma_rank is not None and topo.num_nodes > 1:
        if not torch.equal(token_node_mask(is_token_in_rank, topo).sum(0, dtype=torch.int32), num_tokens_per_rdma_rank):
            raise Invalid("num_tokens_per_rdma_rank does not match is_token_in_rank")
    if expected is not None and not torch.equal(expected.num_tokens_per_expert, num_tokens_per_expert):
        raise Invalid("num_tokens_per_expert does not match topk_idx; pass get_dispatch_layout's outputs unchanged")


