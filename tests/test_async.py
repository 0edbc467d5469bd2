"""``async_finish=True``: the call returns before the rows move, the data phase runs off the calling
thread, the results equal the synchronous ones bit for bit, and errors and ordering behave."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

import epcomm
from backend_selection import selected_backends
from cases import Case, expert_output, make_input, same_bits

# cuda (EPCOMM_TEST_BACKENDS=cuda, make gpu-check on 4 GPUs): async_finish returns a CUDA event on the
# communication stream, the data kernels only enqueued (README "Streams on GPUs")
TOPOLOGIES = [("torch", 1, 4), ("torch", 2, 2), ("sim", 1, 4), ("sim", 2, 2)] + (
    [("cuda", 1, 4)] if "cuda" in selected_backends() else [])


def _round(buf: epcomm.Buffer, case: Case, rank: int, async_finish: bool) -> dict:
    """dispatch, cached dispatch (FP8-free) and weighted combine; every output, waited for."""
    inp = make_input(case, rank)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    recv_x, idx, w, counts, handle, event = buf.dispatch(
        inp.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights,
        expert_alignment=case.alignment, async_finish=async_finish)
    event.current_stream_wait()
    cached, *_, event = buf.dispatch(inp.x, handle=handle, async_finish=async_finish)
    event.current_stream_wait()
    combined, combined_w, event = buf.combine(expert_output(recv_x, rank), handle, topk_weights=w,
                                              async_finish=async_finish)
    event.current_stream_wait()
    return dict(recv_x=recv_x, idx=idx, w=w, counts=counts, cached=cached, combined=combined, combined_w=combined_w)


def async_equals_sync(rank: int, world: int, backend: str, nvl: int) -> None:
    for kind in ("bf16", "fp8"):
        case = Case(num_nodes=world // nvl, nvl=nvl, tokens=(23, 0, 17, 30), kind=kind, alignment=4, seed=7)
        buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=nvl, timeout_s=60)
        want = _round(buf, case, rank, async_finish=False)
        got = _round(buf, case, rank, async_finish=True)
        for key, value in want.items():
            assert same_bits(got[key], value) if key != "counts" else got[key] == value, f"rank {rank}: {key} differs"


@pytest.mark.parametrize("backend,nodes,nvl", TOPOLOGIES)
def test_async_results_equal_sync_bit_for_bit(pools, backend, nodes, nvl):
    pools(nodes * nvl).run(async_equals_sync, backend, nvl)


def returns_before_the_data_phase(rank: int, world: int, backend: str) -> tuple[bool, bool, bool]:
    """Hold the backend's dispatch until the caller has seen dispatch return: the call must not
    wait for it, the event must say "not done", and the phase must run on another thread."""
    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=2, timeout_s=60)
    case = Case(num_nodes=world // 2, nvl=2, tokens=(9, 4, 6, 11), seed=2)
    inp = make_input(case, rank)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    release, ran_on = threading.Event(), []
    real = buf._impl.dispatch

    def held(call):
        ran_on.append(threading.get_ident())
        assert release.wait(30), "the caller never released the data phase"
        return real(call)

    buf._impl.dispatch = held
    recv_x, *_, handle, event = buf.dispatch(
        inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx, async_finish=True)
    pending = not event.query()
    release.set()
    event.current_stream_wait()
    buf._impl.dispatch = real
    # the filled outputs are the dispatch's: combine them back (one rank per token is enough to check)
    combined, _, _ = buf.combine(recv_x, handle)
    weights = epcomm.layout.token_rank_mask(inp.topk_idx, case.num_experts, world).sum(1, keepdim=True)
    return pending, ran_on[0] != threading.get_ident(), torch.equal(combined, (inp.x.float() * weights).to(inp.x.dtype))


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_async_call_returns_before_its_rows_move(pools, backend):
    for rank, (pending, other_thread, exact) in enumerate(pools(4).run(returns_before_the_data_phase, backend)):
        assert pending, f"rank {rank}: dispatch(async_finish=True) waited for its data phase"
        assert other_thread, f"rank {rank}: the data phase ran on the calling thread"
        assert exact, f"rank {rank}: the asynchronously filled outputs are wrong"


def own_collectives_while_in_flight(rank: int, world: int) -> bool:
    """The caller's collectives on its own group while a data phase is in flight do not mix with epcomm's."""
    buf = epcomm.Buffer(None, backend="torch", num_nvl_ranks=2, timeout_s=60)
    case = Case(num_nodes=2, nvl=2, tokens=(40, 33, 25, 38), hidden=512, seed=3)
    sync = _round(buf, case, rank, async_finish=False)
    inp = make_input(case, rank)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    recv_x, idx, w, _, handle, event = buf.dispatch(
        inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx, topk_weights=inp.topk_weights, async_finish=True)
    total = torch.tensor([rank + 1.0])
    for _ in range(5):  # the user's own traffic on the default group, meanwhile
        dist.all_reduce(total)
    event.current_stream_wait()
    return same_bits(recv_x, sync["recv_x"]) and same_bits(w, sync["w"]) and float(total) == 10.0 * 4 ** 4


def test_own_collectives_during_an_async_call(pools):
    assert all(pools(4).run(own_collectives_while_in_flight))


def errors_reach_the_waiter_once(rank: int, world: int) -> list[str]:
    buf = epcomm.Buffer(None, backend="torch", num_nvl_ranks=2, timeout_s=60)
    case = Case(num_nodes=2, nvl=2, tokens=(5, 6, 7, 8), seed=4)
    inp = make_input(case, rank)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    kwargs = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                  num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx)
    real, seen = buf._impl.dispatch, []

    def broken(call):  # on every rank alike, before any collective: no peer is left waiting
        raise RuntimeError("planted data-phase failure")

    buf._impl.dispatch = broken
    *_, event = buf.dispatch(inp.x, **kwargs, async_finish=True)
    try:
        event.current_stream_wait()
    except RuntimeError as err:
        seen.append(str(err))
    event.current_stream_wait()  # raised once already: no second time
    *_, event = buf.dispatch(inp.x, **kwargs, async_finish=True)  # not waited for:
    try:
        buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
        buf.dispatch(inp.x, **kwargs)  # the next call raises it
    except RuntimeError as err:
        seen.append(str(err))
    buf._impl.dispatch = real
    recv_x, *_ = buf.dispatch(inp.x, **kwargs)  # and the Buffer still works
    seen.append(f"{recv_x.size(0)} rows")
    return seen


def test_data_phase_errors_reach_the_caller_once(pools):
    for rank, seen in enumerate(pools(4).run(errors_reach_the_waiter_once)):
        assert seen[:2] == ["planted data-phase failure"] * 2 and seen[2].endswith("rows"), f"rank {rank}: {seen}"


def disagreeing_async(rank: int, world: int) -> str:
    buf = epcomm.Buffer(None, backend="torch", num_nvl_ranks=2, timeout_s=60)
    case = Case(num_nodes=2, nvl=2, tokens=(5, 6, 7, 8), seed=4)
    inp = make_input(case, rank)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    try:
        buf.dispatch(inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                     is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx,
                     async_finish=rank == 3)
    except epcomm.EpcommInputError as err:
        return str(err)
    return "accepted"


def test_async_finish_must_agree_across_ranks(pools):
    for rank, message in enumerate(pools(4).run(disagreeing_async)):
        assert "async_finish" in message and "rank 3" in message, f"rank {rank}: {message}"


class _LateWriter:
    """An event whose producer writes ``value`` into ``target`` 0.3 s after it is made, then completes: what a
    producer stream's kernel does before the event a caller passes as ``previous_event``."""

    def __init__(self, target: torch.Tensor, value: torch.Tensor) -> None:
        self._done = threading.Event()

        def produce() -> None:
            self._done.wait(0.3)
            target.copy_(value)
            self._done.set()

        self._thread = threading.Thread(target=produce, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def query(self) -> bool:
        return not self._thread.is_alive()


def previous_event_orders_the_inputs(rank: int, world: int, backend: str) -> bool:
    """A call made with ``previous_event`` reads its inputs only after that event: the rows a late producer
    writes before completing it are the ones that travel (cached dispatch, then combine)."""
    case = Case(num_nodes=1, nvl=world, tokens=(7, 12, 0, 9), kind="bf16", seed=41)
    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=world)
    inp = make_input(case, rank)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    recv_x, _, w, _, handle, _ = buf.dispatch(inp.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                              is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                              topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)
    new_x = inp.x * 3 + 1
    want = buf.dispatch(new_x, handle=handle)[0]
    x = torch.zeros_like(inp.x)
    late = epcomm.EventOverlap(epcomm.EventHandle(_LateWriter(x, new_x)))
    got = buf.dispatch(x, handle=handle, previous_event=late)[0]
    rows = expert_output(recv_x, rank)
    want_combined = buf.combine(rows, handle, topk_weights=w)[0]
    y = torch.zeros_like(rows)
    late = epcomm.EventOverlap(epcomm.EventHandle(_LateWriter(y, rows)))
    got_combined = buf.combine(y, handle, topk_weights=w, previous_event=late)[0]
    return same_bits(got, want) and same_bits(got_combined, want_combined)


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_previous_event_orders_the_inputs(pools, backend):
    assert all(pools(4).run(previous_event_orders_the_inputs, backend))
