"""``DispatchHandle``: what a dispatch remembers for cached dispatch and combine.

The handle is a named object, and it also reads like DeepEP's handle tuple where callers index or
unpack it (``handle[0]``, ``handle[-4]``, ``a, b, *_ = handle``): see :meth:`DispatchHandle.as_tuple`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

__all__ = ["DispatchHandle", "INTRANODE_FIELDS", "INTERNODE_FIELDS"]

# DeepEP's handle tuples, position by position (one node, several nodes)
INTRANODE_FIELDS = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
                    "is_token_in_rank", "send_head")
INTERNODE_FIELDS = ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                    "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum", "recv_gbl_channel_prefix_matrix",
                    "recv_gbl_rank_prefix_sum", "recv_src_meta", "send_rdma_head", "send_nvl_head")
_SOURCE_META_BYTES = 8  # DeepEP's per-row source record: source node (int32) and NVLink-peer bits (int32)
_MAX_NVL_PEERS = 8  # the width of DeepEP's send_nvl_head


@dataclass(frozen=True, eq=False)
class DispatchHandle:
    """The routing of one dispatch call, reused by ``dispatch(x, handle=...)`` and ``combine``.

    Treat it as opaque; the public fields are there for inspection. Indexing, ``len()`` and
    unpacking give DeepEP's handle tuple (see :meth:`as_tuple`).

    Attributes:
        is_token_in_rank: ``[num_tokens, world_size]`` bool, the routing of this rank's tokens.
        num_recv_tokens_per_rank: ``[world_size]`` int64, rows this rank received from each rank;
            ``None`` for a dispatch counted on the device (num_worst_tokens under host_sync_free or a graph
            capture: the host never read the counts, nor are :attr:`counts` known then).
        num_tokens: tokens this rank dispatched.
        num_recv_tokens: rows this rank received (counted on the device: the padded num_worst_tokens).
        hidden: hidden size of the dispatched rows.
        layout_seq: which dispatch call of its buffer produced it (1, 2, ...).
        counts: ``[world_size, world_size]`` int64, ``counts[s, d]``: tokens rank ``s`` sent rank ``d``
            (every rank's, as the ranks agreed them).
        node_counts: ``[world_size, num_nodes]`` int64, tokens rank ``s`` sent to node ``n``.
        num_nvl_ranks: ranks per node of the buffer that dispatched.
        num_channels: channels of DeepEP's per-channel matrices in :meth:`as_tuple` (the dispatch's
            ``config.num_sms // 2``, or ``Buffer.num_sms // 2`` without a config).
        num_worst_tokens: ``0``, or the row count dispatch padded its outputs to
            (``dispatch(num_worst_tokens=...)``); cached dispatch pads alike and combine takes
            either that many rows or :attr:`num_recv_tokens`.
    """

    is_token_in_rank: torch.Tensor
    num_recv_tokens_per_rank: torch.Tensor | None
    num_tokens: int
    num_recv_tokens: int
    hidden: int
    layout_seq: int
    buffer_id: int = field(repr=False)
    plan: Any = field(repr=False)  # backend-specific routing
    counts: torch.Tensor | None = field(default=None, repr=False)
    node_counts: torch.Tensor | None = field(default=None, repr=False)
    num_nvl_ranks: int = 0
    num_channels: int = 10
    num_worst_tokens: int = 0
    buffer_key: tuple = field(default=(), repr=False)  # what a Buffer must match to adopt this handle
    _tuple: list = field(default_factory=list, repr=False, compare=False)  # as_tuple(), built once

    def _set_plan(self, plan: Any) -> None:
        """An asynchronous dispatch's plan, set by its data phase (before any call can use the handle)."""
        object.__setattr__(self, "plan", plan)

    # ------------------------------------------------------------ DeepEP's tuple view
    @property
    def rank(self) -> int:
        return self.buffer_key[1] if len(self.buffer_key) > 1 else 0

    @property
    def world_size(self) -> int:
        return self.is_token_in_rank.size(1)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """DeepEP's handle tuple: 6 tensors on one node (:data:`INTRANODE_FIELDS`), 10 across nodes
        (:data:`INTERNODE_FIELDS`), with DeepEP's shapes and dtypes.

        Exact (computed from this rank's routing and the counts every rank agreed on):
        ``rank_prefix_matrix`` ``[R, R]`` int32 (column ``d``: inclusive prefix over source ranks of
        the tokens sent to ``d``, so ``rank_prefix_matrix[s, me]`` ends the rows from ``s``),
        ``recv_gbl_rank_prefix_sum`` ``[R]`` int32 (the same column for this rank),
        ``recv_rdma_rank_prefix_sum`` ``[nodes]`` int32 (inclusive prefix over source nodes of the
        tokens this rank receives over the network as forwarder), ``is_token_in_rank``, the send-side
        per-channel matrices (``channel_prefix_matrix``/``gbl_channel_prefix_matrix`` ``[R, C]``,
        ``rdma_channel_prefix_matrix`` ``[nodes, C]``: inclusive prefix over channels of the tokens to
        each rank/node, channel ``c`` holding tokens ``[c * ceil(N / C), (c + 1) * ceil(N / C))``),
        ``send_head`` / ``send_rdma_head`` (a token's index among the tokens of its channel sent to
        that rank/node, ``-1`` where not sent), and ``recv_src_meta``'s source node (first int32).

        Not tracked by epcomm (its kernels lay rings out their own way, the torch backend has no
        channels), so filled with ``-1`` in DeepEP's shape and dtype: ``recv_channel_prefix_matrix``,
        ``recv_src_idx``, ``recv_rdma_channel_prefix_matrix``, ``recv_gbl_channel_prefix_matrix``,
        ``send_nvl_head``, and ``recv_src_meta``'s NVLink-peer bits (``0``).
        """
        if not self._tuple:
            self._tuple.extend(self._build_tuple())
        return tuple(self._tuple)

    def __getitem__(self, index):
        return self.as_tuple()[index]

    def __len__(self) -> int:
        return len(INTRANODE_FIELDS) if self._num_nodes() == 1 else len(INTERNODE_FIELDS)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.as_tuple())

    def _num_nodes(self) -> int:
        nvl = self.num_nvl_ranks or self.world_size
        return max(self.world_size // nvl, 1)

    def _build_tuple(self) -> list[torch.Tensor]:
        if self.counts is None:
            raise TypeError("this DispatchHandle has no routing counts (only handles of dispatches whose counts the "
                            "host read index: not one counted on the device)")
        world, nodes = self.world_size, self._num_nodes()
        nvl = world // nodes
        me = self.rank
        in_rank = self.is_token_in_rank.cpu()
        device = self.is_token_in_rank.device
        num_tokens = in_rank.size(0)
        num_rows = max(self.num_worst_tokens, self.num_recv_tokens)
        channels = max(self.num_channels, 1)
        per_channel = -(-num_tokens // channels) if num_tokens else 1
        channel_of = torch.arange(num_tokens) // per_channel  # [N]

        def channel_prefix(mask: torch.Tensor) -> torch.Tensor:  # mask [N, K] -> [K, C] inclusive prefix
            per = torch.zeros(mask.size(1), channels, dtype=torch.int64)
            if num_tokens:
                per.index_add_(1, channel_of, mask.t().to(torch.int64))
            return per.cumsum(1).to(torch.int32)

        def send_head(mask: torch.Tensor) -> torch.Tensor:  # [N, K]: index among the channel's tokens to k
            head = torch.full(mask.shape, -1, dtype=torch.int32)
            if num_tokens:
                m = mask.to(torch.int64)
                running = m.cumsum(0) - m  # tokens to k before t
                starts = torch.arange(channels) * per_channel
                before_channel = torch.cat([torch.zeros(1, m.size(1), dtype=torch.int64), m.cumsum(0)])
                base = before_channel[starts.clamp(max=num_tokens)][channel_of]  # tokens to k before t's channel
                head = torch.where(mask, (running - base).to(torch.int32), head)
            return head

        rank_prefix = self.counts.cpu().cumsum(0).to(torch.int32)  # [R, R]
        full = lambda *shape, dtype=torch.int32: torch.full(shape, -1, dtype=dtype)  # noqa: E731
        if nodes == 1:
            parts = [rank_prefix, channel_prefix(in_rank), full(world, channels), full(num_rows), in_rank,
                     send_head(in_rank)]
        else:
            node_mask = in_rank.view(num_tokens, nodes, nvl).any(2)  # [N, nodes]
            local = me % nvl
            forwarders = [n * nvl + local for n in range(nodes)]
            recv_rdma = self.node_counts.cpu()[forwarders, me // nvl]  # rows from each node's same-index rank
            src_meta = torch.zeros(num_rows, _SOURCE_META_BYTES // 4, dtype=torch.int32)
            sources = torch.repeat_interleave(torch.arange(world), self.counts.cpu()[:, me])
            src_meta[: sources.numel(), 0] = (sources // nvl).to(torch.int32)
            parts = [in_rank, channel_prefix(node_mask), channel_prefix(in_rank), full(nodes, channels),
                     recv_rdma.cumsum(0).to(torch.int32), full(world, channels), rank_prefix[:, me].contiguous(),
                     src_meta.view(torch.uint8), send_head(node_mask),
                     full(int(recv_rdma.sum()), _MAX_NVL_PEERS)]
        return [t.to(device) for t in parts]
