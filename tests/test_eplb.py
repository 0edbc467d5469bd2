"""epcomm.eplb: placement invariants, argument errors, determinism, and quality against
the greedy baseline, the lower bound and (on tiny instances) the brute-force optimum."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epcomm.eplb import Placement, fractional_lower_bound, greedy_baseline, rebalance_experts

REL = 1e-9  # float rounding of per-GPU sums computed in different orders


def max_load(weight: torch.Tensor, result, num_gpus: int) -> torch.Tensor:
    """float64 [L]: the most loaded GPU of each layer."""
    return Placement(*result, num_gpus=num_gpus).gpu_loads(weight).max(dim=-1).values


def check_invariants(weight, result, R, G, N, P) -> None:
    """Shapes, dtypes, counts, mutual consistency and (hierarchical) groups kept on one node."""
    phy2log, log2phy, logcnt = result
    L, n = weight.shape
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (L, R) and logcnt.shape == (L, n)
    assert log2phy.shape[:2] == (L, n) and log2phy.shape[2] == int(logcnt.max())
    assert int(logcnt.min()) >= 1 and torch.equal(logcnt.sum(1), torch.full((L,), R))
    k = R // P
    for layer in range(L):
        for e in range(n):
            c = int(logcnt[layer, e])
            slots = log2phy[layer, e, :c].tolist()
            assert slots == sorted(slots) and len(set(slots)) == c
            assert all(int(phy2log[layer, p]) == e for p in slots)
            assert (log2phy[layer, e, c:] == -1).all()
        # slots of one GPU listed by ascending logical id
        for g in range(P):
            row = phy2log[layer, g * k:(g + 1) * k].tolist()
            assert row == sorted(row)
    placement = Placement(phy2log, log2phy, logcnt, num_gpus=P)  # its own consistency check
    assert placement.slots_per_gpu == k
    assert [sum(placement.gpu_of_slot(p) == g for p in range(R)) for g in range(P)] == [k] * P
    if G % N == 0:
        per_group, slots_per_node = n // G, R // N
        for layer in range(L):
            nodes_of_group = []
            for g in range(G):
                nodes = {p // slots_per_node for e in range(g * per_group, (g + 1) * per_group)
                         for p in log2phy[layer, e].tolist() if p >= 0}
                assert len(nodes) == 1, f"layer {layer} group {g} spans nodes {nodes}"
                nodes_of_group.append(nodes.pop())
            assert sorted(nodes_of_group.count(j) for j in range(N)) == [G // N] * N


@st.composite
def problems(draw):
    """Random sizes satisfying every divisibility rule, hierarchical or global, and random loads."""
    if draw(st.booleans()):  # hierarchical
        N = draw(st.integers(1, 3))
        G = N * draw(st.integers(1, 2))
    else:  # global: the groups do not divide evenly over the nodes
        N = draw(st.integers(2, 3))
        G = draw(st.sampled_from([g for g in range(1, 6) if g % N]))
    P = N * draw(st.integers(1, 3))
    n = G * draw(st.integers(1, 3))
    k = draw(st.integers(max(1, math.ceil(n / P)), max(1, math.ceil(n / P)) + 2))
    L = draw(st.integers(1, 2))
    if draw(st.booleans()):
        rows = draw(st.lists(st.lists(st.integers(0, 1000), min_size=n, max_size=n), min_size=L, max_size=L))
        weight = torch.tensor(rows, dtype=torch.int64)
    else:
        # (no subnormal loads: a load of 5e-324 is below what the bounds' relative tolerance can compare)
        load = st.floats(0, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)
        rows = draw(st.lists(st.lists(load, min_size=n, max_size=n), min_size=L, max_size=L))
        weight = torch.tensor(rows, dtype=torch.float64)
    return weight, k * P, G, N, P


@settings(max_examples=120, deadline=None)
@given(problems())
def test_policy_invariants_and_quality(problem):
    weight, R, G, N, P = problem
    result = rebalance_experts(weight, R, G, N, P)
    check_invariants(weight, result, R, G, N, P)
    baseline = greedy_baseline(weight, R, G, N, P)
    check_invariants(weight, baseline, R, G, N, P)
    ours, greedy = max_load(weight, result, P), max_load(weight, baseline, P)
    bound = fractional_lower_bound(weight, R, P)
    node_bound = fractional_lower_bound(weight, R, P, num_groups=G, num_nodes=N)  # groups kept on nodes
    assert (ours <= greedy * (1 + REL)).all(), (ours, greedy)
    assert (ours >= node_bound * (1 - REL)).all(), (ours, node_bound)
    assert (node_bound >= bound * (1 - REL)).all()
    # the bound's first term: no GPU is below the mean
    assert (bound >= weight.double().sum(1) / P * (1 - REL)).all()


def brute_force_optimum(w: list[float], R: int, P: int) -> float:
    """Smallest max GPU load over every replica count vector and every assignment (global, tiny sizes)."""
    n, k = len(w), R // P
    best = math.inf
    for cuts in itertools.combinations(range(1, R), n - 1):  # compositions of R into n parts >= 1
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, R))]
        reps = [w[e] / c for e, c in enumerate(counts) for _ in range(c)]
        for perm in itertools.permutations(range(R)):
            loads = [sum(reps[i] for i in perm[g * k:(g + 1) * k]) for g in range(P)]
            best = min(best, max(loads))
    return best


@st.composite
def tiny_problems(draw):
    P = draw(st.integers(1, 3))
    k = draw(st.integers(1, 2 if P == 3 else 3))
    R = P * k
    n = draw(st.integers(1, R))
    w = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return w, R, P


@settings(max_examples=40, deadline=None)
@given(tiny_problems())
def test_bound_below_optimum_and_policy_above(problem):
    w, R, P = problem
    weight = torch.tensor([w], dtype=torch.float64)
    optimum = brute_force_optimum(w, R, P)
    bound = float(fractional_lower_bound(weight, R, P)[0])
    ours = float(max_load(weight, rebalance_experts(weight, R, 1, 1, P), P)[0])
    assert bound <= optimum * (1 + REL) + 1e-12
    assert ours >= optimum * (1 - REL) - 1e-12


def hierarchical_optimum(w: list[float], R: int, G: int, N: int, P: int) -> float:
    """Exact optimum over placements keeping each group on one node (G/N groups per node)."""
    per_group, size = len(w) // G, G // N
    best = math.inf
    for order in itertools.permutations(range(G)):
        blocks = [order[j * size:(j + 1) * size] for j in range(N)]
        worst = max(
            brute_force_optimum([w[g * per_group + i] for g in block for i in range(per_group)], R // N, P // N)
            for block in blocks
        )
        best = min(best, worst)
    return best


@st.composite
def tiny_hierarchical(draw):
    N = 2
    G = N * draw(st.integers(1, 2))
    n = G * draw(st.integers(1, 2 if G == 2 else 1))
    P = N * draw(st.integers(1, 2))
    k = draw(st.integers(max(1, math.ceil(n / P)), max(1, math.ceil(n / P)) + 1))
    if k * P // N > 6:  # keep the per-node brute force small
        k = max(1, math.ceil(n / P))
    w = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return w, k * P, G, N, P


@settings(max_examples=25, deadline=None)
@given(tiny_hierarchical())
def test_node_bound_below_hierarchical_optimum(problem):
    w, R, G, N, P = problem
    weight = torch.tensor([w], dtype=torch.float64)
    optimum = hierarchical_optimum(w, R, G, N, P)
    bound = float(fractional_lower_bound(weight, R, P, num_groups=G, num_nodes=N)[0])
    ours = float(max_load(weight, rebalance_experts(weight, R, G, N, P), P)[0])
    assert bound <= optimum * (1 + REL) + 1e-12
    assert ours >= optimum * (1 - REL) - 1e-12


def test_known_example_beats_water_filling_alone():
    # water-filling gives the spare slot to expert 0 (41, 41, 81, 31: best max 112); the optimum
    # (brute force: 97.5) replicates the *cold* expert so each hot one shares a GPU with half of it
    weight = torch.tensor([[82.0, 81.0, 31.0]])
    assert brute_force_optimum([82.0, 81.0, 31.0], 4, 2) == 97.5
    assert float(max_load(weight, rebalance_experts(weight, 4, 1, 1, 2), 2)[0]) == 97.5
    assert float(max_load(weight, greedy_baseline(weight, 4, 1, 1, 2), 2)[0]) == 122.0
    assert 82.0 <= float(fractional_lower_bound(weight, 4, 2)[0]) <= 97.5


def test_hierarchical_packs_hot_groups_on_different_nodes():
    # groups 0 and 1 are hot; the contiguous assignment would put both on node 0
    weight = torch.tensor([[90.0, 90.0, 80.0, 80.0, 1.0, 1.0, 1.0, 1.0]])
    result = rebalance_experts(weight, 8, 4, 2, 4)
    check_invariants(weight, result, 8, 4, 2, 4)
    loads = Placement(*result, num_gpus=4).gpu_loads(weight)[0]
    node_loads = loads.view(2, 2).sum(1)
    assert node_loads.max() < 200  # 180 + 2 vs 160 + 2, not 340 vs 4
    greedy = Placement(*greedy_baseline(weight, 8, 4, 2, 4), num_gpus=4).gpu_loads(weight)[0]
    assert greedy.view(2, 2).sum(1).max() == 340  # the baseline keeps groups 0 and 1 together


def test_global_policy_replicates_across_all_gpus():
    # 3 groups over 2 nodes: global policy; the hot expert may take slots on both nodes
    weight = torch.tensor([[100.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    phy2log, _, logcnt = rebalance_experts(weight, 8, 3, 2, 4)
    assert int(logcnt[0, 0]) == 3
    assert {p // 4 for p in (phy2log[0] == 0).nonzero().flatten().tolist()} == {0, 1}


def test_zero_loads_and_no_redundancy():
    weight = torch.zeros(2, 8)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 8, 2, 2, 4)
    assert (logcnt == 1).all() and log2phy.shape == (2, 8, 1)
    assert float(fractional_lower_bound(weight, 8, 4).max()) == 0.0


def test_deterministic_and_dtype_independent():
    g = torch.Generator().manual_seed(3)
    weight = (torch.rand(3, 32, generator=g) ** 3 * 1000).round().to(torch.int64)
    first = rebalance_experts(weight, 40, 4, 2, 8)
    again = rebalance_experts(weight.clone(), 40, 4, 2, 8)
    as_float = rebalance_experts(weight.to(torch.float32), 40, 4, 2, 8)
    for a, b, c in zip(first, again, as_float):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_layers_are_independent():
    g = torch.Generator().manual_seed(5)
    weight = torch.rand(3, 16, generator=g) ** 4
    phy2log, _, logcnt = rebalance_experts(weight, 20, 4, 2, 4)
    for layer in range(3):
        one = rebalance_experts(weight[layer:layer + 1], 20, 4, 2, 4)
        assert torch.equal(one[0][0], phy2log[layer]) and torch.equal(one[2][0], logcnt[layer])


@pytest.mark.parametrize("args, error, match", [
    ((torch.ones(8), 8, 1, 1, 2), ValueError, r"weight must be 2-D .*got shape \(8,\)"),
    ((torch.ones(1, 2, 8), 8, 1, 1, 2), ValueError, r"weight must be 2-D"),
    ((torch.ones(0, 8), 8, 1, 1, 2), ValueError, r"weight must not be empty"),
    ((torch.tensor([[1.0, -2.0]]), 2, 1, 1, 1), ValueError, r"weight must be >= 0.*-2\.0 at index \(0, 1\)"),
    ((torch.tensor([[1.0, float("nan")]]), 2, 1, 1, 1), ValueError, r"weight must be finite.*nan"),
    ((torch.tensor([[float("inf"), 1.0]]), 2, 1, 1, 1), ValueError, r"weight must be finite.*inf"),
    (([[1.0, 2.0]], 2, 1, 1, 1), TypeError, r"weight must be a torch.Tensor"),
    ((torch.ones(1, 2, dtype=torch.bool), 2, 1, 1, 1), TypeError, r"weight must be a real"),
    ((torch.ones(1, 8), 6, 1, 1, 2), ValueError, r"num_replicas \(6\) must be >= the number of logical experts \(8\)"),
    ((torch.ones(1, 8), 9, 1, 1, 2), ValueError, r"num_replicas \(9\) must be divisible by num_gpus \(2\)"),
    ((torch.ones(1, 8), 12, 1, 2, 3), ValueError, r"num_gpus \(3\) must be divisible by num_nodes \(2\)"),
    ((torch.ones(1, 8), 8, 3, 1, 2), ValueError, r"\(8, weight.shape\[1\]\) must be divisible by num_groups \(3\)"),
    ((torch.ones(1, 8), 0, 1, 1, 2), ValueError, r"num_replicas must be >= 1, got 0"),
    ((torch.ones(1, 8), 8, 0, 1, 2), ValueError, r"num_groups must be >= 1, got 0"),
    ((torch.ones(1, 8), 8, 1, -1, 2), ValueError, r"num_nodes must be >= 1, got -1"),
    ((torch.ones(1, 8), 8, 1, 1, 0), ValueError, r"num_gpus must be >= 1, got 0"),
    ((torch.ones(1, 8), 8.0, 1, 1, 2), TypeError, r"num_replicas must be an int"),
    ((torch.ones(1, 8), 8, True, 1, 2), TypeError, r"num_groups must be an int"),
])
def test_errors_name_the_argument(args, error, match):
    for fn in (rebalance_experts, greedy_baseline):
        with pytest.raises(error, match=match):
            fn(*args)


def test_bound_errors_and_shapes():
    assert fractional_lower_bound(torch.tensor([4.0, 2.0]), 2, 2).shape == ()
    assert fractional_lower_bound(torch.ones(3, 4), 4, 2).shape == (3,)
    with pytest.raises(ValueError, match=r"num_replicas \(3\) must be >= the number of logical experts \(4\)"):
        fractional_lower_bound(torch.ones(4), 3, 1)
    with pytest.raises(ValueError, match=r"num_replicas \(5\) must be divisible by num_gpus \(2\)"):
        fractional_lower_bound(torch.ones(4), 5, 2)
    with pytest.raises(ValueError, match=r"weight must be 1-D or 2-D"):
        fractional_lower_bound(torch.ones(1, 1, 4), 4, 2)
    with pytest.raises(ValueError, match="num_groups and num_nodes go together"):
        fractional_lower_bound(torch.ones(4), 4, 2, num_groups=2)
    with pytest.raises(ValueError, match=r"num_gpus \(2\) must be divisible by num_nodes \(4\)"):
        fractional_lower_bound(torch.ones(4), 4, 2, num_groups=2, num_nodes=4)
    # keeping groups on nodes raises it: group 0 = both hot experts, one 2-slot GPU per node
    w = torch.tensor([10.0, 10.0, 0.0, 0.0])
    assert float(fractional_lower_bound(w, 4, 2)) == 10.0
    assert float(fractional_lower_bound(w, 4, 2, num_groups=2, num_nodes=2)) == 20.0
    assert float(max_load(w[None], rebalance_experts(w[None], 4, 2, 2, 2), 2)[0]) == 20.0


def test_placement_helpers():
    weight = torch.tensor([[12.0, 2.0, 3.0, 1.0], [1.0, 1.0, 1.0, 9.0]])
    placement = Placement.rebalance(weight, 6, 2, 1, 3)
    assert placement.layered and placement.num_layers == 2
    assert (placement.num_physical, placement.num_logical, placement.slots_per_gpu) == (6, 4, 2)
    assert [placement.gpu_of_slot(p) for p in range(6)] == [0, 0, 1, 1, 2, 2]
    assert list(placement.slots_of_gpu(1)) == [2, 3]
    loads = placement.gpu_loads(weight)
    for layer in range(2):
        one = placement.layer(layer)
        assert not one.layered and one.log2phy.shape[1] == int(one.logcnt.max())
        brute = [0.0] * 3
        for e in range(4):
            reps = placement.replicas_of(e, layer=layer)
            assert reps == one.replicas_of(e) and len(reps) == int(one.logcnt[e])
            for p in reps:
                brute[p // 2] += float(weight[layer, e]) / len(reps)
        assert torch.allclose(loads[layer], torch.tensor(brute, dtype=torch.float64))
        assert torch.allclose(one.gpu_loads(weight[layer]), loads[layer])
    assert float(loads.sum()) == pytest.approx(float(weight.sum()))
    with pytest.raises(ValueError, match="layer is required"):
        placement.replicas_of(0)
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 6\), got 6"):
        placement.gpu_of_slot(6)
    with pytest.raises(ValueError, match=r"weight must have shape \(2, 4\)"):
        placement.gpu_loads(torch.ones(2, 5))


def test_contiguous_placement_and_bad_tensors():
    before = Placement.contiguous(8, 4)
    assert before.phy2log.tolist() == list(range(8)) and before.replicas_of(5) == [5]
    assert before.gpu_loads(torch.arange(8.0)).tolist() == [1.0, 5.0, 9.0, 13.0]
    assert Placement.contiguous(8, 4, num_layers=3).phy2log.shape == (3, 8)
    phy2log, log2phy, logcnt = rebalance_experts(torch.tensor([[5.0, 1.0, 1.0, 1.0]]), 6, 1, 1, 2)
    with pytest.raises(ValueError, match="logcnt does not count"):
        Placement(phy2log, log2phy, logcnt + 1, num_gpus=2)
    bad = log2phy.clone()
    bad[0, 0, :2] = bad[0, 0, :2].flip(0)
    with pytest.raises(ValueError, match="log2phy does not list"):
        Placement(phy2log, bad, logcnt, num_gpus=2)
    with pytest.raises(ValueError, match=r"6 physical slots must be divisible by num_gpus \(4\)"):
        Placement(phy2log, log2phy, logcnt, num_gpus=4)
    with pytest.raises(ValueError, match="int64"):
        Placement(phy2log.int(), log2phy, logcnt, num_gpus=2)


def test_quality_bench_smoke(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import eplb_quality

    out = tmp_path / "eplb.json"
    assert eplb_quality.main(["--experts", "16", "--gpus", "8,16", "--redundant", "0,8", "--layers", "1",
                              "--tokens", "256", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 * 3  # (16 experts on 8 GPUs: 0 and 8 redundant; on 16 GPUs: 0) x 2 kinds
    for row in result["rows"]:
        assert row["policy"] <= row["greedy"] * (1 + REL) and row["policy"] >= row["bound"] * (1 - REL)
        assert row["bound"] >= row["free"] * (1 - REL)
    assert "| zipf | 16 |" in capsys.readouterr().out
