"""Low-latency mode on epcomm's kernels (``csrc/kernels/low_latency*.cuh``), run by the sim backend.

Four kernels, one send and one receive phase per operation, so the receive hook is real: the send
kernel only puts into the peers' buffers and returns; the receive kernel (run now, or when the
caller runs the hook) waits for the peers' signals. Nothing is read on the host between them and
no collective runs: every count travels as a transport signal.

The LL region sits at the start of each rank's data region, shared with normal mode as in DeepEP:
a normal-mode call may overwrite it (``clean_low_latency_buffer`` is then required, and checked by
the Buffer), and an LL call makes the next normal-mode call re-lay its buffers. The region is
sized for the first LL shape (or the one given to ``clean_low_latency_buffer``); another shape needs
a clean first, which also invalidates the tensors returned by
:meth:`~epcomm.Buffer.get_next_low_latency_combine_buffer` (views into the region).

Signals only grow; each call adds one unit to each of its signals and the receive kernels wait for
``generation`` units, where the generation of a slot (dispatches and combines separately) is counted in
the region by the send kernels (``csrc/kernels/low_latency.hpp``), not passed from here: a CUDA graph
that captured a decode step counts its replays too. It restarts at 0 when the region is cleaned or
re-allocated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._validate import Invalid
from ..low_latency import (
    LowLatencyCombineCall,
    LowLatencyDispatchCall,
    LowLatencyDispatchResult,
    LowLatencyLayout,
    is_host_sync_free,
)
from ..topology import LinkClass
from .torch_low_latency import SlotTensors, dispatch_outputs

__all__ = ["SimLowLatency"]

_LINKS = (LinkClass.SELF, LinkClass.NVLINK, LinkClass.NETWORK)  # the transport's counter order
_NOT_NORMAL_MODE = "low-latency"  # what the normal path's last spec becomes after an LL call (forces a re-lay)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class SimLowLatency:
    """The LL engine of the sim backend (see the module docs)."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.ext = backend._ext
        self.topo = backend.topo
        self.layout: LowLatencyLayout | None = None
        self._signals = None  # (runtime, layout) whose LL signals may still be owed adds (None: settled)
        self._outputs = [SlotTensors(), SlotTensors()]

    # ------------------------------------------------------------------ checks (before the agreement)
    def check_dispatch(self, layout: LowLatencyLayout, tensors: dict[str, torch.Tensor | None]) -> None:
        self._check_layout(layout)
        self._check_tensors(tensors)

    def check_combine(self, layout: LowLatencyLayout, tensors: dict[str, torch.Tensor | None]) -> None:
        self._check_layout(layout)
        self._check_tensors(tensors)

    def _check_layout(self, layout: LowLatencyLayout) -> None:
        if self.layout is not None and layout != self.layout:
            raise Invalid(f"the {self.backend.name} backend's LL region is laid out for {_shape(self.layout)}; this "
                          f"call has {_shape(layout)}: call clean_low_latency_buffer with the new shape first")
        given = self._explicit_capacity()
        if any(self.backend.explicit_bytes) and layout.rdma_bytes > given:
            raise Invalid(f"the {self.backend.name} backend's LL region needs {layout.rdma_bytes} bytes for "
                          f"{_shape(layout)} but the Buffer holds {given}: pass num_rdma_bytes="
                          f"Buffer.get_low_latency_rdma_size_hint(...) (or 0 to size it automatically)")

    def _check_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        for name, t in tensors.items():
            if t is None:
                continue
            if t.device != self.backend.device:
                raise Invalid(f"the {self.backend.name} backend's kernels run on {self.backend.device}: {name} is on "
                              f"{t.device}; move it there or use backend='torch'")
            if t.data_ptr() % 16:
                raise Invalid(f"the LL kernels move 16-byte vectors: {name} must start 16-byte aligned (got address "
                              f"{t.data_ptr():#x}; use a fresh tensor or .clone())")

    # ------------------------------------------------------------------ the region
    def _spec(self, layout: LowLatencyLayout):
        return self.ext.LowLatencySpec(num_max_tokens=layout.num_max_dispatch_tokens_per_rank, hidden=layout.hidden,
                                       num_local_experts=layout.num_local_experts, region_offset=0,
                                       num_nvl_ranks=self.topo.num_nvl_ranks)

    def _explicit_capacity(self) -> int:
        """Bytes the Buffer's explicit sizes give the LL region: the whole data region here."""
        return self.backend._total_bytes(self.backend.explicit_bytes)

    def _holds(self, runtime, layout: LowLatencyLayout) -> bool:
        """Whether ``runtime`` has room for ``layout``'s region (else a new runtime is made)."""
        return runtime.num_nvl_bytes >= layout.rdma_bytes

    def _region_view(self, runtime, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
        """``count`` elements of this rank's LL region from byte ``offset`` (no copy)."""
        return runtime.local_view(dtype, offset, count)

    def _runtime(self, layout: LowLatencyLayout, op: str):
        """The device runtime holding ``layout``'s region (allocated at the first LL call). Collective."""
        backend = self.backend
        if self.layout is None:
            self._allocate(layout, op)
        backend._last_spec = _NOT_NORMAL_MODE
        self._signals = (backend._device_runtime, self.layout)
        return backend._device_runtime

    def _allocate(self, layout: LowLatencyLayout, op: str) -> None:
        backend = self.backend
        need = layout.rdma_bytes
        runtime = backend._device_runtime
        if runtime is None or not self._holds(runtime, layout):
            if runtime is not None:
                backend._retire_runtime(op)
            backend._device_runtime = backend._new_runtime(max(need, backend._total_bytes(backend.explicit_bytes)))
        else:  # reuse: the signals must start from zero on every rank before anyone signals a peer
            backend._relayout(op, self._clean_bytes(layout), lambda: self._zero_signals(runtime, layout, op))
        self._signals = None
        self.layout = layout

    def _clean_bytes(self, layout: LowLatencyLayout) -> int:
        """Bytes of the data region a clean zeroes: the LL region (signals and generations included)."""
        return layout.rdma_bytes

    def settle_signals(self, runtime, op: str) -> None:
        """Leave LL mode on ``runtime``: wait for the adds still owed to this rank's LL signals, then zero them.

        Called by every re-layout and by growth, once every rank has made its last LL call (the caller is a
        collective normal-mode call or clean), before anything zeroes the region. What is owed is what the
        region's generation words count since the last clean (``wait_for_due``: a send whose receive never
        ran still owes its adds; on GIN they may land late). After it no add is in flight towards this rank
        and its LL signals are 0: zeroing the region cannot race a late add (shm), and the signals GIN keeps
        in its session, where zeroing the window does not reach, start the next LL layout at 0 too. A no-op
        when nothing is owed here (no LL call since the last settle, or on another runtime)."""
        last_runtime, last_layout = self._signals or (None, None)
        self._signals = None
        if last_runtime is runtime and last_layout is not None:
            # this rank's LL kernels may run on any stream (cuda: the one current at each call), so the kernel
            # below, on the runtime's, is ordered after them by waiting for them here (it also raises their errors)
            runtime.report_enqueued(wait=True, op=op)
            runtime.run(self._spec(last_layout), self._reset_params(wait_for_due=True), op=op,
                        timeout_s=self.backend.timeout_s)

    def _zero_signals(self, runtime, layout: LowLatencyLayout, op: str) -> None:
        """A clean's reset, after :meth:`settle_signals` (the re-layout's): zero ``layout``'s signals without
        waiting (on shm they are in the zeroed region anyway; on GIN its range may differ from the last
        layout's)."""
        runtime.run(self._spec(layout), self._reset_params(wait_for_due=False), op=op, timeout_s=self.backend.timeout_s)

    def _reset_params(self, wait_for_due: bool):
        """The reset kernel's: wait for the adds the region's generation words say are due (the region is
        intact), or zero the signals at once."""
        return self.ext.LowLatencyResetSignalsParams(wait_for_due=wait_for_due)

    def clean(self, layout: LowLatencyLayout) -> None:
        self.layout = None
        self._allocate(layout, "clean_low_latency_buffer")
        self.backend._last_spec = _NOT_NORMAL_MODE

    def combine_buffer(self, slot: int, layout: LowLatencyLayout) -> torch.Tensor:
        """A view of the region an LL dispatch of ``layout`` laid out (the caller checked that no normal-mode
        call or clean came since): local, so it neither lays out nor marks anything."""
        runtime = self.backend._device_runtime
        if layout != self.layout or runtime is None:
            raise Invalid(f"no LL region laid out for {_shape(layout)}: dispatch first")
        where = self.ext.low_latency_layout(self._spec(layout), self.topo.world_size, slot)
        count = layout.num_local_experts * layout.recv_rows * layout.hidden
        view = self._region_view(runtime, torch.bfloat16, where["combine_send_buffer"], count)
        return view.view(layout.num_local_experts, layout.recv_rows, layout.hidden)

    # ------------------------------------------------------------------ kernels
    def _launch(self, runtime, spec, params, op: str) -> None:
        """An LL kernel, only issued (``SimRuntime.enqueue``): nothing on the host waits for it or reads its
        outputs (on the CPU its grid has finished anyway), in :meth:`_stream`'s order."""
        runtime.enqueue(spec, params, op=op, timeout_s=self.backend.timeout_s, stream=self._stream())

    def _stream(self) -> int | None:
        """The stream LL kernels run on (None: the runtime's)."""
        return None

    def _mark_sent(self) -> object:
        """A mark after a send kernel, for its receive (:meth:`_follow`); None where kernels end at launch."""
        return None

    def _follow(self, sent: object) -> None:
        """Before a receive kernel: order it after its send (it reads the generation the send counted), whichever
        stream the hook runs on."""

    def _byte_counters(self) -> torch.Tensor | None:
        """``[3]`` int64 the transport adds the bytes it puts to, per link class, read on the host after the
        call; None where that would be a host read of device memory (cuda)."""
        return torch.zeros(3, dtype=torch.int64)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, call: LowLatencyDispatchCall) -> LowLatencyDispatchResult:
        op = "low_latency_dispatch"
        layout = call.layout
        runtime = self._runtime(layout, op)
        spec = self._spec(layout)
        num_tokens, num_topk = call.topk_idx.shape
        slot_of = torch.empty((num_tokens, num_topk), dtype=torch.int32, device=self.backend.device)
        counters = self._byte_counters()
        self._launch(runtime, spec, self.ext.LowLatencyDispatchSendParams(
            slot=call.slot, x=call.x.data_ptr(), num_tokens=num_tokens, topk_idx=call.topk_idx.data_ptr(),
            num_topk=num_topk, use_fp8=call.use_fp8, round_scale=call.round_scale, use_ue8m0=call.use_ue8m0,
            slot_of=slot_of.data_ptr(), byte_counters=_ptr(counters)), op)
        sent = self._mark_sent()
        if self._counts_bytes(counters):
            dest_rank = call.topk_idx // layout.num_local_experts
            rows = torch.bincount(dest_rank[dest_rank >= 0], minlength=self.topo.world_size)
            self._record_rows(op, counters, rows, layout.payload_bytes(call.use_fp8)
                              if not call.use_ue8m0 else layout.hidden + 4 * (layout.hidden // 512))
        out = self._outputs[call.slot].get(
            (layout, call.use_fp8, call.use_ue8m0),
            lambda: dispatch_outputs(layout, call.use_fp8, call.use_ue8m0, self.backend.device, scales_ue8m0_only=True))
        scales = out.get("scales_ue8m0" if call.use_ue8m0 else "scales")

        def receive() -> None:
            self._follow(sent)
            self._launch(runtime, spec, self.ext.LowLatencyDispatchRecvParams(
                slot=call.slot, use_fp8=call.use_fp8, use_ue8m0=call.use_ue8m0,
                recv_x=out["x"].data_ptr(), recv_x_scales=_ptr(scales), recv_count=out["count"].data_ptr(),
                src_info=out["src_info"].data_ptr(), layout_range=out["layout_range"].data_ptr(),
                cumulative_local_expert_recv_stats=_ptr(call.recv_stats),
                dispatch_wait_recv_cost_stats=_ptr(call.wait_stats)), op)

        return LowLatencyDispatchResult(out["x"], scales, out["count"], out["src_info"], out["layout_range"], slot_of,
                                        receive)

    # ------------------------------------------------------------------ combine
    def combine(self, call: LowLatencyCombineCall) -> Callable[[], None]:
        op = "low_latency_combine"
        layout = call.layout
        runtime = self._runtime(layout, op)
        spec = self._spec(layout)
        counters = self._byte_counters()
        self._launch(runtime, spec, self.ext.LowLatencyCombineSendParams(
            slot=call.slot, x=call.x.data_ptr(), layout_range=call.layout_range.data_ptr(),
            byte_counters=_ptr(counters)), op)
        sent = self._mark_sent()
        if self._counts_bytes(counters):
            rows_back = (call.layout_range & 0xFFFFFFFF).sum(0)  # [R]: rows going back to each source
            self._record_rows(op, counters, rows_back, 2 * layout.hidden)
        num_tokens, num_topk = call.topk_idx.shape

        def receive() -> None:
            self._follow(sent)
            self._launch(runtime, spec, self.ext.LowLatencyCombineRecvParams(
                slot=call.slot, num_tokens=num_tokens, topk_idx=call.topk_idx.data_ptr(),
                topk_weights=call.topk_weights.data_ptr(), num_topk=num_topk, slot_of=call.token_slots.data_ptr(),
                out=call.out.data_ptr()), op)

        return receive

    # ------------------------------------------------------------------ bytes
    @staticmethod
    def _counts_bytes(counters: torch.Tensor | None) -> bool:
        """Whether this call's bytes go into buffer.traffic: with the transport's counters, and outside
        host-sync-free calls (counting reads the routing and the counters on the host)."""
        return counters is not None and not is_host_sync_free()

    def _record_rows(self, op: str, counters: torch.Tensor, rows_to_peer: torch.Tensor, payload: int) -> None:
        """What the transport counted per link class; rows and their payload from the routing, the rest
        (message headers, count messages) as metadata. Only where :meth:`_counts_bytes`."""
        per_link = {link: 0 for link in _LINKS}
        for peer, n in enumerate(rows_to_peer.tolist()):
            per_link[self.topo.link_to(peer)] += n
        for link, counted in zip(_LINKS, counters.tolist()):
            rows = per_link[link]
            if counted or rows:
                self.backend.comm.traffic.record(op, link, rows, rows * payload, counted - rows * payload)


def _shape(layout: LowLatencyLayout) -> str:
    return (f"num_max_dispatch_tokens_per_rank={layout.num_max_dispatch_tokens_per_rank}, hidden={layout.hidden}, "
            f"num_experts={layout.num_experts}")
