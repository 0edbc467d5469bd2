"""The torch.distributed backend: dispatch and combine from plain collectives.

Works on any process group (gloo on CPU, NCCL on GPU) and is the reference
every kernel backend is checked against. Two algorithms, identical results:

* ``flat``: one exchange; a token travels once to each rank that needs it.
* ``two_hop``: a token crosses nodes once per destination node, to the rank
  with the same local index there (its *forwarder*), which forwards it inside
  the node. Combine runs backwards: the forwarder sums its node's rows (fp32)
  and sends one partial row per (token, node) back across nodes.

Combine arithmetic is fixed so both algorithms agree bit for bit: for each
token, ``acc = 0``; for each node ``n`` ascending, ``partial = 0``, then
``partial += float32(row_d)`` for each rank ``d`` of ``n`` ascending that
holds a row of the token, then ``acc += partial``; finally one cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._comm import GroupComm
from .._wire import Field, RowFormat
from ..layout import token_node_mask
from ..topology import Topology

__all__ = ["TorchBackend", "FlatPlan", "TwoHopPlan"]

NVL_MASK = "nvl_mask"


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _segments(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


def _scatter_rows(rows: torch.Tensor, positions: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[positions[i]] = rows[i]``: put rows back where a gather took them from."""
    out = rows.new_empty((num_rows, *rows.shape[1:]))
    out[positions] = rows
    return out


@dataclass
class FlatPlan:
    """Routing of one dispatch under the flat algorithm (kept in the handle)."""

    num_tokens: int
    send_token_idx: torch.Tensor  # [num_sent] int64, grouped by destination rank ascending
    send_counts: list[int]  # rows to each rank
    recv_counts: list[int]  # rows from each rank


@dataclass
class TwoHopPlan:
    """Routing of one dispatch under the two-hop algorithm (kept in the handle)."""

    num_tokens: int
    # hop 1, source -> forwarder (same local index on each destination node)
    hop1_token_idx: torch.Tensor  # [num_hop1_sent] int64, grouped by destination node ascending
    hop1_send_counts: list[int]
    hop1_recv_counts: list[int]
    # hop 2, forwarder -> destination rank inside the node
    fwd_row_idx: torch.Tensor  # [num_hop2_sent] positions in the hop-1 rows, grouped by destination
    hop2_send_counts: list[int]
    hop2_recv_counts: list[int]
    recv_order: torch.Tensor  # hop-2 arrival position of each received row, in final order

    @property
    def num_hop1_recv(self) -> int:
        return sum(self.hop1_recv_counts)

    @property
    def num_recv(self) -> int:
        return sum(self.hop2_recv_counts)


class TorchBackend:
    """Dispatch/combine over a process group. Buffer validates; this moves data."""

    name = "torch"

    def __init__(self, comm: GroupComm, topo: Topology, algorithm: str) -> None:
        self.comm = comm
        self.topo = topo
        self.algorithm = algorithm

    # ----------------------------------------------------------------- dispatch
    def dispatch(
        self,
        tensors: dict[str, torch.Tensor],
        fmt: RowFormat,
        is_token_in_rank: torch.Tensor,
        counts: torch.Tensor,
        node_counts: torch.Tensor,
    ) -> tuple[torch.Tensor, FlatPlan | TwoHopPlan]:
        """Send each token's row to every rank in ``is_token_in_rank``.

        Args:
            tensors: per-token ``[N, width]`` tensors named by ``fmt``'s fields.
            is_token_in_rank: ``[N, world_size]`` bool.
            counts: ``[world_size, world_size]`` int64, ``counts[s, d]`` tokens rank s sends rank d.
            node_counts: ``[world_size, num_nodes]`` int64, tokens rank s sends to node n.
        Returns:
            ``uint8 [num_recv, fmt.row_bytes]`` rows ordered by source rank, then token,
            and the plan that cached dispatch and combine reuse.
        """
        if self.algorithm == "flat":
            return self._dispatch_flat(tensors, fmt, is_token_in_rank, counts)
        return self._dispatch_two_hop(tensors, fmt, is_token_in_rank, counts, node_counts)

    def dispatch_cached(
        self, tensors: dict[str, torch.Tensor], fmt: RowFormat, plan: FlatPlan | TwoHopPlan,
        op: str = "cached dispatch",
    ) -> torch.Tensor:
        """Dispatch along an earlier dispatch's routing (no count exchange)."""
        if isinstance(plan, FlatPlan):
            send = fmt.pack(tensors, rows=plan.send_token_idx)
            return self.comm.all_to_all_rows(op, "rows", send, plan.send_counts, plan.recv_counts, fmt.payload_bytes)
        send = fmt.pack(tensors, rows=plan.hop1_token_idx)
        hop1 = self.comm.all_to_all_rows(
            op, "network hop", send, plan.hop1_send_counts, plan.hop1_recv_counts, fmt.payload_bytes
        )
        return self._forward(op, hop1.index_select(0, plan.fwd_row_idx), fmt, plan)

    def _dispatch_flat(self, tensors, fmt, is_token_in_rank, counts) -> tuple[torch.Tensor, FlatPlan]:
        me = self.topo.rank
        dest_token = is_token_in_rank.t().nonzero()  # (rank, token), rank-major
        plan = FlatPlan(
            num_tokens=is_token_in_rank.size(0),
            send_token_idx=dest_token[:, 1].contiguous(),
            send_counts=counts[me].tolist(),
            recv_counts=counts[:, me].tolist(),
        )
        return self.dispatch_cached(tensors, fmt, plan, op="dispatch"), plan

    def _dispatch_two_hop(self, tensors, fmt, is_token_in_rank, counts, node_counts):
        topo, me = self.topo, self.topo.rank
        num_tokens, nvl = is_token_in_rank.size(0), topo.num_nvl_ranks

        # Hop 1: one row per (token, destination node), to this rank's rail peer there.
        node_token = token_node_mask(is_token_in_rank, topo).t().nonzero()  # (node, token), node-major
        hop1_token_idx, hop1_node = node_token[:, 1].contiguous(), node_token[:, 0]
        nvl_mask = is_token_in_rank.view(num_tokens, topo.num_nodes, nvl)[hop1_token_idx, hop1_node]
        hop1_fmt = RowFormat(fmt.fields + [Field(NVL_MASK, torch.uint8, nvl)])
        hop1_tensors = {f.name: tensors[f.name].index_select(0, hop1_token_idx) for f in fmt.fields}
        hop1_tensors[NVL_MASK] = nvl_mask.to(torch.uint8)
        rail = set(topo.rail_ranks(topo.local_rank))
        hop1_send_counts = [int(node_counts[me, topo.node_of(r)]) if r in rail else 0 for r in range(topo.world_size)]
        hop1_recv_counts = [int(node_counts[s, topo.node]) if s in rail else 0 for s in range(topo.world_size)]
        hop1 = self.comm.all_to_all_rows(
            "dispatch", "network hop", hop1_fmt.pack(hop1_tensors), hop1_send_counts, hop1_recv_counts,
            fmt.payload_bytes,
        )

        # Hop 2: the forwarder sends each arrived row to the ranks of its node that need it.
        dest_row = hop1_fmt.unpack(hop1, NVL_MASK).t().nonzero()  # (local dest, hop-1 row)
        fwd_row_idx = dest_row[:, 1].contiguous()
        per_local_dest = torch.bincount(dest_row[:, 0], minlength=nvl).tolist()
        node_ranks = topo.node_ranks(topo.node)
        hop2_send_counts = [0] * topo.world_size
        hop2_recv_counts = [0] * topo.world_size
        # rows reaching me from source (m, l) arrive via forwarder (my node, l), node m ascending
        from_source = counts[:, me].view(topo.num_nodes, nvl)  # [source node, source local]
        for local in range(nvl):
            hop2_send_counts[node_ranks[local]] = per_local_dest[local]
            hop2_recv_counts[node_ranks[local]] = int(from_source[:, local].sum())

        # Arrival order is (forwarder local l, source node m); final order is source rank m*L + l.
        chunk_start = _exclusive_cumsum(from_source.sum(0))  # [L]
        block_start = chunk_start.unsqueeze(0) + _exclusive_cumsum(from_source)  # [M, L]
        lengths = from_source.flatten()
        starts = block_start.flatten().repeat_interleave(lengths)
        within = torch.arange(int(lengths.sum())) - _exclusive_cumsum(lengths).repeat_interleave(lengths)
        plan = TwoHopPlan(
            num_tokens=num_tokens,
            hop1_token_idx=hop1_token_idx,
            hop1_send_counts=hop1_send_counts,
            hop1_recv_counts=hop1_recv_counts,
            fwd_row_idx=fwd_row_idx,
            hop2_send_counts=hop2_send_counts,
            hop2_recv_counts=hop2_recv_counts,
            recv_order=(starts + within).to(is_token_in_rank.device),
        )
        return self._forward("dispatch", hop1.index_select(0, fwd_row_idx)[:, : fmt.row_bytes], fmt, plan), plan

    def _forward(self, op: str, send: torch.Tensor, fmt: RowFormat, plan: TwoHopPlan) -> torch.Tensor:
        hop2 = self.comm.all_to_all_rows(
            op, "nvlink hop", send.contiguous(), plan.hop2_send_counts, plan.hop2_recv_counts,
            fmt.payload_bytes,
        )
        return hop2.index_select(0, plan.recv_order)

    # ------------------------------------------------------------------ combine
    def combine(
        self, tensors: dict[str, torch.Tensor], fmt: RowFormat, plan: FlatPlan | TwoHopPlan
    ) -> dict[str, torch.Tensor]:
        """Return each received row to its source and sum per token (fp32, fixed order).

        Args:
            tensors: ``[num_recv, width]`` tensors, rows in dispatch's receive order.
            fmt: their row format; every field is summed.
        Returns:
            per field, ``float32 [num_tokens, width]`` sums (not yet cast).
        """
        if isinstance(plan, FlatPlan):
            return self._combine_flat(tensors, fmt, plan)
        return self._combine_two_hop(tensors, fmt, plan)

    def _combine_flat(self, tensors, fmt, plan: FlatPlan) -> dict[str, torch.Tensor]:
        topo = self.topo
        back = self.comm.all_to_all_rows(
            "combine", "rows", fmt.pack(tensors), plan.recv_counts, plan.send_counts, fmt.payload_bytes
        )
        rows = {f.name: fmt.unpack(back, f.name) for f in fmt.fields}
        segments = _segments(plan.send_counts)
        acc = {f.name: rows[f.name].new_zeros((plan.num_tokens, f.width), dtype=torch.float32) for f in fmt.fields}
        for node in range(topo.num_nodes):
            node_segments = [segments[r] for r in topo.node_ranks(node) if segments[r][1] > segments[r][0]]
            if not node_segments:
                continue
            tokens = torch.cat([plan.send_token_idx[lo:hi] for lo, hi in node_segments]).unique(sorted=True)
            slot = torch.full((plan.num_tokens,), -1, dtype=torch.int64, device=tokens.device)
            slot[tokens] = torch.arange(tokens.numel(), device=tokens.device)
            for f in fmt.fields:
                partial = acc[f.name].new_zeros((tokens.numel(), f.width))
                for lo, hi in node_segments:
                    partial.index_add_(0, slot[plan.send_token_idx[lo:hi]], rows[f.name][lo:hi].float())
                acc[f.name].index_add_(0, tokens, partial)
        return acc

    def _combine_two_hop(self, tensors, fmt, plan: TwoHopPlan) -> dict[str, torch.Tensor]:
        # Back over NVLink to the forwarders, in the order hop 2 delivered the rows.
        arrival = {name: _scatter_rows(t, plan.recv_order, plan.num_recv) for name, t in tensors.items()}
        back2 = self.comm.all_to_all_rows(
            "combine", "nvlink hop", fmt.pack(arrival), plan.hop2_recv_counts, plan.hop2_send_counts,
            fmt.payload_bytes,
        )
        # The forwarder's node-local partial sum, in fp32, destination ranks ascending.
        partial_fmt = RowFormat([Field(f.name, torch.float32, f.width, f.payload) for f in fmt.fields])
        partial = {}
        for f in fmt.fields:
            rows = fmt.unpack(back2, f.name)
            acc = rows.new_zeros((plan.num_hop1_recv, f.width), dtype=torch.float32)
            for lo, hi in _segments([c for c in plan.hop2_send_counts if c]):
                acc.index_add_(0, plan.fwd_row_idx[lo:hi], rows[lo:hi].float())
            partial[f.name] = acc
        back1 = self.comm.all_to_all_rows(
            "combine", "network hop", partial_fmt.pack(partial), plan.hop1_recv_counts, plan.hop1_send_counts,
            partial_fmt.payload_bytes,
        )
        # Across nodes at the source: node partials ascending.
        out = {}
        for f in fmt.fields:
            rows = partial_fmt.unpack(back1, f.name)
            acc = rows.new_zeros((plan.num_tokens, f.width))
            for lo, hi in _segments([c for c in plan.hop1_send_counts if c]):
                acc.index_add_(0, plan.hop1_token_idx[lo:hi], rows[lo:hi])
            out[f.name] = acc
        return out
