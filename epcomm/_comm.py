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
from .errors import EpcommPeerError, EpcommTimeoutError
from .topology import Topology
from .traffic import TrafficStats

__all__ = ["GroupComm"]

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
        board_id = agree_board_id(self._max_over_ranks)
        self.board = ProgressBoard(group, topo.rank, topo.world_size, board_id)

    def _max_over_ranks(self, value: int) -> int:
        """Collective max of one int, before the progress board exists (Buffer construction)."""
        on_gpu = dist.get_backend(self.group) == "nccl"  # NCCL only moves CUDA tensors
        t = torch.tensor([value], dtype=torch.int64, device="cuda" if on_gpu else "cpu")
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

    def _run(self, op: str, stage: str, start: Callable[[], dist.Work | None]) -> None:
        if self.broken is not None:
            raise EpcommPeerError(
                f"epcomm {op}: rank {self.topo.rank}: this buffer's process group failed earlier "
                f"({self.broken}); create a new process group and Buffer"
            )
        self.board.enter(op, stage)
        try:
            work = start()
            if work is not None:
                work.wait(timeout=self.timeout)
        except RuntimeError as err:
            text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            where = f"epcomm {op}: stage '{stage}' on rank {self.topo.rank}"
            self.broken = f"{op}/{stage}"
            timed_out = "timed out" in text.lower() or "timeout" in text.lower()
            peers = self.board.diagnose(grace_s=min(1.0, self.timeout.total_seconds() / 4))
            if timed_out:
                raise EpcommTimeoutError(
                    f"{where}: a peer did not arrive within {self.timeout.total_seconds():g} s "
                    f"(Buffer(timeout_s=...) sets this limit); {peers}. Backend said: {text}"
                ) from err
            raise EpcommPeerError(f"{where}: a peer failed; {peers}. Backend said: {text}") from err

    def all_gather(self, op: str, stage: str, tensor: torch.Tensor) -> torch.Tensor:
        """``[world_size, *tensor.shape]``: every rank's ``tensor``."""
        flat = tensor.contiguous().flatten()
        out = torch.empty(self.topo.world_size * flat.numel(), dtype=tensor.dtype, device=tensor.device)
        self.traffic.control_bytes += flat.numel() * flat.element_size() * (self.topo.world_size - 1)
        self._run(op, stage, lambda: _all_gather_single(out, flat, group=self.group, async_op=True))
        return out.view(self.topo.world_size, *tensor.shape)

    def all_to_all_rows(
        self,
        op: str,
        stage: str,
        send: torch.Tensor,
        send_counts: list[int],
        recv_counts: list[int],
        payload_bytes_per_row: int,
    ) -> torch.Tensor:
        """Exchange rows: ``send_counts[r]`` consecutive rows of ``send`` go to rank ``r``.

        Args:
            send: ``[sum(send_counts), row_bytes]`` uint8, grouped by destination rank ascending.
            send_counts / recv_counts: rows to / from each rank (``world_size`` entries).
            payload_bytes_per_row: the part of each row that is token data (for accounting).
        Returns:
            ``[sum(recv_counts), row_bytes]`` uint8, grouped by source rank ascending.
        """
        row_bytes = send.size(1)
        out = torch.empty((sum(recv_counts), row_bytes), dtype=send.dtype, device=send.device)
        for peer, rows in enumerate(send_counts):
            if rows:
                self.traffic.record(
                    op,
                    self.topo.link_to(peer),
                    rows,
                    rows * payload_bytes_per_row,
                    rows * (row_bytes - payload_bytes_per_row),
                )
        self._run(
            op,
            stage,
            lambda: dist.all_to_all_single(
                out, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group, async_op=True
            ),
        )
        return out
