"""DeepEP drop-in, the data path: num_worst_tokens, combine's bias, DeepEP's positional argument order,
per-expert counts without topk_idx, FP8 scales in DeepEP's layouts (column-major, UE8M0 int32, per
token), the handle as DeepEP's tuple, handles outliving their Buffer, and cached calls with another
Config (tuning loops). Every result is checked against epcomm.reference or a direct computation from
every rank's inputs, on the torch and sim backends, on one node and across nodes."""

from __future__ import annotations

import gc

import pytest
import torch

import epcomm
from cases import Case, expert_output, make_input, same_bits
from epcomm.reference import reference_combine, reference_dispatch

RUNS = [(1, "torch"), (1, "sim"), (2, "torch"), (2, "sim")]  # (nodes, backend) on 4 ranks
IDS = [f"{n}node-{b}" for n, b in RUNS]


def _case(world: int, nodes: int, **kw) -> Case:
    kw.setdefault("tokens", (11, 0, 17, 6)[:world])
    kw.setdefault("seed", 31)
    return Case(num_nodes=nodes, nvl=world // nodes, max_nodes=nodes, **kw)


def _buffer(case: Case, backend: str, **kw) -> epcomm.Buffer:
    return epcomm.Buffer(None, backend=backend, num_nvl_ranks=case.nvl, max_nodes_per_token=case.max_nodes,
                         timeout_s=60, **kw)


def _routes(case: Case, world: int) -> list[torch.Tensor]:
    """is_token_in_rank of every rank, straight from its topk_idx."""
    per_rank = case.num_experts // world
    out = []
    for s in range(world):
        idx = make_input(case, s).topk_idx
        out.append(torch.stack([((idx >= 0) & (idx // per_rank == d)).any(1) for d in range(world)], dim=1))
    return out


def _layout(buf, inp, case):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    return per_rank, per_rdma, per_expert, in_rank


def _error(fn):
    try:
        fn()
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


# ------------------------------------------------------------------ num_worst_tokens, positional order
def worst_tokens_round(rank, world, nodes, backend, kind):
    case = _case(world, nodes, kind=kind)
    inputs = [make_input(case, r) for r in range(world)]
    refs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    ref, mine = refs[rank], inputs[rank]
    worst = max(len(r.sources) for r in refs) + 3  # the same on every rank
    buf = _buffer(case, backend)
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    # DeepEP's positional order: ..., expert_alignment, num_worst_tokens, config
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        mine.x, None, per_rank, per_rdma, in_rank, per_expert, mine.topk_idx, mine.topk_weights, 1, worst, None)
    n = len(ref.sources)
    data = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    assert data.shape[0] == worst and counts == []
    if isinstance(recv_x, tuple):
        assert same_bits((recv_x[0][:n], recv_x[1][:n]), ref.recv_x) and recv_x[1].shape[0] == worst
        assert not recv_x[1][n:].any()
    else:
        assert same_bits(recv_x[:n], ref.recv_x)
    assert not data[n:].view(torch.uint8).any()
    assert torch.equal(recv_idx[:n], ref.recv_topk_idx) and (recv_idx[n:] == -1).all()
    assert same_bits(recv_w[:n], ref.recv_topk_weights) and not recv_w[n:].any()
    cached = buf.dispatch(mine.x, handle=handle)[0]
    assert same_bits(cached, recv_x), "a cached dispatch along a padded handle pads alike"
    outputs = [expert_output(r.recv_x, d) for d, r in enumerate(refs)]
    want = reference_combine([r.sources for r in refs], outputs, case.tokens[rank], rank, case.nvl)
    padded = torch.cat([outputs[rank], torch.full((worst - n, case.hidden), 7.0, dtype=outputs[rank].dtype)])
    padded_w = torch.cat([recv_w[:n], torch.full((worst - n, case.topk), 5.0)])
    combined, combined_w, _ = buf.combine(padded, handle, padded_w)  # padded rows are ignored
    assert same_bits(combined, want)
    want_w = reference_combine([r.sources for r in refs], [r.recv_topk_weights for r in refs], case.tokens[rank],
                               rank, case.nvl)
    assert same_bits(combined_w, want_w)
    assert same_bits(buf.combine(outputs[rank], handle)[0], want), "combine also takes the unpadded rows"
    return worst


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("nodes,backend", RUNS, ids=IDS)
def test_num_worst_tokens_pads_and_combines(pools, nodes, backend, kind):
    pools(4).run(worst_tokens_round, nodes, backend, kind)


def worst_tokens_misuse(rank, world, backend, how):
    case = _case(world, 1)
    buf = _buffer(case, backend)
    mine = make_input(case, rank)
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    worst = {"too small": 3, "disagree": 200 if rank == 1 else 100, "negative": -1 if rank == 1 else 100}[how]
    message = _error(lambda: buf.dispatch(mine.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                          num_tokens_per_expert=per_expert, topk_idx=mine.topk_idx,
                                          num_worst_tokens=worst))
    buf.dispatch(mine.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank)  # the group still works
    return message


@pytest.mark.parametrize("how,phrase", [("too small", "num_worst_tokens=3 but this rank receives"),
                                        ("disagree", "ranks disagree on num_worst_tokens"),
                                        ("negative", "num_worst_tokens must be an int >= 0")])
@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_num_worst_tokens_misuse_fails_every_rank(pools, backend, how, phrase):
    for message in pools(4).run(worst_tokens_misuse, backend, how):
        assert message is not None and phrase in message, message


# ------------------------------------------------------------------ combine's bias
def combine_with_bias(rank, world, nodes, backend):
    case = _case(world, nodes)
    inputs = [make_input(case, r) for r in range(world)]
    refs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    buf = _buffer(case, backend)
    mine = inputs[rank]
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    _, _, recv_w, _, handle, _ = buf.dispatch(mine.x, None, per_rank, per_rdma, in_rank, per_expert, mine.topk_idx,
                                              mine.topk_weights)
    outputs = [expert_output(r.recv_x, d) for d, r in enumerate(refs)]
    # fp32 sums, each node's partial rounded to the rows' bf16 (the default combine_node_partials)
    sums = reference_combine([r.sources for r in refs], [o.float() for o in outputs], case.tokens[rank], rank,
                             case.nvl, node_partials=torch.bfloat16)
    g = torch.Generator().manual_seed(rank)
    b0 = torch.randn(case.tokens[rank], case.hidden, generator=g).to(torch.bfloat16)
    b1 = torch.randn(case.tokens[rank], case.hidden, generator=g).to(torch.bfloat16)
    # DeepEP's positional order: x, handle, topk_weights, bias, config
    both, weights, _ = buf.combine(outputs[rank], handle, recv_w, (b0, b1), None)
    assert same_bits(both, ((sums + b0.float()) + b1.float()).to(torch.bfloat16))
    assert weights is not None
    one = buf.combine(outputs[rank], handle, None, b0)[0]
    assert same_bits(one, (sums + b0.float()).to(torch.bfloat16))
    half = buf.combine(outputs[rank], handle, bias=(None, b1))[0]
    assert same_bits(half, (sums + b1.float()).to(torch.bfloat16))
    plain = buf.combine(outputs[rank], handle)[0]  # and without bias, as before
    assert same_bits(plain, sums.to(torch.bfloat16))
    bad = b0[:, :8].contiguous() if rank == 2 else b0
    return _error(lambda: buf.combine(outputs[rank], handle, None, bad))


@pytest.mark.parametrize("nodes,backend", RUNS, ids=IDS)
def test_combine_adds_bias_before_the_one_cast(pools, nodes, backend):
    for message in pools(4).run(combine_with_bias, nodes, backend):
        assert message is not None and "rank 2: bias must have shape" in message, message


# ------------------------------------------------------------------ per-expert list without topk_idx
def per_expert_without_topk(rank, world, nodes, backend):
    case = _case(world, nodes, alignment=4)
    buf = _buffer(case, backend)
    mine = make_input(case, rank)
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    got = buf.dispatch(mine.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                       is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, expert_alignment=4)[3]
    local = case.num_experts // world
    want = [0] * local
    for s in range(world):  # every rank's tokens choosing each of this rank's experts
        idx = make_input(case, s).topk_idx
        for e in range(local):
            want[e] += int((idx == rank * local + e).sum())
    want = [-(-c // 4) * 4 for c in want]
    with_topk = buf.dispatch(mine.x, None, per_rank, per_rdma, in_rank, per_expert, mine.topk_idx, None, 4)[3]
    none_given = buf.dispatch(mine.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                              is_token_in_rank=in_rank)[3]
    return got, want, with_topk, none_given


@pytest.mark.parametrize("nodes,backend", RUNS, ids=IDS)
def test_per_expert_counts_without_topk_idx(pools, nodes, backend):
    for got, want, with_topk, none_given in pools(4).run(per_expert_without_topk, nodes, backend):
        assert got == want == with_topk and none_given == []


# ------------------------------------------------------------------ FP8 scales in DeepEP's layouts
def scale_layouts(rank, world, nodes, backend, layout):
    hidden = 1024
    case = _case(world, nodes, hidden=hidden)
    routes = _routes(case, world)
    buf = _buffer(case, backend)

    def rows_of(s):
        g = torch.Generator().manual_seed(100 + s)
        n = case.tokens[s]
        data = (torch.randn(n, hidden, generator=g) * 32).to(torch.float8_e4m3fn)
        if layout == "ue8m0":  # four exponent bytes per int, every bit pattern (0xff included)
            scales = torch.randint(-2**31, 2**31 - 1, (n, hidden // 512), generator=g, dtype=torch.int64).to(torch.int32)
        elif layout == "per-token":
            scales = torch.rand(n, generator=g) + 0.5
        else:
            scales = torch.rand(n, hidden // 128, generator=g) + 0.5
        return data, scales

    data, scales = rows_of(rank)
    passed = scales.T.contiguous().T if scales.dim() == 2 else scales  # DeepEP's column-major layout
    assert scales.dim() == 1 or scales.size(1) == 1 or data.size(0) < 2 or not passed.is_contiguous()
    mine = make_input(case, rank)
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    recv, _, _, _, handle, _ = buf.dispatch((data, passed), None, per_rank, per_rdma, in_rank, per_expert,
                                            mine.topk_idx)
    want_data = torch.cat([rows_of(s)[0][routes[s][:, rank]] for s in range(world)])
    want_scales = torch.cat([rows_of(s)[1][routes[s][:, rank]] for s in range(world)])
    assert same_bits(recv[0], want_data)
    assert recv[1].dtype == scales.dtype and recv[1].is_contiguous() and same_bits(recv[1], want_scales)
    cached = buf.dispatch((data, passed), handle=handle)[0]
    assert same_bits(cached[1], want_scales) and same_bits(cached[0], want_data)
    # one rank with another scale format: every rank refuses
    other = (data, torch.ones(case.tokens[rank], hidden // 128)) if rank == 3 and layout == "ue8m0" else (data, passed)
    return _error(lambda: buf.dispatch(other, handle=handle))


@pytest.mark.parametrize("layout", ["column-major", "ue8m0", "per-token"])
@pytest.mark.parametrize("nodes,backend", RUNS, ids=IDS)
def test_fp8_scales_in_deepep_layouts_are_carried_bit_exactly(pools, nodes, backend, layout):
    for message in pools(4).run(scale_layouts, nodes, backend, layout):
        if layout == "ue8m0":
            assert message is not None and "rank 3: ranks disagree on x's dtype" in message, message
        else:
            assert message is None, message


def bad_ue8m0(rank, world):
    case = _case(world, 1, hidden=640)  # hidden % 512 != 0
    buf = _buffer(case, "torch")
    mine = make_input(case, rank)
    per_rank, _, _, in_rank = _layout(buf, mine, case)
    n = case.tokens[rank]
    x = (torch.zeros(n, 640, dtype=torch.float8_e4m3fn),
         torch.zeros(n, 1, dtype=torch.int32) if rank == 0 else torch.ones(n, 5))
    return _error(lambda: buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank))


def test_ue8m0_scales_need_hidden_multiple_of_512(pools):
    for message in pools(4).run(bad_ue8m0):
        assert message is not None and "rank 0: UE8M0 scales" in message and "hidden % 512" in message, message


# ------------------------------------------------------------------ the handle as DeepEP's tuple
def handle_tuple(rank, world, nodes, backend):
    case = _case(world, nodes)
    routes = _routes(case, world)
    inputs = [make_input(case, r) for r in range(world)]
    buf = _buffer(case, backend)
    mine = inputs[rank]
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    config = epcomm.Config(num_sms=6, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=8,
                           num_max_rdma_chunked_send_tokens=2, num_max_rdma_chunked_recv_tokens=8)
    recv_x, _, _, _, handle, _ = buf.dispatch(mine.x, None, per_rank, per_rdma, in_rank, per_expert, mine.topk_idx,
                                              config=config)
    counts = torch.tensor([[int(routes[s][:, d].sum()) for d in range(world)] for s in range(world)])
    prefix = counts.cumsum(0)
    n, channels = case.tokens[rank], 3
    rows = list(handle)  # unpacking works like DeepEP's tuple
    if nodes == 1:
        assert len(handle) == 6 and len(rows) == 6
        rank_prefix, ch_prefix, recv_ch_prefix, recv_src_idx, h_in_rank, send_head = rows
        assert rank_prefix.dtype == torch.int32 and torch.equal(rank_prefix, prefix.to(torch.int32))
        assert torch.equal(handle[0], rank_prefix) and torch.equal(h_in_rank, routes[rank])
        assert ch_prefix.shape == (world, channels) and recv_ch_prefix.shape == (world, channels)
        assert recv_src_idx.shape == (recv_x.size(0),) and recv_src_idx.dtype == torch.int32
        send_side, send_route = ch_prefix, routes[rank]
    else:
        assert len(handle) == 10
        assert torch.equal(handle[0], routes[rank])
        recv_gbl = handle[-4]
        assert recv_gbl.dtype == torch.int32 and torch.equal(recv_gbl, prefix[:, rank].to(torch.int32))
        node_route = routes[rank].view(n, nodes, case.nvl).any(2)
        assert torch.equal(handle[1][:, -1], node_route.sum(0, dtype=torch.int32))  # rdma_channel_prefix_matrix
        assert handle[1].shape == (nodes, channels) and handle[3].shape == (nodes, channels)
        assert handle[2].shape == (world, channels) and handle[5].shape == (world, channels)
        # recv_rdma_rank_prefix_sum: tokens of each node's same-index rank that reach this rank's node
        forwarded = [int(routes[m * case.nvl + rank % case.nvl].view(-1, nodes, case.nvl).any(2)[:, rank // case.nvl]
                         .sum()) for m in range(nodes)]
        assert torch.equal(handle[4], torch.tensor(forwarded).cumsum(0).to(torch.int32))
        meta = handle[7]
        assert meta.dtype == torch.uint8 and meta.shape == (recv_x.size(0), 8)
        sources = torch.repeat_interleave(torch.arange(world), counts[:, rank])
        assert torch.equal(meta.view(torch.int32)[:, 0], (sources // case.nvl).to(torch.int32))
        assert handle[8].shape == (n, nodes) and handle[9].shape == (sum(forwarded), 8)
        send_side, send_route = handle[2], routes[rank]
        head = handle[8]
        assert torch.equal(head >= 0, node_route)
    # send side, per channel: channel c holds tokens [c * q, (c + 1) * q)
    q = max(-(-n // channels), 1)
    want = torch.stack([send_route[: min((c + 1) * q, n)].sum(0) for c in range(channels)], dim=1).to(torch.int32)
    assert torch.equal(send_side, want)
    if nodes == 1:
        for t in range(n):
            c0 = (t // q) * q
            for d in range(world):
                expected = int(send_route[c0:t, d].sum()) if send_route[t, d] else -1
                assert int(rows[5][t, d]) == expected
    # rank_prefix / recv_gbl_rank_prefix_sum delimit the rows from each source, as DeepEP's tests read them
    ends = prefix[:, rank].tolist()
    for s in range(world):
        lo = ends[s - 1] if s else 0
        assert same_bits(recv_x[lo : ends[s]], inputs[s].x[routes[s][:, rank]])
    return True


@pytest.mark.parametrize("nodes,backend", RUNS, ids=IDS)
def test_handle_reads_like_deepeps_tuple(pools, nodes, backend):
    assert all(pools(4).run(handle_tuple, nodes, backend))


# ------------------------------------------------------------------ a handle outlives its Buffer
def handle_after_new_buffer(rank, world, nodes, backend, how):
    case = _case(world, nodes)
    inputs = [make_input(case, r) for r in range(world)]
    refs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    mine = inputs[rank]
    buf = _buffer(case, backend, explicitly_destroy=(how == "destroy"))
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    _, _, recv_w, _, handle, _ = buf.dispatch(mine.x, None, per_rank, per_rdma, in_rank, per_expert, mine.topk_idx,
                                              mine.topk_weights)
    if how == "destroy":
        buf.destroy()
    old_id = buf.id
    buf = _buffer(case, backend)  # Megatron re-creates its global buffer: the old one goes away
    gc.collect()
    assert buf.id != old_id
    outputs = [expert_output(r.recv_x, d) for d, r in enumerate(refs)]
    want = reference_combine([r.sources for r in refs], outputs, case.tokens[rank], rank, case.nvl)
    assert same_bits(buf.combine(outputs[rank], handle)[0], want)
    assert same_bits(buf.dispatch(mine.x, handle=handle)[0], refs[rank].recv_x)
    # a Buffer with other settings cannot take the handle over: every rank refuses
    other = epcomm.Buffer(None, backend="torch", num_nvl_ranks=1 if rank == 1 else case.nvl,
                          max_nodes_per_token=world, timeout_s=60)
    del buf
    gc.collect()
    return _error(lambda: other.combine(outputs[rank], handle))


@pytest.mark.parametrize("how", ["replace", "destroy"])
@pytest.mark.parametrize("nodes,backend", RUNS, ids=IDS)
def test_handle_survives_a_recreated_buffer(pools, nodes, backend, how):
    for message in pools(4).run(handle_after_new_buffer, nodes, backend, how):
        assert message is not None and "rank 1: handle was made by a Buffer that no longer exists" in message
        assert "ranks per node" in message, message


# ------------------------------------------------------------------ tuning loops: cached calls, other configs
TUNING = [epcomm.Config(4, 2, 8, 2, 8), epcomm.Config(6, 3, 12, 2, 16), epcomm.Config(2, 6, 32, 4, 16),
          epcomm.Config(8, 1, 4, 1, 4)]


def tuning_loop(rank, world, nodes, backend):
    case = _case(world, nodes, kind="fp8")
    inputs = [make_input(case, r) for r in range(world)]
    refs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    mine = inputs[rank]
    buf = _buffer(case, backend)
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    _, _, _, _, handle, _ = buf.dispatch(mine.x, None, per_rank, per_rdma, in_rank, per_expert, mine.topk_idx,
                                         config=TUNING[0])
    outputs = [expert_output(r.recv_x, d) for d, r in enumerate(refs)]
    want = reference_combine([r.sources for r in refs], outputs, case.tokens[rank], rank, case.nvl)
    for config in TUNING:  # as DeepEP's tests tune: the same handle, config after config
        assert same_bits(buf.dispatch(mine.x, handle=handle, config=config)[0], refs[rank].recv_x), config
        assert same_bits(buf.combine(outputs[rank], handle, config=config)[0], want), config
    return True


@pytest.mark.parametrize("nodes,backend", RUNS, ids=IDS)
def test_cached_calls_take_another_config(pools, nodes, backend):
    assert all(pools(4).run(tuning_loop, nodes, backend))


def tuning_past_the_buffer(rank, world):
    """A config whose rings do not fit a buffer sized for the dispatch's: refused on every rank, and the
    handle keeps working with a config that fits."""
    case = _case(world, 1)
    inputs = [make_input(case, r) for r in range(world)]
    refs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    fits = epcomm.Config(4, 2, 8, 2, 8)
    buf = epcomm.Buffer(None, fits.get_nvl_buffer_size_hint(2 * case.hidden, world, case.topk), backend="sim",
                        timeout_s=60)
    mine = inputs[rank]
    per_rank, per_rdma, per_expert, in_rank = _layout(buf, mine, case)
    handle = buf.dispatch(mine.x, None, per_rank, per_rdma, in_rank, per_expert, mine.topk_idx, config=fits)[4]
    message = _error(lambda: buf.dispatch(mine.x, handle=handle, config=epcomm.Config(4, 2, 64, 2, 8)))
    assert same_bits(buf.dispatch(mine.x, handle=handle, config=epcomm.Config(2, 1, 4, 1, 4))[0], refs[rank].recv_x)
    return message


def test_a_config_that_cannot_fit_is_refused_on_every_rank(pools):
    for message in pools(4).run(tuning_past_the_buffer):
        assert message is not None and "rejected its inputs on 4 of 4 ranks" in message
        assert "raise num_nvl_bytes to at least" in message, message
