"""epcomm.moe helpers against simple loops, load statistics, and a tiny run of examples/moe_layer.py."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from cases import Case, make_input
from epcomm.moe import LoadStats, group_by_expert, grouped_linear, ungroup_from_experts


def received(num_recv: int, num_topk: int, num_local: int, seed: int):
    """Synthetic dispatch outputs: local ids with plenty of -1, weights 0 where -1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-2, num_local, (num_recv, num_topk), generator=g).clamp_min(-1)
    weights = torch.where(idx >= 0, torch.rand(num_recv, num_topk, generator=g), 0.0)
    x = torch.randn(num_recv, 8, generator=g, dtype=torch.float64).float()
    return x, idx, weights


def aligned_counts(idx: torch.Tensor, num_local: int, alignment: int) -> list[int]:
    return [-(-int((idx == e).sum()) // alignment) * alignment for e in range(num_local)]


@pytest.mark.parametrize("alignment", [1, 4])
def test_group_and_ungroup_match_loops(alignment):
    num_local = 3
    x, idx, weights = received(23, 4, num_local, seed=alignment)
    counts = aligned_counts(idx, num_local, alignment)
    x.requires_grad_()
    weights.requires_grad_()
    groups = group_by_expert(x, idx, weights, counts, alignment)

    want_x, want_w, want_rows = [], [], []
    for e in range(num_local):
        for r in range(idx.size(0)):
            for k in range(idx.size(1)):
                if idx[r, k] == e:
                    want_x.append(x[r].detach())
                    want_w.append(float(weights.detach()[r, k]))
                    want_rows.append(r)
        missing = sum(counts[: e + 1]) - len(want_x)  # padding up to the aligned count
        want_x += [torch.zeros(8)] * missing
        want_w += [0.0] * missing
        want_rows += [-1] * missing
    assert groups.counts == counts
    assert torch.equal(groups.x.detach(), torch.stack(want_x))
    assert torch.equal(groups.weights.detach(), torch.tensor(want_w))
    assert groups.row_idx.tolist() == want_rows

    expert_out = groups.x * 3.0 + 1.0  # padding rows become 1.0: they must be ignored
    out = ungroup_from_experts(expert_out, groups, x.size(0))
    want_out = torch.zeros_like(x)
    for r in range(idx.size(0)):
        for k in range(idx.size(1)):
            if idx[r, k] >= 0:
                want_out[r] += weights[r, k] * (x[r] * 3.0 + 1.0)
    torch.testing.assert_close(out, want_out)

    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad((out * probe).sum(), (x, weights))
    want_grads = torch.autograd.grad((want_out * probe).sum(), (x, weights))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_group_rejects_counts_that_do_not_match():
    x, idx, weights = received(10, 2, 2, seed=3)
    counts = aligned_counts(idx, 2, 1)
    with pytest.raises(ValueError, match="does not match recv_topk_idx"):
        group_by_expert(x, idx, weights, [c + 1 for c in counts], 1)
    alignment = max(counts) + 1  # no count is a multiple of it, so the unaligned list is wrong
    with pytest.raises(ValueError, match=f"aligned to {alignment}"):
        group_by_expert(x, idx, weights, counts, alignment)


def test_grouped_linear_is_a_per_expert_matmul():
    counts = [3, 0, 5]
    x = torch.randn(8, 4)
    weight = torch.randn(3, 4, 6)
    want = torch.cat([x[0:3] @ weight[0], x[3:3] @ weight[1], x[3:8] @ weight[2]])
    torch.testing.assert_close(grouped_linear(x, weight, counts), want)
    with pytest.raises(ValueError, match="num_local_experts=3"):
        grouped_linear(x, weight[:2], counts)


def load_on_rank(rank, world, case: Case):
    from epcomm.moe import expert_load

    return expert_load(make_input(case, rank).topk_idx, case.num_experts)


def test_expert_load_sums_over_ranks(pools):
    case = Case(num_nodes=2, nvl=2, tokens=(30, 0, 17, 25), num_experts=16, topk=4, seed=2)
    stats = pools(4).run(load_on_rank, case)
    idx = torch.cat([make_input(case, r).topk_idx for r in range(4)]).flatten()
    want = torch.bincount(idx[idx >= 0], minlength=16)
    for s in stats:
        assert torch.equal(s.tokens_per_expert, want)
        assert torch.equal(s.tokens_per_rank, want.view(4, 4).sum(1))
        assert s.max_over_mean == pytest.approx(float(want.max() / want.float().mean()))
    assert LoadStats.from_counts(torch.zeros(8, dtype=torch.int64), 4).max_over_mean == 1.0


def tiny_example(rank, world, algorithm, backend="torch", nvl_ranks=2):
    from examples.moe_layer import Settings, run

    s = Settings(tokens=12, hidden=32, ffn=16, shared_ffn=16, experts=8, topk=3, max_nodes=1, nvl_ranks=nvl_ranks,
                 steps=2, algorithm=algorithm, backend=backend)
    return [(log.loss, log.max_rel_err) for log in run(rank, world, s)]


@pytest.mark.parametrize("algorithm", ["flat", "two_hop"])
def test_example_moe_layer_matches_dense(pools, algorithm):
    """examples/moe_layer.py's training loop on 2 nodes x 2 ranks (max one node per token)."""
    logs = pools(4).run(tiny_example, algorithm)
    assert all(err <= 2e-5 for rank_logs in logs for _, err in rank_logs), logs
    assert len({tuple(loss for loss, _ in rank_logs) for rank_logs in logs}) == 1  # same global loss everywhere


@pytest.mark.parametrize("nvl_ranks", [4, 2])
def test_example_moe_layer_on_the_sim_kernels(pools, nvl_ranks):
    """The same training loop with dispatch/combine (and their backward) on epcomm's kernels, one node
    of 4 ranks (intranode kernels) and 2 nodes x 2 (two-hop kernels): the same losses as the torch
    backend, to the bit."""
    algorithm = "flat" if nvl_ranks == 4 else "two_hop"
    sim = pools(4).run(tiny_example, algorithm, "sim", nvl_ranks)
    ref = pools(4).run(tiny_example, algorithm, "torch", nvl_ranks)
    assert all(err <= 2e-5 for rank_logs in sim for _, err in rank_logs), sim
    assert [[loss for loss, _ in r] for r in sim] == [[loss for loss, _ in r] for r in ref]


def tiny_rebalancing_example(rank, world, backend, nvl_ranks, max_nodes):
    from examples.moe_layer import Settings, phases, run

    s = Settings(tokens=12, hidden=32, ffn=16, shared_ffn=16, experts=8, topk=3, max_nodes=max_nodes,
                 nvl_ranks=nvl_ranks, steps=4, skew=2.0, redundant_experts=4, backend=backend)
    logs = run(rank, world, s)
    return [log.max_rel_err for log in logs], [(p.num_slots, p.rank_max_over_mean) for p in phases(s, logs)]


@pytest.mark.parametrize("backend,nvl_ranks,max_nodes", [("torch", 2, 1), ("sim", 2, 1), ("sim", 4, 1)],
                         ids=["torch-2x2-hierarchical", "sim-2x2-hierarchical", "sim-1x4-global"])
def test_example_moe_layer_rebalances_redundant_experts(pools, backend, nvl_ranks, max_nodes):
    """examples/moe_layer.py --redundant-experts 4 on skewed routing: two steps on 8 slots, then a placement
    with 12 slots from the observed loads, moved live; every step still matches the dense model (replicas
    stay identical) and the per-rank load gets more even. 2 nodes x 2 with one node per token keeps expert
    groups on nodes (hierarchical policy); one node places replicas anywhere (global policy)."""
    results = pools(4).run(tiny_rebalancing_example, backend, nvl_ranks, max_nodes)
    for errors, (before, after) in results:
        assert all(err <= 2e-5 for err in errors), errors
        assert before[0] == 8 and after[0] == 12
        assert after[1] < before[1], (before, after)
    assert len({str(r[1]) for r in results}) == 1  # the same loads on every rank


def unavailable_backend(rank, world):
    import epcomm
    from examples.moe_layer import Settings, run

    with pytest.raises(epcomm.EpcommBackendUnavailable, match="backend='torch'"):
        run(rank, world, Settings(backend="cuda", nvl_ranks=2))


def test_example_reports_unavailable_backend(pools):
    pools(4).run(unavailable_backend)


@pytest.mark.skipif(shutil.which("mpiexec", path=os.path.dirname(sys.executable)) is None, reason="needs mpiexec in the venv")
def test_example_runs_under_mpiexec():
    """The script itself, launched the way users launch it (2 ranks, tiny sizes): PASS and exit code 0."""
    root = pathlib.Path(__file__).resolve().parents[1]
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    small = "--tokens 12 --hidden 32 --ffn 16 --shared-ffn 16 --experts 8 --topk 3 --max-nodes 1 --steps 2".split()
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(root / "examples" / "moe_layer.py"), *small],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS"), proc.stdout
