"""backend="sim": epcomm's kernels on the CPU, through Buffer, against the reference.

The reference (epcomm.reference) is what the torch backend is checked against bit for bit, so
passing here means sim == torch bit for bit; one test also compares the two backends' digests.
"""

from __future__ import annotations

import pytest
import torch

import epcomm
from cases import Case, check_case, make_input

TOPOLOGIES = [2, 4, 8]  # one node of this many ranks


def uneven_tokens(world: int) -> tuple[int, ...]:
    """Uneven counts, with rank 1 dispatching nothing."""
    return tuple(0 if r == 1 else 9 + 7 * r for r in range(world))


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("nvl", TOPOLOGIES, ids=[f"1x{n}" for n in TOPOLOGIES])
def test_sim_matches_reference(pools, nvl, kind):
    case = Case(num_nodes=1, nvl=nvl, tokens=uneven_tokens(nvl), kind=kind, alignment=4, seed=nvl + 17)
    reports = pools(nvl).run(check_case, case, "flat", 2, "sim")
    torch_reports = pools(nvl).run(check_case, case, "flat", 2, "torch")
    assert all(r.backend == "sim" and r.kernel_epochs == 6 for r in reports)  # 3 notifies per round
    assert all(r.backend == "torch" for r in torch_reports)
    assert [r.digest for r in reports] == [r.digest for r in torch_reports]


def test_sim_without_weights_and_explicit_buffer(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(5, 17, 0, 11), kind="bf16", with_weights=False, alignment=8, seed=3,
                hidden=384, num_experts=16, topk=3)
    pools(4).run(check_case, case, "flat", 1, "sim", 64 << 20)


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_sim_combines_fp32_and_fp16_rows(pools, kind):
    """Rows of every combine dtype are summed in fp32 and rounded once, as the torch backend does."""
    case = Case(num_nodes=1, nvl=4, tokens=(6, 0, 13, 9), kind=kind, hidden=130, seed=9)
    reports = pools(4).run(check_case, case, "flat", 1, "sim")
    torch_reports = pools(4).run(check_case, case, "flat", 1, "torch")
    assert [r.digest for r in reports] == [r.digest for r in torch_reports]


def too_small(rank, world):
    buf = epcomm.Buffer(None, 4096, backend="sim", num_nvl_ranks=world, timeout_s=60)
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    topk_idx = torch.zeros(4, 2, dtype=torch.int64)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, 4)
    try:
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=topk_idx)
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


def test_sim_too_small_buffer_says_how_big(pools):
    for message in pools(2).run(too_small):
        assert message is not None and "raise num_nvl_bytes to at least" in message, message


def flat_across_nodes(rank, world, backend, algorithm="flat"):
    try:
        epcomm.Buffer(None, backend=backend, num_nvl_ranks=2, algorithm=algorithm)
    except (ValueError, epcomm.EpcommBackendUnavailable) as err:
        return type(err).__name__, str(err)
    return None


def test_kernel_backends_run_two_hop_across_nodes(pools):
    """The kernels implement the two-hop path across nodes; asking sim or cuda for flat says so on every rank."""
    for backend in ("sim", "cuda"):
        for name, message in pools(4).run(flat_across_nodes, backend):
            assert name == "ValueError" and "runs the two-hop kernels across nodes" in message, message


def test_auto_does_not_pick_sim():
    from epcomm.backends import resolve_backend

    assert resolve_backend("auto") == "torch"
    assert resolve_backend("sim") == "sim"


def growing_rounds(rank, world, nodes=1):
    """One sim Buffer through calls of growing and shrinking shape: the buffer grows, layouts change (and
    across nodes the RDMA region, whose barrier and ring signals persist, moves with the NVL region)."""
    from cases import check_round

    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=world // nodes, timeout_s=60)
    sizes = []
    for hidden, kind, topk in ((128, "bf16", 2), (512, "fp8", 6), (256, "bf16", 4), (512, "fp8", 6), (128, "fp32", 1),
                               (128, "bf16", 3)):
        case = Case(num_nodes=nodes, nvl=world // nodes, tokens=(7, 0, 12, 5)[:world], kind=kind, hidden=hidden,
                    topk=topk, seed=hidden + topk)
        check_round(buf, case, rank, world)
        sizes.append(buf._impl._device_runtime.num_nvl_bytes)
    return sizes


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_sim_buffer_grows_and_layout_changes(pools, nodes):
    for sizes in pools(4).run(growing_rounds, nodes):
        assert sizes[0] < sizes[1] == sizes[2] == sizes[3] == sizes[4] == sizes[5], sizes


def wrong_weight_width(rank, world):
    case = Case(num_nodes=1, nvl=world, tokens=(6,) * world, seed=4)
    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=world, timeout_s=60)
    mine = make_input(case, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(mine.topk_idx, case.num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        mine.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx, topk_weights=mine.topk_weights)
    try:
        buf.combine(recv_x, handle, topk_weights=recv_w[:, :2].contiguous())
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


def test_sim_combine_weights_need_dispatch_topk(pools):
    for message in pools(2).run(wrong_weight_width):
        assert message is not None and "dispatch's num_topk=4 columns, got 2" in message, message


def test_sim_counts_the_rows_and_bytes_its_kernels_move(pools):
    """Per link class, sim moves the rows and payload bytes the torch backend sends (metadata differs:
    a kernel slot carries the source index beside the top-k ids and weights)."""
    case = Case(num_nodes=1, nvl=4, tokens=(11, 0, 7, 19), kind="fp8", seed=31)
    sim = pools(4).run(check_case, case, "flat", 1, "sim")
    ref = pools(4).run(check_case, case, "flat", 1, "torch")
    num_topk = case.topk
    for s, t in zip(sim, ref):
        for op in ("dispatch", "cached dispatch", "combine"):
            for link in ("self", "nvlink"):
                got, want = s.traffic.get(op, {}).get(link, {}), t.traffic.get(op, {}).get(link, {})
                assert got.get("rows", 0) == want.get("rows", 0), (op, link, got, want)
                assert got.get("payload_bytes", 0) == want.get("payload_bytes", 0), (op, link, got, want)
        nvlink = s.traffic.get("dispatch", {}).get("nvlink", {"rows": 0, "meta_bytes": 0})
        assert nvlink["meta_bytes"] == nvlink["rows"] * (4 + 12 * num_topk)
        assert "network" not in s.traffic.get("dispatch", {})
    assert sum(s.traffic["dispatch"]["nvlink"]["rows"] for s in sim if "dispatch" in s.traffic) > 0


def traffic_both_ways(rank, world, case: Case) -> tuple[dict, dict]:
    """One checked round on a sim Buffer whose two-hop traffic the transport counts, and one whose traffic comes
    from the routing the host knows (what the cuda backend records, as GIN counts no bytes)."""
    from cases import check_round

    reports = []
    for from_routing in (False, True):
        buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=case.nvl, algorithm="two_hop",
                            max_nodes_per_token=case.max_nodes, combine_node_partials=case.node_partials)
        buf._impl.traffic_from_routing = from_routing
        reports.append(check_round(buf, case, rank, world)[1])
    return tuple(reports)


@pytest.mark.parametrize("nodes,nvl,kind,partials", [(2, 2, "bf16", "rows_dtype"), (4, 2, "fp8", "float32")])
def test_two_hop_traffic_from_routing_equals_the_transport_counts(pools, nodes, nvl, kind, partials):
    """buffer.traffic on cuda: the network hop (dispatch rows with their records, combine node partials with
    their weights) and the NVLink forwarding hop computed on the host from the routing equal, per op, link class,
    rows and bytes, what sim's transport counted and its forward masks say."""
    world = nodes * nvl
    tokens = tuple([13, 0, 21, 8, 17, 5, 9, 30][:world])
    case = Case(num_nodes=nodes, nvl=nvl, tokens=tokens, kind=kind, max_nodes=min(nodes, 4), node_partials=partials,
                seed=53)
    reports = pools(world).run(traffic_both_ways, case)
    for rank, (counted, from_routing) in enumerate(reports):
        assert counted == from_routing, (rank, counted, from_routing)
    rows = lambda op, link: sum(r[0].get(op, {}).get(link, {}).get("rows", 0) for r in reports)  # noqa: E731
    assert rows("dispatch", "network") > 0 and rows("combine", "network") > 0 and rows("dispatch", "nvlink") > 0


def buffer_at_hint(rank, world, slack):
    """A bf16 dispatch + combine of hidden 256, top-4, in a buffer of exactly the hint (+ slack) bytes."""
    from epcomm.backends.sim_backend import SIM_DEFAULT_CONFIG

    case = Case(num_nodes=1, nvl=world, tokens=(9,) * world, hidden=256, topk=4, seed=2)
    hint = SIM_DEFAULT_CONFIG.get_nvl_buffer_size_hint(2 * case.hidden, world, case.topk, num_experts=case.num_experts)
    try:
        check_case(rank, world, case, "flat", 1, "sim", hint + slack)
    except Exception as err:  # RankFailure is raised by the pool; here the error itself
        return hint, type(err).__name__, str(err)
    return hint, None, None


@pytest.mark.parametrize("config_kwargs", [dict(), dict(num_sms=8, num_max_nvl_chunked_recv_tokens=12)])
def test_nvl_size_hint_is_exact(pools, config_kwargs):
    """The hint is the kernels' own workspace size: enough for the call, and one byte less is refused.
    Without num_experts it covers 1024 experts: 8 bytes per expert more (notify's per-expert counts)."""
    from epcomm.backends.sim_backend import SIM_DEFAULT_CONFIG

    num_experts = Case(num_nodes=1, nvl=4, tokens=(9,) * 4).num_experts
    config = epcomm.Config(**config_kwargs) if config_kwargs else SIM_DEFAULT_CONFIG
    hint = config.get_nvl_buffer_size_hint(512, 4, 4, num_experts=num_experts)
    assert hint > 0 and hint % 128 == 0
    default = config.get_nvl_buffer_size_hint(512, 4, 4)
    assert default - hint == pytest.approx(8 * (1024 - num_experts), abs=128)  # each region rounds up to 128 B
    if config_kwargs:  # more channels and a shorter ring: the layout follows the config
        assert hint != SIM_DEFAULT_CONFIG.get_nvl_buffer_size_hint(512, 4, 4, num_experts=num_experts)
        return
    for (got_hint, error, _) in pools(4).run(buffer_at_hint, 0):
        assert got_hint == hint and error is None
    for (_, error, message) in pools(4).run(buffer_at_hint, -1):
        assert error == "EpcommInputError", message
        assert f"raise num_nvl_bytes to at least {hint}" in message and f"num_nvl_bytes={hint - 1}" in message, message


def with_config(rank, world, config_kwargs):
    from cases import check_round

    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=world, timeout_s=60)
    case = Case(num_nodes=1, nvl=world, tokens=(40, 3, 0, 27)[:world], kind="fp8", seed=12)
    config = epcomm.Config(**config_kwargs)
    inputs = make_input(case, rank)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(inputs.topk_idx, case.num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(
        inputs.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=inputs.topk_idx, topk_weights=inputs.topk_weights, config=config)
    channels = handle.plan.recv_channel_prefix.size(1) - 1
    cached = buf.dispatch(inputs.x, handle=handle, config=config)[0]
    out, _, _ = buf.combine(cached[0].float().to(torch.bfloat16), handle, config=config)
    check_round(buf, case, rank, world)  # then a call with the default config, checked against the reference
    return channels, out.shape


def test_sim_runs_the_callers_config(pools):
    """A Config picks the kernels' channels, chunk and ring (a 3-token ring wraps on every channel)."""
    kwargs = dict(num_sms=6, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=3)
    for channels, shape in pools(4).run(with_config, kwargs):
        assert channels == 3


def rounds_across_layouts(rank, world, configs):
    """2 nodes x 2: one checked dispatch + cached dispatch + combine per config, each config another
    buffer layout (channels, rings), so every change re-lays the buffers out."""
    from cases import check_round

    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=2, max_nodes_per_token=2, timeout_s=60)
    case = Case(num_nodes=2, nvl=2, tokens=(30, 3, 0, 27), hidden=256, topk=4, max_nodes=2, seed=21)
    backend, resets = buf._impl, []
    relayout = backend._relayout
    backend._relayout = lambda op, num_bytes: (resets.append(backend.path.transport_signals), relayout(op, num_bytes))
    for kwargs in configs:
        config = epcomm.Config(**kwargs) if kwargs is not None else None
        inputs = make_input(case, rank)
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inputs.topk_idx, case.num_experts)
        buf.dispatch(inputs.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                     num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx, config=config)  # lays out
        check_round(buf, case, rank, world)  # the default layout again: checked against the reference
    return resets


def test_relayout_across_nodes_resets_transport_signals(pools):
    """A re-layout across nodes starts with a notify in the old layout that waits for every add still due
    to this rank's transport signals (ring credits: each signal must reach the count its owner saved) and
    zeroes them (csrc/kernels/internode_notify.cuh, step 5): a wrong expectation would time out here, and
    stale signals would break the next layout's barrier and rings (checked against the reference)."""
    small_rings = dict(num_sms=6, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=3,
                       num_max_rdma_chunked_send_tokens=2, num_max_rdma_chunked_recv_tokens=4)
    configs = [None, small_rings, dict(num_sms=8), small_rings]
    for resets in pools(4).run(rounds_across_layouts, configs):
        # default -> small -> default -> 8 SMs -> default -> small -> default; a layout that needs larger
        # buffers gets new ones instead (their signals start at 0)
        assert len(resets) >= 4 and all(resets), resets


def bad_kernel_config(rank, world):
    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=world, timeout_s=60)
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    topk_idx = torch.zeros(4, 2, dtype=torch.int64)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, 4)
    try:
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=topk_idx, config=epcomm.Config(num_sms=2 * 600))
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


def test_sim_rejects_a_config_the_kernels_cannot_run(pools):
    for message in pools(2).run(bad_kernel_config):
        assert message is not None and "num_channels must be in [1, 512]" in message, message


@pytest.mark.parametrize("backend", ["sim", "torch"])
def test_a_rank_that_receives_nothing_still_forwards_weights(pools, backend):
    """Found by the stress run: on 2 x 2 with one expert per rank, nobody chose rank 0's expert, so rank 0
    receives no rows (its topk_weights for combine are empty) but, as forwarder, must still sum the
    weights its node's peers send back for the tokens of rank 0 (the same local index)."""
    case = Case(num_nodes=2, nvl=2, tokens=(2, 3, 5, 4), hidden=128, num_experts=4, topk=1, drop_prob=0.0,
                max_nodes=2, alignment=4, seed=87)
    pools(4).run(check_case, case, "auto", 1, backend)


def buffers_at_hints(rank, world, nvl_slack, rdma_slack):
    """2 nodes x 2: a bf16 dispatch + combine (hidden 256, top-4, node cap 2) in buffers of exactly the
    NVL and RDMA hints (+ slack)."""
    from cases import check_round
    from epcomm.backends.sim_backend import SIM_DEFAULT_CONFIG

    case = Case(num_nodes=2, nvl=2, tokens=(9, 4, 0, 13), hidden=256, topk=4, max_nodes=2, seed=5)
    local_experts = case.num_experts // case.world  # notify's per-expert counts
    nvl = SIM_DEFAULT_CONFIG.get_nvl_buffer_size_hint_for_node(2 * case.hidden, 2, case.topk, local_experts)
    rdma = SIM_DEFAULT_CONFIG.get_rdma_buffer_size_hint_for_nodes(2 * case.hidden, 2, case.topk, 2, 2, local_experts)
    buf = epcomm.Buffer(None, nvl + nvl_slack, rdma + rdma_slack, backend="sim", num_nvl_ranks=2,
                        max_nodes_per_token=2, timeout_s=60)
    try:
        check_round(buf, case, rank, world)
    except epcomm.EpcommInputError as err:
        return nvl, rdma, str(err)
    return nvl, rdma, None


def test_rdma_size_hint_is_exact(pools):
    """Across nodes both hints are the kernels' own region sizes: enough, and one byte less of either is
    refused on every rank naming the size to raise."""
    (nvl, rdma, problem), *_ = pools(4).run(buffers_at_hints, 0, 0)
    assert problem is None and nvl > 0 and rdma > 0
    for message in [m for _, _, m in pools(4).run(buffers_at_hints, 0, -1)]:
        assert message is not None and f"raise num_rdma_bytes to at least {rdma}" in message, message
    for message in [m for _, _, m in pools(4).run(buffers_at_hints, -1, 0)]:
        assert message is not None and f"raise num_nvl_bytes to at least {nvl}" in message, message


def _dispatched(rank: int, case: Case, low_latency_mode: bool = False):
    """A sim Buffer of ``case`` after one dispatch of this rank's input: (buffer, recv_x, recv_topk_weights,
    handle)."""
    buf = epcomm.Buffer(None, backend="sim", num_nvl_ranks=case.nvl, max_nodes_per_token=case.max_nodes,
                        low_latency_mode=low_latency_mode)
    inp = make_input(case, rank)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    recv_x, _, recv_w, _, handle, _ = buf.dispatch(inp.x, num_tokens_per_rank=per_rank,
                                                   num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx,
                                                   topk_weights=inp.topk_weights)
    return buf, recv_x, recv_w, handle


def cached_calls_without_host_wait(rank, world, case: Case, mutation: str):
    """Cached dispatch and combine under host_sync_free: the call check's notify and the data kernel are only
    enqueued (no runtime call waits on the host) and give what the host-agreed calls give; with one rank's
    call different, every rank raises EpcommInputError naming it (its data kernel moved nothing:
    test_intranode.cpp, intranode_rejected_call_moves_nothing) and the Buffer works as before afterwards."""
    from epcomm.low_latency import host_sync_free

    buf, recv_x, recv_w, handle = _dispatched(rank, case)
    x_in = make_input(case, rank).x
    want_cached = buf.dispatch(x_in, handle=handle)[0]
    want_combined = buf.combine(recv_x, handle, topk_weights=recv_w)[0]
    runtime = buf._impl._device_runtime

    def no_host_wait(*args, **kwargs):
        raise AssertionError("a kernel the host waits for ran under host_sync_free")

    runtime.run = no_host_wait
    with host_sync_free():
        got_cached = buf.dispatch(x_in, handle=handle)[0]
        got_combined = buf.combine(recv_x, handle, topk_weights=recv_w)[0]
    del runtime.run
    assert torch.equal(got_cached.view(torch.int16), want_cached.view(torch.int16))
    assert torch.equal(got_combined.view(torch.int16), want_combined.view(torch.int16))
    bad = 1
    x = recv_x
    if rank == bad:
        x = recv_x.half() if mutation == "another call" else recv_x[:-1]
    try:
        with host_sync_free():
            buf.combine(x, handle, topk_weights=recv_w)
        outcome = None
    except epcomm.EpcommInputError as err:
        outcome = (sorted(err.problems), str(err))
    again = buf.combine(recv_x, handle, topk_weights=recv_w)[0]  # outside host_sync_free, as usual
    assert torch.equal(again.view(torch.int16), want_combined.view(torch.int16))
    return outcome


@pytest.mark.parametrize("nodes,nvl", [(1, 4), (2, 2)])
@pytest.mark.parametrize("mutation", ["refused", "another call"])
def test_cached_calls_judged_on_the_device(pools, nodes, nvl, mutation):
    case = Case(num_nodes=nodes, nvl=nvl, tokens=(9, 14, 6, 11), kind="bf16", max_nodes=2, seed=71)
    for rank, outcome in enumerate(pools(4).run(cached_calls_without_host_wait, case, mutation)):
        assert outcome is not None, f"rank {rank}: the different call passed"
        ranks, message = outcome
        if mutation == "refused":
            # rank 1 knows its problem; the others' kernels saw its refusal on the device and moved nothing
            assert ranks == [1], message
            assert ("x must have shape" in message) if rank == 1 else ("refused its inputs" in message), message
        else:
            # every rank's kernel saw another call: rank 1's peers name it, rank 1 names the first that differed
            assert ranks == [0 if rank == 1 else 1] and "made another call" in message, message


def rejection_read_later(rank, world, case: Case):
    """Where kernel errors are read at a later call (cuda; here sim told to read them so), a cached call that
    one rank refuses under host_sync_free: that rank raises its problem at once; its peers' calls return (their
    gated kernels moved nothing) and their next call raises EpcommCallRejected naming it; from then on every
    rank's calls fail at once ("failed earlier") instead of pairing calls out of step. Nobody waits."""
    from epcomm.low_latency import host_sync_free

    buf, recv_x, _, handle = _dispatched(rank, case)
    buf.combine(recv_x, handle)
    buf._impl._device_runtime.host_waits_for_enqueued = False  # as on cuda
    seen = []
    with host_sync_free():
        try:
            buf.combine(recv_x[:-1] if rank == 1 else recv_x, handle)
            seen.append("returned")
        except epcomm.EpcommInputError as err:
            seen.append(f"input error: {sorted(err.problems)}")
    for _ in range(2):
        try:
            buf.combine(recv_x, handle)
            seen.append("returned")
        except epcomm.EpcommCallRejected as err:
            seen.append(f"rejected: rank {err.rank} {err.reason}")
        except epcomm.EpcommPeerError as err:
            seen.append("failed earlier" if "failed earlier" in str(err) else str(err))
    return seen


def test_a_rejection_read_later_breaks_the_buffer_on_every_rank(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 6, 11), kind="bf16", seed=73)
    for rank, seen in enumerate(pools(4).run(rejection_read_later, case)):
        if rank == 1:
            assert seen == ["input error: [1]", "failed earlier", "failed earlier"], seen
        else:
            assert seen == ["returned", "rejected: rank 1 refused its inputs (its own error names the problem)",
                            "failed earlier"], (rank, seen)


def async_refusal_under_host_sync_free(rank, world, case: Case):
    """async_finish on CPU tensors runs the data phase on a worker thread, whose errors surface at a later
    drain: there the host agreement decides even under host_sync_free, so every rank raises at once."""
    from epcomm.low_latency import host_sync_free

    buf, recv_x, _, handle = _dispatched(rank, case)
    with host_sync_free():
        try:
            buf.combine(recv_x[:-1] if rank == 1 else recv_x, handle, async_finish=True)
            return None
        except epcomm.EpcommInputError as err:
            problems = sorted(err.problems)
    _, _, event = buf.combine(recv_x, handle, async_finish=True)
    event.current_stream_wait()
    return problems


def test_async_calls_under_host_sync_free_agree_on_the_host(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 6, 11), kind="bf16", seed=79)
    assert pools(4).run(async_refusal_under_host_sync_free, case) == [[1]] * 4


def refusals_under_host_sync_free(rank, world, case: Case):
    """What host_sync_free refuses on every rank alike, before anything is enqueued or from the same notify:
    a call that needs another buffer layout (a re-layout waits on the host), and a call when the buffers are
    laid out for LL mode. The same calls outside the block then run."""
    from epcomm.low_latency import host_sync_free

    buf, recv_x, _, handle = _dispatched(rank, case, low_latency_mode=True)
    seen = []
    for call in (lambda: buf.combine(recv_x.float(), handle),  # fp32 rows: larger slots than the layout's
                 lambda: buf.combine(recv_x, handle)):
        try:
            with host_sync_free():
                call()
            seen.append("ran")
        except epcomm.EpcommInputError as err:
            said = next((p for p in ("another buffer layout", "no normal-mode buffer layout") if p in str(err)), str(err))
            seen.append((sorted(err.problems), said))
        if len(seen) == 1:  # then an LL call lays the buffers out for LL mode
            buf.combine(recv_x.float(), handle)
            x = make_input(case, rank).x
            buf.clean_low_latency_buffer(16, x.size(1), world * 2)
            buf.low_latency_dispatch(x, torch.tensor([[0, 1]]).expand(x.size(0), 2).contiguous(), 16, world * 2,
                                     use_fp8=False)
    buf.combine(recv_x, handle)
    return seen


def test_host_sync_free_refuses_what_needs_a_host_wait(pools):
    case = Case(num_nodes=1, nvl=4, tokens=(9, 14, 6, 11), kind="bf16", seed=83)
    for rank, seen in enumerate(pools(4).run(refusals_under_host_sync_free, case)):
        assert seen == [([rank], "another buffer layout"), ([rank], "no normal-mode buffer layout")], (rank, seen)
