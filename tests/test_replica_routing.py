"""epcomm.eplb.logical_to_physical: the local and dynamic replica-routing policies, and a MoE layer with
replicas giving the same output as without, bit for bit, on the torch and sim backends."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epcomm.eplb import (
    Placement,
    dynamic_plan,
    gather_expert_counts,
    logical_counts,
    logical_to_physical,
    optimal_max_load,
    rank_loads,
    rebalance_experts,
)


def placement_of(phy2log: list[int], num_gpus: int) -> Placement:
    """A single-layer Placement from the logical expert of each slot."""
    p2l = torch.tensor(phy2log, dtype=torch.int64)
    n = int(p2l.max()) + 1
    cnt = torch.bincount(p2l, minlength=n)
    l2p = torch.full((n, int(cnt.max())), -1, dtype=torch.int64)
    for e in range(n):
        slots = (p2l == e).nonzero().flatten()
        l2p[e, : slots.numel()] = slots
    return Placement(p2l, l2p, cnt, num_gpus)


def to_logical(slots: torch.Tensor, placement: Placement) -> torch.Tensor:
    return torch.where(slots >= 0, placement.phy2log[slots.clamp_min(0)], -1)


def skewed_routing(num_tokens: int, n: int, topk: int, seed: int, drop: float = 0.1) -> torch.Tensor:
    """Distinct experts per token drawn with Zipf-like weights, some entries -1."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2
    idx = torch.stack([torch.multinomial(probs, topk, generator=g) for _ in range(num_tokens)]) if num_tokens else \
        torch.zeros(0, topk, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=g) < drop] = -1
    return idx


# ------------------------------------------------------------------ local policy


# 4 GPUs x 3 slots; expert 0 on GPUs 0 and 2, expert 1 on GPUs 1, 2, 3, expert 2 on GPU 0 twice
LAYOUT = [0, 2, 2,  1, 4, 5,  0, 1, 6,  1, 7, 3]


def test_prefers_own_rank_then_own_node_then_spreads():
    p = placement_of(LAYOUT, 4)
    idx = torch.tensor([[0, 1]] * 6, dtype=torch.int64)
    # own rank: ranks 0 and 2 hold expert 0, ranks 1, 2, 3 hold expert 1
    assert logical_to_physical(idx, p, 0, num_nvl_ranks=2)[:, 0].tolist() == [0] * 6
    assert logical_to_physical(idx, p, 2, num_nvl_ranks=2).tolist() == [[6, 7]] * 6
    assert logical_to_physical(idx, p, 3, num_nvl_ranks=2)[:, 1].tolist() == [9] * 6
    # own node: nodes {0, 1} and {2, 3}; rank 1 has no replica of expert 0, its node has slot 0
    assert logical_to_physical(idx, p, 1, num_nvl_ranks=2)[:, 0].tolist() == [0] * 6
    assert logical_to_physical(idx, p, 3, num_nvl_ranks=2)[:, 0].tolist() == [6] * 6
    # one node of 4: rank 1 has neither, so expert 0's pairs alternate between slots 0 and 6
    col = logical_to_physical(idx, p, 1, num_nvl_ranks=4)[:, 0].tolist()
    assert sorted(col) == [0, 0, 0, 6, 6, 6] and col[:2] in ([0, 6], [6, 0])
    # rank 0 with one node: expert 1 has no replica on rank 0, so it spreads over slots 3, 7, 9 evenly
    col = logical_to_physical(idx, p, 0, num_nvl_ranks=4)[:, 1].tolist()
    assert sorted(col) == [3, 3, 7, 7, 9, 9]


def test_two_replicas_on_one_gpu_share_its_pairs():
    p = placement_of(LAYOUT, 4)
    idx = torch.tensor([[2]] * 5, dtype=torch.int64)
    # expert 2 sits on slots 1 and 2, both on GPU 0: rank 0 keeps its pairs at home, alternating
    assert logical_to_physical(idx, p, 0).flatten().tolist() == [1, 2, 1, 2, 1]
    # rank 1 (same node) does the same, starting one further along
    assert logical_to_physical(idx, p, 1).flatten().tolist() == [2, 1, 2, 1, 2]


@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(0, 3))
@settings(max_examples=30, deadline=None)
def test_even_spread_maps_back_and_keeps_minus_one(seed, extra_per_gpu, rank):
    num_gpus, n = 4, 8
    R = n + extra_per_gpu * num_gpus
    w = torch.rand(1, n, generator=torch.Generator().manual_seed(seed)) ** 4
    p = Placement(*rebalance_experts(w, R, 1, 1, num_gpus), num_gpus).layer(0)
    idx = skewed_routing(60, n, 3, seed)
    out = logical_to_physical(idx, p, rank, num_nvl_ranks=num_gpus)
    assert out.dtype == torch.int64 and out.shape == idx.shape
    assert torch.equal(to_logical(out, p), idx)  # -1 kept, every pair on a replica of its expert
    assert torch.equal(out, logical_to_physical(idx, p, rank, num_nvl_ranks=num_gpus))  # deterministic
    # among the replicas the policy may choose (none on this rank: all of them), counts differ by <= 1
    for e in range(n):
        reps = p.replicas_of(e)
        if any(p.gpu_of_slot(s) == rank for s in reps):
            continue
        got = [int((out == s).sum()) for s in reps]
        assert max(got) - min(got) <= 1, (e, reps, got)


def test_empty_and_cpu_device_and_contiguous_is_identity():
    p = Placement.contiguous(8, 4)
    idx = skewed_routing(20, 8, 2, 0)
    assert torch.equal(logical_to_physical(idx, p, 3, num_nvl_ranks=2), idx)
    empty = torch.zeros(0, 4, dtype=torch.int64)
    assert logical_to_physical(empty, p, 0).shape == (0, 4)


def test_node_cap_prefers_nodes_the_token_uses():
    # 8 GPUs, one per node, 2 slots each: experts 0-3 on nodes 0-3, expert 4 on nodes 3 and 7
    layout = [0, 5, 1, 6, 2, 7, 3, 4, 8, 9, 10, 11, 12, 13, 4, 14]
    p = placement_of(layout, 8)
    idx = torch.tensor([[0, 1, 2, 3, 4]] * 4, dtype=torch.int64)
    for rank in (4, 5):
        out = logical_to_physical(idx, p, rank, num_nvl_ranks=1, max_nodes_per_token=4)
        assert out[:, 4].tolist() == [7] * 4  # the replica on node 3, which the token already uses
    # the same expert on its own: the pairs spread over both replicas
    alone = logical_to_physical(torch.tensor([[4]] * 4), p, 5, num_nvl_ranks=1)
    assert sorted(alone.flatten().tolist()) == [7, 7, 14, 14]
    # no choice keeps this token within 4 nodes
    with pytest.raises(ValueError, match=r"max_nodes_per_token=4.*token 0"):
        logical_to_physical(torch.tensor([[0, 1, 2, 3, 8]]), p, 0, num_nvl_ranks=1)
    assert logical_to_physical(torch.tensor([[0, 1, 2, 3, 8]]), p, 0, num_nvl_ranks=1,
                               max_nodes_per_token=5).tolist() == [[0, 2, 4, 6, 8]]


def test_hierarchical_placement_never_changes_a_tokens_nodes():
    w = torch.tensor([[40.0, 1, 1, 1, 30, 1, 1, 1, 20, 1, 1, 1, 10, 1, 1, 1]])
    p = Placement.rebalance(w, 24, 4, 2, 4).layer(0)  # 2 nodes x 2 GPUs, groups of 4 experts kept on nodes
    idx = skewed_routing(80, 16, 4, 1)
    per_node = 12
    for rank in range(4):
        out = logical_to_physical(idx, p, rank, num_nvl_ranks=2, max_nodes_per_token=4)
        for e in range(16):
            nodes = {int(s) // per_node for s in out[idx == e].tolist()}
            assert len(nodes) <= 1


BAD = [
    (dict(topk_idx=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "int64"),
    (dict(topk_idx=torch.zeros(4, dtype=torch.int64)), ValueError, r"\[num_tokens, num_topk\]"),
    (dict(topk_idx=torch.full((2, 2), 8)), ValueError, r"logical expert ids in \[0, 8\)"),
    (dict(topk_idx=torch.full((2, 2), -2)), ValueError, "-1"),
    (dict(topk_idx=[[0]]), TypeError, "torch.Tensor"),
    (dict(rank=4), ValueError, r"rank must be an int in \[0, placement.num_gpus=4\)"),
    (dict(rank=True), ValueError, "rank must be an int"),
    (dict(num_nvl_ranks=3), ValueError, "num_nvl_ranks must be a positive divisor"),
    (dict(policy="nearest"), ValueError, "policy must be one of"),
    (dict(max_nodes_per_token=0), ValueError, "max_nodes_per_token"),
    (dict(policy="dynamic"), ValueError, "gather_expert_counts"),
    (dict(expert_counts=torch.zeros(4, 8, dtype=torch.int64)), ValueError, "only used by policy='dynamic'"),
    (dict(policy="dynamic", expert_counts=torch.zeros(4, 7, dtype=torch.int64)), ValueError, r"\[world=4, num_logical=8\]"),
    (dict(policy="dynamic", expert_counts=torch.zeros(4, 8, dtype=torch.int64)), ValueError, "does not match this rank"),
    (dict(placement="contiguous"), TypeError, "Placement"),
    (dict(placement=Placement.contiguous(8, 4, num_layers=2)), ValueError, r"placement.layer\(i\)"),
]


@pytest.mark.parametrize("override,error,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_say_what_to_do(override, error, match):
    args = dict(topk_idx=torch.tensor([[0, 1], [2, -1]]), placement=Placement.contiguous(8, 4), rank=0)
    args.update(override)
    topk_idx, placement, rank = args.pop("topk_idx"), args.pop("placement"), args.pop("rank")
    with pytest.raises(error, match=match):
        logical_to_physical(topk_idx, placement, rank, **args)


# ------------------------------------------------------------------ dynamic policy


def brute_force_max_load(totals: list[int], placement: Placement) -> int:
    """Smallest max GPU load over every split of every expert's count over its replicas' GPUs."""
    P = placement.num_gpus
    options = []
    for e, t in enumerate(totals):
        gpus = sorted({placement.gpu_of_slot(s) for s in placement.replicas_of(e)})
        splits = []
        for cut in itertools.combinations_with_replacement(range(t + 1), len(gpus) - 1):
            parts = [b - a for a, b in zip((0, *cut), (*cut, t))]
            splits.append(dict(zip(gpus, parts)))
        options.append(splits)
    best = None
    for choice in itertools.product(*options):
        loads = [0] * P
        for split in choice:
            for g, c in split.items():
                loads[g] += c
        best = max(loads) if best is None else min(best, max(loads))
    return best


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_dynamic_plan_is_the_exact_optimum_on_tiny_problems(seed):
    g = torch.Generator().manual_seed(seed)
    num_gpus, spg, n = 3, 2, 4
    # every expert once, plus two random extra replicas
    layout = list(range(n)) + torch.randint(0, n, (num_gpus * spg - n,), generator=g).tolist()
    layout = [layout[i] for i in torch.randperm(len(layout), generator=g).tolist()]
    p = placement_of(layout, num_gpus)
    counts = torch.randint(0, 4, (num_gpus, n), generator=g)
    plan = dynamic_plan(counts, p)
    assert torch.equal(plan.sum(2), counts)  # every rank's pairs of every expert are planned
    for e in range(n):
        allowed = {p.gpu_of_slot(s) for s in p.replicas_of(e)}
        assert all(int(plan[:, e, gpu].sum()) == 0 for gpu in range(num_gpus) if gpu not in allowed)
    best = brute_force_max_load(counts.sum(0).tolist(), p)
    assert int(plan.sum((0, 1)).max()) == best == optimal_max_load(counts.sum(0), p)


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4]))
@settings(max_examples=25, deadline=None)
def test_dynamic_mapping_follows_the_plan_and_beats_static(seed, nvl):
    world, n = 4, 16
    w = torch.rand(1, n, generator=torch.Generator().manual_seed(seed)) ** 3
    p = Placement.rebalance(w, 24, 1, 1, world).layer(0)
    routing = [skewed_routing(40 + 7 * r, n, 4, seed + r) for r in range(world)]
    counts = torch.stack([logical_counts(idx, n) for idx in routing])
    plan = dynamic_plan(counts, p, num_nvl_ranks=nvl)
    dynamic = torch.zeros(world, dtype=torch.int64)
    static = torch.zeros(world, dtype=torch.int64)
    for r, idx in enumerate(routing):
        out = logical_to_physical(idx, p, r, num_nvl_ranks=nvl, policy="dynamic", expert_counts=counts)
        assert torch.equal(to_logical(out, p), idx)
        # this rank sends exactly its planned share to each GPU
        gpu = torch.where(out >= 0, out // p.slots_per_gpu, -1)
        for e in range(n):
            sent = torch.bincount(gpu[idx == e], minlength=world)
            assert torch.equal(sent, plan[r, e]), (r, e)
        dynamic += rank_loads(out, p)
        static += rank_loads(logical_to_physical(idx, p, r, num_nvl_ranks=nvl), p)
    assert int(dynamic.max()) == optimal_max_load(counts.sum(0), p) <= int(static.max())


def test_dynamic_repairs_tokens_the_quotas_push_over_the_cap():
    # 4 single-GPU nodes, 2 slots each; expert 0 on nodes 0 and 3, expert 1 on node 0, 2 on 1, 3 on 2
    p = placement_of([0, 1, 2, 4, 3, 5, 0, 6], 4)
    idx = torch.tensor([[1, 2, 0]] * 8)
    counts = torch.zeros(4, 7, dtype=torch.int64)
    counts[0] = logical_counts(idx, 7)
    free = logical_to_physical(idx, p, 0, num_nvl_ranks=1, policy="dynamic", expert_counts=counts,
                               max_nodes_per_token=4)
    assert (free[:, 2] == 6).any()  # unconstrained, the plan sends some expert-0 pairs to node 3
    capped = logical_to_physical(idx, p, 0, num_nvl_ranks=1, policy="dynamic", expert_counts=counts,
                                 max_nodes_per_token=2)
    assert capped[:, 2].tolist() == [0] * 8  # repaired: node 0, which the token already uses


# ------------------------------------------------------------------ a MoE layer with replicas, bit for bit

NUM_LOGICAL, TOPK, HIDDEN = 8, 3, 16


def layer_inputs(rank: int, seed: int):
    """Values chosen so that every product and sum in the layer is exact in float32: the output then does
    not depend on which rank adds which pair, and any lost, duplicated or misrouted pair changes its bits."""
    g = torch.Generator().manual_seed(seed * 131 + rank)
    idx = skewed_routing(10 + 5 * rank, NUM_LOGICAL, TOPK, seed * 17 + rank)
    x = torch.randint(-8, 9, (idx.shape[0], HIDDEN), generator=g).float()
    weights = torch.randint(1, 8, idx.shape, generator=g).float() / 8
    return x, idx, torch.where(idx >= 0, weights, 0.0)


def expert_scale(logical: torch.Tensor) -> torch.Tensor:
    """The expert "weights": logical expert e multiplies by (e + 1) / 4; identical on every replica."""
    return (logical.float() + 1) / 4


def run_layer(buf, x, idx, weights, placement: Placement, physical_idx: torch.Tensor, rank: int) -> torch.Tensor:
    R = placement.num_physical
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(physical_idx, R)
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=physical_idx, topk_weights=weights)
    slot = recv_idx + rank * placement.slots_per_gpu  # local id -> physical slot on this rank
    logical = torch.where(recv_idx >= 0, placement.phy2log[slot.clamp_min(0)], -1)
    factor = (recv_w * torch.where(logical >= 0, expert_scale(logical), 0.0)).sum(1, keepdim=True)
    y = recv_x * factor
    return buf.combine(y, handle)[0]


def layer_with_and_without_replicas(rank: int, world: int, nvl: int, backend: str, algorithm: str, seed: int):
    import epcomm

    x, idx, weights = layer_inputs(rank, seed)
    dense = x * (weights * torch.where(idx >= 0, expert_scale(idx), 0.0)).sum(1, keepdim=True)
    buf = epcomm.Buffer(None, 0, backend=backend, num_nvl_ranks=nvl, algorithm=algorithm, timeout_s=60)
    plain = Placement.contiguous(NUM_LOGICAL, world)
    without = run_layer(buf, x, idx, weights, plain, idx, rank)
    loads = torch.tensor([[9.0, 6, 3, 2, 1, 1, 1, 1]])
    results = {}
    placements = {"global": Placement.rebalance(loads, NUM_LOGICAL + world, 1, 1, world).layer(0)}
    nodes = world // nvl
    if nodes > 1:  # one group of experts per node, replicas inside it
        placements["hierarchical"] = Placement.rebalance(loads, NUM_LOGICAL + world, nodes, nodes, world).layer(0)
    for name, placement in placements.items():
        assert int(placement.logcnt.max()) > 1
        counts = gather_expert_counts(idx, NUM_LOGICAL)
        for policy, extra in (("local", {}), ("dynamic", {"expert_counts": counts})):
            phys = logical_to_physical(idx, placement, rank, num_nvl_ranks=nvl, policy=policy, **extra)
            results[(name, policy)] = run_layer(buf, x, idx, weights, placement, phys, rank)
    return dense, without, results


LAYER_RUNS = [(1, 4, "torch", "flat"), (2, 2, "torch", "flat"), (2, 2, "torch", "two_hop"), (4, 2, "torch", "two_hop"),
              (1, 4, "sim", "flat"), (2, 2, "sim", "two_hop"), (4, 2, "sim", "two_hop")]


@pytest.mark.parametrize("nodes,nvl,backend,algorithm", LAYER_RUNS,
                         ids=[f"{m}x{l}-{b}-{a}" for m, l, b, a in LAYER_RUNS])
def test_layer_with_replicas_matches_without_bit_for_bit(pools, nodes, nvl, backend, algorithm):
    outcomes = pools(nodes * nvl).run(layer_with_and_without_replicas, nvl, backend, algorithm, 3)
    for rank, (dense, without, results) in enumerate(outcomes):
        assert torch.equal(without, dense), f"rank {rank}: the layer without replicas differs from the dense one"
        for key, out in results.items():
            assert out.dtype == without.dtype and torch.equal(out.view(torch.int32), without.view(torch.int32)), \
                f"rank {rank}, {key}: output with replicas differs from the one without"
