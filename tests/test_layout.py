"""get_dispatch_layout's counts against per-token loops, and Topology."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epcomm.layout import compute_layout
from epcomm.topology import LinkClass, Topology


@st.composite
def routings(draw):
    nodes = draw(st.sampled_from([1, 2, 4]))
    nvl = draw(st.sampled_from([1, 2, 4]))
    world = nodes * nvl
    experts = world * draw(st.integers(1, 4))
    topk = draw(st.integers(1, min(6, experts)))
    n = draw(st.integers(0, 20))
    rows = draw(st.lists(st.lists(st.integers(-1, experts - 1), min_size=topk, max_size=topk), min_size=n, max_size=n))
    return Topology(world, 0, nvl), experts, torch.tensor(rows, dtype=torch.int64).view(n, topk)


@settings(max_examples=60, deadline=None)
@given(routings())
def test_layout_matches_loops(problem):
    topo, experts, topk_idx = problem
    per_rank_experts = experts // topo.world_size
    layout = compute_layout(topk_idx, experts, topo)
    ranks_of = [{e // per_rank_experts for e in row if e >= 0} for row in topk_idx.tolist()]
    want_in_rank = [[r in ranks for r in range(topo.world_size)] for ranks in ranks_of]
    assert layout.is_token_in_rank.tolist() == want_in_rank or topk_idx.size(0) == 0
    assert layout.is_token_in_rank.dtype == torch.bool and layout.is_token_in_rank.is_contiguous()
    assert layout.num_tokens_per_rank.dtype == torch.int32
    assert layout.num_tokens_per_rank.tolist() == [sum(r in ranks for ranks in ranks_of) for r in range(topo.world_size)]
    want_expert = [sum(row.count(e) for row in topk_idx.tolist()) for e in range(experts)]
    assert layout.num_tokens_per_expert.tolist() == want_expert
    if topo.num_nodes == 1:
        assert layout.num_tokens_per_rdma_rank is None
    else:
        nodes_of = [{r // topo.num_nvl_ranks for r in ranks} for ranks in ranks_of]
        assert layout.num_tokens_per_rdma_rank.tolist() == [
            sum(n in nodes for nodes in nodes_of) for n in range(topo.num_nodes)
        ]


def test_topology_placement():
    topo = Topology(world_size=8, rank=5, num_nvl_ranks=2)
    assert (topo.num_nodes, topo.node, topo.local_rank) == (4, 2, 1)
    assert list(topo.rail_ranks(1)) == [1, 3, 5, 7]
    assert list(topo.node_ranks(2)) == [4, 5]
    assert topo.link_to(5) == LinkClass.SELF and topo.link_to(4) == LinkClass.NVLINK
    assert topo.link_to(0) == LinkClass.NETWORK


def test_topology_rejects_bad_node_size():
    with pytest.raises(ValueError, match="num_nvl_ranks .* must divide the world size"):
        Topology(world_size=6, rank=0, num_nvl_ranks=4)
