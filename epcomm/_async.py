"""``async_finish=True``: a Buffer's data phase off the calling thread.

An operation has two phases. The *agreement* (inputs checked on every rank, counts exchanged)
always runs on the calling thread: its verdict must reach the caller, and the output shapes come
from it. The *data phase* (the backend's exchange or kernels and the post-processing into the
outputs) is what ``async_finish=True`` moves to a worker thread, one per Buffer, so the caller
computes while the rows travel: gloo moves them in its own threads, the sim kernels spin in
theirs, and torch releases the GIL for both.

Ordering rules, each for a reason:

* One data phase at a time per Buffer, and every later operation of that Buffer first waits for
  it (:meth:`AsyncRunner.drain`): every rank must issue the Buffer's collectives in the same order.
* Once a Buffer has gone asynchronous its collectives move to a private process group (same ranks,
  same backend), because a data phase in flight must not interleave with collectives the caller
  issues meanwhile on its own group (gloo tags collectives in call order per group, so an
  interleaving that differs between ranks mismatches them).
* A failure in the data phase is raised by the event's ``current_stream_wait()`` / ``synchronize()``
  and, if nobody waited, by the Buffer's next operation.
"""

from __future__ import annotations

import datetime
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["AsyncRunner", "PendingEvent", "copy_into", "private_group"]


class PendingEvent:
    """The completion of one asynchronous data phase (the ``event`` inside an ``EventOverlap``).

    ``current_stream_wait()`` and ``synchronize()`` block until the outputs are filled and raise
    the phase's error, if any; ``query()`` says whether it finished.
    """

    def __init__(self, future: Future, runner: "AsyncRunner") -> None:
        self._future, self._runner = future, runner

    def query(self) -> bool:
        return self._future.done()

    def synchronize(self) -> None:
        self._runner.observe(self._future)

    current_stream_wait = synchronize

    def __repr__(self) -> str:
        return f"PendingEvent({'done' if self._future.done() else 'running'})"


class AsyncRunner:
    """A Buffer's worker thread: runs data phases one at a time, in submission order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._observed: set[int] = set()  # ids of futures whose error a caller already received
        self._lock = threading.Lock()

    def submit(self, phase: Callable[[], Any]) -> PendingEvent:
        """Run ``phase`` on the worker; the caller must have drained the previous phase first."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        future = self._executor.submit(phase)
        self._pending = future
        return PendingEvent(future, self)

    def observe(self, future: Future) -> None:
        """Wait for ``future``; raise its error (each error reaches a caller once)."""
        error = future.exception()
        if error is not None:
            with self._lock:
                first = id(future) not in self._observed
                self._observed.add(id(future))
            if first:
                raise error

    def drain(self) -> None:
        """Wait for the data phase in flight, if any; raise its error if no one has received it."""
        future, self._pending = self._pending, None
        if future is not None:
            self.observe(future)
            self._observed.discard(id(future))

    def close(self) -> None:
        """Stop the worker after the phase in flight (does not raise)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._pending = None


def private_group(group: dist.ProcessGroup, timeout_s: float) -> dist.ProcessGroup:
    """A new process group with ``group``'s ranks and backend (collective over those ranks only)."""
    ranks = dist.get_process_group_ranks(group)
    return dist.new_group(ranks=ranks, backend=dist.get_backend(group),
                          timeout=datetime.timedelta(seconds=timeout_s), use_local_synchronization=True)


def copy_into(dst: Any, src: Any) -> None:
    """Copy a result (tensor, tuple of tensors or None) into outputs allocated before it existed."""
    if isinstance(dst, tuple):
        if not isinstance(src, tuple) or len(src) != len(dst):
            raise RuntimeError(f"epcomm internal error: async result {type(src).__name__} does not match its outputs")
        for d, s in zip(dst, src):
            copy_into(d, s)
        return
    if dst is None or src is None:
        if dst is not src:
            raise RuntimeError("epcomm internal error: async result and outputs disagree on an optional tensor")
        return
    if not isinstance(dst, torch.Tensor) or dst.shape != src.shape or dst.dtype != src.dtype:
        raise RuntimeError(f"epcomm internal error: async output {getattr(dst, 'shape', dst)} "
                           f"{getattr(dst, 'dtype', '')} != result {tuple(src.shape)} {src.dtype}")
    dst.copy_(src)
