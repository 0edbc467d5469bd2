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
  IPC buffer, as on ``sim``); ``allow_nvlink_for_low_latency_mode`` is moot there. Across nodes the kernels
  go through NCCL GIN (``csrc/runtime/gin_low_latency_entries.cu``), but this engine does not size a GIN
  session for them yet, so it refuses groups that span nodes. (When it does: the generation words live in
  the GIN window, which a normal-mode re-layout zeroes while GIN's signals survive in the session, so
  leaving LL mode must first run the reset kernel with ``wait_for_due=True``.)

Compiled for sm_90/sm_100; never run on a GPU (none lent to development).
"""

from __future__ import annotations

import torch

from .sim_low_latency import SimLowLatency

__all__ = ["CudaLowLatency"]


class CudaLowLatency(SimLowLatency):
    """The LL engine of the cuda backend (see the module docs)."""

    def __init__(self, backend) -> None:
        if backend.topo.num_nodes > 1:
            raise NotImplementedError(
                "the 'cuda' backend's low-latency mode runs on one node so far (peer memory over CUDA IPC); across "
                "nodes its LL kernels over NCCL GIN are built but no GIN session is sized for them yet: use "
                "Buffer(backend='torch') on NCCL across nodes")
        super().__init__(backend)

    def _stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream

    def _byte_counters(self) -> None:
        return None

    def _launch(self, runtime, spec, params, op: str) -> None:
        if torch.cuda.is_current_stream_capturing():
            # the graph's kernels point at this runtime's buffers: growth must not free them (Buffer refuses)
            self.backend._captured_on = runtime
        super()._launch(runtime, spec, params, op)

    def _mark_sent(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return event

    def _follow(self, sent: torch.cuda.Event) -> None:
        # a hook run under another current stream must still follow its send (an event wait: no host wait,
        # legal inside a capture)
        torch.cuda.current_stream().wait_event(sent)
