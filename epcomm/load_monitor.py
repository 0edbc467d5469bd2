"""Live expert-load statistics for EPLB: what :func:`epcomm.eplb.rebalance_experts` needs as ``weight``.

:class:`LoadMonitor` keeps one layer's per-*logical*-expert load over a sliding
window of the last ``W`` steps, fed from what dispatch already produces:

* normal mode: ``num_tokens_per_expert`` from ``Buffer.get_dispatch_layout``
  (this rank's *sent* pairs per expert; logical ``[n]`` or physical ``[R]``);
  or the received pairs of this rank's local experts (``[R / P]``);
* low-latency mode: the ``cumulative_local_expert_recv_stats`` tensor the
  caller passes to ``low_latency_dispatch`` (it only grows; the monitor records
  the increase since the last call).

Feed either the sent or the received counts, not both: summed over ranks each
alone is the global load (every pair is sent by one rank and received by one).
Physical counts are mapped back to logical experts through the placement
(``phy2log``), so replicas of one expert add up.

:meth:`LoadMonitor.summed` adds the window over the ranks of a group with one
``all_reduce``: the same tensor on every rank, ready for ``rebalance_experts``.
:func:`check_placement_agrees` checks, with one ``all_gather`` of a digest, that
every rank holds the same placement before anyone routes with it.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque

import torch
import torch.distributed as dist
from torch import Tensor

from ._comm import _all_gather_single
from .eplb import Placement
from .errors import EpcommInputError

__all__ = ["LoadMonitor", "check_placement_agrees", "placement_digest"]


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL only moves CUDA tensors; everything else (gloo) takes CPU ones."""
    return torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")


class LoadMonitor:
    """Per-logical-expert load of one MoE layer over the last ``window`` steps.

    Record any number of times during a step (micro-batches add up), then call
    :meth:`end_step`; the open step counts in :meth:`local` / :meth:`summed` too.

    Args:
        num_logical: logical experts ``n``.
        window: steps kept (``>= 1``); older steps drop out.
        placement: single-layer :class:`~epcomm.eplb.Placement` the dispatch routes
            to; needed to record physical or per-rank counts. Change it with
            :meth:`set_placement` after a rebalance (the window keeps its logical loads).

    Raises:
        ValueError: ``num_logical`` or ``window`` < 1, or a placement that is layered or
            has another number of logical experts.
    """

    def __init__(self, num_logical: int, *, window: int = 128, placement: Placement | None = None) -> None:
        for name, value in (("num_logical", num_logical), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_logical = num_logical
        self.window = window
        self.placement: Placement | None = None
        self._steps: deque[Tensor] = deque(maxlen=window)
        self._current = torch.zeros(num_logical, dtype=torch.int64)
        self._last_ll: dict[int, Tensor] = {}  # per tensor id: the LL stats seen last time
        if placement is not None:
            self.set_placement(placement)

    # -- configuration -------------------------------------------------------

    def set_placement(self, placement: Placement) -> None:
        """Route physical counts through ``placement`` from now on (e.g. after a rebalance)."""
        if not isinstance(placement, Placement):
            raise TypeError(f"placement must be an epcomm.eplb.Placement, got {type(placement).__name__}")
        if placement.layered:
            raise ValueError("LoadMonitor watches one layer: pass placement.layer(i)")
        if placement.num_logical != self.num_logical:
            raise ValueError(
                f"placement has {placement.num_logical} logical experts, the monitor {self.num_logical}"
            )
        self.placement = placement

    def _need_placement(self, what: str) -> Placement:
        if self.placement is None:
            raise ValueError(f"{what} needs a placement: LoadMonitor(..., placement=...) or set_placement()")
        return self.placement

    # -- recording -----------------------------------------------------------

    @staticmethod
    def _as_counts(name: str, counts: object, length: int | None = None) -> Tensor:
        if isinstance(counts, (list, tuple)):
            counts = torch.tensor(counts, dtype=torch.int64)
        if not isinstance(counts, Tensor) or counts.dim() != 1 or counts.is_floating_point() or counts.is_complex() \
                or counts.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor (or list of ints), got {counts!r:.80}")
        if length is not None and counts.numel() != length:
            raise ValueError(f"{name} must have {length} entries, got {counts.numel()}")
        c = counts.detach().to("cpu", torch.int64)
        if c.numel() and int(c.min()) < 0:
            raise ValueError(f"{name} must be >= 0 (token counts), got {int(c.min())}")
        return c

    def record(self, counts: Tensor | list[int]) -> None:
        """Add per-expert counts of this rank: logical ``[n]`` or, with a placement, physical ``[R]``.

        ``num_tokens_per_expert`` from ``get_dispatch_layout`` fits directly (``[R]`` when
        dispatching physical ids, ``[n]`` without replicas).
        """
        c = self._as_counts("counts", counts)
        if c.numel() == self.num_logical:
            self._current += c
        elif self.placement is not None and c.numel() == self.placement.num_physical:
            self._current.index_add_(0, self.placement.phy2log.cpu(), c)
        else:
            want = f"{self.num_logical} (logical)"
            if self.placement is not None:
                want += f" or {self.placement.num_physical} (physical)"
            raise ValueError(f"counts must have {want} entries, got {c.numel()}")

    def record_local(self, counts: Tensor | list[int], rank: int) -> None:
        """Add the pairs ``rank`` *received* per local slot: ``[R / P]`` (needs a placement).

        E.g. ``num_recv_tokens_per_expert_list`` of a dispatch with ``expert_alignment=1``
        (padded counts would count the padding).
        """
        p = self._need_placement("record_local")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < p.num_gpus:
            raise ValueError(f"rank must be an int in [0, {p.num_gpus}), got {rank!r}")
        c = self._as_counts("counts", counts, p.slots_per_gpu)
        slots = p.phy2log.cpu()[rank * p.slots_per_gpu:(rank + 1) * p.slots_per_gpu]
        self._current.index_add_(0, slots, c)

    def record_low_latency(self, cumulative_local_expert_recv_stats: Tensor, rank: int) -> None:
        """Add what ``cumulative_local_expert_recv_stats`` (int32 ``[R / P]``) gained since the last call.

        The tensor only grows while low-latency dispatches add to it; if it shrank (the
        caller zeroed it), its whole value counts as new.
        """
        stats = cumulative_local_expert_recv_stats
        now = self._as_counts("cumulative_local_expert_recv_stats", stats)
        key = id(stats)
        before = self._last_ll.get(key)
        gained = now if before is None or before.shape != now.shape or bool((now < before).any()) else now - before
        self._last_ll[key] = now
        self.record_local(gained, rank)

    def end_step(self) -> None:
        """Close the open step into the window (the oldest step drops out once ``window`` are kept)."""
        self._steps.append(self._current)
        self._current = torch.zeros(self.num_logical, dtype=torch.int64)

    def reset(self) -> None:
        """Forget every step (e.g. right after a rebalance, to measure the new placement)."""
        self._steps.clear()
        self._current = torch.zeros(self.num_logical, dtype=torch.int64)
        self._last_ll.clear()

    # -- reading -------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Closed steps in the window (at most ``window``)."""
        return len(self._steps)

    def local(self) -> Tensor:
        """This rank's window (closed steps plus the open one): int64 ``[n]`` on the CPU."""
        total = self._current.clone()
        for step in self._steps:
            total += step
        return total

    def summed(self, group: dist.ProcessGroup | None = None) -> Tensor:
        """The window summed over the ranks of ``group`` (a collective: one ``all_reduce``).

        Returns:
            int64 ``[n]`` on the CPU, identical on every rank: the ``weight`` row for
            ``rebalance_experts``. Every rank must call it (with the same ``num_logical``).
        """
        device = _group_device(group)
        total = self.local().to(device)
        dist.all_reduce(total, group=group)
        return total.cpu()


# ------------------------------------------------------------------ agreement


def placement_digest(placement: Placement) -> int:
    """A 63-bit digest of a placement's tensors and GPU count (equal placements, equal digests)."""
    h = hashlib.sha256()
    h.update(repr((placement.num_gpus, tuple(placement.phy2log.shape), tuple(placement.log2phy.shape))).encode())
    for t in (placement.phy2log, placement.log2phy, placement.logcnt):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def check_placement_agrees(placement: Placement, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank unless every rank of ``group`` holds the same placement (one ``all_gather``).

    Each rank contributes ``[ok, digest, num_gpus, num_physical, num_logical]``; ranks
    whose digest differs from the most common one (ties: the lowest rank's) are
    named, as is any rank whose placement is not for a group of this size.

    Raises:
        EpcommInputError: on every rank, with ``problems`` mapping each offending rank to why.
    """
    world = dist.get_world_size(group)
    ok = isinstance(placement, Placement)
    header = torch.tensor(
        [1, placement_digest(placement), placement.num_gpus, placement.num_physical, placement.num_logical]
        if ok else [0, 0, -1, -1, -1],
        dtype=torch.int64,
    )
    device = _group_device(group)
    out = torch.empty(world * header.numel(), dtype=torch.int64, device=device)
    _all_gather_single(out, header.to(device), group=group)
    rows = out.view(world, -1).cpu().tolist()
    problems: dict[int, str] = {}
    for r, (good, _, gpus, phys, logical) in enumerate(rows):
        if not good:
            problems[r] = "placement is not an epcomm.eplb.Placement"
        elif gpus != world:
            problems[r] = f"placement is for {gpus} GPUs, the group has {world} ranks"
    keys = [tuple(row) for row in rows]
    counts = Counter(keys)
    majority = max(counts, key=lambda k: (counts[k], -keys.index(k)))
    majority_ranks = [r for r, k in enumerate(keys) if k == majority]
    for r, key in enumerate(keys):
        if key != majority and r not in problems:
            _, _, gpus, phys, logical = key
            problems[r] = (
                f"placement differs from the one on {_ranks_text(majority_ranks)} "
                f"(this rank: {phys} slots, {logical} logical experts, {gpus} GPUs; theirs: "
                f"{majority[3]} slots, {majority[4]} logical experts, {majority[2]} GPUs; "
                f"digests differ): compute it from the same summed loads on every rank, or broadcast it"
            )
    if problems:
        raise EpcommInputError("check_placement_agrees", problems, world)
