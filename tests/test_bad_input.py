"""Bad input on ONE rank raises a clear EpcommInputError on EVERY rank, before data moves."""

from __future__ import annotations

import time

import pytest
import torch

import epcomm
from cases import Case, check_case, make_input

CASE = Case(num_nodes=2, nvl=2, tokens=(12, 9, 15, 6), kind="bf16", max_nodes=2, seed=21)
# Each backend on each path: torch and sim (the two-hop internode kernels) on 2 nodes x 2, and sim's
# intranode kernels on one node of 4 ("sim:1x4").
CASES = {"torch": CASE, "sim": CASE, "sim:1x4": Case(num_nodes=1, nvl=4, tokens=(12, 9, 15, 6), kind="bf16", seed=21)}
BACKENDS = list(CASES)


def _buffer(backend: str, **kwargs) -> epcomm.Buffer:
    case = CASES[backend]
    kwargs.setdefault("num_nvl_ranks", case.nvl)
    return epcomm.Buffer(None, backend=backend.split(":")[0], max_nodes_per_token=case.max_nodes, **kwargs)


def _layout_args(buf, inp, num_experts):
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx, num_experts)
    return dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)


def _corrupt(mutation: str, buf, inp, args):
    """Apply one bad input to (x, dispatch kwargs); returns x."""
    x = inp.x
    n = x.size(0)
    if mutation == "x dtype":
        x = x.to(torch.int32)
    elif mutation == "x not contiguous":
        x = torch.cat([x, x], dim=1)[:, ::2]
    elif mutation == "x 3-D":
        x = x.unsqueeze(0)
    elif mutation == "tokens disagree":
        x = x[: n - 1]
    elif mutation == "topk out of range":
        args["topk_idx"] = args["topk_idx"].clone()
        args["topk_idx"][0, 0] = 10_000
    elif mutation == "topk dtype":
        args["topk_idx"] = args["topk_idx"].to(torch.int32)
    elif mutation == "weights shape":
        args["topk_weights"] = args["topk_weights"][:, :2].contiguous()
    elif mutation == "layout mismatch":
        args["is_token_in_rank"] = ~args["is_token_in_rank"]
    elif mutation == "missing layout":
        args["is_token_in_rank"] = None
    elif mutation == "fp8 hidden":
        x = (torch.zeros(n, 200, dtype=torch.float8_e4m3fn), torch.ones(n, 2))
    elif mutation == "fp8 scales dtype":
        x = (x.to(torch.float8_e4m3fn), torch.ones(n, x.size(1) // 128, dtype=torch.bfloat16))
    elif mutation == "config type":
        args["config"] = {"num_sms": 20}
    elif mutation == "hidden disagrees":
        x = torch.cat([x, x], dim=1)
    elif mutation == "dtype disagrees":
        x = x.float()
    elif mutation == "fp8 on one rank":
        x = epcomm.fp8.per_token_cast_to_fp8(x)
    elif mutation == "experts disagree":
        args.update(_layout_args(buf, inp, 2 * CASE.num_experts))  # consistent locally, not across ranks
    else:
        raise AssertionError(mutation)
    return x


def dispatch_with_bad_rank(rank, world, mutation, bad_rank, backend="torch"):
    buf = _buffer(backend)
    inp = make_input(CASES[backend], rank)
    args = _layout_args(buf, inp, CASE.num_experts)
    x = _corrupt(mutation, buf, inp, args) if rank == bad_rank else inp.x
    try:
        buf.dispatch(x, **args)
    except epcomm.EpcommInputError as err:
        return ("input error", str(err), sorted(err.problems))
    return ("no error", None, None)


MUTATIONS = {
    "x dtype": "x must have dtype",
    "x not contiguous": "contiguous",
    "x 3-D": "2-D",
    "tokens disagree": "is_token_in_rank must have shape",
    "topk out of range": "topk_idx values must lie in [-1, 32)",
    "topk dtype": "topk_idx must have dtype torch.int64",
    "weights shape": "topk_weights must have shape",
    "layout mismatch": "is_token_in_rank does not match topk_idx",
    "missing layout": "needs num_tokens_per_rank and is_token_in_rank",
    "fp8 hidden": "hidden % 128",
    "fp8 scales dtype": "x[1] (FP8 scales) must have dtype torch.float32",
    "config type": "config must be an epcomm.Config",
    "hidden disagrees": "ranks disagree on hidden",
    "dtype disagrees": "ranks disagree on x's dtype",
    "fp8 on one rank": "ranks disagree on x's dtype",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_one_bad_rank_fails_every_rank(pools, mutation, backend):
    bad_rank = 2
    outcomes = pools(4).run(dispatch_with_bad_rank, mutation, bad_rank, backend)
    for rank, (kind, message, ranks) in enumerate(outcomes):
        assert kind == "input error", f"rank {rank} did not raise for {mutation!r}"
        assert ranks == [bad_rank], message
        assert f"rank {bad_rank}:" in message and MUTATIONS[mutation] in message, message
    # the group is still healthy: a correct round goes through afterwards
    pools(4).run(check_case, CASES[backend], "auto", 1, backend.split(":")[0])


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` starting one element past an aligned address (a view at offset 1)."""
    raw = torch.empty(t.numel() + 1, dtype=t.dtype)
    return raw[1:].view(t.shape).copy_(t)


def misaligned_on_one_rank(rank, world, backend, op):
    buf = _buffer(backend)
    inp = make_input(CASES[backend], rank)
    args = _layout_args(buf, inp, CASE.num_experts)
    bad = rank == 2
    try:
        if op == "dispatch":
            buf.dispatch(misaligned(inp.x) if bad else inp.x, **args)
        else:
            recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, **args)
            buf.combine(misaligned(recv_x) if bad and recv_x.numel() else recv_x, handle)
    except epcomm.EpcommInputError as err:
        return sorted(err.problems), str(err)
    return None, None


def odd_partials(rank, world):
    """fp32 rows of hidden 7 (28 bytes) cross NVLink fine, but with a bias and bf16 expert outputs the two-hop
    combine's node partials would be bf16: 14 bytes, not whole 4-byte words (the network slots are packed at
    the partial's bytes)."""
    buf = _buffer("sim")
    inp = make_input(CASE, rank)
    x = torch.randn(inp.x.size(0), 7)  # fp32
    recv_x, _, _, _, handle, _ = buf.dispatch(x, **_layout_args(buf, inp, CASE.num_experts))
    bias = torch.zeros(inp.x.size(0), 7, dtype=torch.bfloat16)
    try:
        buf.combine(recv_x.bfloat16(), handle, bias=bias)
    except epcomm.EpcommInputError as err:
        return sorted(err.problems), str(err)
    return None, None


def test_two_hop_partials_must_be_whole_words(pools):
    for rank, (ranks, message) in enumerate(pools(4).run(odd_partials)):
        assert ranks == [0, 1, 2, 3], f"rank {rank}: {message}"
        assert "torch.bfloat16 partials of hidden=7 are 14 bytes" in message, message


@pytest.mark.parametrize("backend", ["sim", "sim:1x4"])
@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_misaligned_input_is_refused_on_every_rank(pools, backend, op):
    """The kernels load rows in 4-byte words: a bf16 view at an odd element offset (2 bytes past an
    aligned address) would trap on a GPU, so every rank refuses it before anything moves."""
    for rank, (ranks, message) in enumerate(pools(4).run(misaligned_on_one_rank, backend, op)):
        assert ranks == [2], f"rank {rank}: {message}"
        assert "4-byte words" in message and ".clone()" in message, message
    pools(4).run(check_case, CASES[backend], "auto", 1, "sim")


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_experts_disagreement(pools, backend):
    outcomes = pools(4).run(dispatch_with_bad_rank, "experts disagree", 0, backend)
    for kind, message, ranks in outcomes:
        assert kind == "input error" and ranks == [0] and "ranks disagree on num_experts" in message, message


def node_cap_violation(rank, world):
    """A token spread over 3 nodes when the cap is 2."""
    buf = epcomm.Buffer(None, backend="torch", num_nvl_ranks=1, max_nodes_per_token=2)
    topk_idx = torch.tensor([[0, 4, 8, -1]]) if rank == 3 else torch.tensor([[0, 4, -1, -1]])
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, 16)
    try:
        buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                     num_tokens_per_expert=per_expert, topk_idx=topk_idx)
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


def test_node_cap_is_enforced_on_every_rank(pools):
    for message in pools(4).run(node_cap_violation):
        assert message is not None and "rank 3:" in message and "max_nodes_per_token=2" in message, message


def bad_handle(rank, world, kind, backend="torch"):
    buf = _buffer(backend)
    other = _buffer(backend)
    inp = make_input(CASES[backend], rank)
    args = _layout_args(buf, inp, CASE.num_experts)
    _, _, w, _, handle, _ = buf.dispatch(inp.x, **args)
    _, _, _, _, handle2, _ = buf.dispatch(inp.x, **args)
    _, _, _, _, foreign, _ = other.dispatch(inp.x, **_layout_args(other, inp, CASE.num_experts))
    recv = buf.dispatch(inp.x, handle=handle2)[0]
    try:
        if kind == "foreign handle":
            buf.combine(recv, foreign if rank == 1 else handle2)
        elif kind == "stale handle":
            buf.dispatch(inp.x, handle=handle if rank == 1 else handle2)
        elif kind == "combine rows":
            buf.combine(recv[1:] if rank == 1 else recv, handle2)
        elif kind == "combine fp8":
            buf.combine((recv.to(torch.float8_e4m3fn), recv) if rank == 1 else recv, handle2)
        elif kind == "cached with layout":
            buf.dispatch(inp.x, handle=handle2, topk_idx=inp.topk_idx if rank == 1 else None)
        elif kind == "config disagrees":
            config = epcomm.Config(num_sms=4 if rank == 1 else 6)
            buf.dispatch(inp.x, **args, config=config)
        elif kind == "network ring disagrees":  # sizes the two-hop kernels' RDMA rings
            config = epcomm.Config(num_sms=4, num_max_rdma_chunked_recv_tokens=8 if rank == 1 else 16)
            buf.dispatch(inp.x, **args, config=config)
        elif kind == "operation mix":
            if rank == 1:
                buf.dispatch(inp.x, handle=handle2)
            else:
                buf.combine(recv, handle2)
        elif kind == "dispatch mix":  # the kernel backends meet in the notify whichever operation a rank runs
            if rank == 1:
                buf.dispatch(inp.x, **args)
            else:
                buf.combine(recv, handle2)
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


@pytest.mark.parametrize("kind,phrase", [
    ("foreign handle", "different Buffer"),
    ("stale handle", "ranks disagree on the handle"),
    ("combine rows", "x must have shape"),
    ("combine fp8", "combine takes no FP8 tuple"),
    ("cached with layout", "takes no layout tensors"),
    ("operation mix", "ranks disagree on the operation"),
    ("dispatch mix", "ranks disagree on the operation"),
    ("config disagrees", "ranks disagree on config.num_sms (-1: no config): this rank has 4, ranks 0,2,3 have 6"),
    ("network ring disagrees", "ranks disagree on config.num_max_rdma_chunked_recv_tokens (-1: no config): this rank "
                               "has 8, ranks 0,2,3 have 16"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_handle_misuse(pools, kind, phrase, backend):
    for message in pools(4).run(bad_handle, kind, backend):
        assert message is not None and "rank 1:" in message and phrase in message, message


def late_or_missing_rank(rank, world, delay_s, timeout_s, backend="torch"):
    buf = _buffer(backend, timeout_s=timeout_s)
    inp = make_input(CASES[backend], rank)
    args = _layout_args(buf, inp, CASE.num_experts)
    if rank == 3:
        time.sleep(delay_s)
        if delay_s > timeout_s:
            return ("absent", None)
    start = time.monotonic()
    try:
        buf.dispatch(inp.x, **args)
    except epcomm.EpcommError as err:
        return (type(err).__name__, str(err), time.monotonic() - start)
    return ("ok", None, time.monotonic() - start)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_rank_within_timeout_succeeds(pools, backend):
    outcomes = pools(4).run(late_or_missing_rank, 0.5, 10.0, backend)
    assert all(o[0] == "ok" for o in outcomes), outcomes


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_rank_times_out_naming_the_stage(pools, backend):
    pool = pools(4)
    try:
        outcomes = pool.run(late_or_missing_rank, 4.0, 1.5, backend, timeout=60)
    finally:
        pool.close()  # a timed-out gloo group is not reusable
    for rank, outcome in enumerate(outcomes[:3]):
        kind, message, waited = outcome
        assert kind == "EpcommTimeoutError", outcome
        assert f"stage 'agree' on rank {rank}" in message and "1.5 s" in message, message
        assert "live peer(s) that have not arrived: rank 3 (last seen at creating its Buffer" in message, message
        assert waited < 10, f"rank {rank} waited {waited:.1f} s for a 1.5 s timeout"


def nvl_ranks_disagree(rank, world):
    buf = epcomm.Buffer(None, num_nvl_ranks=1 if rank == 0 else 2)
    inp = make_input(CASE, rank)
    try:
        buf.dispatch(inp.x, **_layout_args(buf, inp, CASE.num_experts))
    except epcomm.EpcommInputError as err:
        return str(err)
    return None


def test_ranks_per_node_disagreement(pools):
    for message in pools(4).run(nvl_ranks_disagree):
        assert message is not None and "rank 0: ranks disagree on num_nvl_ranks" in message, message


def unavailable_backend(rank, world, name):
    try:
        epcomm.Buffer(None, backend=name)
    except (epcomm.EpcommBackendUnavailable, ValueError) as err:
        return type(err).__name__, str(err)
    return None


def test_unavailable_backends_say_so(pools):
    name, message = pools(2).run(unavailable_backend, "cuda")[0]
    assert name == "EpcommBackendUnavailable" and "backend='torch'" in message
    name, message = pools(2).run(unavailable_backend, "nccl-magic")[0]
    assert name == "ValueError" and "unknown backend" in message
