"""Routing layout: which ranks, nodes and experts each token goes to.

Pure, local tensor computations (no communication). Which rank hosts an expert
is :class:`~epcomm.placement.ExpertPlacement`'s rule (today: split evenly and
contiguously, expert ``e`` on rank ``e // (num_experts // world_size)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .placement import ExpertPlacement
from .topology import Topology

__all__ = ["DispatchLayout", "compute_layout", "rank_of_expert"]


class DispatchLayout(NamedTuple):
    """The four tensors of ``Buffer.get_dispatch_layout`` (without the event)."""

    num_tokens_per_rank: torch.Tensor  # [world_size] int32
    num_tokens_per_rdma_rank: torch.Tensor | None  # [num_nodes] int32, None on one node
    num_tokens_per_expert: torch.Tensor  # [num_experts] int32
    is_token_in_rank: torch.Tensor  # [num_tokens, world_size] bool


def rank_of_expert(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """Rank hosting each entry of ``topk_idx``; ``-1`` entries map to ``world_size``.

    Args:
        topk_idx: ``[N, K]`` int64 expert ids, ``-1`` for "no expert".
    Returns:
        ``[N, K]`` int64 rank ids in ``[0, world_size]``.
    Raises:
        ValueError: ``num_experts`` is not a positive multiple of ``world_size``.
    """
    return ExpertPlacement.uniform(num_experts, world_size).rank_of(topk_idx)


def token_rank_mask(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """``[N, world_size]`` bool: token ``t`` selected at least one expert of rank ``r``."""
    ranks = rank_of_expert(topk_idx, num_experts, world_size).clamp_(0, world_size)  # an id >= E: nowhere
    mask = torch.zeros(topk_idx.size(0), world_size + 1, dtype=torch.bool, device=topk_idx.device)
    mask.scatter_(1, ranks, True)
    return mask[:, :world_size].contiguous()


def token_node_mask(is_token_in_rank: torch.Tensor, topo: Topology) -> torch.Tensor:
    """``[N, num_nodes]`` bool: token ``t`` goes to at least one rank of node ``n``."""
    n = is_token_in_rank.size(0)
    return is_token_in_rank.view(n, topo.num_nodes, topo.num_nvl_ranks).any(dim=2)


def compute_layout(topk_idx: torch.Tensor, num_experts: int, topo: Topology) -> DispatchLayout:
    """Count tokens per rank, node and expert, and build ``is_token_in_rank``.

    A token counts once per rank (and once per node) however many of its
    experts live there; ``-1`` entries (and ids outside ``[0, num_experts)``) count nowhere.
    No operation has a shape that depends on the values, so nothing waits for the device (a CUDA graph can
    capture it): the per-expert counts are a scatter-add at ``id + 1`` into ``num_experts + 2`` slots, slot 0
    taking the ``-1`` entries and the last the out-of-range ones.
    """
    is_token_in_rank = token_rank_mask(topk_idx, num_experts, topo.world_size)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    slots = (topk_idx.flatten() + 1).clamp(0, num_experts + 1)
    per_slot = torch.zeros(num_experts + 2, dtype=torch.int32, device=topk_idx.device)
    per_slot.scatter_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
    num_tokens_per_expert = per_slot[1 : num_experts + 1]
    num_tokens_per_rdma_rank = None
    if topo.num_nodes > 1:
        num_tokens_per_rdma_rank = token_node_mask(is_token_in_rank, topo).sum(dim=0, dtype=torch.int32)
    return DispatchLayout(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)
