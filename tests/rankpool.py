"""A pool of forked gloo ranks that run test functions collectively.

Forking once per world size and reusing the ranks keeps the multi-process
suite fast (starting a rank costs ~0.1 s, importing torch in a fresh one ~1 s).
Test functions must be module-level (they are pickled by reference); each is
called on every rank as ``fn(rank, world_size, *args)`` and its return value
or exception comes back per rank.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass
class Outcome:
    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None


class RankFailure(AssertionError):
    pass


def _worker(rank: int, world_size: int, store_path: str, conn, one_gpu_per_rank: bool = False) -> None:
    torch.set_num_threads(1)
    if one_gpu_per_rank:
        torch.cuda.set_device(rank)  # the cuda backend uses the current device
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(Outcome(rank, value=fn(rank, world_size, *args, **kwargs)))
        except BaseException as err:  # report everything, including assertion failures
            conn.send(Outcome(rank, error_type=type(err).__name__, error=f"{err}\n{traceback.format_exc()}"))
    conn.close()
    os._exit(0)


class RankPool:
    """``world_size`` forked ranks with a gloo process group. ``one_gpu_per_rank``: rank r uses GPU r,
    and the ranks are spawned instead (a process that forked after CUDA was initialised cannot use it)."""

    def __init__(self, world_size: int, one_gpu_per_rank: bool = False) -> None:
        ctx = mp.get_context("spawn" if one_gpu_per_rank else "fork")
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix="epcomm-pool-")
        store_path = os.path.join(self._dir.name, "store")
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, store_path, child, one_gpu_per_rank),
                               daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        self.broken = False

    def run_outcomes(self, fn: Callable, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Outcome]:
        """Run ``fn`` on every rank; each rank's value or exception."""
        assert not self.broken, "this pool's process group is unusable; use a fresh pool"
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        outcomes = []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(timeout):
                self.close()
                raise RankFailure(f"rank {rank} did not finish {fn.__name__} within {timeout} s (hang?)")
            try:
                outcomes.append(conn.recv())
            except EOFError:  # the rank's process died (tests kill ranks on purpose)
                self.broken = True
                outcomes.append(Outcome(rank, error_type="died", error=f"rank {rank} exited during {fn.__name__}"))
        return outcomes

    def run(self, fn: Callable, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``fn`` on every rank and return the values; fail if any rank raised."""
        outcomes = self.run_outcomes(fn, *args, timeout=timeout, **kwargs)
        errors = [o for o in outcomes if o.error is not None]
        if errors:
            raise RankFailure(
                "\n".join(f"--- rank {o.rank} raised {o.error_type}: {o.error}" for o in errors)
            )
        return [o.value for o in outcomes]

    def close(self) -> None:
        self.broken = True
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._dir.cleanup()
