"""dispatch / cached dispatch / combine against the single-process reference, gloo ranks."""

from __future__ import annotations

import pytest

from cases import Case, algorithms_for, backends_for, check_case, expected_pairs, make_input

TOPOLOGIES = [(1, 2), (1, 4), (2, 2), (4, 2), (2, 4), (8, 1)]  # (nodes, ranks per node)
RUNS = [(m, l, b) for m, l in TOPOLOGIES for b in backends_for(m)]  # + the backends each topology runs on


def uneven_tokens(world: int) -> tuple[int, ...]:
    """Uneven counts, with rank 1 dispatching nothing."""
    return tuple(0 if r == 1 else 9 + 7 * r for r in range(world))


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
@pytest.mark.parametrize("nodes,nvl,backend", RUNS, ids=[f"{m}x{l}-{b}" for m, l, b in RUNS])
def test_matches_reference_both_algorithms(pools, nodes, nvl, backend, kind):
    case = Case(num_nodes=nodes, nvl=nvl, tokens=uneven_tokens(nodes * nvl), kind=kind, alignment=4, seed=nodes + nvl)
    pool = pools(case.world)
    digests = {}
    for algorithm in algorithms_for(nodes, backend):
        reports = pool.run(check_case, case, algorithm, 1, backend)
        assert all(r.backend == backend for r in reports)
        digests[algorithm] = [r.digest for r in reports]
        node_pairs, rank_pairs = expected_pairs(case)
        rows_over_network = sum(r.traffic.get("dispatch", {}).get("network", {}).get("rows", 0) for r in reports)
        combine_over_network = sum(r.traffic.get("combine", {}).get("network", {}).get("rows", 0) for r in reports)
        if algorithm == "two_hop":
            assert rows_over_network == node_pairs, "two-hop must cross nodes once per (token, destination node)"
            assert combine_over_network == node_pairs, "combine must send one partial per (token, node) back"
        else:
            assert rows_over_network == rank_pairs, "flat sends a token once per destination rank"
    if len(digests) == 2:
        assert digests["flat"] == digests["two_hop"]


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "sim"])
@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_fp32_fp16_without_weights_and_alignment(pools, nodes, backend, kind):
    case = Case(num_nodes=nodes, nvl=4 // nodes, tokens=(5, 17, 3, 11), kind=kind, with_weights=False, alignment=8,
                seed=3)
    for algorithm in algorithms_for(nodes, backend):
        pools(4).run(check_case, case, algorithm, 1, backend)


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_two_hop_network_bytes_are_exact(pools, backend):
    """Network payload bytes = (token, destination node) pairs x row bytes, bf16 and FP8 (on sim, as the
    kernels' transport counted them: every network put, divided into whole rows)."""
    base = dict(num_nodes=4, nvl=2, tokens=(40,) * 8, hidden=256, seed=11)
    measured = {}
    for kind, row_bytes in (("bf16", 2 * 256), ("fp8", 256 + 4 * 256 // 128)):
        case = Case(kind=kind, **base)
        reports = pools(8).run(check_case, case, "two_hop", 1, backend)
        payload = sum(r.traffic["dispatch"]["network"]["payload_bytes"] for r in reports)
        node_pairs, _ = expected_pairs(case)
        assert payload == node_pairs * row_bytes
        measured[kind] = payload
    assert measured["fp8"] * 2 * 256 == measured["bf16"] * (256 + 4 * 256 // 128)


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_two_hop_combine_sends_dispatch_bytes_across_nodes(pools, backend):
    """Default combine_node_partials="rows_dtype": a node partial crosses the network in the rows' dtype,
    so combine's network payload equals dispatch's exactly (one bf16 row per (token, remote node), as
    DeepEP); "float32" sends twice that. Both modes bit-exact against the reference in that mode."""
    base = dict(num_nodes=4, nvl=2, tokens=(40,) * 8, hidden=256, seed=11)
    payload = {}
    for mode in ("rows_dtype", "float32"):
        reports = pools(8).run(check_case, Case(node_partials=mode, **base), "two_hop", 1, backend)
        payload[mode] = [sum(r.traffic[op]["network"]["payload_bytes"] for r in reports)
                         for op in ("dispatch", "combine")]
        rows = [sum(r.traffic[op]["network"]["rows"] for r in reports) for op in ("dispatch", "combine")]
        assert rows[0] == rows[1] == expected_pairs(Case(**base))[0]
    assert payload["rows_dtype"][1] == payload["rows_dtype"][0] > 0
    assert payload["float32"][1] == 2 * payload["float32"][0]


def test_node_partial_modes_agree_across_algorithms_and_differ_from_each_other(pools):
    """Each mode defines one result: flat == two_hop bit for bit (torch, 2 nodes); the two modes round
    differently where a token has rows on both nodes, so their results must differ somewhere."""
    base = dict(num_nodes=2, nvl=2, tokens=(64, 48, 0, 57), hidden=256, seed=4, max_nodes=2)
    digests = {}
    for mode in ("rows_dtype", "float32"):
        for algorithm in ("flat", "two_hop"):
            reports = pools(4).run(check_case, Case(node_partials=mode, **base), algorithm, 1, "torch")
            digests[mode, algorithm] = [r.digest[0] for r in reports]
        assert digests[mode, "flat"] == digests[mode, "two_hop"]
    assert digests["rows_dtype", "flat"] != digests["float32", "flat"]


def test_combine_node_partials_is_checked_and_agreed(pools):
    """A bad mode is refused at construction; ranks built with different modes refuse combine on every rank."""
    for rank, outcome in enumerate(pools(4).run(_mixed_node_partials)):
        assert outcome == "refused on every rank", f"rank {rank}: {outcome}"


def _mixed_node_partials(rank: int, world: int) -> str:
    import epcomm

    with pytest.raises(ValueError, match="combine_node_partials"):
        epcomm.Buffer(None, backend="torch", num_nvl_ranks=2, combine_node_partials="bf16")
    mode = "float32" if rank == 1 else "rows_dtype"
    buf = epcomm.Buffer(None, backend="torch", num_nvl_ranks=2, combine_node_partials=mode)
    case = Case(num_nodes=2, nvl=2, tokens=(5, 6, 7, 8))
    inp = make_input(case, rank)
    layout = buf.get_dispatch_layout(inp.topk_idx, case.num_experts)
    try:
        buf.dispatch(inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                     is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx)
    except epcomm.EpcommInputError as err:
        assert "combine_node_partials" in str(err) and "rank 1" in str(err), str(err)
        return "refused on every rank"
    return "accepted"


@pytest.mark.parametrize("nodes,backend", [(2, "torch"), (1, "torch"), (1, "sim"), (2, "sim")])
def test_repeated_rounds_are_deterministic(pools, nodes, backend):
    case = Case(num_nodes=nodes, nvl=4 // nodes, tokens=(13, 0, 21, 8), seed=5)
    reports = pools(4).run(check_case, case, "auto", 3, backend)
    for r in reports:
        assert len(set(r.digest)) == 1


@pytest.mark.parametrize("nodes,backend", [(4, "torch"), (1, "sim"), (4, "sim")])
def test_nothing_to_send_anywhere(pools, nodes, backend):
    """Every rank with zero tokens (the hypothesis-found empty-slice alignment bug)."""
    for kind in ("fp8", "bf16"):
        case = Case(num_nodes=nodes, nvl=4 // nodes, tokens=(0, 0, 0, 0), hidden=128, num_experts=4, topk=1, kind=kind)
        for algorithm in algorithms_for(nodes, backend):
            pools(4).run(check_case, case, algorithm, 1, backend)


def dispatch_without_topk(rank, world, nvl, backend):
    """Routing given only by is_token_in_rank: rows move, no expert outputs."""
    import torch

    import epcomm
    from cases import make_input
    from epcomm.reference import reference_combine, reference_dispatch

    case = Case(num_nodes=world // nvl, nvl=nvl, tokens=(7, 3, 0, 12), seed=8)
    inputs = [make_input(case, r) for r in range(world)]
    buf = epcomm.Buffer(None, num_nvl_ranks=nvl, backend=backend)  # algorithm "auto": two-hop across nodes
    per_rank, per_rdma, _, in_rank, _ = buf.get_dispatch_layout(inputs[rank].topk_idx, case.num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        inputs[rank].x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank
    )
    ref = reference_dispatch(inputs, case.num_experts, rank)
    assert torch.equal(recv_x, ref.recv_x) and recv_idx is None and recv_w is None and counts == []
    outputs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    combined, weights, _ = buf.combine(recv_x, handle)
    want = reference_combine([o.sources for o in outputs], [o.recv_x for o in outputs], case.tokens[rank], rank, nvl)
    assert torch.equal(combined, want) and weights is None


@pytest.mark.parametrize("nvl,backend", [(2, "torch"), (4, "torch"), (4, "sim"), (2, "sim")])
def test_dispatch_with_is_token_in_rank_only(pools, nvl, backend):
    pools(4).run(dispatch_without_topk, nvl, backend)
