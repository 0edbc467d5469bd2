"""``Buffer``: the expert-parallel dispatch/combine API (DeepEP normal-mode contract)."""

from __future__ import annotations

import itertools
from typing import Union

import torch
import torch.distributed as dist

from ._agree import FP8_KIND as _FP8_KIND
from ._agree import X_KINDS as _X_KINDS
from ._agree import agree
from ._comm import GroupComm
from ._validate import Invalid, check_hidden_for_fp8, check_tensor, check_topk_idx, describe, is_fp8_pair
from ._agree import ALGORITHM_NAMES, OPERATION_NAMES
from .backends import agree_available, backend_class, resolve_backend
from .backends.base import BackendOptions, DispatchCall
from .config import Config
from .errors import EpcommInputError
from .event import EventOverlap
from .handle import DispatchHandle
from .layout import DispatchLayout, compute_layout, token_node_mask
from .placement import ExpertPlacement, check_num_experts
from .topology import Topology
from .traffic import TrafficStats

__all__ = ["Buffer", "FP8Tensor"]

FP8Tensor = tuple[torch.Tensor, torch.Tensor]
"""FP8 rows: ``(float8_e4m3fn [N, H], float32 scales [N, H // 128])``."""
XTensor = Union[torch.Tensor, FP8Tensor]

_OPERATIONS = {name: code for code, name in OPERATION_NAMES.items()}  # the call signature's codes
_ALGORITHMS = {name: code for code, name in ALGORITHM_NAMES.items()}
_buffer_ids = itertools.count(1)


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

    Args:
        group: the process group (``None``: the default group).
        num_nvl_bytes: NVLink buffer bytes for the kernel backends (see
            :meth:`Config.get_nvl_buffer_size_hint`); unused by ``"torch"``.
        num_rdma_bytes: network buffer bytes for the kernel backends; unused by ``"torch"``.
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
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        *,
        backend: str = "auto",
        num_nvl_ranks: int | None = None,
        max_nodes_per_token: int = 4,
        algorithm: str = "auto",
        timeout_s: float = 30.0,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("epcomm.Buffer needs torch.distributed: call dist.init_process_group first")
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
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.max_nodes_per_token = max_nodes_per_token
        self.algorithm = algorithm
        self.timeout_s = timeout_s
        self.backend = resolve_backend(backend)
        self.traffic = TrafficStats()
        self._comm = GroupComm(self.group, self.topology, timeout_s, self.traffic)
        options = BackendOptions(num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, algorithm=algorithm,
                                 max_nodes_per_token=max_nodes_per_token, timeout_s=timeout_s)
        impl_class = backend_class(self.backend)
        impl_class.check_options(self.topology, options)  # the same verdict on every rank (same arguments)
        agree_available(self._comm, self.backend)  # every rank raises, or none
        self._impl = impl_class(self._comm, self.topology, options)
        self._id = next(_buffer_ids)
        self._layout_seq = 0

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

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A reasonable dispatch :class:`Config` for ``num_ranks`` ranks."""
        return Config.default(num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """A reasonable combine :class:`Config` for ``num_ranks`` ranks."""
        return Config.default(num_ranks)

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
            EpcommInputError: on this rank only (this call is local) if the inputs are invalid.
        """
        self._wait(previous_event)
        try:
            check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2)
            self._check_num_experts(num_experts)
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
                an FP8 tuple ``(float8_e4m3fn [num_tokens, hidden], float32 scales [num_tokens, hidden // 128])``.
            handle: from an earlier dispatch: reuse its routing (cached mode; pass no layout tensors).
            num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert:
                from :meth:`get_dispatch_layout` on the same ``topk_idx``.
            topk_idx: ``[num_tokens, num_topk]`` torch.int64, ``-1`` for none (optional).
            topk_weights: ``[num_tokens, num_topk]`` torch.float32 (optional, needs topk_idx).
            expert_alignment: round each per-expert receive count up to a multiple of this.
            config: kernel tuning (:class:`Config`), the same on every rank; validated, unused by the
                torch backend; the kernel backends default to their own (see ``README``: Backends).
        Returns:
            ``recv_x``: ``[num_recv, hidden]`` like ``x`` (an FP8 tuple for FP8 input): one row per
            (token, this rank) pair, ordered by source rank, then source token index;
            ``recv_topk_idx``: ``[num_recv, num_topk]`` int64, this rank's experts as local ids, others ``-1``;
            ``recv_topk_weights``: ``[num_recv, num_topk]`` float32, ``0`` where recv_topk_idx is ``-1``;
            ``num_recv_tokens_per_expert_list``: one int per local expert, rounded up to expert_alignment;
            ``handle``: for cached dispatch and combine;
            ``event``. In cached mode only ``recv_x`` and ``event`` are set; the rest are ``None``.

        Every rank ``d`` receives from every rank ``s`` the rows ``x_s[t]`` with
        ``is_token_in_rank_s[t, d]``, for ``s`` ascending and ``t`` ascending::

            recv_x_d = cat([x_s[is_token_in_rank_s[:, d]] for s in range(world_size)])
        """
        self._wait(previous_event)
        if handle is not None:
            return self._cached_dispatch(x, handle, num_tokens_per_rank, is_token_in_rank, topk_idx, config)

        op = "dispatch"
        problem, prepared = None, None
        try:
            prepared = self._prepare_dispatch(
                x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, config,
            )
        except Exception as err:  # any failure here must reach the peers, not strand them
            problem = _problem_text(err)
        signature = dict(operation=_OPERATIONS[op], **self._common_signature(), **_config_signature(config))
        counts = None
        if prepared is not None:
            signature.update(prepared["signature"])
            counts = prepared["counts"]
        gathered = agree(self._comm, op, problem, signature, counts, self._device_of(x))
        world, nodes = self.group_size, self.num_nodes
        tensors = prepared["tensors"]
        placement = prepared["placement"]  # None without topk_idx
        recv, plan = self._impl.dispatch(DispatchCall(
            tensors, prepared["is_token_in_rank"], gathered[:, :world], gathered[:, world : world + nodes],
            placement, config))
        self._layout_seq += 1
        recv_x = self._unpack_x(recv)
        recv_topk_idx = recv_topk_weights = None
        num_recv_per_expert: list[int] = []
        if placement is not None:
            recv_topk_idx, recv_topk_weights, num_recv_per_expert = self._localize_experts(
                recv["topk_idx"], recv.get("topk_weights"), placement, expert_alignment)
        new_handle = DispatchHandle(
            is_token_in_rank=prepared["is_token_in_rank"],
            num_recv_tokens_per_rank=gathered[:, self.rank].clone(),
            num_tokens=prepared["num_tokens"],
            num_recv_tokens=recv["x"].size(0),
            hidden=prepared["hidden"],
            layout_seq=self._layout_seq,
            buffer_id=self._id,
            plan=plan,
        )
        event = EventOverlap.capture(recv["x"].device)
        return recv_x, recv_topk_idx, recv_topk_weights, num_recv_per_expert, new_handle, event

    def _prepare_dispatch(
        self, x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
        num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, config,
    ) -> dict:
        topo = self.topology
        _check_config(config)
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise Invalid(f"expert_alignment must be a positive int, got {expert_alignment!r}")
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
            check_topk_idx(topk_idx, num_experts)
            num_topk = topk_idx.size(1)
            tensors["topk_idx"] = topk_idx
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2,
                             shape=(num_tokens, num_topk), device=device)
                tensors["topk_weights"] = topk_weights
            expected = compute_layout(topk_idx, num_experts, topo)
        elif topk_weights is not None:
            raise Invalid("topk_weights was given without topk_idx")
        _check_layout_consistent(expected, is_token_in_rank, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                 num_tokens_per_expert, topo)
        self._check_node_cap(is_token_in_rank)
        node_counts = torch.zeros(topo.world_size, dtype=torch.int64)
        node_counts[: topo.num_nodes] = token_node_mask(is_token_in_rank, topo).sum(0).cpu()
        counts = torch.cat([num_tokens_per_rank.to(torch.int64).cpu(), node_counts])
        self._impl.check_dispatch(tensors, num_topk, config=config)
        return {
            "tensors": tensors,
            "is_token_in_rank": is_token_in_rank,
            "counts": counts,
            "num_tokens": num_tokens,
            "hidden": hidden,
            "placement": placement,
            "signature": dict(num_experts=num_experts, hidden=hidden, x_kind=x_kind, num_topk=num_topk,
                              has_topk_weights=int(topk_weights is not None)),
        }

    def _cached_dispatch(self, x, handle, num_tokens_per_rank, is_token_in_rank, topk_idx, config):
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
            problem = _problem_text(err)
        seq = handle.layout_seq if isinstance(handle, DispatchHandle) else -1
        hidden = tensors["x"].size(1) if tensors is not None else -1
        signature = dict(operation=_OPERATIONS[op], handle=seq, hidden=hidden, x_kind=x_kind, **self._common_signature(),
                         **_config_signature(config))
        agree(self._comm, op, problem, signature, None, self._device_of(x))
        recv = self._impl.dispatch_cached(tensors, handle.plan, config=config)
        return self._unpack_x(recv), None, None, None, None, EventOverlap.capture(recv["x"].device)

    # --------------------------------------------------------------- combine
    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Send each received row back to its token's rank and sum per token.

        Args:
            x: ``[num_recv, hidden]`` torch.bfloat16 (float16/float32 accepted), rows in the
                order dispatch returned them (``handle.num_recv_tokens`` rows).
            handle: from the dispatch that delivered these rows.
            topk_weights: ``[num_recv, num_topk]`` torch.float32, summed the same way (optional).
        Returns:
            ``combined_x``: ``[num_tokens, hidden]``, x's dtype: for each original token the sum of
            the rows that came from it, accumulated in float32 (nodes ascending, and inside each
            node ranks ascending; see the torch backend's module docs) and cast once;
            ``combined_topk_weights``: ``[num_tokens, num_topk]`` float32 or ``None``; ``event``.
        """
        self._wait(previous_event)
        op = "combine"
        problem, tensors, x_kind, hidden = None, {}, -1, -1
        try:
            self._check_handle(handle)
            _check_config(config)
            dtype = x.dtype if isinstance(x, torch.Tensor) else None
            if dtype not in _X_KINDS:
                raise Invalid(
                    f"combine's x must be a bfloat16, float16 or float32 tensor, got {describe(x)}"
                    + (" (combine takes no FP8 tuple; send expert outputs in bf16)" if isinstance(x, tuple) else "")
                )
            check_tensor("x", x, dtypes=tuple(_X_KINDS), ndim=2, shape=(handle.num_recv_tokens, None))
            x_kind, hidden = _X_KINDS[dtype], x.size(1)
            tensors["x"] = x
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2,
                             shape=(handle.num_recv_tokens, None), device=x.device)
                tensors["topk_weights"] = topk_weights
            self._impl.check_combine(tensors, handle.plan, config=config)
        except Exception as err:
            problem = _problem_text(err)
        seq = handle.layout_seq if isinstance(handle, DispatchHandle) else -1
        signature = dict(operation=_OPERATIONS[op], handle=seq, hidden=hidden, x_kind=x_kind,
                         has_topk_weights=int(topk_weights is not None), **self._common_signature(),
                         **_config_signature(config))
        agree(self._comm, op, problem, signature, None, self._device_of(x))
        sums = self._impl.combine(tensors, handle.plan, config=config)
        # copy=True: the sums live in the backend's scratch, reused by the next call
        combined_x = sums["x"].to(x.dtype, copy=True)
        combined_weights = sums["topk_weights"].clone() if "topk_weights" in sums else None
        return combined_x, combined_weights, EventOverlap.capture(combined_x.device)

    # --------------------------------------------------------------- helpers
    def _common_signature(self) -> dict[str, int]:
        return dict(num_nvl_ranks=self.topology.num_nvl_ranks, max_nodes_per_token=self.max_nodes_per_token,
                    algorithm=_ALGORITHMS[self.algorithm])

    def _check_num_experts(self, num_experts: int) -> None:
        check_num_experts(num_experts, self.group_size)  # raises Invalid, agreed across ranks by the caller

    def _check_handle(self, handle: object) -> None:
        if not isinstance(handle, DispatchHandle):
            raise Invalid(f"handle must be the DispatchHandle returned by dispatch, got {describe(handle)}")
        if handle.buffer_id != self._id:
            raise Invalid("handle was made by a different Buffer; use the Buffer that dispatched")

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
        """Tensors (``x``, and ``scales`` for FP8), num_tokens, hidden and kind code of dispatch's ``x``."""
        if is_fp8_pair(x):
            data, scales = x
            check_tensor("x[0] (FP8 data)", data, dtypes=(torch.float8_e4m3fn,), ndim=2)
            num_tokens, hidden = data.shape
            check_hidden_for_fp8(hidden)
            check_tensor("x[1] (FP8 scales)", scales, dtypes=(torch.float32,), ndim=2,
                         shape=(num_tokens, hidden // 128), device=data.device)
            return {"x": data, "scales": scales}, num_tokens, hidden, _FP8_KIND
        if isinstance(x, tuple):
            raise Invalid(
                "x as a tuple must be (float8_e4m3fn data [N, H], float32 scales [N, H/128]); got "
                + ", ".join(describe(t) for t in x)
            )
        check_tensor("x", x, dtypes=tuple(_X_KINDS), ndim=2)
        num_tokens, hidden = x.shape
        return {"x": x}, num_tokens, hidden, _X_KINDS[x.dtype]

    @staticmethod
    def _unpack_x(recv: dict[str, torch.Tensor]) -> XTensor:
        if "scales" in recv:
            return recv["x"], recv["scales"]
        return recv["x"]

    def _localize_experts(
        self, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, placement: ExpertPlacement,
        expert_alignment: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """This rank's view of the received rows' experts.

        Args:
            topk_idx: ``[num_recv, num_topk]`` int64: global expert ids, ``-1`` for none; or, from a
                backend with ``local_expert_ids``, already local ids (``-1`` elsewhere, weights zeroed).
            topk_weights: ``[num_recv, num_topk]`` float32, or ``None``.
            expert_alignment: round each per-expert count up to a multiple of this.
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
        per_expert = torch.bincount(recv_topk_idx[mine], minlength=placement.num_local_experts).tolist()
        aligned = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in per_expert]
        return recv_topk_idx, recv_topk_weights, aligned

    @staticmethod
    def _wait(previous_event: EventOverlap | None) -> None:
        if previous_event is not None:
            previous_event.current_stream_wait()

    @staticmethod
    def _device_of(x: object) -> torch.device:
        t = x[0] if isinstance(x, tuple) and x and isinstance(x[0], torch.Tensor) else x
        return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


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


def _problem_text(err: Exception) -> str:
    if isinstance(err, Invalid):
        return str(err)
    return f"{type(err).__name__}: {err}"
