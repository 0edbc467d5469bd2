"""Low-latency mode: DeepEP's LL invariants, checked against a reference built from every rank's inputs.

Every rank generates every rank's inputs from the same seeds, so the expected result of each rank is
computed here without communication (independent of the backends' code).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import pytest
import torch

import epcomm
import epcomm._ext
from backend_selection import selected_backends
from epcomm.graphs import SimGraph, sim_graph
from epcomm.low_latency import LowLatencyLayout, host_sync_free

BACKENDS = ["torch", "sim"]
# (world size, ranks per node): the LL contract ignores nodes; the link classes of the bytes do not
TOPOLOGIES = {"1x4": (4, 4), "2x2": (4, 2), "4x2": (8, 2), "8x1": (8, 1)}
E4M3_MAX = 448.0


@dataclass(frozen=True)
class LLCase:
    world: int
    nvl: int
    num_max: int = 12
    hidden: int = 512
    experts_per_rank: int = 3
    topk: int = 4
    seed: int = 7

    @property
    def num_experts(self) -> int:
        return self.world * self.experts_per_rank

    def tokens(self, rank: int) -> int:
        # one rank sends nothing, one sends the maximum, the others something in between
        return [0, self.num_max, 5, 9, 1, 11, 7, 3][rank % 8] if self.world > 1 else self.num_max

    def inputs(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x bf16 [N, H], topk_idx int64 [N, K] (some -1), topk_weights float32 [N, K] of ``rank``."""
        g = torch.Generator().manual_seed(self.seed * 1000 + rank)
        n = self.tokens(rank)
        x = (torch.randn(n, self.hidden, generator=g) * 3).bfloat16()
        if n:
            x[0, :128] = 0  # an all-zero FP8 block
        topk = torch.stack([torch.randperm(self.num_experts, generator=g)[: self.topk] for _ in range(n)]) \
            if n else torch.empty(0, self.topk, dtype=torch.int64)
        drop = torch.rand(n, self.topk, generator=g) < 0.2
        topk = torch.where(drop, -1, topk)
        weights = torch.rand(n, self.topk, generator=g)
        weights = torch.where(drop, float("nan"), weights)  # -1 slots are skipped whatever their weight
        return x, topk, weights


def _buffer(case: LLCase, backend: str) -> epcomm.Buffer:
    return epcomm.Buffer(None, 0, 0, True, backend=backend, num_nvl_ranks=case.nvl)


def _expected_slices(case: LLCase, rank: int) -> list[list[list[int]]]:
    """[local expert][source rank] -> the source's token indices routed to that expert, ascending."""
    e_loc = case.experts_per_rank
    out = [[[] for _ in range(case.world)] for _ in range(e_loc)]
    for src in range(case.world):
        _, topk, _ = case.inputs(src)
        for j in range(e_loc):
            expert = rank * e_loc + j
            out[j][src] = (topk == expert).any(1).nonzero().flatten().tolist()
    return out


def _reference_scales(block: torch.Tensor, round_scale: bool) -> torch.Tensor:
    """amax / 448 per 128 values (amax clamped at 1e-4), rounded up to a power of two if asked."""
    amax = block.float().abs().amax(-1).clamp_min(1e-4)
    scale = amax / E4M3_MAX
    if round_scale:
        scale = torch.tensor([2.0 ** math.ceil(math.log2(s)) for s in scale.tolist()])
        assert (scale >= amax / E4M3_MAX).all()
    return scale


def _decode_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., B/4] -> float32 [..., B]: byte i%4 of word i//4 is block i's exponent + 127."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    exps = torch.stack([(words >> (8 * b)) & 0xFF for b in range(4)], -1).flatten(-2)
    return torch.pow(2.0, (exps - 127).double()).float()


# ----------------------------------------------------------------------------- dispatch invariants

def dispatch_invariants(rank, world, case: LLCase, backend: str, use_fp8: bool, round_scale: bool, use_ue8m0: bool,
                        hook: bool):
    buf = _buffer(case, backend)
    x, topk, _ = case.inputs(rank)
    e_loc, rows = case.experts_per_rank, case.world * case.num_max
    stats = torch.full((e_loc,), 5, dtype=torch.int32)
    waits = torch.zeros(world, dtype=torch.int64)
    recv_x, count, handle, event, recv_hook = buf.low_latency_dispatch(
        x, topk, case.num_max, case.num_experts, stats, waits, use_fp8=use_fp8, round_scale=round_scale,
        use_ue8m0=use_ue8m0, return_recv_hook=hook)
    assert (recv_hook is not None) == hook
    if hook:
        recv_hook()
    expected = _expected_slices(case, rank)
    data, scales = recv_x if use_fp8 else (recv_x, None)
    assert data.shape == (e_loc, rows, case.hidden)
    assert data.dtype == (torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
    assert count.dtype == torch.int32 and count.shape == (e_loc,)
    src_info, layout_range = handle[0], handle[1]
    assert handle[2:] == (case.num_max, case.hidden, case.num_experts)
    assert src_info.shape == (e_loc, rows) and src_info.dtype == torch.int32
    assert layout_range.shape == (e_loc, world) and layout_range.dtype == torch.int64
    if use_fp8:
        blocks = case.hidden // (512 if use_ue8m0 else 128)
        assert scales.shape == (e_loc, rows, blocks)
        assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32)
        assert scales.stride()[1] == 1, "scales must be column-major: token index fastest"
    for j in range(e_loc):
        want_counts = [len(t) for t in expected[j]]
        assert int(count[j]) == sum(want_counts)
        assert int(stats[j]) == 5 + sum(want_counts)
        begin = 0
        for src in range(world):
            r = int(layout_range[j, src])
            assert (r >> 32, r & 0xFFFFFFFF) == (begin, want_counts[src]), (j, src)
            tokens = expected[j][src]
            got_tokens = src_info[j, begin : begin + len(tokens)].tolist()
            assert got_tokens == tokens, (j, src)
            x_src, _, _ = case.inputs(src)
            for row, t in zip(range(begin, begin + len(tokens)), tokens):
                if not use_fp8:
                    assert torch.equal(data[j, row], x_src[t])
                    continue
                _check_fp8_row(data[j, row], scales[j, row], x_src[t], round_scale, use_ue8m0)
            begin += len(tokens)
    assert (waits >= 0).all()
    return hashlib.sha256(b"".join(_valid_rows_bytes(recv_x, count, handle))).hexdigest()


def _check_fp8_row(q: torch.Tensor, scale_row: torch.Tensor, x: torch.Tensor, round_scale: bool, ue8m0: bool) -> None:
    blocks = x.float().view(-1, 128)
    want = _reference_scales(blocks, round_scale)
    got = _decode_ue8m0(scale_row) if ue8m0 else scale_row
    assert torch.equal(got, want), (got, want)
    deq = q.float().view(-1, 128) * got.view(-1, 1)
    assert not deq.isnan().any()
    # e4m3 round to nearest: relative error <= 2^-4 of normals, absolute <= 2^-10 * scale below
    err = (deq - blocks).abs()
    assert (err <= blocks.abs() * 2.0**-4 + got.view(-1, 1) * 2.0**-9 + 1e-30).all()
    # values exactly representable round-trip exactly
    exact = (blocks / got.view(-1, 1)).to(torch.float8_e4m3fn).float() * got.view(-1, 1)
    assert torch.equal(deq, exact)


def _valid_rows_bytes(recv_x, count, handle):
    data, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    for j in range(count.numel()):
        c = int(count[j])
        yield data[j, :c].contiguous().view(torch.uint8).numpy().tobytes()
        if scales is not None:
            yield scales[j, :c].contiguous().numpy().tobytes()
        yield handle[0][j, :c].numpy().tobytes()
    yield handle[1].numpy().tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("mode", ["bf16", "fp8", "fp8-round", "fp8-ue8m0"])
def test_dispatch_invariants(pools, backend, topology, mode):
    world, nvl = TOPOLOGIES[topology]
    case = LLCase(world, nvl, hidden=128 if topology == "8x1" and mode != "fp8-ue8m0" else 512)
    fp8, rnd, ue8 = mode != "bf16", mode in ("fp8-round", "fp8-ue8m0"), mode == "fp8-ue8m0"
    pools(world).run(dispatch_invariants, case, backend, fp8, rnd, ue8, hook=(mode == "fp8"))


# ----------------------------------------------------------------------------- combine

def _reference_combine(case: LLCase, rank: int, expert_rows) -> torch.Tensor:
    """bf16(sum over valid k ascending of w * row), float32 from 0, one rounding."""
    x, topk, weights = case.inputs(rank)
    acc = torch.zeros(x.size(0), case.hidden, dtype=torch.float32)
    for k in range(case.topk):
        for n in range(x.size(0)):
            e = int(topk[n, k])
            if e >= 0:
                acc[n] = acc[n] + weights[n, k] * expert_rows(e, rank, n).float()
    return acc.bfloat16()


def _expert_output(e: int, x_row: torch.Tensor) -> torch.Tensor:
    """A different function per expert, so rows returned to the wrong (token, k) are caught."""
    return (x_row.float() * (1 + (e % 5)) / 4 - (e % 3)).bfloat16()


def combine_round(rank, world, case: LLCase, backend: str, variant: str, rounds: int):
    buf = _buffer(case, backend)
    x, topk, weights = case.inputs(rank)
    e_loc = case.experts_per_rank
    digests = []
    for _ in range(rounds):
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
        if variant == "zero_copy":
            y = buf.get_next_low_latency_combine_buffer(handle)
            assert y.shape == recv_x.shape and y.dtype == torch.bfloat16
        else:
            y = torch.empty_like(recv_x)
        y.fill_(float("nan"))  # rows past recv_count: garbage that must never be read
        for j in range(e_loc):
            c = int(count[j])
            y[j, :c] = _expert_output(rank * e_loc + j, recv_x[j, :c])
        out = torch.full((x.size(0), case.hidden), 7.0, dtype=torch.bfloat16) if variant == "out" else None
        combined, _, hook = buf.low_latency_combine(y, topk, weights, handle, zero_copy=(variant == "zero_copy"),
                                                    return_recv_hook=(variant == "hook"), out=out)
        if variant == "hook":
            hook()
        if out is not None:
            assert combined is out
        assert combined.shape == (x.size(0), case.hidden) and combined.dtype == torch.bfloat16
        want = _reference_combine(case, rank, lambda e, src, n: _expert_output(e, case.inputs(src)[0][n]))
        assert torch.equal(combined.view(torch.int16), want.view(torch.int16)), (combined - want).abs().max()
        digests.append(hashlib.sha256(combined.view(torch.int16).numpy().tobytes()).hexdigest())
    assert len(set(digests)) == 1
    return digests[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_combine_weighted_sum_bit_exact(pools, backend, topology):
    world, nvl = TOPOLOGIES[topology]
    pools(world).run(combine_round, LLCase(world, nvl), backend, "plain", 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["hook", "zero_copy", "out"])
def test_combine_paths(pools, backend, variant):
    pools(4).run(combine_round, LLCase(4, 2), backend, variant, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_twenty_rounds_bitwise_identical(pools, backend):
    """Order-strict determinism: 20 identical calls, identical outputs (dispatch and combine)."""
    case = LLCase(4, 2, seed=11)
    first = pools(4).run(dispatch_invariants, case, backend, True, True, False, False)
    for _ in range(19):
        assert pools(4).run(dispatch_invariants, case, backend, True, True, False, False) == first
    pools(4).run(combine_round, case, backend, "plain", 20)


# ----------------------------------------------------------------------------- double buffering, modes

def double_buffering(rank, world, case: LLCase, backend: str):
    buf = _buffer(case, backend)
    x, topk, weights = case.inputs(rank)
    args = (case.num_max, case.num_experts)
    a = buf.low_latency_dispatch(x, topk, *args, use_fp8=False)
    b = buf.low_latency_dispatch(x, topk, *args, use_fp8=False)
    out_a, _, _ = buf.low_latency_combine(a[0], topk, weights, a[2])  # two alive: fine
    c = buf.low_latency_dispatch(x, topk, *args, use_fp8=False)
    errors = []
    for what, call in (("combine", lambda: buf.low_latency_combine(a[0], topk, weights, a[2])),
                       ("zero-copy buffer", lambda: buf.get_next_low_latency_combine_buffer(a[2]))):
        try:
            call()
            errors.append(f"{what}: no error")
        except epcomm.EpcommInputError as err:
            assert "stale" in str(err) and "dispatch #3 reused" in str(err), str(err)
    out_b, _, _ = buf.low_latency_combine(b[0], topk, weights, b[2])
    out_c, _, _ = buf.low_latency_combine(c[0], topk, weights, c[2])
    assert torch.equal(out_a, out_b) and torch.equal(out_b, out_c)
    # a hook called after its slot was reused
    d = buf.low_latency_dispatch(x, topk, *args, use_fp8=False, return_recv_hook=True)
    buf.low_latency_dispatch(x, topk, *args, use_fp8=False)
    buf.low_latency_dispatch(x, topk, *args, use_fp8=False)
    try:
        d[4]()
        errors.append("late hook: no error")
    except RuntimeError as err:
        assert "reused its buffer slot" in str(err)
    return errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_result_is_a_clear_error(pools, backend):
    for errors in pools(4).run(double_buffering, LLCase(4, 2), backend):
        assert errors == []


def mode_switch(rank, world, case: LLCase, backend: str):
    buf = _buffer(case, backend)
    x, topk, weights = case.inputs(rank)
    buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts)
    layout = buf.get_dispatch_layout(topk, case.num_experts)
    buf.dispatch(x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                 num_tokens_per_expert=layout[2], topk_idx=topk, topk_weights=weights)
    try:
        buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts)
        return "no error"
    except epcomm.EpcommInputError as err:
        assert "clean_low_latency_buffer" in str(err) and len(err.problems) == world, str(err)
    buf.clean_low_latency_buffer(case.num_max, case.hidden, case.num_experts)
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    combined, _, _ = buf.low_latency_combine(recv_x, topk, weights, handle)
    return "ok"


@pytest.mark.parametrize("backend", BACKENDS)
def test_normal_mode_then_clean_before_low_latency(pools, backend):
    assert pools(4).run(mode_switch, LLCase(4, 2), backend) == ["ok"] * 4


def needs_low_latency_mode(rank, world, backend):
    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=2)
    x, topk, _ = LLCase(world, 2).inputs(rank)
    with pytest.raises(epcomm.EpcommInputError, match="low_latency_mode=True"):
        buf.low_latency_dispatch(x, topk, 12, 12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_needs_the_constructor_flag(pools, backend):
    pools(4).run(needs_low_latency_mode, backend)


# ----------------------------------------------------------------------------- bad input on one rank

def _bad_dispatch(mutation: str, case: LLCase, x, topk):
    kwargs = dict(num_max_dispatch_tokens_per_rank=case.num_max, num_experts=case.num_experts)
    if mutation == "too many tokens":
        x = torch.cat([x, x, x])[: case.num_max + 1]
        topk = torch.cat([topk, topk, topk])[: case.num_max + 1]
        if x.size(0) <= case.num_max:  # a rank with few tokens: pad
            x = torch.zeros(case.num_max + 1, case.hidden, dtype=torch.bfloat16)
            topk = torch.full((case.num_max + 1, case.topk), -1)
    elif mutation == "expert out of range":
        topk = topk.clone()
        topk[0, 0] = case.num_experts
    elif mutation == "expert twice":
        topk = topk.clone()
        topk[0, 1] = topk[0, 0] = 1
    elif mutation == "x dtype":
        x = x.float()
    elif mutation == "fp8 hidden":
        x = torch.zeros(x.size(0), 200, dtype=torch.bfloat16)
    elif mutation == "ue8m0 without round_scale":
        kwargs["use_ue8m0"] = True
    elif mutation == "hook and async":
        kwargs.update(return_recv_hook=True, async_finish=True)
    elif mutation == "stats shape":
        kwargs["cumulative_local_expert_recv_stats"] = torch.zeros(99, dtype=torch.int32)
    else:
        raise AssertionError(mutation)
    return x, topk, kwargs


BAD_DISPATCH = {
    "too many tokens": "more than num_max_dispatch_tokens_per_rank",
    "expert out of range": "is not an expert id",
    "expert twice": "names an expert twice",
    "x dtype": "x must have dtype torch.bfloat16",
    "fp8 hidden": "multiple of 128",
    "ue8m0 without round_scale": "use_ue8m0=True needs round_scale=True",
    "hook and async": "exclude each other",
    "stats shape": "cumulative_local_expert_recv_stats must have shape",
}


def dispatch_with_bad_rank(rank, world, case: LLCase, backend: str, mutation: str, bad_rank: int):
    buf = _buffer(case, backend)
    x, topk, weights = LLCase(world, case.nvl, seed=3).inputs(1)  # every rank: a rank with tokens
    kwargs = dict(num_max_dispatch_tokens_per_rank=case.num_max, num_experts=case.num_experts)
    if rank == bad_rank:
        x, topk, kwargs = _bad_dispatch(mutation, case, x, topk)
    try:
        buf.low_latency_dispatch(x, topk, **kwargs)
        outcome = ("no error", None, None)
    except epcomm.EpcommInputError as err:
        outcome = ("input error", str(err), sorted(err.problems))
    # the buffer stays usable
    x, topk, weights = case.inputs(rank)
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    buf.low_latency_combine(recv_x, topk, weights, handle)
    return outcome


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutation", list(BAD_DISPATCH))
def test_bad_dispatch_on_one_rank_fails_every_rank(pools, backend, mutation):
    bad = 2
    for rank, (kind, message, ranks) in enumerate(pools(4).run(dispatch_with_bad_rank, LLCase(4, 2), backend,
                                                               mutation, bad)):
        assert kind == "input error", f"rank {rank}: no error for {mutation!r}"
        assert ranks == [bad] and f"rank {bad}:" in message and BAD_DISPATCH[mutation] in message, message


def combine_with_bad_rank(rank, world, case: LLCase, backend: str, mutation: str, bad_rank: int):
    buf = _buffer(case, backend)
    x, topk, weights = case.inputs(rank)
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    args = dict(x=recv_x, topk_idx=topk, topk_weights=weights, handle=handle)
    if rank == bad_rank:
        if mutation == "other topk_idx":
            args["topk_idx"] = torch.where(topk >= 0, (topk + 1) % case.num_experts, -1)
        elif mutation == "logfmt":
            args["use_logfmt"] = True
        elif mutation == "x shape":
            args["x"] = recv_x[:, :-1].contiguous()
        elif mutation == "zero_copy with another x":
            args["zero_copy"] = True
        elif mutation == "weights dtype":
            args["topk_weights"] = weights.double()
    try:
        buf.low_latency_combine(**args)
        return ("no error", None, None)
    except epcomm.EpcommInputError as err:
        return ("input error", str(err), sorted(err.problems))


BAD_COMBINE = {
    "other topk_idx": "topk_idx differs",
    "logfmt": "use_logfmt=True is not implemented",
    "x shape": "x must have shape",
    "zero_copy with another x": "zero_copy=True takes as x",
    "weights dtype": "topk_weights must have dtype torch.float32",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutation", list(BAD_COMBINE))
def test_bad_combine_on_one_rank_fails_every_rank(pools, backend, mutation):
    bad = 1
    case = LLCase(4, 2)
    for rank, (kind, message, ranks) in enumerate(pools(4).run(combine_with_bad_rank, case, backend, mutation, bad)):
        assert kind == "input error", f"rank {rank}: no error for {mutation!r}"
        assert ranks == [bad] and BAD_COMBINE[mutation] in message, message


# ----------------------------------------------------------------------------- no host synchronization

class _NoHostReads:
    """Makes every host read of a tensor value raise inside the block (what graph capture forbids)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def forbid(name):
            def read(*_a, **_k):
                raise AssertionError(f"host read of a tensor value (Tensor.{name}) inside a host-sync-free LL call")
            return read

        for name in self.NAMES:
            setattr(torch.Tensor, name, forbid(name))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def host_sync_free_step(rank, world, case: LLCase, backend: str):
    buf = _buffer(case, backend)
    x, topk, weights = case.inputs(rank)
    eager = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    want, _, _ = buf.low_latency_combine(eager[0], topk, weights, eager[2])
    want = want.clone()
    buf.reset_traffic()
    with host_sync_free(), _NoHostReads():
        recv_x, count, handle, _, hook = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts,
                                                                  use_fp8=False, return_recv_hook=True)
        hook()
        got, _, hook = buf.low_latency_combine(recv_x, topk, weights, handle, return_recv_hook=True)
        hook()
    trips = {op: dict(c) for op, c in buf.traffic.round_trips.items()}
    assert torch.equal(got, want)
    return trips


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_reads_nothing_on_the_host(pools, backend):
    """The call sequence a CUDA graph would capture: no host read of a tensor, no agreement round."""
    for trips in pools(4).run(host_sync_free_step, LLCase(4, 2), backend):
        # torch: the one exchange; sim: the send kernel and the receive kernel, nothing else
        expected = {"collective": 1} if backend == "torch" else {"kernel": 2}
        assert trips["low_latency_dispatch"] == expected, trips
        assert trips["low_latency_combine"] == expected, trips


# ----------------------------------------------------------------------------- bytes and sizes

def traffic_of_one_call(rank, world, case: LLCase, backend: str, use_fp8: bool = True):
    buf = _buffer(case, backend)
    x, topk, weights = case.inputs(rank)
    buf.reset_traffic()
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=use_fp8)
    shape = recv_x[0].shape if use_fp8 else recv_x.shape
    buf.low_latency_combine(torch.zeros(shape, dtype=torch.bfloat16), topk, weights, handle)
    return buf.traffic.as_dict()


def test_torch_traffic_counts_every_byte(pools):
    """Valid messages as rows/payload; the fixed slot arrays' rest as meta; per link class."""
    case = LLCase(4, 2)
    e_loc, m, h = case.experts_per_rank, case.num_max, case.hidden
    fp8_payload = h + 4 * (h // 128)
    for rank, stats in enumerate(pools(4).run(traffic_of_one_call, case, "torch")):
        _, topk, _ = case.inputs(rank)
        per_link = {}
        for dest in range(4):
            link = "self" if dest == rank else ("nvlink" if dest // 2 == rank // 2 else "network")
            rows = int(((topk // e_loc) == dest).logical_and(topk >= 0).sum())
            d = per_link.setdefault(link, [0, 0, 0, 0, 0, 0])
            d[0] += rows
            d[1] += rows * fp8_payload
            d[2] += 4 * e_loc + e_loc * m * (4 + fp8_payload) - rows * fp8_payload
            _, dest_topk, _ = case.inputs(dest)  # combine returns the rows dest sent here
            back = int(((dest_topk // e_loc) == rank).logical_and(dest_topk >= 0).sum())
            d[3] += back
            d[4] += back * 2 * h
            d[5] += e_loc * m * 2 * h - back * 2 * h
        for link, (r, p, meta, cr, cp, cmeta) in per_link.items():
            assert stats["low_latency_dispatch"][link] == {"rows": r, "payload_bytes": p, "meta_bytes": meta}
            assert stats["low_latency_combine"][link] == {"rows": cr, "payload_bytes": cp, "meta_bytes": cmeta}


def sim_traffic_of_one_call(rank, world, case: LLCase, use_fp8: bool):
    return traffic_of_one_call(rank, world, case, "sim", use_fp8)


def test_sim_transport_counts_only_the_messages(pools):
    """The kernels put exactly one message per (token, expert) pair (16-byte header + payload) and one
    4-byte count per (expert, this rank); combine one bf16 row back per pair. Counted by the transport."""
    case = LLCase(4, 2)
    e_loc, h = case.experts_per_rank, case.hidden
    for use_fp8 in (False, True):
        payload = h + 4 * (h // 128) if use_fp8 else 2 * h
        for rank, stats in enumerate(pools(4).run(sim_traffic_of_one_call, case, use_fp8)):
            _, topk, _ = case.inputs(rank)
            want: dict[str, list[int]] = {}
            for dest in range(4):
                link = "self" if dest == rank else ("nvlink" if dest // 2 == rank // 2 else "network")
                rows = int(((topk // e_loc) == dest).logical_and(topk >= 0).sum())
                _, dest_topk, _ = case.inputs(dest)
                back = int(((dest_topk // e_loc) == rank).logical_and(dest_topk >= 0).sum())
                d = want.setdefault(link, [0, 0, 0, 0, 0, 0])
                d[0:3] = [d[0] + rows, d[1] + rows * payload, d[2] + rows * 16 + 4 * e_loc]
                d[3:6] = [d[3] + back, d[4] + back * 2 * h, d[5]]
            for link, (r, p, meta, cr, cp, cmeta) in want.items():
                assert stats["low_latency_dispatch"][link] == {"rows": r, "payload_bytes": p, "meta_bytes": meta}
                got = stats["low_latency_combine"].get(link, {"rows": 0, "payload_bytes": 0, "meta_bytes": 0})
                assert got == {"rows": cr, "payload_bytes": cp, "meta_bytes": cmeta}


def both_backends_round(rank, world, case: LLCase, mode: str):
    """The same calls on the torch and the sim backend: digests of every valid output byte."""
    x, topk, weights = case.inputs(rank)
    fp8, rnd, ue8 = mode != "bf16", mode in ("fp8-round", "fp8-ue8m0"), mode == "fp8-ue8m0"
    digests = []
    for backend in ("torch", "sim"):
        buf = _buffer(case, backend)
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=fp8,
                                                               round_scale=rnd, use_ue8m0=ue8)
        data = recv_x[0] if fp8 else recv_x
        y = torch.zeros(data.shape, dtype=torch.bfloat16)
        for j in range(case.experts_per_rank):
            c = int(count[j])
            y[j, :c] = data[j, :c].float().bfloat16() if fp8 else data[j, :c]
        combined, _, _ = buf.low_latency_combine(y, topk, weights, handle)
        digests.append((b"".join(_valid_rows_bytes(recv_x, count, handle)), combined.view(torch.int16).numpy().tobytes()))
    assert digests[0] == digests[1], f"rank {rank}: sim and torch differ"
    return True


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("mode", ["bf16", "fp8", "fp8-ue8m0"])
def test_sim_and_torch_agree_bit_for_bit(pools, topology, mode):
    world, nvl = TOPOLOGIES[topology]
    pools(world).run(both_backends_round, LLCase(world, nvl, seed=5), mode)


def missing_sender(rank, world, case: LLCase, absent: int):
    buf = epcomm.Buffer(None, 0, 0, True, backend="sim", num_nvl_ranks=case.nvl, timeout_s=3.0)
    x, topk, _ = case.inputs(rank)
    buf.clean_low_latency_buffer(case.num_max, case.hidden, case.num_experts)  # the region exists everywhere
    if rank == absent:
        with host_sync_free():  # (no agreement: the absent rank's peers wait in the receive kernel)
            return "absent"
    try:
        with host_sync_free():
            buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    except (epcomm.EpcommTimeoutError, epcomm.EpcommPeerError) as err:
        return str(err)
    return "no error"


def test_sim_receiver_names_the_rank_that_never_sent(pools):
    """Without the agreement (host-sync-free), a rank that never sends makes every receiver time out
    in the receive kernel, naming the kernel, its role and the missing peer, instead of hanging."""
    case = LLCase(4, 2)
    pool = pools(4)
    outcomes = pool.run(missing_sender, case, 3, timeout=90)
    pool.close()  # the group is broken by design after a timeout
    for rank, text in enumerate(outcomes):
        if rank == 3:
            continue
        assert "low_latency_dispatch_recv" in text and "peer=3" in text.replace(" ", ""), text
        # the progress board cannot see kernels: it must not claim every peer arrived
        assert "arrived" not in text.split("Backend said")[0] or "have not arrived" in text, text


def test_size_hint_is_the_exact_workspace():
    """The hint is the kernels' own layout (csrc/kernels/low_latency.hpp), byte for byte."""
    hint = epcomm.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    a = lambda n: (n + 127) // 128 * 128  # noqa: E731
    msg = 16 + 2 * 7168
    slot = (a(4 * 256) + a(4 * 32 * 8) + a(128 * msg) + a(32 * 8 * 128 * msg) + a(32 * 8 * 128 * 2 * 7168)
            + a(256 * 128 * 2 * 7168))
    assert hint == a(8 * (4 * 256 + 1)) + a(8 * 4) + 2 * slot  # signals, generations, two slots
    with pytest.raises(ValueError, match="multiple of the 8 ranks"):
        epcomm.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 250)
    try:
        ext = epcomm._ext.load_extension("cpu")
    except epcomm.EpcommBackendUnavailable:
        pytest.skip("the cpu extension is not built")
    for m, h, r, e in ((128, 7168, 8, 256), (1, 8, 1, 1), (12, 136, 4, 12), (33, 512, 2, 6)):
        spec = ext.LowLatencySpec(num_max_tokens=m, hidden=h, num_local_experts=e // r, region_offset=0,
                                  num_nvl_ranks=1)
        assert ext.low_latency_workspace_bytes(spec, r) == epcomm.Buffer.get_low_latency_rdma_size_hint(m, h, r, e)


# ----------------------------------------------------------------------------- the decode example

@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_example_runs_under_mpiexec(backend):
    """examples/decode_step.py: two micro-batches with the hook and zero-copy combine, vs a dense model
    (2 nodes x 2 ranks; the sim backend with DeepEP's LL-only buffer: num_nvl_bytes=0, num_rdma_bytes=hint)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if mpiexec is None:
        pytest.skip("needs mpiexec in the venv")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([mpiexec, "-n", "4", sys.executable, str(root / "examples" / "decode_step.py"),
                           "--steps", "2", "--hidden", "128", "--backend", backend], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout


# ----------------------------------------------------------------------------- the signal reset

def reset_signals_round(rank, world, case: LLCase):
    """Three LL rounds (slots 0, 1, 0) leave every signal but the abort one non-zero; the reset kernel waits
    for each signal's due units (calls on its slot x (M + 1)) and zeroes it through the transport, and times
    out naming itself when more units are claimed than ever arrive."""
    buf = _buffer(case, "sim")
    x, topk, weights = case.inputs(rank)
    for _ in range(3):
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
        buf.low_latency_combine(recv_x, topk, weights, handle)
    engine, runtime = buf._impl.low_latency(), buf._impl._device_runtime
    runtime.barrier(op="test")  # every rank's combine sends (adds to signals its reducers never read) are done
    signals = lambda: runtime.peer_view(rank, torch.int64, 0, 4 * case.num_experts + 1).clone()  # noqa: E731
    unit, e = case.num_max + 1, case.num_experts
    expected = torch.tensor([2 * unit] * e + [unit] * e + [2 * unit] * e + [unit] * e + [0])
    assert torch.equal(signals(), expected), signals()
    # a clean waits for those units on every rank, zeroes the signals and the region; the next round starts at
    # generation 1 (it would time out if the counts were not restarted, or pass stale signals if not zeroed)
    buf.clean_low_latency_buffer(case.num_max, case.hidden, case.num_experts)
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    buf.low_latency_combine(recv_x, topk, weights, handle)
    runtime.barrier(op="test")
    spec = engine._spec(engine.layout)
    where = [buf._impl._ext.low_latency_layout(spec, world, slot) for slot in (0, 1)]
    generation = lambda slot, op: int(runtime.peer_view(rank, torch.int64, where[slot][f"{op}_generation"], 1))  # noqa: E731
    # the send kernels counted one call per op on slot 1 since the clean (the slots alternate across it)
    assert [generation(s, op) for s in (0, 1) for op in ("dispatch", "combine")] == [0, 0, 1, 1]
    assert torch.equal(signals(), torch.tensor([0] * e + [unit] * e + [0] * e + [unit] * e + [0])), signals()
    # the kernel alone (no peers: rank by rank): zeroes what the generations say is due
    runtime.run(spec, engine._reset_params(wait_for_due=True), op="test")
    assert (signals() == 0).all()
    # more units due than ever arrive (a generation claiming a second call): a timeout naming the kernel (the
    # process group is failed after it, as after any kernel timeout)
    runtime.peer_view(rank, torch.int64, where[1]["dispatch_generation"], 1).fill_(2)
    with pytest.raises(epcomm.EpcommTimeoutError, match="low_latency_reset_signals"):
        runtime.run(spec, engine._reset_params(wait_for_due=True), op="test", timeout_s=0.2)
    return True


def test_reset_signals_kernel_waits_for_due_adds_then_zeroes(pools):
    """low_latency_reset_signals (what clean_low_latency_buffer runs between the re-layout's meetings, so
    GIN's signals, which live outside the buffer, restart at 0 too) on the CPU path over ShmTransport."""
    pool = pools(4)
    assert all(pool.run(reset_signals_round, LLCase(4, 2)))
    pool.close()  # the group is failed by design after the timeout


def _spy_on_signals(runtime, ext, events: list) -> None:
    """Record, in order, the LL reset kernels ``runtime`` runs (with their wait_for_due), its zeroings and its
    host waits for enqueued kernels."""
    run, zero, report_enqueued = runtime.run, runtime.zero, runtime.report_enqueued

    def spy_run(spec, params, **kwargs):
        if isinstance(params, ext.LowLatencyResetSignalsParams):
            events.append(("reset", params.wait_for_due))
        return run(spec, params, **kwargs)

    def spy_zero(num_bytes):
        events.append(("zero", num_bytes))
        return zero(num_bytes)

    def spy_report_enqueued(wait, op=None):
        events.append(("wait for enqueued", wait))
        return report_enqueued(wait, op)

    runtime.run, runtime.zero, runtime.report_enqueued = spy_run, spy_zero, spy_report_enqueued


def leave_low_latency_mode(rank, world, case: LLCase, overclaim: bool):
    """Leaving LL mode settles this rank's LL signals before anything zeroes or frees the region: the reset
    kernel waits for the adds the generation words say are owed (those of a dispatch whose hook never ran
    included) and zeroes the signals (what GIN needs: its signals survive a zeroed window). With a generation
    claiming a call no peer made, the normal call times out naming that kernel instead of zeroing early."""
    buf = epcomm.Buffer(None, 0, 0, True, backend="sim", num_nvl_ranks=case.nvl, timeout_s=3.0 if overclaim else 30.0)
    x, topk, weights = case.inputs(rank)
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    want, _, _ = buf.low_latency_combine(recv_x, topk, weights, handle)
    *_, hook = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False, return_recv_hook=True)
    impl, events = buf._impl, []
    runtime, engine = impl._device_runtime, impl.low_latency()
    _spy_on_signals(runtime, impl._ext, events)
    if overclaim:
        where = impl._ext.low_latency_layout(engine._spec(engine.layout), world, 1)
        runtime.peer_view(rank, torch.int64, where["dispatch_generation"], 1).add_(1)
    layout = buf.get_dispatch_layout(topk, case.num_experts)
    try:
        recv = buf.dispatch(x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                            is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], topk_idx=topk,
                            topk_weights=weights)
    except epcomm.EpcommTimeoutError as err:
        assert overclaim and "low_latency_reset_signals" in str(err), str(err)
        assert events == [("wait for enqueued", True), ("reset", True)], events  # nothing zeroed after it
        return "timed out"
    assert not overclaim, "an unreachable due count passed"
    # the settle (this rank's LL kernels waited for, then the owed adds; the signals zeroed) before the
    # re-layout's zeroing, once
    assert events[:3] == [("wait for enqueued", True), ("reset", True), ("zero", runtime.num_nvl_bytes)], events
    assert ("reset", True) not in events[3:], events
    with pytest.raises(epcomm.EpcommInputError, match="reused by a normal-mode call"):
        buf.get_next_low_latency_combine_buffer(handle)  # a view of a region normal mode now uses
    buf.combine(recv[0], recv[4])
    with pytest.raises(RuntimeError, match="came after a normal-mode call"):
        hook()  # its receive would read a zeroed region
    del events[:]
    buf.clean_low_latency_buffer(case.num_max, case.hidden, case.num_experts)
    # settled when normal mode began: a clean only zeroes the layout's signals, then the region
    assert [e for e in events if e[0] != "wait for enqueued"] == [("reset", False), ("zero", engine.layout.rdma_bytes)]
    recv_x, _, handle, _, _ = buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    got, _, _ = buf.low_latency_combine(recv_x, topk, weights, handle)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"rank {rank}: LL after normal mode differs"
    # growth retires the runtime: settled first (no LL add may land in freed buffers), nothing zeroed there
    del events[:]
    buf.clean_low_latency_buffer(4 * case.num_max, case.hidden, case.num_experts)
    assert impl._device_runtime is not runtime and ("reset", True) in events, events
    assert ("zero", runtime.num_nvl_bytes) not in events, events
    return "ok"


@pytest.mark.parametrize("topology", ["1x4", "2x2"])
def test_leaving_low_latency_mode_settles_owed_signals_first(pools, topology):
    world, nvl = TOPOLOGIES[topology]
    assert pools(world).run(leave_low_latency_mode, LLCase(world, nvl), False) == ["ok"] * world


def test_leaving_low_latency_mode_waits_for_what_the_generations_claim(pools):
    pool = pools(4)
    assert pool.run(leave_low_latency_mode, LLCase(4, 2), True) == ["timed out"] * 4
    pool.close()  # the group is failed by design after the timeout


# ----------------------------------------------------------------------------- the cuda backend (GPUs only)

def cuda_decode_step_in_a_graph(rank, world, case: LLCase):
    """Eager cuda LL equals sim bit for bit; a decode step (dispatch + hook, combine + hook) captured in a CUDA
    graph and replayed three times gives the same result each time (the slot's generation is counted on the
    device, so each replay waits for its own signals)."""
    x, topk, weights = case.inputs(rank)
    ref = _buffer(case, "sim")
    recv_x, count, handle, _, _ = ref.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    want, _, _ = ref.low_latency_combine(recv_x, topk, weights, handle)
    buf = _buffer(case, "cuda")
    device = torch.device("cuda", torch.cuda.current_device())
    xd, topkd, wd = x.to(device), topk.to(device), weights.to(device)
    got_x, got_count, got_handle, _, _ = buf.low_latency_dispatch(xd, topkd, case.num_max, case.num_experts,
                                                                  use_fp8=False)
    assert torch.equal(got_count.cpu(), count)
    got, _, _ = buf.low_latency_combine(got_x, topkd, wd, got_handle)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)), f"rank {rank}: eager combine differs"
    # two decode steps per graph: an even number of LL dispatches keeps the slots alternating across replays
    static_out = [torch.zeros_like(got), torch.zeros_like(got)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for out in static_out:
            step_x, _, step_handle, _, hook = buf.low_latency_dispatch(xd, topkd, case.num_max, case.num_experts,
                                                                       use_fp8=False, return_recv_hook=True)
            hook()
            _, _, hook = buf.low_latency_combine(step_x, topkd, wd, step_handle, out=out, return_recv_hook=True)
            hook()
    for replay in range(3):
        for out in static_out:
            out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for out in static_out:
            assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16)), f"rank {rank}: replay {replay}"
    buf.low_latency_dispatch(xd, topkd, case.num_max, case.num_experts, use_fp8=False)  # reports replays' errors
    return True


@pytest.mark.skipif("cuda" not in selected_backends(),
                    reason="needs 4 GPUs and EPCOMM_TEST_BACKENDS=cuda (make gpu-check runs it)")
def test_cuda_decode_step_captured_in_a_graph_replays_exactly(pools):
    assert all(pools(4).run(cuda_decode_step_in_a_graph, LLCase(4, 4)))


class _SessionSizes:
    """What the cuda backend reads of a runtime to decide whether it holds a layout (no GPU needed)."""

    def __init__(self, nvl: int, rdma: int, signals: int) -> None:
        self.num_nvl_bytes, self.network_rdma_bytes, self.network_signals = nvl, rdma, signals


def test_cuda_gin_session_holds_both_modes_in_disjoint_signal_ranges():
    """Across nodes the cuda backend sizes one GIN session for normal and LL mode: the window holds the LL
    region (at its start) and the internode RDMA workspace, the signals are the internode kernels' plus the
    LL layout's 4E + 1 (the LL range at the top never overlaps the internode range at the bottom), sizes never
    shrink, and a layout the session cannot hold gets a new one. Plain Python over the kernels' own counts."""
    from epcomm._ext import load_extension
    from epcomm.backends._kernel_paths import InternodePath
    from epcomm.backends.cuda_backend import CudaDispatchBackend
    from epcomm.backends.cuda_low_latency import CudaLowLatency
    from epcomm.topology import Topology

    topo = Topology(world_size=16, rank=3, num_nvl_ranks=8)
    backend = CudaDispatchBackend.__new__(CudaDispatchBackend)  # its sizing state only: no GPU here
    backend.topo, backend._ext = topo, load_extension("cpu")
    backend.path = InternodePath(backend._ext, topo, 4)
    backend.explicit_bytes, backend._sizing_spec, backend._network_floor = (0, 0), None, (0, 0, 0)
    backend._low_latency_sizing = None
    engine = CudaLowLatency(backend)
    assert engine.over_network
    normal_spec = backend._normal_spec()
    normal_signals = int(backend._ext.transport_signals(normal_spec))
    nvl, rdma, signals = backend._network_sizes()
    assert signals == normal_signals and rdma == backend.path.region_bytes(normal_spec)[1]
    layout = LowLatencyLayout(128, 7168, 16, 256)
    assert layout.num_signals == 4 * 256 + 1
    assert not engine._holds(_SessionSizes(nvl, rdma, signals), layout)  # a normal-mode session: LL needs a new one
    backend._low_latency_sizing = layout  # what the engine's first LL call (or clean) does before allocating
    sizes = backend._network_sizes()
    assert sizes[1] == max(layout.rdma_bytes, rdma) and sizes[2] == normal_signals + layout.num_signals
    session = _SessionSizes(*sizes)
    assert engine._holds(session, layout) and backend._holds(session, normal_spec)
    short = _SessionSizes(sizes[0], sizes[1], sizes[2] - 1)  # one signal short: the ranges would overlap
    assert not engine._holds(short, layout) and not backend._holds(short, normal_spec)
    assert not engine._holds(_SessionSizes(sizes[0], layout.rdma_bytes - 1, sizes[2]), layout)
    # a larger LL layout outgrows the session; a smaller one afterwards does not shrink the next
    bigger = LowLatencyLayout(256, 7168, 16, 512)
    assert not engine._holds(session, bigger)
    backend._low_latency_sizing = bigger
    grown = backend._network_sizes()
    assert grown[2] == normal_signals + bigger.num_signals and grown[1] >= bigger.rdma_bytes
    backend._low_latency_sizing = layout
    assert backend._network_sizes() == grown
    # explicit sizes across nodes: the LL region must fit num_rdma_bytes (the window), not the NVL bytes
    backend.explicit_bytes = (1 << 20, layout.rdma_bytes)
    assert engine._explicit_capacity() == layout.rdma_bytes


def growth_after_capture(rank, world, case: LLCase):
    buf = _buffer(case, "sim")
    x, topk, _ = case.inputs(rank)
    buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    with sim_graph(SimGraph()):  # its kernels point at the current buffers (as a CUDA graph's would)
        buf.low_latency_dispatch(x, topk, case.num_max, case.num_experts, use_fp8=False)
    with pytest.raises(epcomm.EpcommError, match=fr"on rank {rank}: this call needs larger buffers \(or, across "
                                                 r"nodes on cuda, more GIN signals\), but a graph captured "
                                                 "kernels on the current ones"):
        buf.clean_low_latency_buffer(4 * case.num_max, case.hidden, case.num_experts)
    return True


def test_buffers_captured_kernels_use_are_never_replaced(pools):
    """A Buffer whose runtime a CUDA graph captured kernels on refuses to grow (a replay would use freed
    buffers), on every rank, before anything collective."""
    assert all(pools(4).run(growth_after_capture, LLCase(4, 2)))
