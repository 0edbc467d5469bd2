"""Collectives over a torch.distributed process group, with deadlines and byte accounting.

Every exchange names its stage; if a peer does not arrive within the
buffer's timeout, or fails, the caller gets an epcomm error that says which
operation and stage, on which rank, instead of a hang.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist

from ._progress import ProgressBoard, agree_board_id
from .errors import EpcommCallRejected, EpcommPeerError, EpcommRecvOverflow, EpcommTimeoutError
from .topology import Topology
from ._wire import RowFormat
from .traffic import TrafficStats

__all__ = ["GroupComm", "PendingWork"]

# torch 2.14 renamed all_gather_into_tensor; keep older releases working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GroupComm:
    """The collectives epcomm needs, on one process group."""

    def __init__(self, group: dist.ProcessGroup, topo: Topology, timeout_s: float, traffic: TrafficStats) -> None:
        self.group = group
        self.topo = topo
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.traffic = traffic
        self.broken: str | None = None  # set after a failed collective: the group is unusable
        self.expects_rejection = False  # inside a data phase whose device call check may say no (Buffer)
        board_id = agree_board_id(self._max_over_ranks)
        self.board = ProgressBoard(group, topo.rank, topo.world_size, board_id)

    @property
    def device(self) -> torch.device:
        """Where this group's collectives take tensors: NCCL only moves CUDA tensors."""
        return torch.device("cuda" if dist.get_backend(self.group) == "nccl" else "cpu")

    def _max_over_ranks(self, value: int) -> int:
        """Collective max of one int, before the progress board exists (Buffer construction)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            work.wait(timeout=self.timeout)
        except RuntimeError as err:
            self.broken = "Buffer construction"
            raise EpcommTimeoutError(
                f"epcomm Buffer construction on rank {self.topo.rank}: not every rank of the group created its "
                f"Buffer within {self.timeout.total_seconds():g} s (Buffer() is collective). Backend said: {err}"
            ) from err
        return int(t.item())

    def run_local(self, op: str, stage: str, fn: Callable[[], None]) -> None:
        """Run ``fn``, a local wait on the peers (a kernel that spins on peer memory), as a stage of ``op``.

        Failures are reported like a failed collective's (naming dead and late peers from the progress
        board, and marking the group broken), but the stage is not posted to the board: one store
        write per kernel launch would put the store on the kernels' path.
        """
        self._run(op, stage, fn, post=False)

    def _run(self, op: str, stage: str, start: Callable[[], dist.Work | list[dist.Work] | None],
             post: bool = True) -> None:
        self.start(op, stage, start, post).wait()

    def start(self, op: str, stage: str, start: Callable[[], dist.Work | list[dist.Work] | None],
              post: bool = True) -> "PendingWork":
        """Issue the collective(s) ``start`` makes as a stage of ``op``; wait for them with ``.wait()``.

        Between the two the caller may compute (the low-latency receive hook). Failures at either
        point are reported as :meth:`run_local` says.
        """
        if self.broken is not None:
            raise EpcommPeerError(
                f"epcomm {op}: rank {self.topo.rank}: this buffer's process group failed earlier "
                f"({self.broken}); create a new process group and Buffer"
            )
        if post:
            self.board.enter(op, stage)
        try:
            works = start()
        except EpcommRecvOverflow:
            # a failure of this rank (its kernel raised the abort flag on every rank), said as itself
            self.broken = f"{op}/{stage}: this rank's dispatch received more rows than num_worst_tokens"
            raise
        except EpcommCallRejected:
            # Every rank's kernel moved nothing. Inside its own call (expects_rejection: every rank raises
            # there) the group stays usable; surfacing later (kernel errors read at a later call, cuda), the
            # ranks are no longer in step: this Buffer is done on every rank (the refusing rank marked itself)
            if not self.expects_rejection:
                self.broken = f"{op}/{stage}: the ranks' calls diverged under host_sync_free"
            raise
        except RuntimeError as err:
            raise self._failure(op, stage, err, posted=post) from err
        works = [w for w in (works if isinstance(works, list) else [works]) if w is not None]
        # a local wait (run_local: a kernel spinning on peer memory) is one kernel round trip
        self.traffic.count_round_trip(op, "collective" if post else "kernel", len(works) if post else 1)
        return PendingWork(self, op, stage, works)

    def _failure(self, op: str, stage: str, err: RuntimeError, posted: bool = True) -> Exception:
        """The epcomm error for a collective of ``op`` that failed with ``err``; marks the group broken.
        ``posted``: the stage was posted to the progress board (False: a kernel, see :meth:`run_local`)."""
        text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        where = f"epcomm {op}: stage '{stage}' on rank {self.topo.rank}"
        self.broken = f"{op}/{stage}"
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        peers = self.board.diagnose(grace_s=min(1.0, self.timeout.total_seconds() / 4), posted=posted)
        if timed_out:
            return EpcommTimeoutError(
                f"{where}: a peer did not arrive within {self.timeout.total_seconds():g} s "
                f"(Buffer(timeout_s=...) sets this limit); {peers}. Backend said: {text}"
            )
        return EpcommPeerError(f"{where}: a peer failed; {peers}. Backend said: {text}")

    def record_rows_to_peers(self, op: str, rows_to_peer: list[int], payload_bytes: int, meta_bytes: int) -> None:
        """Count ``rows_to_peer[r]`` rows of ``payload_bytes + meta_bytes`` sent to rank ``r``, per link class."""
        for peer, rows in enumerate(rows_to_peer):
            if rows:
                self.traffic.record(op, self.topo.link_to(peer), rows, rows * payload_bytes, rows * meta_bytes)

    def all_gather(self, op: str, stage: str, tensor: torch.Tensor) -> torch.Tensor:
        """``[world_size, *tensor.shape]``: every rank's ``tensor``."""
        flat = tensor.contiguous().flatten()
        out = torch.empty(self.topo.world_size * flat.numel(), dtype=tensor.dtype, device=tensor.device)
        self.traffic.control_bytes += flat.numel() * flat.element_size() * (self.topo.world_size - 1)
        self._run(op, stage, lambda: _all_gather_single(out, flat, group=self.group, async_op=True))
        return out.view(self.topo.world_size, *tensor.shape)

    def all_gather_bytes(self, op: str, stage: str, payload: bytes, size: int) -> list[bytes]:
        """Every rank's ``payload``, zero-padded (or cut) to ``size`` bytes."""
        row = torch.zeros(size, dtype=torch.uint8)
        payload = payload[:size]
        if payload:
            row[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        rows = self.all_gather(op, stage, row.to(self.device)).cpu()
        return [bytes(rows[r].tolist()) for r in range(self.topo.world_size)]

    def exchange_rows(
        self,
        op: str,
        stage: str,
        fmt: RowFormat,
        send: dict[str, torch.Tensor],
        send_counts: list[int],
        recv_counts: list[int],
        bulk_out: torch.Tensor | None = None,
        pack: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Exchange rows: ``send_counts[r]`` consecutive rows go to rank ``r``.

        The bulk field moves as it is and the side fields packed beside it: two collectives. With
        ``pack`` (small calls, where a collective costs more than copying the rows) bulk and side
        fields travel as one packed row: one collective, a copy on each side. Every rank must pass
        the same ``pack`` (it changes the number of collectives).

        Args:
            fmt: the row's fields; ``send[name]`` is ``[sum(send_counts), width]``, grouped by
                destination rank ascending.
            send_counts / recv_counts: rows to / from each rank (``world_size`` entries).
            bulk_out: optional ``[sum(recv_counts), width]`` tensor receiving the bulk field.
        Returns:
            per field, ``[sum(recv_counts), width]``, grouped by source rank ascending.
        """
        num_recv = sum(recv_counts)
        bulk = fmt.bulk
        send_bulk = send[bulk.name].reshape(-1, bulk.width)
        if bulk_out is None:
            bulk_out = torch.empty((num_recv, bulk.width), dtype=bulk.dtype, device=send_bulk.device)
        side_send = fmt.pack_side(send)
        self.record_rows_to_peers(op, send_counts, fmt.payload_bytes, fmt.meta_bytes)
        if pack and side_send is not None:
            return self._exchange_packed(op, stage, fmt, send_bulk, side_send, send_counts, recv_counts, bulk_out)
        side_out = None
        if side_send is not None:
            side_out = torch.empty((num_recv, fmt.side_bytes), dtype=torch.uint8, device=send_bulk.device)

        def start() -> list[dist.Work]:
            works = [
                dist.all_to_all_single(
                    bulk_out.view(torch.uint8), send_bulk.contiguous().view(torch.uint8),
                    output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group, async_op=True,
                )
            ]
            if side_send is not None:
                works.append(
                    dist.all_to_all_single(
                        side_out, side_send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                        group=self.group, async_op=True,
                    )
                )
            return works

        self._run(op, stage, start)
        received = {bulk.name: bulk_out}
        if side_out is not None:
            received.update(fmt.unpack_side(side_out))
        return received

    def _exchange_packed(self, op: str, stage: str, fmt: RowFormat, send_bulk: torch.Tensor, side_send: torch.Tensor,
                         send_counts: list[int], recv_counts: list[int], bulk_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`exchange_rows` in one collective: ``uint8 [rows, bulk bytes + side bytes]`` rows."""
        bulk_bytes = fmt.bulk.nbytes
        packed = torch.cat([send_bulk.contiguous().view(torch.uint8), side_send], dim=1)
        out = torch.empty((bulk_out.size(0), fmt.row_bytes), dtype=torch.uint8, device=packed.device)
        self._run(op, stage, lambda: dist.all_to_all_single(
            out, packed, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group,
            async_op=True))
        bulk_out.view(torch.uint8).copy_(out[:, :bulk_bytes])
        return {fmt.bulk.name: bulk_out, **fmt.unpack_side(out[:, bulk_bytes:])}


class PendingWork:
    """Collectives issued by :meth:`GroupComm.start`, not yet waited for."""

    def __init__(self, comm: GroupComm, op: str, stage: str, works: list[dist.Work]) -> None:
        self._comm, self._op, self._stage, self._works = comm, op, stage, works

    def wait(self) -> None:
        """Block until every collective finished (idempotent); raises as :meth:`GroupComm.run_local`."""
        works, self._works = self._works, []
        try:
            for work in works:
                work.wait(timeout=self._comm.timeout)
        except RuntimeError as err:
            raise self._comm._failure(self._op, self._stage, err) from err
