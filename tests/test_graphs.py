"""Graph capture (epcomm/graphs.py): normal-mode cached calls and LL decode steps captured in a SimGraph on
the sim backend and replayed with new inputs equal eager calls bit for bit; what cannot be captured is refused
with a clear error; a Buffer whose kernels a graph captured keeps its buffers and layout."""

from __future__ import annotations

import pytest
import torch

import epcomm
from backend_selection import selected_backends
from cases import Case, kernel_device, make_input, same_bits
from epcomm.graphs import SimGraph, is_capturing, sim_graph
from epcomm.reference import RankInput
from test_low_latency import LLCase
from test_low_latency import _buffer as ll_buffer

TOPOLOGIES = [(1, 4), (2, 2)]


def _dispatched(rank: int, case: Case, backend: str = "sim", **buffer_args):
    """A Buffer of ``case`` after one dispatch of this rank's input: (buffer, input, recv_x, recv_topk_weights,
    handle)."""
    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=case.nvl, max_nodes_per_token=case.max_nodes,
                        **buffer_args)
    inp = make_input(case, rank)
    device = kernel_device(buf)
    moved = lambda t: tuple(p.to(device) for p in t) if isinstance(t, tuple) else t.to(device)  # noqa: E731
    inp = RankInput(moved(inp.x), inp.topk_idx.to(device), inp.topk_weights.to(device))
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(inp.x, num_tokens_per_rank=per_rank,
                                                   num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx,
                                                   topk_weights=inp.topk_weights)
    return buf, inp, recv_x, recv_w, handle


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


# ----------------------------------------------------------------------------- normal mode

def cached_calls_in_a_sim_graph(rank, world, case: Case):
    """A cached dispatch and a combine captured once, replayed three times with new rows in the static inputs,
    eager calls on the same Buffer in between: each replay equals the eager calls on the same inputs and
    advances the notifies' epoch by one per captured call (counted on the device)."""
    buf, inp, recv_x, recv_w, handle = _dispatched(rank, case)
    buf.dispatch(inp.x, handle=handle)  # one eager call of each kind first: the layouts exist before capture
    buf.combine(recv_x, handle, topk_weights=recv_w)
    static_x, static_y, static_w = inp.x.clone(), recv_x.clone(), recv_w.clone()
    graph = SimGraph()
    with sim_graph(graph):
        assert is_capturing()
        got_x = buf.dispatch(static_x, handle=handle)[0]
        got_y, got_w, _ = buf.combine(static_y, handle, topk_weights=static_w)
    # per call: the call check's notify and the data kernel, both only enqueued (a kernel the host waits for
    # would have raised in the capture)
    assert graph.num_kernels == 4
    g = torch.Generator().manual_seed(1000 + rank)
    for replay in range(3):
        static_x.copy_(torch.randn(static_x.shape, generator=g).to(static_x.dtype))
        static_y.copy_(torch.randn(static_y.shape, generator=g).to(static_y.dtype))
        static_w.copy_(torch.rand(static_w.shape, generator=g))
        before = buf._impl.notify_epoch()
        graph.replay()
        assert buf._impl.notify_epoch() == before + 2, f"rank {rank}, replay {replay}"
        want_x = buf.dispatch(static_x.clone(), handle=handle)[0]
        want_y, want_w, _ = buf.combine(static_y.clone(), handle, topk_weights=static_w.clone())
        assert torch.equal(_bits(got_x), _bits(want_x)), f"rank {rank}, replay {replay}: cached dispatch"
        assert torch.equal(_bits(got_y), _bits(want_y)), f"rank {rank}, replay {replay}: combine"
        assert torch.equal(got_w, want_w), f"rank {rank}, replay {replay}: combined weights"
    return True


@pytest.mark.parametrize("nodes,nvl", TOPOLOGIES)
def test_cached_dispatch_and_combine_replay_from_a_graph(pools, nodes, nvl):
    case = Case(num_nodes=nodes, nvl=nvl, tokens=(9, 14, 0, 11), kind="bf16", max_nodes=2, seed=73)
    assert all(pools(4).run(cached_calls_in_a_sim_graph, case))


def what_a_graph_refuses(rank, world, case: Case):
    """Under capture: a dispatch without handle, the torch backend's normal-mode calls and host reads of tensor
    values raise at once; after a capture, a call needing another layout (another Config, LL mode) raises on
    every rank, and the captured calls still replay."""
    problems = []
    buf, inp, recv_x, recv_w, handle = _dispatched(rank, case, low_latency_mode=True, num_nvl_bytes=1 << 25)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    want = buf.combine(recv_x, handle, topk_weights=recv_w)[0]
    smaller_rings = epcomm.Config(num_sms=4, num_max_nvl_chunked_send_tokens=4, num_max_nvl_chunked_recv_tokens=16)
    graph = SimGraph()
    with sim_graph(graph):
        # refused alike on every rank before anything is captured: the Buffer goes on
        with pytest.raises(epcomm.EpcommInputError, match="needs another buffer layout") as err:
            buf.combine(recv_x, handle, topk_weights=recv_w, config=smaller_rings)
        problems.append(str(err.value))
        with pytest.raises(epcomm.EpcommError, match="the host waits for kernel peer_barrier"):
            buf._impl._device_runtime.barrier()  # (local: refused before it meets anyone)
        with pytest.raises(epcomm.EpcommInputError, match="reads its receive counts on the host") as err:
            buf.dispatch(inp.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                         is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx)
        problems.append(str(err.value))
        for read in (lambda: torch.ones(2)[0].item(), lambda: bool(torch.ones(1)), lambda: int(torch.ones(1))):
            with pytest.raises(epcomm.EpcommError, match="a host read of a tensor value"):
                read()
        got = buf.combine(recv_x, handle, topk_weights=recv_w)[0]
    assert graph.num_kernels == 2  # the combine's notify and data kernel: nothing of the refused calls
    with pytest.raises(epcomm.EpcommError, match="a graph captured normal-mode kernels in the current one"):
        buf.combine(recv_x, handle, topk_weights=recv_w, config=smaller_rings)  # fits the buffers: another layout
    with pytest.raises(epcomm.EpcommError, match="a graph captured normal-mode kernels in the current one"):
        buf.clean_low_latency_buffer(8, case.hidden, case.num_experts)  # LL mode's layout
    got.zero_()
    graph.replay()
    assert torch.equal(_bits(got), _bits(want))

    ref, _, recv_x, recv_w, handle = _dispatched(rank, case, backend="torch")
    with sim_graph(SimGraph()):
        with pytest.raises(epcomm.EpcommInputError, match="agree on the host") as err:
            ref.combine(recv_x, handle, topk_weights=recv_w)
        problems.append(str(err.value))
    return problems


def test_what_a_graph_cannot_capture_is_refused(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 6, 11), kind="bf16", seed=74)
    for rank, problems in enumerate(pools(4).run(what_a_graph_refuses, case)):
        assert all(f"rank {rank}" in p for p in problems), problems


# ----------------------------------------------------------------------------- low-latency mode

def decode_steps_in_a_sim_graph(rank, world, case: LLCase):
    """Two decode steps (dispatch + hook, combine + hook) captured once and replayed three times with new
    tokens in the static input: each replay equals the same steps on a reference Buffer (the slots'
    generations are counted on the device, so each replay waits for its own signals)."""
    x, topk, weights = case.inputs(rank)
    buf, ref = ll_buffer(case, "sim"), ll_buffer(case, "sim")
    eager_x, _, eager_handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    buf.low_latency_combine(eager_x, topk, weights, eager_handle)
    static_x = x.clone()
    outs = [torch.zeros_like(x), torch.zeros_like(x)]
    graph = SimGraph()
    with sim_graph(graph):
        for out in outs:  # an even number of LL dispatches: the slots alternate alike across replays
            step_x, _, step_handle, _, hook = buf.low_latency_dispatch(static_x, topk, case.num_max, case.num_experts,
                                                                       use_fp8=False, return_recv_hook=True)
            hook()
            _, _, hook = buf.low_latency_combine(step_x, topk, weights, step_handle, out=out, return_recv_hook=True)
            hook()
    g = torch.Generator().manual_seed(2000 + rank)
    for replay in range(3):
        static_x.copy_((torch.randn(static_x.shape, generator=g) * 3).to(static_x.dtype))
        for out in outs:
            out.zero_()
        graph.replay()
        recv_x, _, handle, _, _ = ref.low_latency_dispatch(static_x, topk, case.num_max, case.num_experts,
                                                           use_fp8=False)
        want, _, _ = ref.low_latency_combine(recv_x, topk, weights, handle)
        for out in outs:
            assert torch.equal(_bits(out), _bits(want)), f"rank {rank}, replay {replay}"
    return True


@pytest.mark.parametrize("world,nvl", [(4, 4), (4, 2)], ids=["1x4", "2x2"])
def test_decode_steps_replay_from_a_graph(pools, world, nvl):
    assert all(pools(world).run(decode_steps_in_a_sim_graph, LLCase(world, nvl)))


# ----------------------------------------------------------------------------- the cuda backend (GPUs only)

def cuda_cached_calls_in_a_graph(rank, world, case: Case):
    """Cached dispatch and combine captured in a CUDA graph and replayed three times with new rows in the static
    inputs: each replay equals the same calls on sim, bit for bit."""
    ref, inp, recv_x, recv_w, handle = _dispatched(rank, case)
    buf, inp_d, _, _, handle_d = _dispatched(rank, case, backend="cuda")
    device = inp_d.x.device
    static_x, static_y, static_w = inp_d.x, recv_x.to(device), recv_w.to(device)
    buf.dispatch(static_x, handle=handle_d)  # one eager call of each kind first
    buf.combine(static_y, handle_d, topk_weights=static_w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_x = buf.dispatch(static_x, handle=handle_d)[0]
        got_y = buf.combine(static_y, handle_d, topk_weights=static_w)[0]
    g = torch.Generator().manual_seed(3000 + rank)
    for replay in range(3):
        new_x = torch.randn(static_x.shape, generator=g).to(static_x.dtype)
        new_y = torch.randn(static_y.shape, generator=g).to(static_y.dtype)
        static_x.copy_(new_x.to(device))
        static_y.copy_(new_y.to(device))
        graph.replay()
        torch.cuda.synchronize()
        want_x = ref.dispatch(new_x, handle=handle)[0]
        want_y = ref.combine(new_y, handle, topk_weights=recv_w)[0]
        assert torch.equal(_bits(got_x.cpu()), _bits(want_x)), f"rank {rank}: replay {replay}"
        assert torch.equal(_bits(got_y.cpu()), _bits(want_y)), f"rank {rank}: replay {replay}"
    buf.combine(static_y, handle_d, topk_weights=static_w)  # reports the replays' kernel errors
    return True


@pytest.mark.skipif("cuda" not in selected_backends(),
                    reason="needs 4 GPUs and EPCOMM_TEST_BACKENDS=cuda (make gpu-check runs it)")
def test_cuda_cached_calls_captured_in_a_graph_replay_exactly(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 0, 11), kind="bf16", seed=75)
    assert all(pools(4).run(cuda_cached_calls_in_a_graph, case))


# ----------------------------------------------------------------------------- dispatch counted on the device

def _layout_and_dispatch(buf, case: Case, inp, num_worst_tokens: int):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    return buf.dispatch(inp.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx,
                        topk_weights=inp.topk_weights, num_worst_tokens=num_worst_tokens)


def dispatch_counted_on_device(rank, world, case: Case, worst: int):
    """num_worst_tokens under host_sync_free: the same padded outputs, cached dispatch and combine as the eager
    call whose counts the host read (DeepEP's padding: x 0, top-k ids -1, weights 0; empty per-expert list)."""
    from epcomm.low_latency import host_sync_free

    buf, inp, _, _, _ = _dispatched(rank, case)
    eager = _layout_and_dispatch(buf, case, inp, worst)
    y = torch.randn(worst, case.hidden, generator=torch.Generator().manual_seed(rank)).bfloat16()  # expert rows
    buf.combine(y, eager[4], topk_weights=eager[2])
    with host_sync_free():
        got = _layout_and_dispatch(buf, case, inp, worst)
    assert got[3] == [] and got[4].num_recv_tokens_per_rank is None
    for name, want_t, got_t in zip(("recv_x", "recv_topk_idx", "recv_topk_weights"), eager[:3], got[:3]):
        rows = (got_t[0] if isinstance(got_t, tuple) else got_t).size(0)
        assert rows == worst and same_bits(got_t, want_t), name  # (FP8: data and scales, padding included)
    want_y = buf.combine(y, eager[4], topk_weights=eager[2])
    got_y = buf.combine(y, got[4], topk_weights=got[2])
    assert torch.equal(_bits(got_y[0]), _bits(want_y[0])) and torch.equal(got_y[1], want_y[1])
    assert same_bits(buf.dispatch(inp.x, handle=got[4])[0], buf.dispatch(inp.x, handle=eager[4])[0])
    return True


def expert_rows(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """What an expert returns for the received rows (padding rows included, which combine ignores)."""
    return (recv_x.float() * (rank + 2) - 1).to(recv_x.dtype)


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_dispatch_counted_on_the_device_equals_the_eager_one(pools, kind):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 0, 11), kind=kind, seed=76)
    assert all(pools(4).run(dispatch_counted_on_device, case, 48))


def moe_step_in_a_sim_graph(rank, world, case: Case, worst: int):
    """A whole normal-mode MoE step (layout, dispatch with num_worst_tokens, the experts, combine) captured once
    and replayed with new tokens AND new routing in the static inputs: each replay equals the eager step on the
    same inputs (which reads its counts on the host), bit for bit."""
    buf, inp, _, _, _ = _dispatched(rank, case)
    static_x, static_topk, static_w = inp.x.clone(), inp.topk_idx.clone(), inp.topk_weights.clone()

    def step(x, topk, w):
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, case.num_experts)
        recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank,
                                                       num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                                                       num_tokens_per_expert=per_expert, topk_idx=topk, topk_weights=w,
                                                       num_worst_tokens=worst)
        return (recv_x, *buf.combine(expert_rows(recv_x, rank), handle, topk_weights=recv_w)[:2])

    step(static_x, static_topk, static_w)  # eager once: the layouts exist before capture
    graph = SimGraph()
    with sim_graph(graph):
        got_x, got_y, got_w = step(static_x, static_topk, static_w)
    for replay in range(3):
        new = make_input(Case(**{**case.__dict__, "seed": case.seed + 100 + replay}), rank)
        static_x.copy_(new.x)
        static_topk.copy_(new.topk_idx)
        static_w.copy_(new.topk_weights)
        graph.replay()
        want_x, want_y, want_w = step(new.x, new.topk_idx, new.topk_weights)
        assert torch.equal(_bits(got_x), _bits(want_x)), f"rank {rank}, replay {replay}: received rows, padding"
        assert torch.equal(_bits(got_y), _bits(want_y)), f"rank {rank}, replay {replay}"
        assert torch.equal(got_w, want_w), f"rank {rank}, replay {replay}"
    return True


def test_a_normal_mode_moe_step_replays_from_a_graph_with_new_routing(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 6, 11), kind="bf16", seed=77)
    assert all(pools(4).run(moe_step_in_a_sim_graph, case, 48))


def overflow_on_some_ranks(rank, world, case: Case, worst: int):
    """num_worst_tokens below what some ranks receive: those raise EpcommRecvOverflow naming the rows; the others
    finish or stop on the abort flag it raised (EpcommPeerError): a failure of the call, on no rank a hang. The
    torch backend refuses the mode. Returns (rows this rank receives, as the eager call counts them on the host,
    the overflow's (rank, capacity, received), or the other outcome's exception name, or "ok")."""
    from epcomm.low_latency import host_sync_free

    ref, ref_inp, _, _, _ = _dispatched(rank, case, backend="torch")
    with host_sync_free(), pytest.raises(epcomm.EpcommInputError, match="runs on the kernel backends"):
        _layout_and_dispatch(ref, case, ref_inp, 64)
    buf, inp, _, _, _ = _dispatched(rank, case)
    eager = _layout_and_dispatch(buf, case, inp, 64)
    with host_sync_free():
        try:
            got = _layout_and_dispatch(buf, case, inp, worst)
            assert torch.equal(_bits(got[0]), _bits(eager[0][:worst])), "a rank that fits got other rows"
            outcome = "ok"
        except epcomm.EpcommRecvOverflow as err:
            outcome = (err.rank, err.capacity, err.received)
        except epcomm.EpcommPeerError as err:
            assert "peer_aborted" in str(err), str(err)
            outcome = type(err).__name__
    return eager[4].num_recv_tokens, outcome


def test_a_dispatch_counted_on_the_device_reports_overflow_on_the_ranks_it_hits(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 6, 11), kind="bf16", seed=78)
    worst = 28
    pool = pools(4)
    results = pool.run(overflow_on_some_ranks, case, worst)
    assert any(rows > worst for rows, _ in results) and any(rows <= worst for rows, _ in results), results
    for rank, (rows, outcome) in enumerate(results):
        expected = [(rank, worst, rows)] if rows > worst else ["ok", "EpcommPeerError"]
        assert outcome in expected, (rank, rows, outcome)
    pool.close()  # the Buffers failed by design


def device_counted_refusals(rank, world, case: Case):
    """A dispatch counted on the device refuses async_finish on CPU tensors through its notify (every rank
    raises, the Buffer goes on), and multi-node groups before anything is sent."""
    from epcomm.low_latency import host_sync_free

    buf, inp, _, _, _ = _dispatched(rank, case)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights,
                num_worst_tokens=64)
    with host_sync_free():
        if case.num_nodes > 1:
            with pytest.raises(epcomm.EpcommInputError, match="on one node, as DeepEP's"):
                buf.dispatch(inp.x, **args)
        else:
            with pytest.raises(epcomm.EpcommInputError, match="async_finish on CPU tensors"):
                buf.dispatch(inp.x, async_finish=True, **args)
            assert buf.dispatch(inp.x, **args)[0].size(0) == 64  # the Buffer goes on
    return True


@pytest.mark.parametrize("nodes,nvl", TOPOLOGIES)
def test_a_dispatch_counted_on_the_device_refuses_async_and_multi_node(pools, nodes, nvl):
    case = Case(num_nodes=nodes, nvl=nvl, tokens=(9, 14, 6, 11), kind="bf16", max_nodes=2, seed=80)
    assert all(pools(4).run(device_counted_refusals, case))


def cuda_moe_step_in_a_graph(rank, world, case: Case, worst: int):
    """The whole MoE step of moe_step_in_a_sim_graph captured with torch.cuda.graph on cuda and replayed with new
    tokens and routing: each replay equals the eager step on sim, bit for bit."""
    ref = _dispatched(rank, case)[0]
    buf, inp_d, _, _, _ = _dispatched(rank, case, backend="cuda")
    device = inp_d.x.device

    def step(b, x, topk, w):
        per_rank, per_rdma, per_expert, in_rank, _ = b.get_dispatch_layout(topk, case.num_experts)
        recv_x, _, recv_w, _, handle, _ = b.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                                     is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                     topk_idx=topk, topk_weights=w, num_worst_tokens=worst)
        return b.combine(expert_rows(recv_x, rank), handle, topk_weights=recv_w)[0]

    static_x, static_topk, static_w = inp_d.x.clone(), inp_d.topk_idx.clone(), inp_d.topk_weights.clone()
    step(buf, static_x, static_topk, static_w)  # eager once: the layouts exist before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step(buf, static_x, static_topk, static_w)
    for replay in range(3):
        new = make_input(Case(**{**case.__dict__, "seed": case.seed + 100 + replay}), rank)
        static_x.copy_(new.x.to(device))
        static_topk.copy_(new.topk_idx.to(device))
        static_w.copy_(new.topk_weights.to(device))
        graph.replay()
        torch.cuda.synchronize()
        want = step(ref, new.x, new.topk_idx, new.topk_weights)
        assert torch.equal(_bits(got.cpu()), _bits(want)), f"rank {rank}: replay {replay}"
    step(buf, static_x, static_topk, static_w)  # reports the replays' kernel errors
    return True


@pytest.mark.skipif("cuda" not in selected_backends(),
                    reason="needs 4 GPUs and EPCOMM_TEST_BACKENDS=cuda (make gpu-check runs it)")
def test_cuda_moe_step_with_num_worst_tokens_captured_in_a_graph_replays_exactly(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 6, 11), kind="bf16", seed=79)
    assert all(pools(4).run(cuda_moe_step_in_a_graph, case, 48))
