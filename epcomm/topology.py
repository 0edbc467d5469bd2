"""Where each rank sits: nodes (NVLink domains) and local ranks.

Rank ``r`` is local rank ``r % num_nvl_ranks`` of node ``r // num_nvl_ranks``,
the layout DeepEP uses, but with the number of ranks per node configurable
instead of fixed at 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Topology", "LinkClass"]


class LinkClass(str, Enum):
    """The kind of link a transfer between two ranks uses.

    The values are the keys of ``buffer.traffic`` and of the benchmarks' JSON; the C++ side's
    ``transport::LinkClass`` (csrc/transport/transport.cuh) has the same three, in the same order.
    """

    SELF = "self"  # same rank: a local copy, no link
    NVLINK = "nvlink"  # same node, different rank
    NETWORK = "network"  # different nodes


@dataclass(frozen=True)
class Topology:
    """Ranks grouped into nodes of ``num_nvl_ranks`` ranks each."""

    world_size: int
    rank: int
    num_nvl_ranks: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.num_nvl_ranks < 1 or self.world_size % self.num_nvl_ranks:
            raise ValueError(
                f"num_nvl_ranks (ranks per node) must divide the world size: "
                f"got num_nvl_ranks={self.num_nvl_ranks}, world_size={self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.num_nvl_ranks

    @property
    def node(self) -> int:
        return self.node_of(self.rank)

    @property
    def local_rank(self) -> int:
        return self.local_of(self.rank)

    def node_of(self, rank: int) -> int:
        return rank // self.num_nvl_ranks

    def local_of(self, rank: int) -> int:
        return rank % self.num_nvl_ranks

    def rank_of(self, node: int, local_rank: int) -> int:
        return node * self.num_nvl_ranks + local_rank

    def node_ranks(self, node: int) -> range:
        """The global ranks of ``node``, ascending."""
        return range(node * self.num_nvl_ranks, (node + 1) * self.num_nvl_ranks)

    def rail_ranks(self, local_rank: int) -> range:
        """The ranks with local index ``local_rank`` on every node, ascending."""
        return range(local_rank, self.world_size, self.num_nvl_ranks)

    def link_to(self, peer: int) -> LinkClass:
        if peer == self.rank:
            return LinkClass.SELF
        if self.node_of(peer) == self.node:
            return LinkClass.NVLINK
        return LinkClass.NETWORK
