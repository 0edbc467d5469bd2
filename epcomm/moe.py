"""Helpers for writing an expert-parallel MoE layer on top of :mod:`epcomm.ops`.

* :class:`ExpertParallel`: one layer's communication (a Buffer, the expert
  placement, the alignment); differentiable and torch.compile-traceable
  ``dispatch`` / ``combine``.
* :func:`group_by_expert` / :func:`ungroup_from_experts`: turn the received
  rows (one per token, with up to ``num_topk`` local experts each) into
  contiguous per-expert groups padded to ``expert_alignment`` for a grouped
  GEMM, and back: weighted by the gate, rows with several local experts summed.
  :func:`grouped_linear` is a plain per-expert loop to run on those groups.
* :func:`expert_load` and :class:`LoadStats`: tokens per expert summed over
  ranks (an ``all_reduce``), for :func:`epcomm.routing.update_bias` and logging.

The grouping helpers take the host-side counts (``num_recv_tokens_per_expert_list``),
as a grouped-GEMM launch does; they run eagerly. Under ``torch.compile`` either
let them break the graph there or compute experts without grouping.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .buffer import Buffer
from .placement import ExpertPlacement

__all__ = [
    "ExpertParallel",
    "ExpertGroups",
    "group_by_expert",
    "ungroup_from_experts",
    "grouped_linear",
    "expert_load",
    "LoadStats",
]


class ExpertParallel:
    """The communication of one MoE layer: dispatch to the experts' ranks and combine back.

    Experts are placed by :attr:`placement` (:meth:`ExpertPlacement.uniform
    <epcomm.placement.ExpertPlacement.uniform>`): expert ``e`` lives on rank
    ``e // num_local_experts`` (local id ``e % num_local_experts``).
    Construct it outside ``torch.compile``; its methods trace without graph breaks.

    Args:
        buffer: the :class:`~epcomm.Buffer` of the expert-parallel group.
        num_experts: routed experts in total, divisible by the group size.
        expert_alignment: pad each local expert's row count to a multiple of this.
    Raises:
        ValueError: ``num_experts`` is not a positive multiple of the group size, or
            ``expert_alignment < 1``.
    """

    def __init__(self, buffer: Buffer, num_experts: int, expert_alignment: int = 1) -> None:
        placement = ExpertPlacement.uniform(num_experts, buffer.group_size)
        if expert_alignment < 1:
            raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
        self.buffer = buffer
        self.placement = placement
        self.num_experts = num_experts
        self.num_local_experts = placement.num_local_experts
        self.rank = buffer.rank
        self.expert_alignment = expert_alignment
        self._key = ops.buffer_key(buffer)

    @property
    def local_experts(self) -> range:
        """Global ids of the experts on this rank."""
        return self.placement.local_experts(self.rank)

    def dispatch(self, x: Tensor | tuple[Tensor, Tensor], topk_idx: Tensor, topk_weights: Tensor) -> ops.Dispatched:
        """Differentiable dispatch; see :func:`epcomm.ops.dispatch` for shapes."""
        return ops._dispatch(self._key, x, topk_idx, topk_weights, self.num_experts, self.expert_alignment)

    def combine(self, y: Tensor, dispatched: ops.Dispatched, num_tokens: int) -> Tensor:
        """Differentiable combine of ``y`` ``[num_recv, hidden]`` -> ``[num_tokens, hidden]`` (y's dtype)."""
        return ops.combine(y, dispatched.handle, num_tokens)[0]


# ---------------------------------------------------------------- grouping
class ExpertGroups(NamedTuple):
    """Received rows regrouped by local expert (see :func:`group_by_expert`).

    Attributes:
        x: ``[num_padded, hidden]`` recv_x's dtype: expert 0's rows, then expert 1's, ...; each
            group is followed by zero rows up to ``counts[e]`` rows.
        weights: ``[num_padded]`` float32, the gate weight of each (row, expert) pair, 0 on padding.
        counts: rows per local expert including padding (``num_recv_tokens_per_expert_list``).
        positions: ``[num_pairs]`` int64, where each (row, expert) pair sits in ``x``.
        rows: ``[num_pairs]`` int64, which received row each pair came from.
    """

    x: Tensor
    weights: Tensor
    counts: list[int]
    positions: Tensor
    rows: Tensor

    @property
    def row_idx(self) -> Tensor:
        """``[num_padded]`` int64: the received row of each grouped row, ``-1`` on padding."""
        out = torch.full((self.x.size(0),), -1, dtype=torch.int64, device=self.x.device)
        return out.index_copy(0, self.positions, self.rows)


def _exclusive_cumsum(values: Tensor) -> Tensor:
    return torch.cumsum(values, 0) - values


def group_by_expert(
    recv_x: Tensor,
    recv_topk_idx: Tensor,
    recv_topk_weights: Tensor,
    num_recv_tokens_per_expert_list: list[int],
    expert_alignment: int = 1,
) -> ExpertGroups:
    """Group received rows by local expert, padded for a grouped GEMM. Differentiable.

    A row routed to ``j`` local experts appears ``j`` times. Inside a group rows keep
    their received order. Equivalent loop::

        for e in range(num_local_experts):
            for r, k in pairs (row r, slot k) with recv_topk_idx[r, k] == e, r ascending:
                x.append(recv_x[r]); weights.append(recv_topk_weights[r, k])
            pad with zero rows (weight 0) up to num_recv_tokens_per_expert_list[e]

    Args:
        recv_x: ``[num_recv, hidden]`` from dispatch.
        recv_topk_idx: ``[num_recv, num_topk]`` int64 local expert ids, ``-1`` elsewhere.
        recv_topk_weights: ``[num_recv, num_topk]`` float32.
        num_recv_tokens_per_expert_list: one int per local expert, rounded up to ``expert_alignment``.
        expert_alignment: the alignment dispatch used (checked against the counts).
    Raises:
        ValueError: the counts do not match ``recv_topk_idx`` rounded up to ``expert_alignment``.
    """
    num_local = len(num_recv_tokens_per_expert_list)
    valid = recv_topk_idx >= 0
    rows, slots = valid.nonzero(as_tuple=True)  # row-major: rows ascending
    experts = recv_topk_idx[rows, slots]
    order = torch.sort(experts, stable=True).indices
    rows, slots, experts = rows[order], slots[order], experts[order]
    actual = torch.bincount(experts, minlength=num_local)
    aligned = (actual + expert_alignment - 1) // expert_alignment * expert_alignment
    if actual.numel() != num_local or aligned.tolist() != list(num_recv_tokens_per_expert_list):
        raise ValueError(
            f"num_recv_tokens_per_expert_list {list(num_recv_tokens_per_expert_list)} does not match recv_topk_idx "
            f"(rows per local expert {actual.tolist()}, aligned to {expert_alignment}); pass dispatch's outputs "
            "and the same expert_alignment"
        )
    counts = torch.tensor(num_recv_tokens_per_expert_list, dtype=torch.int64, device=recv_x.device)
    rank_in_group = torch.arange(rows.numel(), device=recv_x.device) - _exclusive_cumsum(actual)[experts]
    positions = _exclusive_cumsum(counts)[experts] + rank_in_group
    num_padded = int(counts.sum())
    x = recv_x.new_zeros(num_padded, recv_x.size(1)).index_copy(0, positions, recv_x.index_select(0, rows))
    pair_weights = recv_topk_weights[rows, slots]
    weights = pair_weights.new_zeros(num_padded).index_copy(0, positions, pair_weights)
    return ExpertGroups(x, weights, list(num_recv_tokens_per_expert_list), positions, rows)


def ungroup_from_experts(expert_out: Tensor, groups: ExpertGroups, num_recv: int, weighted: bool = True) -> Tensor:
    """Sum the expert outputs back into one row per received token. Differentiable.

    ``out[r] = sum over pairs (r, e) of weight(r, e) * expert_out[position(r, e)]``,
    accumulated in float32 and cast to expert_out's dtype once; padding rows are ignored.

    Args:
        expert_out: ``[num_padded, hidden_out]`` rows in :attr:`ExpertGroups.x`'s order.
        groups: from :func:`group_by_expert`.
        num_recv: rows dispatch received (``recv_x.size(0)``).
        weighted: multiply by the gate weights (``False``: plain sum).
    Returns:
        ``[num_recv, hidden_out]``, expert_out's dtype: ready for combine.
    """
    if expert_out.size(0) != groups.x.size(0):
        raise ValueError(f"expert_out has {expert_out.size(0)} rows but the groups have {groups.x.size(0)}")
    pairs = expert_out.index_select(0, groups.positions).float()
    if weighted:
        pairs = pairs * groups.weights.index_select(0, groups.positions).unsqueeze(1)
    out = pairs.new_zeros(num_recv, expert_out.size(1)).index_add(0, groups.rows, pairs)
    return out.to(expert_out.dtype)


def grouped_linear(x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
    """Per-expert matmul on grouped rows (a reference grouped GEMM).

    Args:
        x: ``[num_padded, in]`` grouped rows (:attr:`ExpertGroups.x`).
        weight: ``[num_local_experts, in, out]``.
        counts: rows per expert, ``sum(counts) == num_padded``.
    Returns:
        ``[num_padded, out]``: ``x[group e] @ weight[e]`` for each expert ``e``.
    """
    if weight.dim() != 3 or weight.size(0) != len(counts):
        raise ValueError(f"weight must be [num_local_experts={len(counts)}, in, out], got {list(weight.shape)}")
    parts = [chunk @ weight[e] for e, chunk in enumerate(torch.split(x, counts))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.size(2))


# -------------------------------------------------------------- load stats
class LoadStats(NamedTuple):
    """Expert load over all ranks of a step.

    Attributes:
        tokens_per_expert: ``[num_experts]`` int64, (token, expert) pairs per expert, summed over ranks.
        tokens_per_rank: ``[world_size]`` int64, the same summed over each rank's experts.
        max_over_mean: busiest expert's load over the mean expert load (1.0 is perfect balance).
        rank_max_over_mean: the same per rank (what the slowest rank's experts see).
    """

    tokens_per_expert: Tensor
    tokens_per_rank: Tensor
    max_over_mean: float
    rank_max_over_mean: float

    @classmethod
    def from_counts(cls, tokens_per_expert: Tensor, world_size: int) -> "LoadStats":
        """Statistics of ``tokens_per_expert`` ``[num_experts]`` (int64) over ``world_size`` ranks.

        Raises:
            ValueError: ``num_experts`` is not a positive multiple of ``world_size``.
        """
        placement = ExpertPlacement.uniform(tokens_per_expert.numel(), world_size)
        # sum each expert into its rank through the placement's table rather than assuming contiguous blocks
        ranks = placement.rank_table(tokens_per_expert.device).long()
        per_rank = tokens_per_expert.new_zeros(world_size).index_add_(0, ranks, tokens_per_expert)
        load, rank_load = tokens_per_expert.double(), per_rank.double()
        ratio = float(load.max() / load.mean()) if load.sum() > 0 else 1.0
        rank_ratio = float(rank_load.max() / rank_load.mean()) if rank_load.sum() > 0 else 1.0
        return cls(tokens_per_expert, per_rank, ratio, rank_ratio)


def expert_load(topk_idx: Tensor, num_experts: int, group: dist.ProcessGroup | None = None) -> LoadStats:
    """Tokens per expert over all ranks of ``group`` (a collective: one ``all_reduce``).

    Args:
        topk_idx: ``[num_tokens, num_topk]`` int64, this rank's routing (``-1`` ignored).
        num_experts: total experts, divisible by the group size.
        group: process group (``None``: the default group).
    Returns:
        :class:`LoadStats`, identical on every rank (feed ``tokens_per_expert`` to
        :func:`epcomm.routing.update_bias` so every rank keeps the same bias).
    Raises:
        ValueError: ``num_experts`` is not a positive multiple of the group size, or ``topk_idx``
            holds ids ``>= num_experts``.
    """
    world = dist.get_world_size(group)
    ExpertPlacement.uniform(num_experts, world)  # validates num_experts before the collective
    ids = topk_idx[topk_idx >= 0]
    counts = torch.bincount(ids.flatten(), minlength=num_experts).to(torch.int64)
    if counts.numel() != num_experts:
        raise ValueError(f"topk_idx holds expert ids >= num_experts ({num_experts})")
    dist.all_reduce(counts, group=group)  # on topk_idx's device (NCCL groups need CUDA tensors)
    return LoadStats.from_counts(counts.cpu(), world)
