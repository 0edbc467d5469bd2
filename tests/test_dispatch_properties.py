"""Hypothesis-driven shapes and routings: every backend output equals the reference."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import Case, check_case


@st.composite
def cases(draw):
    nvl = draw(st.sampled_from([1, 2, 4]))
    nodes = 4 // nvl
    experts = 4 * draw(st.integers(1, 8))
    per_node = experts // nodes
    max_nodes = draw(st.integers(1, nodes))
    topk = draw(st.integers(1, min(8, per_node * max_nodes)))
    return Case(
        num_nodes=nodes,
        nvl=nvl,
        tokens=tuple(draw(st.lists(st.integers(0, 24), min_size=4, max_size=4))),
        hidden=128 * draw(st.integers(1, 3)),
        num_experts=experts,
        topk=topk,
        kind=draw(st.sampled_from(["bf16", "fp8", "fp32"])),
        drop_prob=draw(st.sampled_from([0.0, 0.3, 1.0])),
        max_nodes=max_nodes,
        alignment=draw(st.sampled_from([1, 3, 16])),
        with_weights=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), algorithm=st.sampled_from(["flat", "two_hop"]))
def test_random_problems_match_reference(pools, case, algorithm):
    pools(4).run(check_case, case, algorithm)


@st.composite
def kernel_cases(draw):
    """4 ranks as 1x4 (intranode kernels), 2x2 or 4x1 (two-hop kernels), every dtype combine takes, odd row
    sizes, node caps below the node count."""
    nvl = draw(st.sampled_from([4, 2, 1]))
    nodes = 4 // nvl
    experts = 4 * draw(st.integers(1, 8))
    max_nodes = draw(st.integers(1, nodes))
    kind = draw(st.sampled_from(["bf16", "fp8", "fp16", "fp32"]))
    hidden = 128 * draw(st.integers(1, 3)) if kind == "fp8" else 2 * draw(st.integers(1, 200))
    return Case(
        num_nodes=nodes,
        nvl=nvl,
        max_nodes=max_nodes,
        tokens=tuple(draw(st.lists(st.integers(0, 40), min_size=4, max_size=4))),
        hidden=hidden,
        num_experts=experts,
        topk=draw(st.integers(1, min(8, experts // nodes * max_nodes))),
        kind=kind,
        drop_prob=draw(st.sampled_from([0.0, 0.3, 1.0])),
        alignment=draw(st.sampled_from([1, 3, 16])),
        with_weights=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=kernel_cases(), num_sms=st.sampled_from([None, 2, 6]), ring=st.sampled_from([2, 7, 64]))
def test_sim_and_torch_agree_bit_for_bit(pools, case, num_sms, ring):
    """The kernels (under random channel counts and ring sizes, NVLink and network) against the torch
    backend, same bits."""
    import epcomm

    config = None if num_sms is None else epcomm.Config(
        num_sms=num_sms, num_max_nvl_chunked_send_tokens=min(ring, 4), num_max_nvl_chunked_recv_tokens=ring,
        num_max_rdma_chunked_send_tokens=min(ring, 3), num_max_rdma_chunked_recv_tokens=ring)
    sim = pools(4).run(check_case_with_config, case, "sim", config)
    ref = pools(4).run(check_case_with_config, case, "torch", config)
    assert sim == ref


def check_case_with_config(rank, world, case, backend, config):
    """check_round with a Config on every call; returns the digest of the outputs."""
    import epcomm
    from cases import check_round

    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=case.nvl, max_nodes_per_token=case.max_nodes,
                        timeout_s=60)
    original = buf.dispatch, buf.combine
    buf.dispatch = lambda *a, **k: original[0](*a, **{"config": config, **k})
    buf.combine = lambda *a, **k: original[1](*a, **{"config": config, **k})
    return check_round(buf, case, rank, world)[0]
