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
