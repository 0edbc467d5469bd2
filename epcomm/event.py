"""``EventOverlap``: the completion event returned by every epcomm operation."""

from __future__ import annotations

from types import TracebackType

import torch

__all__ = ["EventOverlap"]


class EventOverlap:
    """Marks the point in a stream where an epcomm operation's results are ready.

    On CPU (and for operations that already synchronised) the event is
    complete on creation and every method returns at once. On CUDA it wraps a
    ``torch.cuda.Event`` recorded on the stream that produced the results.

    Use it as DeepEP users do::

        recv_x, ..., event = buffer.dispatch(..., async_finish=True)
        event.current_stream_wait()      # or: with event: ...
    """

    def __init__(self, event: "torch.cuda.Event | None" = None) -> None:
        self.event = event

    @classmethod
    def capture(cls, device: torch.device) -> "EventOverlap":
        """Record an event on the current stream of ``device`` (none on CPU)."""
        if device.type != "cuda":
            return cls(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return cls(event)

    def current_stream_wait(self) -> None:
        """Make the current stream wait for this event (no-op when complete)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def query(self) -> bool:
        """True when the operation has finished."""
        return self.event is None or self.event.query()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap({'complete' if self.event is None else self.event!r})"
