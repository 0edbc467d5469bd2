"""Tests of epcomm.routing against brute-force references written from the definitions."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epcomm.routing import (
    GateOutput,
    node_limited_gate,
    num_nodes_per_token,
    random_topk_idx,
    update_bias,
    zipf_topk_idx,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# brute-force references
# ---------------------------------------------------------------------------


def reference_gate(scores, bias, *, top_k, num_nodes, max_nodes, group_top, scale):
    """Per-token Python loop of the V3 node-limited gate, straight from the definition.

    Only two float32 element-wise primitives are shared with the implementation
    (sigmoid and the s + bias addition); everything else (per-node sums, node
    ranking, expert ranking, tie-breaking by lower id, normalisation) is plain
    Python over exact float values.
    """
    s = torch.sigmoid(scores.float())
    b = s if bias is None else s + bias.float()
    s_rows, b_rows = s.tolist(), b.tolist()
    n_tok, n_exp = s.shape
    epn = n_exp // num_nodes
    kept_n = min(max_nodes, num_nodes)
    all_idx, all_w = [], []
    for t in range(n_tok):
        node_score = []
        for n in range(num_nodes):
            vals = sorted(b_rows[t][n * epn : (n + 1) * epn], reverse=True)[:group_top]
            acc = np.float32(vals[0])
            for v in vals[1:]:
                acc = np.float32(acc + np.float32(v))  # float32 accumulation, descending order
            node_score.append(float(acc))
        kept = sorted(range(num_nodes), key=lambda n: (-node_score[n], n))[:kept_n]
        candidates = [e for e in range(n_exp) if e // epn in kept]
        chosen = sorted(candidates, key=lambda e: (-b_rows[t][e], e))[:top_k]
        total = sum(s_rows[t][e] for e in chosen)
        all_idx.append(chosen)
        all_w.append([s_rows[t][e] / total * scale for e in chosen])
    return all_idx, all_w, s


def brute_nodes_per_token(topk_idx, num_experts, num_nodes):
    epn = num_experts // num_nodes
    return [len({e // epn for e in row if e >= 0}) for row in topk_idx.tolist()]


@st.composite
def gate_case(draw):
    num_nodes = draw(st.sampled_from([1, 2, 3, 4, 8]))
    epn = draw(st.integers(1, 6))
    n_exp = num_nodes * epn
    max_nodes = draw(st.integers(1, num_nodes + 1))
    kept = min(max_nodes, num_nodes)
    group_top = draw(st.integers(1, epn))
    top_k = draw(st.integers(1, kept * epn))
    n_tok = draw(st.integers(0, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # coarse grid: many exact ties
        scores = torch.randint(-3, 4, (n_tok, n_exp), generator=gen).to(dtype) / 2
    else:
        scores = (torch.randn(n_tok, n_exp, generator=gen) * 3).to(dtype)
    bias_kind = draw(st.sampled_from(["none", "grid", "continuous"]))
    if bias_kind == "none":
        bias = None
    elif bias_kind == "grid":
        bias = torch.randint(-2, 3, (n_exp,), generator=gen).float() / 4
    else:
        bias = torch.randn(n_exp, generator=gen) * 0.1
    scale = draw(st.sampled_from([1.0, 2.5, 0.5]))
    return dict(
        scores=scores, bias=bias, top_k=top_k, num_nodes=num_nodes,
        max_nodes=max_nodes, group_top=group_top, scale=scale,
    )


# ---------------------------------------------------------------------------
# node_limited_gate
# ---------------------------------------------------------------------------


def _run_gate(case) -> GateOutput:
    return node_limited_gate(
        case["scores"], case["bias"], top_k=case["top_k"], num_nodes=case["num_nodes"],
        max_nodes=case["max_nodes"], group_top=case["group_top"],
        routed_scaling_factor=case["scale"],
    )


def _check_against_reference(case) -> GateOutput:
    out = _run_gate(case)
    ref_idx, ref_w, ref_s = reference_gate(
        case["scores"], case["bias"], top_k=case["top_k"], num_nodes=case["num_nodes"],
        max_nodes=case["max_nodes"], group_top=case["group_top"], scale=case["scale"],
    )
    n_tok = case["scores"].shape[0]
    assert out.topk_idx.dtype == torch.int64 and out.topk_idx.shape == (n_tok, case["top_k"])
    assert out.topk_weights.dtype == torch.float32 and out.topk_weights.shape == (n_tok, case["top_k"])
    assert out.affinities.dtype == torch.float32
    assert out.topk_idx.tolist() == ref_idx
    torch.testing.assert_close(
        out.topk_weights, torch.tensor(ref_w, dtype=torch.float32).reshape(n_tok, case["top_k"]),
        rtol=2e-6, atol=1e-7,
    )
    torch.testing.assert_close(out.affinities, ref_s, rtol=0, atol=0)
    return out


@FAST
@given(gate_case())
def test_gate_matches_bruteforce_reference(case):
    _check_against_reference(case)


@FAST
@given(gate_case())
def test_gate_node_cap_distinct_and_weight_sum(case):
    out = _run_gate(case)
    n_exp = case["scores"].shape[1]
    cap = min(case["max_nodes"], case["num_nodes"])
    per_token = num_nodes_per_token(out.topk_idx, n_exp, case["num_nodes"])
    assert per_token.tolist() == brute_nodes_per_token(out.topk_idx, n_exp, case["num_nodes"])
    assert bool((per_token <= cap).all())
    for row in out.topk_idx.tolist():
        assert len(set(row)) == len(row) and all(0 <= e < n_exp for e in row)
    if case["scores"].shape[0]:
        sums = out.topk_weights.sum(dim=1)
        torch.testing.assert_close(sums, torch.full_like(sums, case["scale"]), rtol=1e-5, atol=0)
        # weights are the unbiased affinities of the chosen experts, normalised
        chosen = out.affinities.gather(1, out.topk_idx)
        torch.testing.assert_close(
            out.topk_weights, chosen / chosen.sum(1, keepdim=True) * case["scale"], rtol=1e-6, atol=0
        )


def test_gate_deepseek_v3_shape_matches_reference():
    gen = torch.Generator().manual_seed(1234)
    scores = torch.randn(48, 256, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    bias = torch.randn(256, generator=gen) * 0.05
    case = dict(scores=scores, bias=bias, top_k=8, num_nodes=8, max_nodes=4, group_top=2, scale=2.5)
    out = _check_against_reference(case)
    assert bool((num_nodes_per_token(out.topk_idx, 256, 8) <= 4).all())


def test_bias_affects_selection_but_not_weights():
    gen = torch.Generator().manual_seed(7)
    n_tok, n_exp, num_nodes = 16, 32, 4
    scores = torch.rand(n_tok, n_exp, generator=gen) + 1.0  # every affinity > sigmoid(1)
    forced = [9, 10, 12]  # experts on node 1, made the least attractive by the logits
    scores[:, forced] = -2.0
    plain = node_limited_gate(scores, None, top_k=3, num_nodes=num_nodes, max_nodes=2)
    assert not any(set(row) & set(forced) for row in plain.topk_idx.tolist())

    bias = torch.zeros(n_exp)
    bias[forced] = 5.0
    biased = node_limited_gate(scores, bias, top_k=3, num_nodes=num_nodes, max_nodes=2)
    # the bias decides the selection ...
    assert biased.topk_idx.tolist() == [forced] * n_tok
    # ... but the weights come from the unbiased affinities only
    s = torch.sigmoid(scores[:, forced])
    torch.testing.assert_close(biased.topk_weights, s / s.sum(1, keepdim=True), rtol=1e-6, atol=0)
    torch.testing.assert_close(biased.affinities, plain.affinities, rtol=0, atol=0)


def test_gate_ties_go_to_lower_ids():
    # all scores equal: best nodes are 0..max_nodes-1, best experts the lowest ids
    out = node_limited_gate(torch.zeros(3, 16), top_k=5, num_nodes=4, max_nodes=2)
    assert out.topk_idx.tolist() == [[0, 1, 2, 3, 4]] * 3
    torch.testing.assert_close(out.topk_weights, torch.full((3, 5), 0.2))


def test_gate_is_deterministic_and_device_independent_of_call():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(-1, 2, (64, 64), generator=gen).float()
    a = node_limited_gate(scores, top_k=6, num_nodes=8, max_nodes=3)
    b = node_limited_gate(scores.clone(), top_k=6, num_nodes=8, max_nodes=3)
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.topk_weights, b.topk_weights)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(scores=torch.zeros(2, 10), top_k=2, num_nodes=4), ValueError, ["num_experts", "10", "4"]),
        (dict(scores=torch.zeros(2, 16), top_k=9, num_nodes=4, max_nodes=2), ValueError, ["top_k", "9", "8"]),
        (dict(scores=torch.zeros(2, 16), top_k=0, num_nodes=4), ValueError, ["top_k", "0"]),
        (dict(scores=torch.zeros(2, 16), top_k=2, num_nodes=4, group_top=5), ValueError, ["group_top", "5"]),
        (dict(scores=torch.zeros(2, 16), top_k=2, num_nodes=4, max_nodes=0), ValueError, ["max_nodes", "0"]),
        (dict(scores=torch.zeros(2, 16), top_k=2, num_nodes=4, routed_scaling_factor=0.0),
         ValueError, ["routed_scaling_factor"]),
        (dict(scores=torch.zeros(16), top_k=2, num_nodes=4), ValueError, ["scores", "2-D"]),
        (dict(scores=torch.zeros(2, 16, dtype=torch.int64), top_k=2, num_nodes=4), TypeError, ["scores", "int64"]),
        (dict(scores=[[0.0] * 16], top_k=2, num_nodes=4), TypeError, ["scores", "list"]),
        (dict(scores=torch.zeros(2, 16), bias=torch.zeros(8), top_k=2, num_nodes=4), ValueError, ["bias", "16", "8"]),
        (dict(scores=torch.zeros(2, 16), bias=torch.zeros(16, dtype=torch.int32), top_k=2, num_nodes=4),
         TypeError, ["bias", "int32"]),
        (dict(scores=torch.zeros(2, 16), bias=torch.full((16,), float("nan")), top_k=2, num_nodes=4),
         ValueError, ["bias", "finite"]),
        (dict(scores=torch.full((2, 16), float("nan")), top_k=2, num_nodes=4), ValueError, ["scores", "NaN"]),
        (dict(scores=torch.zeros(2, 16), top_k=2.0, num_nodes=4), TypeError, ["top_k", "float"]),
        (dict(scores=torch.zeros(2, 16), top_k=True, num_nodes=4), TypeError, ["top_k", "bool"]),
    ],
)
def test_gate_rejects_bad_inputs(kwargs, exc, words):
    scores = kwargs.pop("scores")
    bias = kwargs.pop("bias", None)
    with pytest.raises(exc) as info:
        node_limited_gate(scores, bias, **kwargs)
    for w in words:
        assert w in str(info.value)


# ---------------------------------------------------------------------------
# update_bias
# ---------------------------------------------------------------------------


@FAST
@given(
    loads=st.lists(st.integers(0, 10_000), min_size=1, max_size=64),
    rate=st.sampled_from([0.0, 1e-3, 0.25]),
    dtype=st.sampled_from([torch.int32, torch.int64, torch.float32]),
)
def test_update_bias_follows_sign_rule(loads, rate, dtype):
    n = len(loads)
    bias = torch.linspace(-1, 1, n)
    before = bias.clone()
    new = update_bias(bias, torch.tensor(loads, dtype=dtype), rate)
    assert torch.equal(bias, before), "input must not be modified"
    assert new.dtype == bias.dtype and new.shape == bias.shape
    assert new.data_ptr() != bias.data_ptr()
    mean = Fraction(sum(loads), n)
    for i, load in enumerate(loads):
        sign = (mean > load) - (mean < load)
        expected = np.float32(float(before[i]) + rate * sign)
        assert float(new[i]) == pytest.approx(float(expected), abs=1e-7)
        if rate > 0:
            if load > mean:
                assert new[i] < before[i]  # overloaded: bias goes down
            elif load < mean:
                assert new[i] > before[i]  # underloaded: bias goes up
            else:
                assert new[i] == before[i]


def test_update_bias_balances_a_biased_router():
    # Repeated gate + update steps must shrink the load imbalance of a skewed router.
    gen = torch.Generator().manual_seed(0)
    n_exp = 32
    skew = torch.linspace(2.0, -2.0, n_exp)
    bias = torch.zeros(n_exp)

    def imbalance(b):
        scores = torch.randn(512, n_exp, generator=gen) + skew
        out = node_limited_gate(scores, b, top_k=4, num_nodes=4, max_nodes=2)
        load = torch.bincount(out.topk_idx.flatten(), minlength=n_exp)
        return load, float(load.max()) / float(load.float().mean())

    load, first = imbalance(bias)
    for _ in range(60):
        bias = update_bias(bias, load, 0.05)
        load, last = imbalance(bias)
    assert last < 0.6 * first
    assert bias[0] < bias[-1]  # the popular experts were pushed down


@pytest.mark.parametrize(
    "args, exc, words",
    [
        ((torch.zeros(4), torch.zeros(5), 0.1), ValueError, ["tokens_per_expert", "5", "4"]),
        ((torch.zeros(4), torch.zeros(4), -0.1), ValueError, ["update_rate", "-0.1"]),
        ((torch.zeros(4), torch.zeros(4), float("inf")), ValueError, ["update_rate"]),
        ((torch.zeros(4, dtype=torch.int64), torch.zeros(4), 0.1), TypeError, ["bias", "int64"]),
        ((torch.zeros(4), torch.zeros(4, dtype=torch.bool), 0.1), TypeError, ["tokens_per_expert", "bool"]),
        ((torch.zeros(4), [0, 0, 0, 0], 0.1), TypeError, ["tokens_per_expert", "list"]),
        ((torch.zeros(4), torch.zeros(4), "0.1"), TypeError, ["update_rate", "str"]),
    ],
)
def test_update_bias_rejects_bad_inputs(args, exc, words):
    with pytest.raises(exc) as info:
        update_bias(*args)
    for w in words:
        assert w in str(info.value)


# ---------------------------------------------------------------------------
# num_nodes_per_token
# ---------------------------------------------------------------------------


@FAST
@given(
    num_nodes=st.sampled_from([1, 2, 4, 8]),
    epn=st.integers(1, 5),
    rows=st.integers(0, 8),
    k=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.int64, torch.int32]),
)
def test_num_nodes_per_token_matches_bruteforce(num_nodes, epn, rows, k, seed, dtype):
    n_exp = num_nodes * epn
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, n_exp, (rows, k), generator=gen).to(dtype)
    got = num_nodes_per_token(idx, n_exp, num_nodes)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert got.tolist() == brute_nodes_per_token(idx, n_exp, num_nodes)


def test_num_nodes_per_token_all_dropped_is_zero():
    idx = torch.full((3, 4), -1)
    assert num_nodes_per_token(idx, 16, 4).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "idx, n_exp, n_nodes, exc, words",
    [
        (torch.tensor([[0, 16]]), 16, 4, ValueError, ["topk_idx", "16"]),
        (torch.tensor([[-2, 1]]), 16, 4, ValueError, ["topk_idx", "-2"]),
        (torch.tensor([[0.0, 1.0]]), 16, 4, TypeError, ["topk_idx", "float32"]),
        (torch.tensor([0, 1]), 16, 4, ValueError, ["topk_idx", "2-D"]),
        (torch.tensor([[0, 1]]), 15, 4, ValueError, ["num_experts", "15"]),
    ],
)
def test_num_nodes_per_token_rejects_bad_inputs(idx, n_exp, n_nodes, exc, words):
    with pytest.raises(exc) as info:
        num_nodes_per_token(idx, n_exp, n_nodes)
    for w in words:
        assert w in str(info.value)


# ---------------------------------------------------------------------------
# synthetic routings
# ---------------------------------------------------------------------------


def _check_routing(idx, n_tok, n_exp, top_k, num_nodes, cap):
    assert idx.dtype == torch.int64 and idx.shape == (n_tok, top_k)
    assert bool(((idx >= -1) & (idx < n_exp)).all())
    for row in idx.tolist():
        kept = [e for e in row if e >= 0]
        assert len(set(kept)) == len(kept), row
    assert bool((num_nodes_per_token(idx, n_exp, num_nodes) <= cap).all())


@FAST
@given(
    num_nodes=st.sampled_from([1, 2, 4, 8]),
    epn=st.integers(1, 8),
    max_nodes=st.integers(1, 9),
    n_tok=st.integers(0, 40),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    drop_prob=st.sampled_from([0.0, 0.3]),
    sort=st.booleans(),
)
def test_random_topk_idx_properties(num_nodes, epn, max_nodes, n_tok, data, seed, drop_prob, sort):
    n_exp = num_nodes * epn
    cap = min(max_nodes, num_nodes)
    top_k = data.draw(st.integers(1, cap * epn))
    kw = dict(num_nodes=num_nodes, max_nodes=max_nodes, drop_prob=drop_prob, sort=sort)
    a = random_topk_idx(n_tok, n_exp, top_k, generator=torch.Generator().manual_seed(seed), **kw)
    b = random_topk_idx(n_tok, n_exp, top_k, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(a, b), "same seed must give the same routing"
    _check_routing(a, n_tok, n_exp, top_k, num_nodes, cap)
    if drop_prob == 0.0:
        assert bool((a >= 0).all())
        if sort:
            assert torch.equal(a, a.sort(dim=1).values)


def test_random_topk_idx_statistics():
    gen = torch.Generator().manual_seed(11)
    idx = random_topk_idx(4000, 64, 8, num_nodes=8, max_nodes=4, generator=gen, drop_prob=0.25)
    frac_dropped = float((idx == -1).float().mean())
    assert abs(frac_dropped - 0.25) < 0.02
    counts = torch.bincount(idx[idx >= 0], minlength=64).float()
    assert float(counts.min()) > 0.8 * float(counts.mean())  # roughly uniform
    other = random_topk_idx(4000, 64, 8, num_nodes=8, max_nodes=4,
                            generator=torch.Generator().manual_seed(12), drop_prob=0.25)
    assert not torch.equal(idx, other)
    assert random_topk_idx(5, 16, 2, num_nodes=4, drop_prob=1.0).eq(-1).all()


@FAST
@given(
    num_nodes=st.sampled_from([1, 2, 4]),
    epn=st.integers(1, 8),
    limit=st.sampled_from([None, 1, 2]),
    n_tok=st.integers(0, 30),
    alpha=st.sampled_from([0.0, 1.0, 2.0]),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_zipf_topk_idx_properties(num_nodes, epn, limit, n_tok, alpha, shuffle, seed, data):
    n_exp = num_nodes * epn
    cap = num_nodes if limit is None else min(limit, num_nodes)
    top_k = data.draw(st.integers(1, cap * epn))
    kw = dict(alpha=alpha, num_nodes=num_nodes, max_nodes=limit, shuffle=shuffle)
    a = zipf_topk_idx(n_tok, n_exp, top_k, generator=torch.Generator().manual_seed(seed), **kw)
    b = zipf_topk_idx(n_tok, n_exp, top_k, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(a, b)
    _check_routing(a, n_tok, n_exp, top_k, num_nodes, cap)


def test_zipf_topk_idx_is_skewed():
    gen = torch.Generator().manual_seed(5)
    idx = zipf_topk_idx(4000, 64, 4, alpha=1.2, shuffle=False, generator=gen)
    counts = torch.bincount(idx.flatten(), minlength=64)
    assert counts[0] > counts[1] > counts[8] > counts[63]
    assert counts[0] > 5 * counts[63]
    shuffled = zipf_topk_idx(4000, 64, 4, alpha=1.2, generator=torch.Generator().manual_seed(5))
    c2 = torch.bincount(shuffled.flatten(), minlength=64).sort(descending=True).values
    assert c2[0] > 5 * c2[-1]
    flat = zipf_topk_idx(4000, 64, 4, alpha=0.0, generator=torch.Generator().manual_seed(5))
    c3 = torch.bincount(flat.flatten(), minlength=64).float()
    assert float(c3.min()) > 0.7 * float(c3.mean())


@pytest.mark.parametrize(
    "fn, args, kwargs, exc, words",
    [
        (random_topk_idx, (4, 16, 9), dict(num_nodes=4, max_nodes=2), ValueError, ["top_k", "9"]),
        (random_topk_idx, (4, 15, 2), dict(num_nodes=4), ValueError, ["num_experts", "15"]),
        (random_topk_idx, (-1, 16, 2), dict(num_nodes=4), ValueError, ["num_tokens", "-1"]),
        (random_topk_idx, (4, 16, 2), dict(num_nodes=4, drop_prob=1.5), ValueError, ["drop_prob", "1.5"]),
        (random_topk_idx, (4, 16, 2), dict(num_nodes=4, generator=3), TypeError, ["generator", "int"]),
        (zipf_topk_idx, (4, 16, 2), dict(alpha=-1.0), ValueError, ["alpha", "-1.0"]),
        (zipf_topk_idx, (4, 16, 17), dict(), ValueError, ["top_k", "17"]),
    ],
)
def test_synthetic_routings_reject_bad_inputs(fn, args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    for w in words:
        assert w in str(info.value)
