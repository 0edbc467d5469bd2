"""Low-latency mode on torch.distributed: the reference implementation of the LL contract.

Fixed-size slots, one ``all_to_all_single`` each way, no count exchange and no host read of a tensor
value (so it can be captured in a CUDA graph on NCCL):

* dispatch: each rank fills a byte array per destination rank: the ``E_loc`` counts (int32) of the
  destination's experts, then ``[E_loc, M]`` message slots (header: the int32 source token index;
  payload: bf16 row, or FP8 row + float32 scales). Token ``n``'s message for expert ``e`` goes to
  slot ``p`` = the number of this rank's tokens before ``n`` routed to ``e``. One exchange; the
  receiver packs the slots of source ``s`` for expert ``j`` at ``begin(j, s) + p``
  (``begin`` = counts of the lower sources), with fixed-shape index arithmetic.
* combine: the expert owner sends row ``begin(j, s) + p`` back to source ``s`` as slot ``(e, p)``
  (``[E, M, H]`` bf16 per source); one exchange; the source sums ``w[n, k] * slot(e_nk, p_nk)``
  over ``k`` ascending in float32 (invalid ``k`` skipped with ``where``, never multiplied by a
  zero weight: rows past a count may hold NaN) and rounds once.

The exchange moves the whole fixed slot arrays (that is what makes it shape-static); the traffic
counters record it exactly: ``rows`` are the valid messages, ``payload_bytes`` their payload, and
``meta_bytes`` everything else that crossed (counts, headers and unused slots).

Results live in per-slot tensors reused by the dispatch after next (DeepEP's double buffering).
``dispatch_wait_recv_cost_stats`` gets the nanoseconds the receive waited for the exchange, added to
every source rank's entry (one collective receives from all sources at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .._comm import GroupComm, PendingWork
from ..fp8 import per_token_cast_to_fp8
from ..low_latency import LowLatencyCombineCall, LowLatencyDispatchCall, LowLatencyDispatchResult, LowLatencyLayout
from ..topology import Topology

__all__ = ["TorchLowLatency", "SlotTensors", "dispatch_outputs", "pack_ue8m0", "token_slots"]

_INDEX_BYTES = 4  # the message header here: the int32 source token index


def token_slots(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (token, k)'s position among this rank's tokens routed to the same expert.

    Args:
        topk_idx: int64 ``[N, K]``, ``-1`` for none, no expert twice in a row.
    Returns:
        ``slots`` int64 ``[N, K]`` (``0`` where topk_idx is ``-1``) and ``counts`` int64 ``[E]``.
    """
    num_tokens = topk_idx.size(0)
    valid = topk_idx >= 0
    expert = topk_idx.clamp_min(0)
    one_hot = torch.zeros((num_tokens, num_experts + 1), dtype=torch.int64, device=topk_idx.device)
    one_hot.scatter_(1, torch.where(valid, expert, num_experts), 1)  # invalid k land in the spare column
    one_hot = one_hot[:, :num_experts]
    before = torch.cumsum(one_hot, 0) - one_hot  # tokens before n routed to each expert
    slots = torch.where(valid, before.gather(1, expert), 0)
    return slots, one_hot.sum(0)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales ``[..., B]`` (B % 4 == 0) -> int32 ``[..., B / 4]``: block ``i``'s
    biased exponent (``exponent + 127``) in byte ``i % 4`` of word ``i // 4``, first block lowest."""
    exponent_bytes = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.int32)
    b = exponent_bytes.unflatten(-1, (-1, 4))
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


class SlotTensors:
    """One buffer slot's result tensors, reallocated only when the call's shapes change."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, key: tuple, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if key != self.key:
            self.key, self.tensors = key, make()
        return self.tensors


def dispatch_outputs(layout: LowLatencyLayout, use_fp8: bool, use_ue8m0: bool, device,
                 scales_ue8m0_only: bool = False) -> dict[str, torch.Tensor]:
    """One slot's LL dispatch result tensors (scales token-fastest; float32 ones omitted with
    ``scales_ue8m0_only`` and UE8M0, where nothing produces them)."""
    e_loc, rows, hidden = layout.num_local_experts, layout.recv_rows, layout.hidden
    out = {
        "x": torch.empty((e_loc, rows, hidden), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
                         device=device),
        "count": torch.empty(e_loc, dtype=torch.int32, device=device),
        "src_info": torch.empty((e_loc, rows), dtype=torch.int32, device=device),
        "layout_range": torch.empty((e_loc, layout.num_ranks), dtype=torch.int64, device=device),
    }
    if use_fp8 and not (use_ue8m0 and scales_ue8m0_only):  # token index fastest (for TMA reads by grouped GEMMs)
        out["scales"] = torch.empty((e_loc, hidden // 128, rows), dtype=torch.float32, device=device).transpose(1, 2)
    if use_fp8:
        if use_ue8m0:
            out["scales_ue8m0"] = torch.empty((e_loc, hidden // 512, rows), dtype=torch.int32,
                                              device=device).transpose(1, 2)
    return out


class TorchLowLatency:
    """The LL engine of the torch backend (see the module docs)."""

    def __init__(self, comm: GroupComm, topo: Topology) -> None:
        self.comm, self.topo = comm, topo
        self._dispatch_slots = [SlotTensors(), SlotTensors()]
        self._combine_send = [SlotTensors(), SlotTensors()]
        # The exchange buffers (send, recv) of each slot and each direction, kept from call to call: fresh
        # ones of this size (hundreds of MB at EP8 x 256 experts) cost more in page faults than the
        # exchange itself. A slot's buffers are reused only after that slot's previous exchange finished.
        self._exchange = {("dispatch", 0): SlotTensors(), ("dispatch", 1): SlotTensors(),
                          ("combine", 0): SlotTensors(), ("combine", 1): SlotTensors()}
        self._in_flight: dict[tuple[str, int], PendingWork] = {}
        self._unpack_scratch = SlotTensors()  # receive() runs on the caller's thread: one at a time

    def _exchange_buffers(self, direction: str, slot: int, shape: tuple[int, ...], dtype: torch.dtype,
                          device) -> tuple[torch.Tensor, torch.Tensor]:
        """(send, recv) of ``shape`` for ``slot``'s exchanges in ``direction``, once its last one finished."""
        previous = self._in_flight.pop((direction, slot), None)
        if previous is not None:
            previous.wait()  # a result whose hook was never called: its exchange still owns the buffers
        buffers = self._exchange[direction, slot].get(
            (shape, dtype, device),
            lambda: {"send": torch.empty(shape, dtype=dtype, device=device),
                     "recv": torch.empty(shape, dtype=dtype, device=device)})
        return buffers["send"], buffers["recv"]

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, call: LowLatencyDispatchCall) -> LowLatencyDispatchResult:
        layout, x, topk_idx = call.layout, call.x, call.topk_idx
        world, e_loc, m, hidden = layout.num_ranks, layout.num_local_experts, layout.num_max_dispatch_tokens_per_rank, layout.hidden
        payload = layout.payload_bytes(call.use_fp8)
        message = _INDEX_BYTES + payload
        chunk = 4 * e_loc + e_loc * m * message  # bytes per destination rank
        device = x.device

        # Messages: each token once (quantized here, as the kernels do in their send phase)
        num_tokens = x.size(0)
        rows = torch.empty((num_tokens, message), dtype=torch.uint8, device=device)
        rows[:, :_INDEX_BYTES] = torch.arange(num_tokens, dtype=torch.int32, device=device).view(-1, 1).view(torch.uint8)
        if num_tokens == 0:
            pass  # (nothing to pack; empty views of [0, 1] tensors cannot change dtype)
        elif call.use_fp8:
            data, scales = per_token_cast_to_fp8(x, power_of_two_scales=call.round_scale)
            rows[:, _INDEX_BYTES : _INDEX_BYTES + hidden] = data.view(torch.uint8)
            rows[:, _INDEX_BYTES + hidden :] = scales.view(torch.uint8)
        else:
            rows[:, _INDEX_BYTES:] = x.view(torch.uint8)

        slots, counts = token_slots(topk_idx, layout.num_experts)
        send, recv = self._exchange_buffers("dispatch", call.slot, (world, chunk), torch.uint8, device)
        send[:, : 4 * e_loc] = counts.to(torch.int32).view(world, e_loc).view(torch.uint8)
        messages = send[:, 4 * e_loc :].unflatten(1, (e_loc * m, message))  # [dest, j * M + p, message]
        valid = topk_idx >= 0
        token_of = torch.arange(num_tokens, device=device).view(-1, 1).expand_as(topk_idx)[valid]
        expert = topk_idx[valid]
        messages[expert // e_loc, (expert % e_loc) * m + slots[valid]] = rows.index_select(0, token_of)
        # (unfilled slots travel as they are, earlier calls' bytes included: fixed shapes are the point)

        self._record("low_latency_dispatch", counts.view(world, e_loc).sum(1), payload, chunk)
        pending = self.comm.start("low_latency_dispatch", "exchange",
                                  lambda: dist.all_to_all_single(recv, send, group=self.comm.group, async_op=True))
        self._in_flight["dispatch", call.slot] = pending

        out = self._dispatch_slots[call.slot].get(
            (hidden, m, e_loc, world, call.use_fp8, call.use_ue8m0, device),
            lambda: dispatch_outputs(layout, call.use_fp8, call.use_ue8m0, device))
        token_slots_i32 = torch.where(valid, slots, -1).to(torch.int32)

        def receive() -> None:
            started = time.perf_counter_ns()
            pending.wait()
            waited = time.perf_counter_ns() - started
            keep_alive = rows  # noqa: F841
            self._unpack_dispatch(call, recv, out, message)
            if call.wait_stats is not None:
                call.wait_stats.add_(waited)

        scales_out = out.get("scales_ue8m0" if call.use_ue8m0 else "scales")
        return LowLatencyDispatchResult(out["x"], scales_out, out["count"], out["src_info"], out["layout_range"],
                                        token_slots_i32, receive)

    def _unpack_dispatch(self, call: LowLatencyDispatchCall, recv: torch.Tensor, out: dict[str, torch.Tensor],
                         message: int) -> None:
        layout = call.layout
        world, e_loc, m, hidden = layout.num_ranks, layout.num_local_experts, layout.num_max_dispatch_tokens_per_rank, layout.hidden
        rows = layout.recv_rows
        device = recv.device
        counts = recv[:, : 4 * e_loc].contiguous().view(torch.int32).to(torch.int64).t()  # [E_loc, R]
        begin = torch.cumsum(counts, 1) - counts
        out["count"].copy_(counts.sum(1))
        out["layout_range"].copy_((begin << 32) | counts)
        if call.recv_stats is not None:
            call.recv_stats.add_(counts.sum(1).to(torch.int32))

        # slot (s, j, p) -> row j * rows + begin[j, s] + p when p < counts[j, s], else the spare row
        p = torch.arange(m, device=device).view(1, 1, m)
        begin_sj, counts_sj = begin.t().unsqueeze(2), counts.t().unsqueeze(2)  # [R, E_loc, 1]
        target = torch.arange(e_loc, device=device).view(1, e_loc, 1) * rows + begin_sj + p
        target = torch.where(p < counts_sj, target, e_loc * rows).flatten()
        # (moved as int32 words: messages are multiples of 4 bytes, and word copies are ~4x faster)
        packed = self._unpack_scratch.get(
            (e_loc * rows + 1, message // 4, device),
            lambda: {"packed": torch.empty((e_loc * rows + 1, message // 4), dtype=torch.int32, device=device)})["packed"]
        packed.index_copy_(0, target, recv[:, 4 * e_loc :].reshape(world * e_loc * m, message).view(torch.int32))
        packed = packed[:-1].view(torch.uint8)
        out["src_info"].copy_(packed[:, :_INDEX_BYTES].contiguous().view(torch.int32).view(e_loc, rows))
        if call.use_fp8:
            out["x"].view(torch.uint8).copy_(packed[:, _INDEX_BYTES : _INDEX_BYTES + hidden].reshape(e_loc, rows, hidden))
            scales = packed[:, _INDEX_BYTES + hidden :].contiguous().view(torch.float32).view(e_loc, rows, hidden // 128)
            out["scales"].copy_(scales)
            if call.use_ue8m0:
                out["scales_ue8m0"].copy_(pack_ue8m0(scales))
        else:
            out["x"].view(torch.uint8).copy_(packed[:, _INDEX_BYTES:].reshape(e_loc, rows, 2 * hidden))

    # ------------------------------------------------------------------ combine
    def combine_buffer(self, slot: int, layout: LowLatencyLayout) -> torch.Tensor:
        device = self.comm.device
        tensors = self._combine_send[slot].get(
            (layout, device),
            lambda: {"x": torch.empty((layout.num_local_experts, layout.recv_rows, layout.hidden),
                                      dtype=torch.bfloat16, device=device)})
        return tensors["x"]

    def combine(self, call: LowLatencyCombineCall) -> Callable[[], None]:
        layout, x = call.layout, call.x
        world, e_loc, m, hidden = layout.num_ranks, layout.num_local_experts, layout.num_max_dispatch_tokens_per_rank, layout.hidden
        rows, device = layout.recv_rows, x.device
        counts = call.layout_range & 0xFFFFFFFF  # [E_loc, R]
        begin = call.layout_range >> 32
        # send[s, j, p] = x[j, begin[j, s] + p] (p < count; other slots carry whatever row 0 holds)
        p = torch.arange(m, device=device).view(1, 1, m)
        begin_sj, counts_sj = begin.t().unsqueeze(2), counts.t().unsqueeze(2)
        source_row = torch.arange(e_loc, device=device).view(1, e_loc, 1) * rows + torch.where(p < counts_sj, begin_sj + p, 0)
        send, recv = self._exchange_buffers("combine", call.slot, (world * e_loc * m, hidden), x.dtype, device)
        torch.index_select(x.reshape(e_loc * rows, hidden), 0, source_row.flatten(), out=send)  # [R * E_loc * M, H]
        self._record("low_latency_combine", counts.sum(0), 2 * hidden, e_loc * m * 2 * hidden)
        pending = self.comm.start("low_latency_combine", "exchange",
                                  lambda: dist.all_to_all_single(recv, send, group=self.comm.group, async_op=True))
        self._in_flight["combine", call.slot] = pending

        def receive() -> None:
            pending.wait()
            # recv row (e * M + p): the output of expert e for this rank's p-th token routed to e
            valid = call.topk_idx >= 0
            flat = torch.where(valid, call.topk_idx * m + call.token_slots.to(torch.int64), 0)
            acc = torch.zeros((call.topk_idx.size(0), hidden), dtype=torch.float32, device=device)
            for k in range(call.topk_idx.size(1)):
                term = recv.index_select(0, flat[:, k]).float() * call.topk_weights[:, k : k + 1]
                acc = acc + torch.where(valid[:, k : k + 1], term, 0.0)
            call.out.copy_(acc)

        return receive

    def check_dispatch(self, layout: LowLatencyLayout, tensors: dict) -> None:
        """Any shape, any device the process group takes: nothing to add to the Buffer's checks."""

    def check_combine(self, layout: LowLatencyLayout, tensors: dict) -> None:
        """As :meth:`check_dispatch`."""

    def clean(self, layout: LowLatencyLayout) -> None:
        """Nothing persists between calls here but result tensors (no counters to reset)."""

    # ------------------------------------------------------------------ bytes
    def _record(self, op: str, valid_rows_to_peer: torch.Tensor, payload: int, chunk: int) -> None:
        """What one exchange moves to each peer: ``chunk`` bytes, of which the valid rows' payload is payload.

        Reads ``valid_rows_to_peer`` on the host unless calls must stay host-sync free (then all bytes
        are counted as meta: the split needs the counts)."""
        from ..low_latency import is_host_sync_free

        rows = [0] * self.topo.world_size if is_host_sync_free() else valid_rows_to_peer.tolist()
        for peer, n in enumerate(rows):
            self.comm.traffic.record(op, self.topo.link_to(peer), n, n * payload, chunk - n * payload)
