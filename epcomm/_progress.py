"""Where each rank is, and whether it is alive: a small board in the group's store.

Every collective stage a rank enters is posted as ``step|operation|stage``,
and one background thread per process beats a counter for every live board.
When a stage fails or times out, the rank compares two readings of the
heartbeats taken ``grace_s`` apart: a peer whose heartbeat stopped is dead (or
its process is frozen); a live peer that has not reached this step is late.
This turns "Connection reset by peer" into "rank 3 is dead; it was last seen
at dispatch, stage 'network hop'".
"""

from __future__ import annotations

from collections.abc import Callable
import atexit
import datetime
import threading
import time
import weakref

import torch.distributed as dist

__all__ = ["ProgressBoard", "HEARTBEAT_INTERVAL_S"]

HEARTBEAT_INTERVAL_S = 0.25
# The heartbeat thread and the caller share one store client; some clients
# (FileStore) keep unsynchronised read caches, so every access takes this lock.
_STORE_LOCK = threading.Lock()
_next_board_id = 0


def agree_board_id(propose: "Callable[[int], int]") -> int:
    """A board id every rank of the group shares.

    Processes may have created different numbers of buffers (on other groups,
    or ones whose construction failed), so a local counter is not enough: each
    rank proposes its next id and all take the largest (``propose`` is that
    collective max).
    """
    global _next_board_id
    board_id = propose(_next_board_id)
    _next_board_id = board_id + 1
    return board_id


def _group_store(group: dist.ProcessGroup) -> dist.Store | None:
    """The store behind ``group`` (private torch API: degrade to None if it moves)."""
    try:
        world = dist.distributed_c10d._world
        if group in world.pg_map:
            return world.pg_map[group][1]
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


class _Heartbeat:
    """One daemon thread per process that beats for every live board."""

    def __init__(self) -> None:
        self.boards: weakref.WeakSet[ProgressBoard] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        # Stop before interpreter shutdown: a daemon thread still inside a store
        # call while C++ objects are torn down aborts the process at exit.
        atexit.register(self.stop)

    def stop(self) -> None:
        self.stopping.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2 * HEARTBEAT_INTERVAL_S + 1)

    def add(self, board: "ProgressBoard") -> None:
        if self.stopping.is_set():
            return
        with self.lock:
            self.boards.add(board)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="epcomm-heartbeat", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                boards = list(self.boards)
                if not boards:
                    self.thread = None
                    return
            for board in boards:
                board.beat()
            del boards
            if self.stopping.wait(HEARTBEAT_INTERVAL_S):
                return


_HEARTBEAT = _Heartbeat()


def _remove_keys(store: dist.Store, rank: int, failed: list[bool]) -> None:
    """Drop a board's keys when its Buffer goes away, so long runs do not grow the store.

    After a failure the keys stay: peers still diagnosing read them.
    """
    if failed[0] or _HEARTBEAT.stopping.is_set():
        return  # at exit the store's host process may already be gone
    for kind in ("progress", "beat"):
        try:
            with _STORE_LOCK:
                store.delete_key(f"{kind}/{rank}")
        except Exception:
            pass


BUFFER_CONSTRUCTION = "Buffer construction"  # the op name of the collectives a Buffer's constructor runs


# How long a get may wait for a key its check just saw (the store's own timeout is minutes).
_PRESENT_KEY_WAIT = datetime.timedelta(seconds=1)


def read_present(store: dist.Store, keys: list[str]) -> list[str | None]:
    """Each key's value, or None where the key is absent. A peer deletes its keys when its Buffer goes, which can
    fall between the check and the get: the get then fails after a second instead of waiting out the store's
    timeout (a rank diagnosing a failure while its peers, done with theirs, drop their Buffers hung there for
    minutes). Callers hold _STORE_LOCK; the store's timeout is restored after."""
    timeout = store.timeout
    store.set_timeout(_PRESENT_KEY_WAIT)
    try:
        values: list[str | None] = []
        for key in keys:
            try:
                values.append(store.get(key).decode() if store.check([key]) else None)
            except RuntimeError:  # deleted since the check (DistStoreError)
                values.append(None)
        return values
    finally:
        store.set_timeout(timeout)


class ProgressBoard:
    """Posts this rank's progress and heartbeat; names dead and late peers after a failure."""

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, board_id: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self._beats = 0
        self._failed = [False]  # shared with the finalizer
        store = _group_store(group)
        self.store = None if store is None else dist.PrefixStore(f"epcomm/board{board_id}/", store)
        self._post("progress", "0|created|-")
        self.beat()
        if self.store is not None:
            _HEARTBEAT.add(self)
            weakref.finalize(self, _remove_keys, self.store, rank, self._failed)

    def _post(self, kind: str, value: str) -> None:
        if self.store is None:
            return
        try:
            with _STORE_LOCK:
                self.store.set(f"{kind}/{self.rank}", value)
        except Exception:
            self.store = None  # the store is gone (its host rank died): stop posting

    def beat(self) -> None:
        self._beats += 1
        self._post("beat", str(self._beats))

    def enter(self, op: str, stage: str) -> None:
        """Called before each collective stage."""
        self.step += 1
        self._post("progress", f"{self.step}|{op}|{stage}")

    def _read_all(self, kind: str) -> list[str | None]:
        keys = [f"{kind}/{r}" for r in range(self.world_size)]
        with _STORE_LOCK:
            return read_present(self.store, keys)

    def diagnose(self, grace_s: float, posted: bool = True) -> str:
        """After a failure at the current step: which peers are dead or late, as a sentence.

        ``posted=False``: the failed stage was a kernel, which is not posted to the board (a store write
        per launch would sit on the kernels' path), so a peer that never entered it looks as arrived as
        one that did; the sentence then says so instead of "arrived"."""
        self._failed[0] = True
        if self.store is None:
            return "peer status is unavailable (no store)"
        try:
            before = self._read_all("beat")
            time.sleep(max(grace_s, 3 * HEARTBEAT_INTERVAL_S))
            after = self._read_all("beat")
            progress = self._read_all("progress")
        except Exception as err:  # the store lives in one rank's process; it may be the dead one
            return f"peer status is unavailable ({type(err).__name__}: {err})"
        dead, late = [], []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            step, where = 0, "before creating its Buffer"
            if progress[r] is not None:
                s, op, stage = progress[r].split("|")
                step = int(s)
                if op == "created":
                    where = "creating its Buffer"
                elif op == BUFFER_CONSTRUCTION:
                    where = f"creating its Buffer, stage '{stage}'"
                else:
                    where = f"{op}, stage '{stage}'"
            seen = f"rank {r} (last seen at {where}, step {step}; this rank failed at step {self.step})"
            if before[r] is not None and after[r] is None:
                continue  # it destroyed its Buffer meanwhile: alive, and done with this step
            if before[r] is None or before[r] == after[r]:
                dead.append(seen)
            elif step < self.step:
                late.append(seen)
        parts = []
        if dead:
            parts.append("dead or frozen peer(s), no heartbeat: " + "; ".join(dead))
        if late:
            parts.append("live peer(s) that have not arrived: " + "; ".join(late))
        if parts:
            return ", ".join(parts)
        if not posted:
            return ("every peer is alive; kernels are not posted to the progress board, so it cannot tell which "
                    "peer did not enter this kernel: the backend's message names the peer the kernel waited for")
        return "every peer is alive and arrived; see the backend's message"
