"""Host round trips per operation, counted exactly (``buffer.traffic.round_trips``).

Times are noisy on shared machines; the number of collectives a call issues and the number of
kernel launches it waits for are not. These are the per-call fixed costs ``bench/host_overhead.py``
times; a change that adds one fails here.

torch backend: one agreement all_gather (it carries the counts: dispatch's count exchange), then per
exchange one all_to_all: small calls (the busiest rank sends at most ``PACK_LIMIT_BYTES``) pack the
side fields (top-k ids/weights, FP8 scales, the forwarding mask) beside the rows; larger ones send
them in a second all_to_all, sparing the packing copies. Two-hop exchanges twice (network hop,
NVLink hop). Kernel backends: every operation starts with its notify, which carries every rank's call
header and says whether all ranks run the same call and accept it (kernels/call_check.cuh), then the
data kernel runs. A dispatch's notify also exchanges the counts, and one agreement all_gather follows
(the handle keeps every rank's counts); cached dispatch and combine need no collective. Only when some
rank differs, refuses its inputs or needs another buffer layout does the host agreement decide (and
the notify run again in the new layout).

On the torch backend the agreement stays a round of its own even for cached calls, whose sizes the
handle already knows: a rank that passes another dispatch's handle would post other sizes, and gloo
aborts the process on a size mismatch inside all_to_all (measured: ``Received data size doesn't match
expected size``, then ``terminate``) instead of raising, so the sizes must be agreed before they are used.
"""

from __future__ import annotations

import pytest
import torch

import epcomm
from cases import Case, make_input
from epcomm.reference import reference_dispatch

# (backend, nodes, ranks per node) -> {operation: (collectives, kernels)}, small calls (packed rows)
EXPECTED = {
    ("torch", 1, 4): {"dispatch": (2, 0), "cached dispatch": (2, 0), "combine": (2, 0)},
    ("torch", 2, 2): {"dispatch": (3, 0), "cached dispatch": (3, 0), "combine": (3, 0)},
    ("sim", 1, 4): {"dispatch": (1, 2), "cached dispatch": (0, 2), "combine": (0, 2)},
    ("sim", 2, 2): {"dispatch": (1, 2), "cached dispatch": (0, 2), "combine": (0, 2)},
}


def count_round_trips(rank: int, world: int, backend: str, case: Case, weighted_combine: bool = False
                      ) -> dict[str, tuple[int, int]]:
    inp = make_input(case, rank)
    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=case.nvl)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    counts = {}
    for repeat in range(2):  # the second round runs on buffers sized by the first
        buf.reset_traffic()
        recv_x, _, _, _, handle, _ = buf.dispatch(
            inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], num_tokens_per_expert=layout[2],
            is_token_in_rank=layout[3], topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)
        buf.dispatch(inp.x, handle=handle)
        buf.combine(recv_x, handle, topk_weights=layout_weights(handle, case, rank) if weighted_combine else None)
        counts = {op: (trips["collective"], trips["kernel"]) for op, trips in buf.traffic.round_trips.items()}
    return counts


@pytest.mark.parametrize("backend,nodes,nvl", sorted(EXPECTED))
def test_round_trips_per_operation(pools, backend, nodes, nvl):
    case = Case(num_nodes=nodes, nvl=nvl, tokens=(12, 7, 0, 9), hidden=128, num_experts=16, topk=3)
    for rank, counts in enumerate(pools(case.world).run(count_round_trips, backend, case)):
        assert counts == EXPECTED[backend, nodes, nvl], f"rank {rank}: {counts}"


# A dispatch that must return the per-expert counts without counting its received top-k ids: an
# asynchronous one (the rows have not arrived when it returns) or one given num_tokens_per_expert
# without topk_idx. The kernel backends' notify sums every rank's counts (the call check's notify, in
# steady state), so the dispatch keeps its one collective; the torch backend gathers every rank's counts.
EXPECTED_WITH_EXPERT_COUNTS = {("torch", 1, 4): 3, ("sim", 1, 4): 1, ("sim", 2, 2): 1}


def dispatch_returning_expert_counts(rank: int, world: int, backend: str, case: Case, mode: str
                                     ) -> tuple[list[int], list[int], int]:
    """(per-expert counts returned, the reference's, collectives of the second dispatch)."""
    inputs = [make_input(case, r) for r in range(world)]
    ref = reference_dispatch(inputs, case.num_experts, rank)
    inp = inputs[rank]
    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=case.nvl)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    routed = dict(topk_idx=inp.topk_idx, topk_weights=inp.topk_weights) if mode == "async" else {}
    for _ in range(2):  # the second call runs on buffers laid out by the first
        buf.reset_traffic()
        counts, _, event = buf.dispatch(
            inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], num_tokens_per_expert=layout[2],
            is_token_in_rank=layout[3], expert_alignment=case.alignment, async_finish=mode == "async", **routed)[3:]
        event.current_stream_wait()
    aligned = [-(-c // case.alignment) * case.alignment for c in ref.num_recv_tokens_per_expert]
    return counts, aligned, buf.traffic.round_trips["dispatch"]["collective"]


@pytest.mark.parametrize("mode", ["async", "no topk_idx"])
@pytest.mark.parametrize("backend,nodes,nvl", sorted(EXPECTED_WITH_EXPERT_COUNTS))
def test_per_expert_counts_come_from_notify_on_kernel_backends(pools, backend, nodes, nvl, mode):
    case = Case(num_nodes=nodes, nvl=nvl, tokens=(12, 7, 0, 9), hidden=128, num_experts=16, topk=3, alignment=4)
    for rank, (counts, expected, collectives) in enumerate(
            pools(case.world).run(dispatch_returning_expert_counts, backend, case, mode)):
        assert counts == expected, f"rank {rank}: {counts} != {expected}"
        assert collectives == EXPECTED_WITH_EXPERT_COUNTS[backend, nodes, nvl], f"rank {rank}: {collectives}"


def layout_weights(handle, case: Case, rank: int) -> torch.Tensor:
    return torch.ones(handle.num_recv_tokens, case.topk)


@pytest.mark.parametrize("nodes,nvl", [(1, 4), (2, 2)])
def test_large_calls_send_side_fields_apart_and_small_ones_packed(pools, nodes, nvl):
    """Above PACK_LIMIT_BYTES per rank the side fields take a second all_to_all per exchange (no packing
    copy of the rows); below it, one. A weighted combine carries a side field (the weights) too."""
    from epcomm.backends.torch_backend import PACK_LIMIT_BYTES

    exchanges = 1 if nodes == 1 else 2
    big = Case(num_nodes=nodes, nvl=nvl, tokens=(300, 280, 320, 290), hidden=2048, num_experts=16, topk=3)
    assert 280 * 2 * 2048 > PACK_LIMIT_BYTES
    small = Case(num_nodes=nodes, nvl=nvl, tokens=(12, 7, 0, 9), hidden=128, num_experts=16, topk=3)
    for case, per_exchange in ((big, 2), (small, 1)):
        for rank, counts in enumerate(pools(4).run(count_round_trips, "torch", case, True)):
            want = {"dispatch": (1 + per_exchange * exchanges, 0), "cached dispatch": (1 + exchanges, 0),
                    "combine": (1 + per_exchange * exchanges, 0)}
            assert counts == want, f"rank {rank}, {case.tokens[0]} tokens: {counts}"


def _calls_along_a_handle_that_fall_back(rank: int, world: int, nvl: int, bad_rank: int) -> dict:
    """A combine that needs larger buffers (float32 rows of a bf16 dispatch) and then a combine refused
    on one rank: each runs the barrier with the call check, sees the verdict "no" on every rank, and
    takes the host agreement."""
    case = Case(num_nodes=world // nvl, nvl=nvl, tokens=(12, 7, 0, 9), hidden=128, num_experts=16, topk=3)
    inp = make_input(case, rank)
    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=nvl)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    recv_x, _, _, _, handle, _ = buf.dispatch(
        inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], num_tokens_per_expert=layout[2],
        is_token_in_rank=layout[3], topk_idx=inp.topk_idx)
    trips = {}
    buf.reset_traffic()
    wide, _, _ = buf.combine(recv_x.float(), handle)  # fp32 rows: twice the bytes of the layout's bf16 slots
    trips["relayout"] = dict(buf.traffic.round_trips["combine"])
    narrow, _, _ = buf.combine(recv_x, handle)  # back in the (now larger) layout: no host agreement
    assert torch.equal(wide.to(torch.bfloat16), narrow) or torch.allclose(wide, narrow.float(), rtol=1e-2, atol=1e-2)
    buf.reset_traffic()
    buf.combine(recv_x, handle)
    trips["again"] = dict(buf.traffic.round_trips["combine"])
    buf.reset_traffic()
    try:
        buf.combine(recv_x[1:] if rank == bad_rank else recv_x, handle)
    except epcomm.EpcommInputError as err:
        trips["refused"] = (dict(buf.traffic.round_trips["combine"]), f"rank {bad_rank}:" in str(err))
    return trips


@pytest.mark.parametrize("nvl", [4, 2])
def test_calls_along_a_handle_fall_back_to_the_host_agreement(pools, nvl):
    for rank, trips in enumerate(pools(4).run(_calls_along_a_handle_that_fall_back, nvl, 2)):
        # the call-check barrier, the host agreement, larger buffers (the old ones closed collectively;
        # the new ones' set-up is counted under its own name), then the combine's own barrier and kernel
        assert trips["relayout"] == {"collective": 2, "kernel": 3}, f"rank {rank}: {trips}"
        assert trips["again"] == {"kernel": 2}, f"rank {rank}: {trips}"
        # the call-check barrier, then the agreement and its error report
        assert trips["refused"] == ({"collective": 2, "kernel": 1}, True), f"rank {rank}: {trips}"


def test_counter_sees_a_bad_call_as_one_agreement(pools):
    """A call rejected on one rank costs the agreement and the error report on every rank, nothing else."""
    results = pools(2).run(_bad_call)
    for rank, trips in enumerate(results):
        assert trips == {"collective": 2}, f"rank {rank}: {trips}"


def _bad_call(rank: int, world: int) -> dict[str, int]:
    buf = epcomm.Buffer(None, backend="torch")
    topk_idx = torch.zeros(4, 2, dtype=torch.int64)
    layout = buf.get_dispatch_layout(topk_idx, 4)
    x = torch.zeros(4, 64, *([1] if rank == 0 else []), dtype=torch.bfloat16)  # rank 0's x is 3-D: refused there
    buf.reset_traffic()
    try:
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                     num_tokens_per_expert=layout[2], topk_idx=topk_idx)
    except epcomm.EpcommInputError:
        pass
    return dict(buf.traffic.round_trips["dispatch"])
