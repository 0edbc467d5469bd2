"""``EventOverlap`` and ``EventHandle``: the completion events returned by every epcomm operation."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch

__all__ = ["EventHandle", "EventOverlap"]


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class EventHandle:
    """A point in the current stream (DeepEP's ``EventHandle``).

    Constructed, it records an event on the current CUDA stream when this process uses CUDA;
    on the CPU (where epcomm's calls return with their results ready) it is complete at once.

    Args:
        event: an existing ``torch.cuda.Event`` (or any object with ``wait``/``query``) to wrap
            instead of recording a new one.
    """

    def __init__(self, event: Any = None) -> None:
        if event is None and _cuda_ready():
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
        self.event = event

    def current_stream_wait(self) -> None:
        """Make the current stream wait for this point (no-op when complete)."""
        if self.event is None:
            return
        if isinstance(self.event, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(self.event)
        else:
            self.event.wait()

    def query(self) -> bool:
        """True when everything before this point has finished."""
        return self.event is None or bool(self.event.query())

    def synchronize(self) -> None:
        """Block the host until this point is reached."""
        if self.event is not None:
            self.event.synchronize()

    def __repr__(self) -> str:
        return f"EventHandle({'complete' if self.event is None else self.event!r})"


class EventOverlap:
    """Marks the point in a stream where an epcomm operation's results are ready (DeepEP's ``EventOverlap``).

    ``event`` may be an :class:`EventHandle`, any object with its own ``current_stream_wait()``
    (which this class calls), a ``torch.cuda.Event``, or ``None`` (complete: on the CPU, and for
    operations that already synchronised, every method returns at once). ``extra_tensors`` are kept
    alive until this object is dropped, as DeepEP's do.

    Use it as DeepEP users do::

        recv_x, ..., event = buffer.dispatch(..., async_finish=True)
        event.current_stream_wait()      # or: with event: ...
    """

    def __init__(self, event: Any = None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    @classmethod
    def capture(cls, device: torch.device | None = None) -> "EventOverlap":
        """Record an event on the current stream of ``device`` (none on CPU)."""
        if device is None or device.type != "cuda":
            return cls(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return cls(EventHandle(event))

    def current_stream_wait(self) -> None:
        """Make the current stream wait for this event (no-op when complete)."""
        event = self.event
        if event is None:
            return
        if hasattr(event, "current_stream_wait"):
            event.current_stream_wait()
        elif isinstance(event, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(event)
        else:
            raise TypeError(f"EventOverlap cannot wait on {type(event).__name__}: it has no current_stream_wait()")

    def query(self) -> bool:
        """True when the operation has finished."""
        return self.event is None or bool(self.event.query())

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap({'complete' if self.event is None else self.event!r})"
