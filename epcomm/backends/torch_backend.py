"""The torch.distributed backend: dispatch and combine from plain collectives.

Works on any process group (gloo on CPU, NCCL on GPU) and is the reference
every kernel backend is checked against. Two algorithms, identical results:

* ``flat``: one exchange; a token travels once to each rank that needs it.
* ``two_hop``: a token crosses nodes once per destination node, to the rank
  with the same local index there (its *forwarder*), which forwards it inside
  the node. Combine runs backwards: the forwarder sums its node's rows (fp32)
  and sends one partial row per (token, node) back across nodes, in the rows'
  dtype by default (``combine_node_partials="rows_dtype"``) or in float32.

Combine arithmetic is fixed so both algorithms agree bit for bit: for each
token, ``acc = 0``; for each node ``n`` ascending, ``partial = 0``, then
``partial += float32(row_d)`` for each rank ``d`` of ``n`` ascending that
holds a row of the token; in ``rows_dtype`` mode ``partial = float32(dtype(partial))``
(only when there are several nodes: with one, the final cast makes it a no-op);
then ``acc += partial``; finally one cast.

Speed: the token data moves without packing copies (see ``_wire``), and the
large temporaries (send rows, float32 partials and accumulators) live in a
per-Buffer scratch of a few slots, reused across calls instead of being
allocated and page-faulted afresh each time. Slot use per step:
dispatch ``a`` send rows, ``b`` network-hop arrivals, ``c`` hop-2 arrivals (hop-2 send
rows reuse ``a``); combine ``a`` rows going back (then the float32 partials
arriving), ``b`` rows arriving at the forwarder (flat: node partials), ``c``
forwarder partials, ``acc:*`` per-token sums.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .._comm import GroupComm
from .._wire import Field, RowFormat
from ..layout import token_node_mask
from ..topology import Topology
from .base import BackendOptions, DispatchBackend, DispatchCall

__all__ = ["TorchBackend", "FlatPlan", "TwoHopPlan", "release_scratch"]

NVL_MASK = "nvl_mask"
_CHUNK_ROWS = 512  # rows converted to float32 at a time when summing
# Calls whose busiest rank sends at most this many bytes move their rows packed: one collective per
# exchange instead of two (bulk, side fields). A collective's fixed cost (~0.1-0.3 ms on gloo, more
# with NCCL's launch + sync) buys a copy of about this many bytes at memory speed.
PACK_LIMIT_BYTES = 1 << 20


def _pack_rows(counts: torch.Tensor, fmt: RowFormat) -> bool:
    """Whether a call packs its rows: decided from every rank's agreed counts, so identically everywhere."""
    return int(counts.sum(1).max()) * fmt.row_bytes <= PACK_LIMIT_BYTES if counts.numel() else True


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _segments(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


class Scratch:
    """Temporaries reused across calls: a few raw byte slots, each viewed as the dtype a step needs.

    Steps that are never live at the same time share a slot, so the memory kept is a few
    row-buffers, not one per step. Each Buffer has its own: one Buffer runs one operation at a
    time, but two Buffers' asynchronous operations (``async_finish=True``) run at the same time
    on their worker threads. Results handed to the caller never live in it.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple[str, torch.device], torch.Tensor] = {}
        _SCRATCHES.add(self)

    def get(self, slot: str, rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = max(rows * width * dtype.itemsize, 1)
        raw = self._slots.get((slot, device))
        if raw is None or raw.numel() < nbytes:
            raw = self._slots[(slot, device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return raw[: rows * width * dtype.itemsize].view(dtype).view(rows, width)

    def release(self) -> None:
        self._slots.clear()


_SCRATCHES: "weakref.WeakSet[Scratch]" = weakref.WeakSet()


def release_scratch() -> None:
    """Free the reusable temporaries of every torch-backend Buffer of this process.

    The next call re-allocates what it needs. Useful between phases of a program whose shapes
    shrink, like :func:`torch.cuda.empty_cache`; not needed for correctness. Call it while no
    ``async_finish`` operation is in flight.
    """
    for scratch in list(_SCRATCHES):
        scratch.release()


def _gather_rows(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.index_select(src.reshape(src.size(0), out.size(1)), 0, idx, out=out)


@dataclass
class FlatPlan:
    """Routing of one dispatch under the flat algorithm (kept in the handle)."""

    num_tokens: int
    send_token_idx: torch.Tensor  # [num_sent] int64, grouped by destination rank ascending
    send_counts: list[int]  # rows to each rank
    recv_counts: list[int]  # rows from each rank
    pack_rows: bool = False  # small call: fields travel packed, one collective per exchange (every rank alike)


@dataclass
class TwoHopPlan:
    """Routing of one dispatch under the two-hop algorithm (kept in the handle)."""

    num_tokens: int
    # hop 1, source -> forwarder (same local index on each destination node)
    network_token_idx: torch.Tensor  # [num_network_sent] int64, grouped by destination node ascending
    network_send_counts: list[int]
    network_recv_counts: list[int]
    # hop 2, forwarder -> destination rank inside the node
    fwd_row_idx: torch.Tensor  # [num_nvlink_sent] positions in the network-hop rows, grouped by destination
    nvlink_send_counts: list[int]
    nvlink_recv_counts: list[int]
    recv_order: torch.Tensor  # hop-2 arrival position of each received row, in final order
    pack_rows: bool = False  # small call: fields travel packed, one collective per exchange (every rank alike)

    @property
    def num_network_recv(self) -> int:
        return sum(self.network_recv_counts)

    @property
    def num_recv(self) -> int:
        return sum(self.nvlink_recv_counts)


_PAYLOAD = ("x", "scales")  # token data; the other fields are routing metadata


def row_format(tensors: dict[str, torch.Tensor]) -> RowFormat:
    """The wire format of rows carrying ``tensors`` (x first: it is the bulk field)."""
    return RowFormat([Field(name, t.dtype, t.size(1), payload=name in _PAYLOAD) for name, t in tensors.items()])


class TorchBackend(DispatchBackend):
    """Dispatch/combine over a process group. Buffer validates; this moves data."""

    name = "torch"

    def low_latency(self) -> "TorchLowLatency":
        from .torch_low_latency import TorchLowLatency

        if getattr(self, "_low_latency", None) is None:
            self._low_latency = TorchLowLatency(self.comm, self.topo)
        return self._low_latency

    def __init__(self, comm: GroupComm, topo: Topology, options: BackendOptions) -> None:
        super().__init__(comm, topo, options)
        self.algorithm = options.algorithm
        self.node_partials = options.combine_node_partials
        self.scratch = Scratch()

    # ----------------------------------------------------------------- helpers
    def _gather(self, name: str, tensors: dict[str, torch.Tensor], fmt: RowFormat, idx: torch.Tensor):
        """The rows ``idx`` of every field; the bulk field lands in scratch ``name``."""
        bulk = tensors[fmt.bulk.name]
        out = {fmt.bulk.name: _gather_rows(bulk, idx, self.scratch.get(name, idx.numel(), fmt.bulk.width,
                                                                      bulk.dtype, bulk.device))}
        for f in fmt.side:
            if f.name in tensors:
                out[f.name] = tensors[f.name].index_select(0, idx)
        return out

    def _sum_rows_into(self, acc: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """``acc[slots[i]] += float32(rows[i])``, converting a chunk at a time (slots are distinct)."""
        if rows.dtype == torch.float32:
            acc.index_add_(0, slots, rows)
            return
        for lo in range(0, rows.size(0), _CHUNK_ROWS):
            hi = min(lo + _CHUNK_ROWS, rows.size(0))
            chunk = self.scratch.get("convert", hi - lo, rows.size(1), torch.float32, rows.device)
            acc.index_add_(0, slots[lo:hi], chunk.copy_(rows[lo:hi]))

    def _zeros(self, name: str, rows: int, width: int, device: torch.device) -> torch.Tensor:
        return self.scratch.get(name, rows, width, torch.float32, device).zero_()

    # ----------------------------------------------------------------- checks
    def check_dispatch(self, tensors: dict[str, torch.Tensor], num_topk: int, plan: object = None,
                       config: object = None, num_experts: int = 0) -> None:
        """Backend-specific input limits (raise ``Invalid``); the torch backend takes anything Buffer accepts."""

    def check_combine(self, tensors: dict[str, torch.Tensor], plan: object, config: object = None,
                      node_partial_dtype: torch.dtype | None = None) -> None:
        """Backend-specific input limits of combine (raise ``Invalid``); none here."""

    # ----------------------------------------------------------------- dispatch
    def dispatch(self, call: DispatchCall) -> tuple[dict[str, torch.Tensor], FlatPlan | TwoHopPlan]:
        """See :meth:`DispatchBackend.dispatch`; ``topk_idx`` comes back as global ids."""
        fmt = row_format(call.tensors)
        if self.algorithm == "flat":
            return self._dispatch_flat(call.tensors, fmt, call.is_token_in_rank, call.counts)
        return self._dispatch_two_hop(call.tensors, fmt, call.is_token_in_rank, call.counts, call.node_counts)

    def dispatch_cached(self, tensors: dict[str, torch.Tensor], plan: FlatPlan | TwoHopPlan,
                        config: object = None) -> dict[str, torch.Tensor]:
        """Dispatch along an earlier dispatch's routing (no count exchange)."""
        return self._dispatch_along(tensors, row_format(tensors), plan, "cached dispatch")

    def _dispatch_along(self, tensors: dict[str, torch.Tensor], fmt: RowFormat, plan: FlatPlan | TwoHopPlan,
                        op: str) -> dict[str, torch.Tensor]:
        if isinstance(plan, FlatPlan):
            send = self._gather("a", tensors, fmt, plan.send_token_idx)
            return self.comm.exchange_rows(op, "rows", fmt, send, plan.send_counts, plan.recv_counts,
                                           pack=plan.pack_rows)
        send = self._gather("a", tensors, fmt, plan.network_token_idx)
        network_rows = self._network_hop(op, fmt, send, plan)
        return self._forward(op, network_rows, fmt, plan)

    def _dispatch_flat(self, tensors, fmt, is_token_in_rank, counts):
        me = self.topo.rank
        dest_token = is_token_in_rank.t().nonzero()  # (rank, token), rank-major
        plan = FlatPlan(
            num_tokens=is_token_in_rank.size(0),
            send_token_idx=dest_token[:, 1].contiguous(),
            send_counts=counts[me].tolist(),
            recv_counts=counts[:, me].tolist(),
            pack_rows=_pack_rows(counts, fmt),
        )
        return self._dispatch_along(tensors, fmt, plan, "dispatch"), plan

    def _network_hop(self, op, fmt, send, plan: TwoHopPlan) -> dict[str, torch.Tensor]:
        bulk = send[fmt.bulk.name]
        out = self.scratch.get("b", plan.num_network_recv, fmt.bulk.width, bulk.dtype, bulk.device)
        return self.comm.exchange_rows(
            op, "network hop", fmt, send, plan.network_send_counts, plan.network_recv_counts, bulk_out=out,
            pack=plan.pack_rows,
        )

    def _dispatch_two_hop(self, tensors, fmt, is_token_in_rank, counts, node_counts):
        topo, me = self.topo, self.topo.rank
        num_tokens, nvl = is_token_in_rank.size(0), topo.num_nvl_ranks

        # Hop 1: one row per (token, destination node), to this rank's rail peer there.
        node_token = token_node_mask(is_token_in_rank, topo).t().nonzero()  # (node, token), node-major
        network_token_idx, network_node = node_token[:, 1].contiguous(), node_token[:, 0]
        rail = set(topo.rail_ranks(topo.local_rank))
        # rows reaching me from source (m, l) arrive via forwarder (my node, l), node m ascending
        from_source = counts[:, me].view(topo.num_nodes, nvl)  # [source node, source local]
        node_ranks = topo.node_ranks(topo.node)
        nvlink_recv_counts = [0] * topo.world_size
        for local in range(nvl):
            nvlink_recv_counts[node_ranks[local]] = int(from_source[:, local].sum())
        # Arrival order is (forwarder local l, source node m); final order is source rank m*L + l.
        chunk_start = _exclusive_cumsum(from_source.sum(0))  # [L]
        block_start = chunk_start.unsqueeze(0) + _exclusive_cumsum(from_source)  # [M, L]
        lengths = from_source.flatten()
        starts = block_start.flatten().repeat_interleave(lengths)
        within = torch.arange(int(lengths.sum())) - _exclusive_cumsum(lengths).repeat_interleave(lengths)
        plan = TwoHopPlan(
            num_tokens=num_tokens,
            network_token_idx=network_token_idx,
            network_send_counts=[int(node_counts[me, topo.node_of(r)]) if r in rail else 0 for r in range(topo.world_size)],
            network_recv_counts=[int(node_counts[s, topo.node]) if s in rail else 0 for s in range(topo.world_size)],
            fwd_row_idx=torch.empty(0, dtype=torch.int64),  # known once hop 1 has arrived
            nvlink_send_counts=[0] * topo.world_size,
            nvlink_recv_counts=nvlink_recv_counts,
            recv_order=(starts + within).to(is_token_in_rank.device),
            pack_rows=_pack_rows(counts, fmt),
        )
        network_fmt = fmt.with_field(Field(NVL_MASK, torch.uint8, nvl))
        send = self._gather("a", tensors, fmt, network_token_idx)
        send[NVL_MASK] = is_token_in_rank.view(num_tokens, topo.num_nodes, nvl)[network_token_idx, network_node].to(torch.uint8)
        network_rows = self._network_hop("dispatch", network_fmt, send, plan)

        # Hop 2: the forwarder sends each arrived row to the ranks of its node that need it.
        dest_row = network_rows.pop(NVL_MASK).t().nonzero()  # (local dest, network-hop row)
        plan.fwd_row_idx = dest_row[:, 1].contiguous()
        per_local_dest = torch.bincount(dest_row[:, 0], minlength=nvl).tolist()
        for local in range(nvl):
            plan.nvlink_send_counts[node_ranks[local]] = per_local_dest[local]
        return self._forward("dispatch", network_rows, fmt, plan), plan

    def _forward(self, op: str, network_rows: dict[str, torch.Tensor], fmt: RowFormat, plan: TwoHopPlan):
        send = self._gather("a", network_rows, fmt, plan.fwd_row_idx)  # network-hop send rows are done
        bulk = send[fmt.bulk.name]
        arrived = self.scratch.get("c", plan.num_recv, fmt.bulk.width, bulk.dtype, bulk.device)
        nvlink_rows = self.comm.exchange_rows(
            op, "nvlink hop", fmt, send, plan.nvlink_send_counts, plan.nvlink_recv_counts, bulk_out=arrived,
            pack=plan.pack_rows,
        )
        return {name: t.index_select(0, plan.recv_order) for name, t in nvlink_rows.items()}

    # ------------------------------------------------------------------ combine
    def combine(self, tensors: dict[str, torch.Tensor], plan: FlatPlan | TwoHopPlan,
                config: object = None, node_partial_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Return each received row to its source and sum per token (fp32, fixed order).

        Args:
            tensors: ``[num_recv, width]`` tensors, rows in dispatch's receive order; every one is summed.
        Returns:
            per tensor, ``float32 [num_tokens, width]`` sums (not yet cast; scratch memory,
            valid until the next call).
        """
        fmt = row_format(tensors)
        if node_partial_dtype is None:
            node_partial_dtype = fmt.bulk.dtype if self.node_partials == "rows_dtype" else torch.float32
        # the dtype each field's node partial crosses nodes in (weights: always float32); with one
        # node the final cast makes any rounding a no-op, so none is done
        partial_dtypes = {f.name: torch.float32 if self.topo.num_nodes == 1 or f.name != fmt.bulk.name
                          else node_partial_dtype for f in fmt.fields}
        if isinstance(plan, FlatPlan):
            return self._combine_flat(tensors, fmt, plan, partial_dtypes)
        return self._combine_two_hop(tensors, fmt, plan, partial_dtypes)

    def _combine_flat(self, tensors, fmt, plan: FlatPlan, partial_dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        topo = self.topo
        x = tensors[fmt.bulk.name]
        back = self.comm.exchange_rows(
            "combine", "rows", fmt, tensors, plan.recv_counts, plan.send_counts,
            bulk_out=self.scratch.get("a", sum(plan.send_counts), fmt.bulk.width, x.dtype, x.device),
            pack=plan.pack_rows,
        )
        segments = _segments(plan.send_counts)
        acc = {f.name: self._zeros(f"acc:{f.name}", plan.num_tokens, f.width, x.device) for f in fmt.fields}
        if topo.num_nodes == 1:
            # One node partial is the whole sum: rounding it before the caller's cast changes nothing
            # (rounding is idempotent, and 0 + p == p), so the rows go straight into the sums, ranks ascending
            for f in fmt.fields:
                for lo, hi in segments:
                    if hi > lo:
                        self._sum_rows_into(acc[f.name], plan.send_token_idx[lo:hi], back[f.name][lo:hi])
            return acc
        for node in range(topo.num_nodes):
            node_segments = [segments[r] for r in topo.node_ranks(node) if segments[r][1] > segments[r][0]]
            if not node_segments:
                continue
            tokens = torch.cat([plan.send_token_idx[lo:hi] for lo, hi in node_segments]).unique(sorted=True)
            slot = torch.full((plan.num_tokens,), -1, dtype=torch.int64, device=tokens.device)
            slot[tokens] = torch.arange(tokens.numel(), device=tokens.device)
            for f in fmt.fields:
                partial = self._zeros(f"b:{f.name}", tokens.numel(), f.width, x.device)
                for lo, hi in node_segments:
                    self._sum_rows_into(partial, slot[plan.send_token_idx[lo:hi]], back[f.name][lo:hi])
                if partial_dtypes[f.name] != torch.float32:
                    partial.copy_(partial.to(partial_dtypes[f.name]))  # what two-hop sends across nodes
                acc[f.name].index_add_(0, tokens, partial)
        return acc

    def _combine_two_hop(self, tensors, fmt, plan: TwoHopPlan, partial_dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        x = tensors[fmt.bulk.name]
        # Back over NVLink to the forwarders, in the order hop 2 delivered the rows.
        arrival = {}
        for f in fmt.fields:
            t = tensors[f.name]
            slot = "a" if f.name == fmt.bulk.name else f"a:{f.name}"
            out = self.scratch.get(slot, plan.num_recv, f.width, t.dtype, t.device)
            out[plan.recv_order] = t.reshape(-1, f.width)
            arrival[f.name] = out
        back2 = self.comm.exchange_rows(
            "combine", "nvlink hop", fmt, arrival, plan.nvlink_recv_counts, plan.nvlink_send_counts,
            bulk_out=self.scratch.get("b", sum(plan.nvlink_send_counts), fmt.bulk.width, x.dtype, x.device),
            pack=plan.pack_rows,
        )
        # The forwarder's node-local partial sum, in fp32, destination ranks ascending; it crosses
        # the network in the rows' dtype (rounded once here) or, when asked, in fp32.
        partial_fmt = RowFormat([Field(f.name, partial_dtypes[f.name], f.width, f.payload) for f in fmt.fields])
        partial = {}
        for f, wire in zip(fmt.fields, partial_fmt.fields):
            acc = self._zeros("c" if f.name == fmt.bulk.name else f"c:{f.name}", plan.num_network_recv, f.width, x.device)
            for lo, hi in _segments([c for c in plan.nvlink_send_counts if c]):
                self._sum_rows_into(acc, plan.fwd_row_idx[lo:hi], back2[f.name][lo:hi])
            partial[f.name] = acc if wire.dtype == torch.float32 else acc.to(wire.dtype)
        back1 = self.comm.exchange_rows(
            "combine", "network hop", partial_fmt, partial, plan.network_recv_counts, plan.network_send_counts,
            bulk_out=self.scratch.get("a", sum(plan.network_send_counts), fmt.bulk.width, partial_fmt.bulk.dtype,
                                      x.device),  # arrival is sent
            pack=plan.pack_rows,
        )
        # Across nodes at the source: node partials ascending, summed in fp32.
        out = {}
        for f in fmt.fields:
            acc = self._zeros(f"acc:{f.name}", plan.num_tokens, f.width, x.device)
            for lo, hi in _segments([c for c in plan.network_send_counts if c]):
                self._sum_rows_into(acc, plan.network_token_idx[lo:hi], back1[f.name][lo:hi])
            out[f.name] = acc
        return out
