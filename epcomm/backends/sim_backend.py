"""The ``sim`` backend's runtime plumbing: epcomm's kernels on the CPU, one process per rank.

:class:`SimBackend` sets up the device runtime of ``epcomm._C`` (csrc/runtime/cpu_runtime.cpp) on
every rank of an NVLink domain, collectively:

1. the ranks agree on a run token (rank 0's random bytes): it names every rank's shared-memory
   segment (``/dev/shm/epcomm-<token>-<rank>``), so any rank can remove all of them on failure;
2. each rank allocates its peer-visible buffer and the ranks all-gather the handles;
3. each rank maps every peer's buffer; once all ranks report success the names are unlinked, so
   nothing is left in ``/dev/shm`` after the processes exit, even after a SIGKILL.

Every exchange goes through :class:`~epcomm._comm.GroupComm`, so a peer that does not arrive within
the buffer's timeout makes every other rank raise :class:`~epcomm.EpcommTimeoutError` naming the
stage. A rank that fails locally (say ``/dev/shm`` is full) makes every rank raise
:class:`~epcomm.EpcommError` with that rank's message.

Kernels run through :meth:`SimBackend.run_kernel`; today one is registered, ``"peer_barrier"``
(:meth:`SimBackend.barrier`); dispatch and combine are wired in later. Not in the backend
registry yet (``epcomm.backends.BACKENDS``): construct it directly.
"""

from __future__ import annotations

import ctypes
import os
from types import ModuleType

import torch
import torch.distributed as dist

from .._comm import GroupComm
from .._ext import load_extension
from ..errors import EpcommBackendUnavailable, EpcommError
from ..topology import Topology

__all__ = ["SimBackend"]

_TOKEN_BYTES = 12  # 24 hex digits in segment names
_MESSAGE_BYTES = 240  # per-rank failure message carried by the setup exchanges


class SimBackend:
    """One rank's device runtime: its NVL buffer, the peers' buffers, and kernel launches.

    Collective: every rank of ``comm``'s group constructs it with the same ``num_nvl_bytes``.

    Args:
        comm: the buffer's collectives (deadlines, progress board).
        topo: where this rank sits; must be a single node (``topo.num_nodes == 1``).
        num_nvl_bytes: bytes of each rank's peer-visible data region (``Buffer(num_nvl_bytes=...)``).
        timeout_s: how long kernels wait for peers (default: the comm's timeout).
    Raises:
        EpcommBackendUnavailable: more than one node, or the extension is not built.
        EpcommTimeoutError / EpcommPeerError: a peer did not take part in the set-up.
        EpcommError: some rank could not allocate or map its buffers (every rank raises it).
    """

    runtime_kind = "cpu"
    backend_name = "sim"

    def __init__(self, comm: GroupComm, topo: Topology, num_nvl_bytes: int, *, timeout_s: float | None = None) -> None:
        if topo.num_nodes != 1:
            raise EpcommBackendUnavailable(
                f"{self.backend_name} backend is intranode-only for now: this group has {topo.num_nodes} nodes "
                f"({topo.world_size} ranks, {topo.num_nvl_ranks} per node); use num_nvl_ranks=world_size or "
                f"backend='torch'"
            )
        if num_nvl_bytes < 0:
            raise ValueError(f"num_nvl_bytes must be >= 0, got {num_nvl_bytes}")
        self.comm = comm
        self.topo = topo
        self.num_nvl_bytes = num_nvl_bytes
        self.timeout_s = comm.timeout.total_seconds() if timeout_s is None else float(timeout_s)
        self._ext: ModuleType = load_extension(self.runtime_kind)
        self._op = f"{self.backend_name} backend setup"
        self.run_token: str | None = None
        self._runtime = None
        try:
            self._set_up()
        except BaseException:
            self._clean_up_failed_setup()
            raise

    # ------------------------------------------------------------ set-up
    def _tensor_device(self) -> str:
        return "cuda" if dist.get_backend(self.comm.group) == "nccl" else "cpu"

    def _gather_bytes(self, stage: str, payload: bytes, size: int) -> list[bytes]:
        """All-gather ``size`` bytes from every rank (through GroupComm: deadlines apply)."""
        row = torch.zeros(size, dtype=torch.uint8)
        row[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        rows = self.comm.all_gather(self._op, stage, row.to(self._tensor_device())).cpu()
        return [bytes(rows[r].tolist()) for r in range(self.topo.world_size)]

    def _gather_status(self, stage: str, error: str | None, payload: bytes = b"", size: int = 0) -> list[bytes]:
        """All-gather (ok flag, failure message, payload); raise on every rank if any rank failed."""
        message = (error or "").encode()[: _MESSAGE_BYTES - 1]
        rows = self._gather_bytes(stage, bytes([error is None]) + message.ljust(_MESSAGE_BYTES, b"\0") + payload,
                                  1 + _MESSAGE_BYTES + size)
        failed = {r: row[1 : 1 + _MESSAGE_BYTES].rstrip(b"\0").decode(errors="replace")
                  for r, row in enumerate(rows) if row[0] != 1}
        if failed:
            lines = "\n".join(f"  rank {r}: {msg}" for r, msg in sorted(failed.items()))
            unavailable = all(msg.startswith(EpcommBackendUnavailable.__name__) for msg in failed.values())
            raise (EpcommBackendUnavailable if unavailable else EpcommError)(
                f"epcomm {self._op}: stage '{stage}' failed on {len(failed)} of {self.topo.world_size} ranks:\n{lines}"
            )
        return [row[1 + _MESSAGE_BYTES :] for row in rows]

    def _set_up(self) -> None:
        # 1. Agree on the run token (rank 0's)
        mine = os.urandom(_TOKEN_BYTES)
        self.run_token = self._gather_bytes("agree run token", mine, _TOKEN_BYTES)[0].hex()
        # 2. Allocate this rank's buffer and exchange handles
        error, handle = None, b""
        try:
            self._runtime = self._new_runtime()
            self._runtime.allocate(self.num_nvl_bytes)
            handle = self._runtime.export_handle()
        except (EpcommError, ValueError, RuntimeError) as err:
            error = f"{type(err).__name__}: {err}"
        handles = self._gather_status("exchange handles", error, handle, self._ext.HANDLE_BYTES)
        # 3. Map every peer; once every rank did, drop the names
        error = None
        try:
            self._runtime.open_peers(handles)
        except (EpcommError, ValueError, RuntimeError) as err:
            error = f"{type(err).__name__}: {err}"
        self._gather_status("open peers", error)
        self._runtime.release_names()

    def _new_runtime(self):
        return self._ext.DeviceRuntime(self.topo.rank, self.topo.world_size, self.run_token)

    def _clean_up_failed_setup(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        if self.run_token is not None and self.runtime_kind == "cpu":
            # Names follow from the token: remove every rank's segment, a dead peer's included.
            self._ext.unlink_segments(self.run_token, self.topo.world_size)

    # ------------------------------------------------------------ use
    @property
    def runtime(self):
        """The extension's ``DeviceRuntime`` (see csrc/bindings/bindings.cpp)."""
        if self._runtime is None:
            raise EpcommError(f"epcomm {self.backend_name} backend on rank {self.topo.rank}: closed")
        return self._runtime

    @property
    def peer_pointers(self) -> list[int]:
        """Every rank's data region as mapped in this process (``[world_size]`` addresses)."""
        return list(self.runtime.peer_ptrs)

    @property
    def local_pointer(self) -> int:
        return self.runtime.local_ptr

    @property
    def peer_table_pointer(self) -> int:
        """Address of a kernel-accessible ``void*[world_size]`` array of :attr:`peer_pointers`."""
        return self.runtime.peer_table_ptr

    def peer_view(self, rank: int, dtype: torch.dtype = torch.uint8, offset: int = 0, count: int = -1) -> torch.Tensor:
        """A CPU tensor over ``rank``'s data region (no copy; invalid after :meth:`close`).

        Args:
            rank: whose buffer (this rank's own included).
            dtype: element type; ``offset`` is in bytes, ``count`` in elements (``-1``: to the end).
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        if count < 0:
            count = (self.num_nvl_bytes - offset) // itemsize
        nbytes = count * itemsize
        if offset < 0 or offset + nbytes > self.num_nvl_bytes:
            raise ValueError(f"[{offset}, {offset + nbytes}) is outside the {self.num_nvl_bytes}-byte NVL buffer")
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        raw = (ctypes.c_char * nbytes).from_address(self.peer_pointers[rank] + offset)
        return torch.frombuffer(raw, dtype=dtype, count=count)

    def run_kernel(self, name: str, *args: int | torch.Tensor, timeout_s: float | None = None) -> None:
        """Run the kernel registered as ``name`` on this rank (collective when the kernel waits on peers).

        Args:
            args: integers, or tensors (passed as their ``data_ptr()``).
            timeout_s: how long the kernel waits for peers (default: this backend's ``timeout_s``).
        Raises:
            EpcommTimeoutError: a peer did not arrive in time (the message names rank and peers).
            ValueError: no such kernel, or bad arguments.
        """
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else int(a) for a in args]
        self.runtime.run_kernel(name, values, self.timeout_s if timeout_s is None else float(timeout_s))

    def barrier(self, timeout_s: float | None = None) -> None:
        """All ranks meet in peer memory (the ``peer_barrier`` kernel); writes before it are visible after it."""
        self.run_kernel("peer_barrier", timeout_s=timeout_s)

    def registered_kernels(self) -> list[str]:
        return list(self._ext.registered_kernels())

    def close(self) -> None:
        """Unmap every buffer; idempotent. Peers may still be using theirs."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
