"""epcomm.eplb.LoadMonitor (sliding-window expert loads from dispatch, summed over ranks) and
check_placement_agrees (a placement that differs on one rank raises on every rank)."""

from __future__ import annotations

import pytest
import torch

from epcomm.eplb import (
    LoadMonitor,
    Placement,
    check_placement_agrees,
    logical_counts,
    logical_to_physical,
    placement_digest,
)

N = 8
# 4 GPUs x 3 slots: experts 0 and 1 have two replicas each (slot -> logical expert)
PHY2LOG = [0, 2, 3, 0, 1, 4, 1, 5, 6, 2, 7, 3]


def placement() -> Placement:
    p2l = torch.tensor(PHY2LOG)
    cnt = torch.bincount(p2l, minlength=N)
    l2p = torch.full((N, int(cnt.max())), -1, dtype=torch.int64)
    for e in range(N):
        slots = (p2l == e).nonzero().flatten()
        l2p[e, : slots.numel()] = slots
    return Placement(p2l, l2p, cnt, 4)


def routing(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    idx = torch.stack([torch.randperm(N, generator=g)[:3] for _ in range(12 + rank)])
    idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
    return idx


# ------------------------------------------------------------------ single process


def test_window_slides_and_open_step_counts():
    m = LoadMonitor(4, window=2)
    m.record(torch.tensor([1, 0, 0, 0]))
    m.end_step()
    m.record([0, 2, 0, 0])
    m.end_step()
    m.record(torch.tensor([0, 0, 3, 0], dtype=torch.int32))
    assert m.local().tolist() == [1, 2, 3, 0] and m.num_steps == 2
    m.end_step()  # the first step drops out
    m.record([0, 0, 0, 4])
    m.record([0, 0, 0, 1])  # micro-batches of one step add up
    assert m.local().tolist() == [0, 2, 3, 5] and m.num_steps == 2
    m.reset()
    assert m.local().tolist() == [0, 0, 0, 0] and m.num_steps == 0


def test_physical_and_received_counts_map_back_to_logical():
    p = placement()
    m = LoadMonitor(N, placement=p)
    physical = torch.arange(12, dtype=torch.int32)  # slot s got s pairs
    m.record(physical)
    want = torch.zeros(N, dtype=torch.int64).index_add_(0, p.phy2log, physical.long())
    assert torch.equal(m.local(), want)
    m.reset()
    m.record_local(torch.tensor([5, 6, 7]), rank=1)  # rank 1 holds slots 3, 4, 5: experts 0, 1, 4
    assert m.local().tolist() == [5, 6, 0, 0, 7, 0, 0, 0]


def test_low_latency_cumulative_stats_count_what_they_gained():
    m = LoadMonitor(N, placement=placement())
    stats = torch.zeros(3, dtype=torch.int32)
    stats += torch.tensor([2, 0, 1], dtype=torch.int32)  # as low_latency_dispatch adds to it
    m.record_low_latency(stats, rank=0)  # rank 0: slots 0, 1, 2 = experts 0, 2, 3
    stats += torch.tensor([1, 1, 1], dtype=torch.int32)
    m.record_low_latency(stats, rank=0)
    assert m.local().tolist() == [3, 0, 1, 2, 0, 0, 0, 0]
    stats.zero_()
    stats += torch.tensor([0, 4, 0], dtype=torch.int32)  # zeroed by the caller: counted afresh
    m.record_low_latency(stats, rank=0)
    assert m.local().tolist() == [3, 0, 5, 2, 0, 0, 0, 0]


@pytest.mark.parametrize("call,error,match", [
    (lambda: LoadMonitor(0), ValueError, "num_logical must be an int >= 1"),
    (lambda: LoadMonitor(4, window=0), ValueError, "window must be an int >= 1"),
    (lambda: LoadMonitor(4).record([1, 2, 3]), ValueError, r"4 \(logical\)"),
    (lambda: LoadMonitor(N, placement=placement()).record([0] * 5), ValueError, r"12 \(physical\)"),
    (lambda: LoadMonitor(4).record(torch.ones(4)), ValueError, "integer"),
    (lambda: LoadMonitor(4).record([1, -1, 0, 0]), ValueError, ">= 0"),
    (lambda: LoadMonitor(4).record_local([1], 0), ValueError, "needs a placement"),
    (lambda: LoadMonitor(N, placement=placement()).record_local([1, 2], 0), ValueError, "3 entries"),
    (lambda: LoadMonitor(N, placement=placement()).record_local([1, 2, 3], 4), ValueError, r"rank must be .*\[0, 4\)"),
    (lambda: LoadMonitor(5, placement=placement()), ValueError, "8 logical experts, the monitor 5"),
    (lambda: LoadMonitor(N, placement=Placement.contiguous(N, 4, 2)), ValueError, r"placement.layer\(i\)"),
])
def test_bad_input_says_what_is_wrong(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_digest_tells_placements_apart():
    assert placement_digest(placement()) == placement_digest(placement())
    assert placement_digest(placement()) != placement_digest(Placement.contiguous(12, 4))
    assert placement_digest(Placement.contiguous(8, 4)) != placement_digest(Placement.contiguous(8, 2))


# ------------------------------------------------------------------ multi-rank (torch backend, gloo)


def monitor_from_dispatch(rank: int, world: int, nvl: int):
    """Three steps of dispatch with replicas; the monitor fed by the layout's physical counts and by the
    received counts; both summed over ranks must equal the global logical load of the last two steps."""
    import epcomm

    p = placement()
    buf = epcomm.Buffer(None, 0, backend="torch", num_nvl_ranks=nvl, timeout_s=60)
    sent, received = LoadMonitor(N, window=2, placement=p), LoadMonitor(N, window=2, placement=p)
    for step in range(3):
        idx = routing(rank, step)
        phys = logical_to_physical(idx, p, rank, num_nvl_ranks=nvl)
        x = torch.randn(idx.shape[0], 16)
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(phys, p.num_physical)
        _, _, _, recv_counts, _, _ = buf.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=phys, topk_weights=torch.ones(phys.shape))
        sent.record(per_expert)
        received.record_local(recv_counts, rank)
        sent.end_step()
        received.end_step()
    return sent.summed(), received.summed(), sent.local()


@pytest.mark.parametrize("nodes,nvl", [(1, 4), (2, 2)])
def test_summed_over_ranks_is_the_global_window(pools, nodes, nvl):
    outcomes = pools(4).run(monitor_from_dispatch, nvl)
    want = sum(logical_counts(routing(r, s), N) for r in range(4) for s in (1, 2))
    for rank, (sent, received, local) in enumerate(outcomes):
        assert torch.equal(sent, want), f"rank {rank}: summed sent counts {sent.tolist()} != {want.tolist()}"
        assert torch.equal(received, want), f"rank {rank}: summed received counts differ"
        assert torch.equal(local, sum(logical_counts(routing(rank, s), N) for s in (1, 2)))


def agreement(rank: int, world: int, bad_rank: int | None, how: str):
    base = Placement.contiguous(16, world)
    if rank != bad_rank:
        check_placement_agrees(base)
        return "ok"
    if how == "permuted":  # same sizes, two slots swapped
        p2l = base.phy2log.clone()
        p2l[[0, 1]] = p2l[[1, 0]]
        l2p = base.log2phy.clone()
        l2p[[0, 1]] = l2p[[1, 0]]
        check_placement_agrees(Placement(p2l, l2p, base.logcnt.clone(), world))
    elif how == "other size":
        check_placement_agrees(Placement.contiguous(16, world // 2))
    else:
        check_placement_agrees("not a placement")  # type: ignore[arg-type]
    return "ok"


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("how", ["permuted", "other size", "garbage"])
def test_a_placement_that_differs_on_one_rank_raises_everywhere(pools, world, how):
    assert pools(world).run(agreement, None, how) == ["ok"] * world
    outcomes = pools(world).run_outcomes(agreement, 2, how)
    for o in outcomes:
        assert o.error_type == "EpcommInputError", (o.rank, o.error)
        assert "check_placement_agrees" in o.error and "rank 2:" in o.error
        assert "rank 0:" not in o.error and "rank 1:" not in o.error
