"""ExpertPlacement against brute-force loops, its round trips, and its argument errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epcomm._validate import Invalid
from epcomm.layout import rank_of_expert
from epcomm.placement import ExpertPlacement, check_num_experts


def owners(num_experts: int, world_size: int) -> list[int]:
    """Brute force: deal experts out in ``world_size`` equal contiguous blocks, rank 0 first."""
    per_rank = num_experts // world_size
    table = []
    for rank in range(world_size):
        for _ in range(per_rank):
            table.append(rank)
    return table


@st.composite
def problems(draw):
    world = draw(st.integers(1, 8))
    experts = world * draw(st.integers(1, 5))
    topk = draw(st.integers(1, 6))
    n = draw(st.integers(0, 12))
    rows = draw(st.lists(st.lists(st.integers(-1, experts - 1), min_size=topk, max_size=topk), min_size=n, max_size=n))
    return ExpertPlacement.uniform(experts, world), torch.tensor(rows, dtype=torch.int64).view(n, topk)


@settings(max_examples=80, deadline=None)
@given(problems())
def test_rule_matches_loops(problem):
    placement, topk_idx = problem
    table = owners(placement.num_experts, placement.world_size)
    world = placement.world_size
    assert placement.num_local_experts * world == placement.num_experts

    ranks = placement.rank_of(topk_idx)
    assert ranks.dtype == torch.int64 and ranks.shape == topk_idx.shape
    assert ranks.tolist() == [[table[e] if e >= 0 else world for e in row] for row in topk_idx.tolist()]
    assert torch.equal(rank_of_expert(topk_idx, placement.num_experts, world), ranks)  # layout delegates

    for rank in range(world):
        hosted = [e for e in range(placement.num_experts) if table[e] == rank]
        assert list(placement.local_experts(rank)) == hosted
        local, mine = placement.to_local(topk_idx, rank)
        assert local.dtype == torch.int64 and mine.dtype == torch.bool
        want = [[hosted.index(e) if e in hosted else -1 for e in row] for row in topk_idx.tolist()]
        assert local.tolist() == want
        assert mine.tolist() == [[i >= 0 for i in row] for row in want]


@settings(max_examples=40, deadline=None)
@given(problems())
def test_to_local_to_global_round_trip(problem):
    placement, topk_idx = problem
    owned = torch.zeros_like(topk_idx)
    for rank in range(placement.world_size):
        local, mine = placement.to_local(topk_idx, rank)
        # each rank gets back exactly its own experts; everything else stays -1
        assert torch.equal(placement.to_global(local, rank), torch.where(mine, topk_idx, -1))
        owned += mine.long()
    # every real expert id is local to exactly one rank, -1 to none
    assert torch.equal(owned, (topk_idx >= 0).long())


def test_to_global_of_every_local_id():
    placement = ExpertPlacement.uniform(12, 3)
    for rank in range(3):
        local = torch.arange(-1, placement.num_local_experts).view(1, -1)
        assert placement.to_global(local, rank).tolist() == [[-1, *placement.local_experts(rank)]]


@pytest.mark.parametrize("num_experts, world_size", [(1, 1), (8, 1), (8, 8), (12, 4), (256, 32)])
def test_rank_table(num_experts, world_size):
    placement = ExpertPlacement.uniform(num_experts, world_size)
    table = placement.rank_table()
    assert table.dtype == torch.int32 and table.shape == (num_experts,) and table.device.type == "cpu"
    assert table.tolist() == owners(num_experts, world_size)
    # the table and rank_of agree on every expert id
    assert torch.equal(placement.rank_of(torch.arange(num_experts)), table.long())


@pytest.mark.parametrize(
    "num_experts, world_size, match",
    [
        (6, 4, "num_experts must be a positive multiple of the world size 4 .* got 6"),
        (0, 2, "num_experts .* got 0"),
        (-4, 2, "num_experts .* got -4"),
        (4.0, 2, "num_experts .* got 4.0"),
        (8, 0, "world_size must be a positive int, got 0"),
        (8, -2, "world_size .* got -2"),
        (8, 2.0, "world_size .* got 2.0"),
    ],
)
def test_bad_arguments_are_named(num_experts, world_size, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement.uniform(num_experts, world_size)
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(num_experts, world_size)  # the constructor validates too


def test_bad_rank_is_named():
    placement = ExpertPlacement.uniform(8, 4)
    topk_idx = torch.zeros(2, 2, dtype=torch.int64)
    for rank in (-1, 4, 1.0):
        with pytest.raises(ValueError, match=r"rank must be an int in \[0, 4\), got"):
            placement.local_experts(rank)
        with pytest.raises(ValueError, match="rank must be"):
            placement.to_local(topk_idx, rank)
        with pytest.raises(ValueError, match="rank must be"):
            placement.to_global(topk_idx, rank)


def test_check_num_experts_raises_invalid_with_buffers_message():
    check_num_experts(8, 4)
    with pytest.raises(Invalid) as err:
        check_num_experts(6, 4)
    # Buffer shows this text on every rank; keep it stable
    assert str(err.value) == (
        "num_experts must be a positive multiple of the world size 4 (experts are split evenly over ranks), got 6"
    )
    with pytest.raises(ValueError, match="world_size"):
        check_num_experts(8, 0)


def test_frozen_and_hashable():
    placement = ExpertPlacement.uniform(16, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        placement.num_experts = 8  # type: ignore[misc]
    assert placement == ExpertPlacement(16, 4) and hash(placement) == hash(ExpertPlacement(16, 4))
