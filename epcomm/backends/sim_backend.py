"""The ``sim`` backend's runtime plumbing: epcomm's kernels on the CPU, one process per rank.

:class:`SimBackend` sets up the device runtime of ``epcomm._C`` (csrc/runtime/cpu_runtime.cpp) on
every rank of an NVLink domain, collectively:

1. the ranks agree on a run token (rank 0's random bytes): it names every rank's shared-memory
   segment (``/dev/shm/epcomm-<token>-<rank>``), so any rank can remove all of them on failure;
2. each rank allocates its peer-visible buffer and the ranks all-gather the handles;
3. each rank maps every peer's buffer; once all ranks report success the names are unlinked, so
   nothing is left in ``/dev/shm`` after the processes exit, even after a SIGKILL.

Every exchange goes through :class:`~epcomm._comm.GroupComm`, so a peer that does not arrive within
the buffer's timeout makes every other rank raise :class:`~epcomm.EpcommTimeoutError` naming the
stage. A rank that fails locally (say ``/dev/shm`` is full) makes every rank raise
:class:`~epcomm.EpcommError` with that rank's message.

Kernels run through :meth:`SimBackend.run_kernel`: ``"peer_barrier"`` (:meth:`SimBackend.barrier`)
and the intranode kernels ``"intranode_notify"``, ``"intranode_dispatch"``, ``"intranode_combine"``
(csrc/runtime/cpu_intranode.cpp). :class:`SimDispatchBackend` builds dispatch and combine on them
with TorchBackend's interface; ``Buffer(backend="sim")`` uses it (one node only).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from .._comm import GroupComm
from .._ext import load_extension
from .._validate import Invalid
from ..config import Config
from ..errors import EpcommBackendUnavailable, EpcommError
from ..topology import Topology

__all__ = ["SimBackend", "SimDispatchBackend", "SimPlan", "SIM_KERNEL_CONFIG", "SIM_DEFAULT_CONFIG", "kernel_config_of"]

_TOKEN_BYTES = 12  # 24 hex digits in segment names
_MESSAGE_BYTES = 240  # per-rank failure message carried by the setup exchanges


class SimBackend:
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
        if topo.num_nodes != 1:
            raise EpcommBackendUnavailable(
                f"{self.backend_name} backend is intranode-only for now: this group has {topo.num_nodes} nodes "
                f"({topo.world_size} ranks, {topo.num_nvl_ranks} per node); use num_nvl_ranks=world_size or "
                f"backend='torch'"
            )
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
        try:
            self._set_up()
        except BaseException:
            self._clean_up_failed_setup()
            raise

    # ------------------------------------------------------------ set-up
    def _gather_bytes(self, stage: str, payload: bytes, size: int) -> list[bytes]:
        """All-gather ``size`` bytes from every rank (through GroupComm: deadlines apply)."""
        return self.comm.all_gather_bytes(self._op, stage, payload, size)

    def _gather_status(self, stage: str, error: str | None, payload: bytes = b"", size: int = 0) -> list[bytes]:
        """All-gather (ok flag, failure message, payload); raise on every rank if any rank failed."""
        message = (error or "").encode()[: _MESSAGE_BYTES - 1]
        rows = self._gather_bytes(stage, bytes([error is None]) + message.ljust(_MESSAGE_BYTES, b"\0") + payload,
                                  1 + _MESSAGE_BYTES + size)
        failed = {r: row[1 : 1 + _MESSAGE_BYTES].rstrip(b"\0").decode(errors="replace")
                  for r, row in enumerate(rows) if row[0] != 1}
        if failed:
            lines = "\n".join(f"  rank {r}: {msg}" for r, msg in sorted(failed.items()))
            unavailable = all(msg.startswith(EpcommBackendUnavailable.__name__) for msg in failed.values())
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
            self._runtime.close()
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

    def run_kernel(self, name: str, *args: int | torch.Tensor, timeout_s: float | None = None,
                   op: str | None = None) -> None:
        """Run the kernel registered as ``name`` on this rank (collective when the kernel waits on peers).

        Args:
            args: integers, or tensors (passed as their ``data_ptr()``).
            timeout_s: how long the kernel waits for peers (default: this backend's ``timeout_s``).
            op: the epcomm operation this kernel serves (``"dispatch"``, ...). With it, the kernel is a
                stage of ``op`` on the progress board: a failure names the operation, the kernel and
                the dead or late peers, and marks the process group broken (as a failed collective does).
        Raises:
            EpcommTimeoutError: a peer did not arrive in time (the message names rank and peers).
            EpcommPeerError: a peer failed first and aborted the kernel (``op`` given).
            ValueError: no such kernel, or bad arguments.
        """
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else int(a) for a in args]
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        if op is None:
            self.runtime.run_kernel(name, values, limit)
        else:
            self.comm._run(op, f"kernel {name}", lambda: self.runtime.run_kernel(name, values, limit))

    def barrier(self, timeout_s: float | None = None, op: str | None = None) -> None:
        """All ranks meet in peer memory (the ``peer_barrier`` kernel); writes before it are visible after it."""
        self.run_kernel("peer_barrier", timeout_s=timeout_s, op=op)

    def registered_kernels(self) -> list[str]:
        return list(self._ext.registered_kernels())

    def close(self) -> None:
        """Unmap every buffer; idempotent. Peers may still be using theirs."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None


# ---------------------------------------------------------------------------------------------
# Dispatch / combine on the intranode kernels (csrc/kernels/intranode.hpp through
# csrc/runtime/cpu_intranode.cpp), with the same interface as TorchBackend.

# KernelConfig of the sim backend when a call passes no Config: (num_channels, nvl_chunk_send_tokens,
# nvl_ring_tokens). Small, because every rank simulates 2 * num_channels blocks of 32 * world_size
# threads on the host's cores. A call's Config (agreed by every rank) overrides it.
SIM_KERNEL_CONFIG = (2, 6, 32)
SIM_DEFAULT_CONFIG = Config(num_sms=2 * SIM_KERNEL_CONFIG[0], num_max_nvl_chunked_send_tokens=SIM_KERNEL_CONFIG[1],
                            num_max_nvl_chunked_recv_tokens=SIM_KERNEL_CONFIG[2])
"""The :class:`~epcomm.Config` a sim call without ``config`` runs with (for buffer-size hints)."""

_Shape = tuple  # (num_local_experts, num_topk, max_row_bytes): the NvlWorkspace shape beyond num_ranks


@dataclass(frozen=True)
class _Layout:
    """Everything that places regions in the NVL buffer: the same on every rank for one call."""

    kernel: tuple[int, int, int]  # KernelConfig (num_channels, nvl_chunk_send_tokens, nvl_ring_tokens)
    shape: _Shape

    def covering(self, shape: _Shape) -> "_Layout":
        """This layout grown (element-wise) to hold rows of ``shape`` too."""
        return _Layout(self.kernel, tuple(max(a, b) for a, b in zip(self.shape, shape)))


def kernel_config_of(config: Config | None) -> tuple[int, int, int]:
    """The intranode KernelConfig a :class:`~epcomm.Config` asks for (``None``: the sim default)."""
    if config is None:
        return SIM_KERNEL_CONFIG
    return (config.num_channels, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens)


class SimPlan:
    """Routing of one sim dispatch (kept in the handle)."""

    def __init__(self, num_tokens: int, num_recv: int, is_token_in_rank: torch.Tensor,
                 recv_channel_prefix: torch.Tensor, layout: _Layout, recv_counts: list[int]) -> None:
        self.num_tokens = num_tokens
        self.num_recv = num_recv
        self.is_token_in_rank = is_token_in_rank  # [N, R] bool, contiguous, cpu
        self.recv_channel_prefix = recv_channel_prefix  # [R, C + 1] int32 from notify
        self.layout = layout
        self.send_counts = is_token_in_rank.sum(0).tolist()  # rows to each rank
        self.recv_counts = recv_counts  # rows from each rank


def _row_bytes(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    x = tensors["x"]
    scales = tensors.get("scales")
    hidden_bytes = x.size(1) * x.element_size()
    scale_bytes = scales.size(1) * scales.element_size() if scales is not None else 0
    return hidden_bytes, scale_bytes


def _dispatch_shape(tensors: dict[str, torch.Tensor], num_topk: int) -> _Shape:
    """Room for this dispatch's rows, and for a bf16 combine of the same hidden (no re-layout between them)."""
    hidden_bytes, scale_bytes = _row_bytes(tensors)
    return (0, max(num_topk, 0), max(hidden_bytes + scale_bytes, 2 * tensors["x"].size(1)))


def _combine_shape(x: torch.Tensor) -> _Shape:
    return (0, 0, x.size(1) * x.element_size())


# combine's row element types: kernels/elements.cuh ElementKind
_ELEMENT_KINDS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


class SimDispatchBackend:
    """Dispatch/combine through epcomm's intranode kernels on the CPU (one node only).

    Same methods and return conventions as :class:`~epcomm.backends.torch_backend.TorchBackend`,
    bit-identical results. The NVL buffer is allocated at construction when ``num_nvl_bytes`` is
    given (a call that needs more is rejected on every rank before anything moves, saying how much
    to give), else at the first call and grown (collectively) when a later call needs more.

    A kernel that fails (a peer died or stopped answering) raises EpcommTimeoutError /
    EpcommPeerError naming the operation, the kernel and the dead or late peers; the buffer's
    process group is then marked broken, as after any failed collective.
    """

    name = "sim"
    runtime_class = SimBackend  # the device runtime the kernels run on
    device = torch.device("cpu")  # where the kernels read and write tensors

    def __init__(self, comm: GroupComm, topo: Topology, num_nvl_bytes: int = 0, *,
                 timeout_s: float | None = None) -> None:
        if topo.num_nodes != 1:
            raise EpcommBackendUnavailable(
                f"backend '{self.name}' is intranode-only for now: this group has {topo.num_nodes} nodes "
                f"({topo.world_size} ranks, {topo.num_nvl_ranks} per node); pass num_nvl_ranks=world_size "
                f"for one node. Use backend='torch' for several nodes."
            )
        self.comm = comm
        self.topo = topo
        self.timeout_s = comm.timeout.total_seconds() if timeout_s is None else float(timeout_s)
        self._ext = load_extension("cpu")
        self.explicit_nvl_bytes = num_nvl_bytes
        self._sim: SimBackend | None = None
        self._epoch = 0
        self._last_layout: _Layout | None = None
        if num_nvl_bytes > 0:
            self._sim = self.runtime_class(comm, topo, num_nvl_bytes, timeout_s=self.timeout_s)

    # ------------------------------------------------------------ sizing and checks
    def required_bytes(self, layout: _Layout) -> int:
        """NVL bytes per rank a call of ``layout`` needs (NvlWorkspace.required_bytes)."""
        return int(self._ext.intranode_workspace_bytes(self.topo.world_size, *layout.shape, *layout.kernel))

    def _check_size(self, layout: _Layout, what: str) -> None:
        need = self.required_bytes(layout)
        if self.explicit_nvl_bytes and need > self.explicit_nvl_bytes:
            raise Invalid(
                f"the sim backend needs a {need}-byte NVL buffer for this {what} (row bytes {layout.shape[2]}, "
                f"num_topk {layout.shape[1]}, {layout.kernel[0]} channels x {layout.kernel[2]}-token rings) but "
                f"Buffer(num_nvl_bytes={self.explicit_nvl_bytes}) was given: raise num_nvl_bytes to at least "
                f"{need} (Config.get_nvl_buffer_size_hint), or pass num_nvl_bytes=0 to size it automatically"
            )

    def _check_kernel_config(self, config: Config | None) -> None:
        problem = self._ext.validate_kernel_config(self.topo.world_size, *kernel_config_of(config))
        if problem:
            raise Invalid(f"config {config} does not fit the intranode kernels: {problem}")

    def _check_device(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if t.device != self.device:
                raise Invalid(f"the {self.name} backend's kernels run on {self.device}: {name} is on {t.device}; "
                              f"move it there or use backend='torch'")

    def check_dispatch(self, tensors: dict[str, torch.Tensor], num_topk: int, plan: object = None,
                       config: Config | None = None) -> None:
        """Raise Invalid for inputs the kernels cannot take (called before the ranks agree)."""
        self._check_device(tensors)
        hidden_bytes, _ = _row_bytes(tensors)
        if hidden_bytes % 4:
            raise Invalid(f"the sim backend moves rows in 4-byte words: x rows are {hidden_bytes} bytes "
                          f"(hidden={tensors['x'].size(1)}, {tensors['x'].dtype}); use an even hidden size")
        if isinstance(plan, SimPlan):
            self._check_cached_config(plan, config, "a cached dispatch")
            layout = plan.layout.covering(_dispatch_shape(tensors, 0))
        else:
            self._check_kernel_config(config)
            layout = _Layout(kernel_config_of(config), _dispatch_shape(tensors, num_topk))
        self._check_size(layout, "dispatch")

    @staticmethod
    def _check_cached_config(plan: SimPlan, config: Config | None, what: str) -> None:
        # received rows are placed per channel: calls along a handle use the dispatch's channels
        if config is not None and kernel_config_of(config) != plan.layout.kernel:
            raise Invalid(f"{what} runs with its dispatch's kernel config (channels, chunk, ring) "
                          f"{plan.layout.kernel}, got a Config asking for {kernel_config_of(config)}; "
                          f"pass config=None or the dispatch's Config")

    def check_combine(self, tensors: dict[str, torch.Tensor], plan: object, config: Config | None = None) -> None:
        self._check_device(tensors)
        x = tensors["x"]
        if x.size(1) * x.element_size() % 4:
            raise Invalid(f"the sim backend moves rows in 4-byte words: combine's x rows are "
                          f"{x.size(1) * x.element_size()} bytes (hidden={x.size(1)}, {x.dtype}); use an even hidden size")
        weights = tensors.get("topk_weights")
        if isinstance(plan, SimPlan):
            self._check_cached_config(plan, config, "combine")
            # the NVL layout depends on the weights' width, which the ranks do not agree on: pin it to
            # the dispatch's num_topk (agreed), so every rank lays out the buffer alike
            if weights is not None and weights.size(1) != plan.layout.shape[1]:
                raise Invalid(f"the sim backend's combine takes topk_weights with the dispatch's num_topk="
                              f"{plan.layout.shape[1]} columns, got {weights.size(1)}")
            self._check_size(plan.layout.covering(_combine_shape(x)), "combine")

    # ------------------------------------------------------------ kernels
    def _ensure(self, layout: _Layout, op: str) -> SimBackend:
        """The NVL buffer, big enough for ``layout``; collective (every rank calls it with the same layout)."""
        need = self.required_bytes(layout)
        if self._sim is None or self._sim.num_nvl_bytes < need:
            if self.explicit_nvl_bytes:
                raise EpcommError(f"epcomm sim backend: the NVL buffer has {self.explicit_nvl_bytes} bytes, "
                                  f"this call needs {need}; raise Buffer(num_nvl_bytes=...) to at least {need}")
            if self._sim is not None:
                self._sim.barrier(op=op)  # nobody still uses the old buffer
                self._sim.close()
                self._sim = None
            self._sim = self.runtime_class(self.comm, self.topo, need, timeout_s=self.timeout_s)
            self._epoch = 0
            self._last_layout = None
        elif self._last_layout is not None and layout != self._last_layout:
            # The regions move with the layout: make sure no rank still works in the old one.
            self._sim.barrier(op=op)
        self._last_layout = layout
        return self._sim

    def _comm_args(self, layout: _Layout, notify: bool = False) -> list[int]:
        """The kernels' leading arguments; a notify takes the next epoch (one per notify, same on every rank)."""
        if notify:
            self._epoch += 1
        return [*layout.kernel, *layout.shape, self._epoch if notify else 0]

    def _barrier(self, sim: SimBackend, layout: _Layout, op: str) -> None:
        """notify without counts: all ranks meet and reset their ring counters."""
        sim.run_kernel("intranode_notify", *self._comm_args(layout, notify=True), 0, 0, 0, 0, 1, 0, 0, 0, op=op)

    @staticmethod
    def _ptr(t: torch.Tensor | None) -> int:
        return 0 if t is None or t.numel() == 0 else t.data_ptr()

    def _record(self, op: str, counts: list[int], payload_bytes: int, meta_bytes: int) -> None:
        """Rows this rank's kernels wrote into each peer's rings (its own included), per link class."""
        for peer, rows in enumerate(counts):
            if rows:
                self.comm.traffic.record(op, self.topo.link_to(peer), rows, rows * payload_bytes, rows * meta_bytes)

    def dispatch(self, tensors, fmt, is_token_in_rank, counts, node_counts, num_experts: int = -1,
                 config: Config | None = None):
        """See TorchBackend.dispatch; rows ordered by source rank, then token.

        ``num_experts`` (needed with ``topk_idx``): the kernel turns expert ids into this rank's
        local ids; they are turned back into global ids here, as the torch backend returns them.
        """
        world, me = self.topo.world_size, self.topo.rank
        num_topk = tensors["topk_idx"].size(1) if "topk_idx" in tensors else 0
        layout = _Layout(kernel_config_of(config), _dispatch_shape(tensors, num_topk))
        sim = self._ensure(layout, "dispatch")
        in_rank = is_token_in_rank.contiguous()
        num_tokens = in_rank.size(0)
        rank_prefix = torch.zeros(world + 1, dtype=torch.int32, device=self.device)
        channel_prefix = torch.zeros(world, layout.kernel[0] + 1, dtype=torch.int32, device=self.device)
        sim.run_kernel("intranode_notify", *self._comm_args(layout, notify=True), 1, self._ptr(in_rank), 0, num_tokens,
                       1, rank_prefix, channel_prefix, 0, op="dispatch")
        num_recv = int(rank_prefix[world])
        expected = int(counts[:, me].sum())
        if num_recv != expected:
            raise EpcommError(f"epcomm sim dispatch on rank {me}: notify counted {num_recv} rows to receive, "
                              f"the agreed counts say {expected}")
        plan = SimPlan(num_tokens, num_recv, in_rank, channel_prefix, layout, counts[:, me].tolist())
        recv = self._dispatch_rows(sim, tensors, plan, num_topk, num_experts, op="dispatch")
        if num_topk:
            experts_per_rank = num_experts // world
            local = recv["topk_idx"]
            recv["topk_idx"] = torch.where(local >= 0, local + me * experts_per_rank, local)
        return recv, plan

    def _dispatch_rows(self, sim: SimBackend, tensors, plan: SimPlan, num_topk: int, num_experts: int = 0, *,
                       layout: _Layout | None = None, op: str) -> dict[str, torch.Tensor]:
        layout = layout or plan.layout
        x = tensors["x"].contiguous()
        scales = tensors.get("scales")
        scales = scales.contiguous() if scales is not None else None
        topk_idx = tensors["topk_idx"].contiguous() if num_topk else None
        weights = tensors.get("topk_weights") if num_topk else None
        weights = weights.contiguous() if weights is not None else None
        hidden_bytes, scale_bytes = _row_bytes(tensors)
        m = plan.num_recv
        new = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=self.device)  # noqa: E731
        recv_x = new(m, x.size(1), dtype=x.dtype)
        recv_scales = new(m, scales.size(1), dtype=scales.dtype) if scales is not None else None
        recv_idx = new(m, num_topk, dtype=torch.int64) if num_topk else None
        recv_w = new(m, num_topk, dtype=torch.float32) if weights is not None else None
        src_idx = new(m, dtype=torch.int32)
        sim.run_kernel(
            "intranode_dispatch", *self._comm_args(layout),
            self._ptr(x), hidden_bytes, self._ptr(scales), scale_bytes, self._ptr(topk_idx), self._ptr(weights),
            num_topk, num_experts if num_topk else 0, plan.num_tokens, self._ptr(plan.is_token_in_rank),
            plan.recv_channel_prefix, self._ptr(recv_x), self._ptr(recv_scales), self._ptr(recv_idx),
            self._ptr(recv_w), self._ptr(src_idx), op=op,
        )
        # a slot carries the row, its source index and the top-k ids (and weights)
        meta_bytes = 4 + (8 * num_topk if num_topk else 0) + (4 * num_topk if weights is not None else 0)
        self._record(op, plan.send_counts, hidden_bytes + scale_bytes, meta_bytes)
        out = {"x": recv_x}
        if recv_scales is not None:
            out["scales"] = recv_scales
        if recv_idx is not None:
            out["topk_idx"] = recv_idx
        if recv_w is not None:
            out["topk_weights"] = recv_w
        return out

    def dispatch_cached(self, tensors, fmt, plan: SimPlan, op: str = "cached dispatch", config: Config | None = None):
        """Dispatch along an earlier dispatch's routing (a barrier, then the dispatch kernel)."""
        rows = {k: v for k, v in tensors.items() if k in ("x", "scales")}
        layout = plan.layout.covering(_dispatch_shape(rows, 0))
        sim = self._ensure(layout, op)
        self._barrier(sim, layout, op)
        return self._dispatch_rows(sim, rows, plan, 0, layout=layout, op=op)

    def combine(self, tensors, fmt, plan: SimPlan, config: Config | None = None) -> dict[str, torch.Tensor]:
        """Per field, [num_tokens, width] sums: x's dtype for ``x`` (fp32 sums rounded once), fp32 weights."""
        x = tensors["x"].contiguous()
        weights = tensors.get("topk_weights")
        weights = weights.contiguous() if weights is not None else None
        num_topk = weights.size(1) if weights is not None else 0
        layout = plan.layout.covering(_combine_shape(x))  # num_topk == layout's (check_combine)
        sim = self._ensure(layout, "combine")
        self._barrier(sim, layout, "combine")
        combined = torch.empty(plan.num_tokens, x.size(1), dtype=x.dtype, device=self.device)
        combined_w = (torch.empty(plan.num_tokens, num_topk, dtype=torch.float32, device=self.device)
                      if weights is not None else None)
        sim.run_kernel(
            "intranode_combine", *self._comm_args(layout),
            self._ptr(x), _ELEMENT_KINDS[x.dtype], self._ptr(weights), x.size(1), num_topk, plan.num_tokens,
            self._ptr(plan.is_token_in_rank), plan.recv_channel_prefix, self._ptr(combined), self._ptr(combined_w),
            op="combine",
        )
        self._record("combine", plan.recv_counts, x.size(1) * x.element_size(), 4 * num_topk)
        out = {"x": combined}
        if combined_w is not None:
            out["topk_weights"] = combined_w
        return out

    def close(self) -> None:
        if self._sim is not None:
            self._sim.close()
            self._sim = None
