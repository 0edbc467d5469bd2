"""Which stream an operation's data phase runs on, and the event it returns (DeepEP's stream semantics).

A backend hands :class:`~epcomm.Buffer` a scope per operation (``DispatchBackend.stream_scope``); the
Buffer runs the data phase (the exchange or kernels and the post-processing into the outputs) inside
it and ends it with :meth:`StreamScope.finish`, which gives the operation's ``EventOverlap``.

* :class:`StreamScope` (torch and sim backends): the data phase runs in the caller's stream (on the
  CPU: on the calling thread, or on the Buffer's worker for ``async_finish``, see ``_async.py``);
  the event marks the caller's stream after it.
* :class:`CommStreamScope` (cuda backend): the data phase runs on the backend's communication stream,
  which first waits for the caller's current stream (so for ``previous_event`` too, which the Buffer
  makes the caller's stream wait for); the kernels are only enqueued there, so the call returns
  without waiting for them. ``finish`` records an event on the communication stream, marks every
  tensor with the streams that use it (``record_stream``: the caching allocator must not hand an
  input to new work before the kernels read it, nor an output before the caller's stream used it)
  and, without ``async_finish``, makes the caller's stream wait for the event: results are then
  ready in stream order, the host never waited. With ``async_finish`` the event is returned and the
  caller decides when its stream waits (``event.current_stream_wait()``).

Outputs are allocated on the communication stream whatever ``allocate_on_comm_stream`` says (they
are then recorded on the caller's stream): the difference DeepEP makes there is which stream's pool
the memory comes from, not when it is safe to use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import torch

from .event import EventHandle, EventOverlap

__all__ = ["CommStreamScope", "KernelEvent", "StreamScope", "tensors_in"]


def tensors_in(*values: Any) -> list[torch.Tensor]:
    """Every tensor in ``values`` (tensors, tuples/lists/dicts of them, None), depth first."""
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found.extend(tensors_in(*value))
        elif isinstance(value, dict):
            found.extend(tensors_in(*value.values()))
    return found


class StreamScope:
    """The data phase in the caller's stream (torch and sim backends); see the module docs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "StreamScope":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                 exc_tb: TracebackType | None) -> None:
        return None

    def finish(self, inputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor]) -> EventOverlap:
        """The operation's event: the caller's stream after the data phase."""
        return EventOverlap.capture(self.device)


class KernelEvent(EventHandle):
    """A CUDA event after enqueued kernels; ``synchronize()`` also raises a kernel's error (its error slot is
    read once the event has passed) through ``report(wait)``."""

    def __init__(self, event: torch.cuda.Event, report: Callable[[bool], None]) -> None:
        super().__init__(event)
        self._report = report

    def synchronize(self) -> None:
        self.event.synchronize()
        self._report(False)


class CommStreamScope(StreamScope):
    """The data phase on ``comm_stream`` (cuda backend); see the module docs.

    Args:
        comm_stream: the backend's communication stream (one per Buffer).
        async_finish: return the event instead of making the caller's stream wait for it.
        report: the runtime's ``report_enqueued(wait)`` (raises a finished kernel's error).
    """

    def __init__(self, device: torch.device, comm_stream: torch.cuda.Stream, async_finish: bool,
                 report: Callable[[bool], None]) -> None:
        super().__init__(device)
        self.comm_stream = comm_stream
        self.async_finish = async_finish
        self._report = report
        self._caller: torch.cuda.Stream | None = None
        self._context: Any = None

    def __enter__(self) -> "CommStreamScope":
        self._caller = torch.cuda.current_stream(self.device)
        self.comm_stream.wait_stream(self._caller)  # the inputs were written in the caller's stream order
        self._context = torch.cuda.stream(self.comm_stream)
        self._context.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                 exc_tb: TracebackType | None) -> None:
        context, self._context = self._context, None
        context.__exit__(exc_type, exc_val, exc_tb)

    def finish(self, inputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor]) -> EventOverlap:
        caller = self._caller
        assert caller is not None, "CommStreamScope.finish() needs the scope entered first"
        event = torch.cuda.Event()
        event.record(self.comm_stream)
        inputs, outputs = list(inputs), list(outputs)
        for t in inputs:
            if t.is_cuda:
                t.record_stream(self.comm_stream)  # read by the kernels, allocated in the caller's order
        for t in outputs:
            if t.is_cuda:
                t.record_stream(caller)  # allocated on the comm stream, used in the caller's order
        if not self.async_finish:
            caller.wait_event(event)
            return EventOverlap(KernelEvent(event, self._report))
        return EventOverlap(KernelEvent(event, self._report), extra_tensors=tuple(inputs + outputs))
