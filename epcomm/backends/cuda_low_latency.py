"""Low-latency mode on the ``cuda`` backend: the sim backend's LL engine (``sim_low_latency.py``) on GPUs.

The same kernels, launch sequence and Python paths, with what a GPU changes:

* Every LL kernel is only enqueued, on torch's *current* stream (not the Buffer's communication stream):
  a decode step's dispatch, hook and combine follow the caller's compute in one stream, and a stream
  capturing a CUDA graph captures them. Nothing is read on the host (no byte counters; ``buffer.traffic``
  has no LL bytes on ``cuda``). Normal-mode kernels (communication stream) and LL kernels meet only
  across a re-layout or ``clean_low_latency_buffer``, whose kernels follow the caller's stream and which the
  host waits for, so the two streams never run epcomm kernels at once.
* While capturing, each kernel writes the runtime's captured-kernel error slot (kept as long as the process:
  graphs are replayed with the pointers they were captured with); the Buffer's next call outside a capture
  raises what a replay left there. A Buffer whose runtime captured kernels refuses to grow (a replay would
  use freed buffers): size it up front. The slot of a captured call is fixed in the graph, so a graph
  should hold an even number of LL dispatches (DeepEP's double buffering alternates too): replaying one
  with a single dispatch back to back reuses a slot on consecutive calls, which the "Reuse" rule of
  ``csrc/kernels/low_latency.hpp`` does not cover when a rank's tokens skip some peer.
* A receive (the hook) waits for an event after its send, so it follows the send whatever stream it runs on. Outside a capture the error slot of each kernel is read by the runtime's
  next call, as for normal mode. The first LL call (or ``clean_low_latency_buffer``) lays out the region and
  waits on the host: make it before capturing, as with DeepEP.
* One node: peer memory over CUDA IPC (ShmTransport on the runtime's peer table; the LL region in each rank's
  IPC buffer, as on ``sim``); ``allow_nvlink_for_low_latency_mode`` is moot there.
* Across nodes: every peer, this node's included, through NCCL GIN (``csrc/runtime/gin_low_latency_entries.cu``;
  ``allow_nvlink_for_low_latency_mode`` has no effect). The LL region sits at the start of the runtime's RDMA
  window (the zero-copy combine buffer is a view of it), which the internode kernels' RDMA workspace shares
  (hence DeepEP's "clean before LL"); its ``4E + 1`` signals are the session's top ones, above the internode
  kernels' (``CudaDispatchBackend.signals_needed``). The session is sized for both modes: the LL layout of the
  first LL call (or clean) with the normal-mode layout set up so far (the default one before any); a layout
  that outgrows the window or the signals gets a new runtime, collectively, unless graphs captured LL kernels
  on this one (refused, as on one node). GIN's signals live in the session, where zeroing the window does not
  reach, so every re-layout that leaves LL mode, and growth, first waits for the adds still owed to this
  rank's LL signals and zeroes them (``SimLowLatency.settle_signals``, the reset kernel with
  ``wait_for_due``): the next layout, LL or normal, starts from zero with no add in flight. The same settle
  runs on ``sim`` and on one node, where it is tested. ``num_qps_per_rank`` is not used (GIN has its own
  queues per context).

Compiled for sm_90/sm_100; never run on a GPU (none lent to development).
"""

from __future__ import annotations

import torch

from ..low_latency import LowLatencyLayout
from .sim_low_latency import SimLowLatency

__all__ = ["CudaLowLatency"]


class CudaLowLatency(SimLowLatency):
    """The LL engine of the cuda backend (see the module docs)."""

    def __init__(self, backend) -> None:
        super().__init__(backend)
        self.over_network = backend.topo.num_nodes > 1  # the LL region in the GIN window, not the IPC buffer

    # ------------------------------------------------------------------ the region across nodes
    def _explicit_capacity(self) -> int:
        return self.backend.explicit_bytes[1] if self.over_network else super()._explicit_capacity()

    def _holds(self, runtime, layout: LowLatencyLayout) -> bool:
        if not self.over_network:
            return super()._holds(runtime, layout)
        return (layout.rdma_bytes <= runtime.network_rdma_bytes
                and self.backend.signals_needed(low_latency=layout) <= runtime.network_signals)

    def _region_view(self, runtime, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
        if not self.over_network:
            return super()._region_view(runtime, dtype, offset, count)
        return runtime.window_view(dtype, offset, count)

    def _clean_bytes(self, layout: LowLatencyLayout) -> int:
        # across nodes the region is in the window, which every re-layout zeroes whole (CudaRuntime.zero)
        return 0 if self.over_network else super()._clean_bytes(layout)

    def _allocate(self, layout: LowLatencyLayout, op: str) -> None:
        if not self.over_network:
            return super()._allocate(layout, op)
        # a new session must hold this layout too (CudaDispatchBackend._network_sizes); kept only once it does
        backend, before = self.backend, self.backend._low_latency_sizing
        backend._low_latency_sizing = layout
        try:
            super()._allocate(layout, op)
        except BaseException:
            backend._low_latency_sizing = before
            raise

    # ------------------------------------------------------------------ streams

    def _stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream

    def _byte_counters(self) -> None:
        return None

    def _mark_sent(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return event

    def _follow(self, sent: torch.cuda.Event) -> None:
        # a hook run under another current stream must still follow its send (an event wait: no host wait,
        # legal inside a capture)
        torch.cuda.current_stream().wait_event(sent)
