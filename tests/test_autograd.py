"""Differentiable dispatch / cached dispatch / combine against a dense single-process model, gloo ranks."""

from __future__ import annotations

import pytest
import torch

from cases import Case, make_input

H, E = 32, 16


def expert_mats() -> torch.Tensor:
    """``[E, H, H]`` float32: expert ``e`` maps a row ``x`` to ``x @ A[e]`` (same on every rank)."""
    return torch.randn(E, H, H, generator=torch.Generator().manual_seed(99)) / H**0.5


def leaves(case: Case, rank: int, dtype: torch.dtype):
    """This rank's differentiable inputs ``x``, ``z`` (for cached dispatch), ``w`` and loss probes."""
    inp = make_input(case, rank)
    g = torch.Generator().manual_seed(500 + rank)
    n = case.tokens[rank]
    x = inp.x.to(dtype).requires_grad_()
    z = torch.randn(n, H, generator=g).to(dtype).requires_grad_()
    w = inp.topk_weights.clone().requires_grad_()
    probe_x, probe_w = torch.randn(n, H, generator=g), torch.randn(n, case.topk, generator=g)
    return inp.topk_idx, x, z, w, probe_x, probe_w


def distributed_grads(rank, world, case: Case, algorithm: str, dtype: torch.dtype, backend: str = "torch"):
    """Forward through the epcomm ops, backward, and return (outputs, grads, live handles after)."""
    import epcomm
    from epcomm import ops

    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=case.nvl, algorithm=algorithm, timeout_s=60)
    topk_idx, x, z, w, probe_x, probe_w = leaves(case, rank, dtype)
    got = ops.dispatch(buf, x, topk_idx, w, E, expert_alignment=4)
    assert got.recv_x.dtype == dtype and got.recv_topk_weights.requires_grad
    mats = expert_mats()[rank * (E // world) : (rank + 1) * (E // world)]
    y = torch.zeros(got.recv_x.shape, dtype=torch.float32)
    for e in range(mats.size(0)):
        we = (got.recv_topk_weights * (got.recv_topk_idx == e)).sum(1, keepdim=True)
        y = y + we * (got.recv_x.float() @ mats[e])
    y = y + 0.5 * ops.cached_dispatch(z, got.handle, got.recv_x.size(0)).float()
    combined, combined_w = ops.combine(y.to(dtype), got.handle, x.size(0), topk_weights=got.recv_topk_weights)
    loss = (combined.float() * probe_x).sum() + (combined_w * probe_w).sum()
    loss.backward()
    outs = [combined.detach().float(), combined_w.detach(), x.grad.float(), z.grad.float(), w.grad]
    assert x.grad.dtype == dtype and z.grad.dtype == dtype
    del got, y, combined, combined_w, loss
    return outs, ops.num_live_handles()


def dense_grads(case: Case, rank: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The same computation in one process: every rank's tokens, no communication."""
    mats = expert_mats()
    per_rank = [leaves(case, r, dtype) for r in range(case.world)]
    loss = 0
    results = []
    for r, (topk_idx, x, z, w, probe_x, probe_w) in enumerate(per_rank):
        valid = topk_idx >= 0
        out = torch.zeros(x.shape, dtype=torch.float32)
        for k in range(case.topk):
            rows = valid[:, k].nonzero().flatten()
            out = out.index_add(0, rows, w[rows, k, None] * torch.einsum("nh,nhj->nj", x[rows].float(), mats[topk_idx[rows, k]]))
        experts_per_rank = E // case.world
        num_dest = torch.tensor([len({e // experts_per_rank for e in row if e >= 0}) for row in topk_idx.tolist()])
        out = out + 0.5 * num_dest[:, None] * z.float()
        combined_w = torch.where(valid, w, 0.0)
        loss = loss + (out.to(dtype).float() * probe_x).sum() + (combined_w * probe_w).sum()
        results.append((out, combined_w))
    loss.backward()
    topk_idx, x, z, w, _, _ = per_rank[rank]
    out, combined_w = results[rank]
    return [out.detach(), combined_w.detach(), x.grad.float(), z.grad.float(), w.grad]


def check_against_dense(rank, world, case: Case, algorithm: str, dtype: torch.dtype, rtol: float,
                        backend: str = "torch"):
    got, live = distributed_grads(rank, world, case, algorithm, dtype, backend)
    want = dense_grads(case, rank, dtype)
    names = ["combined_x", "combined_topk_weights", "grad x", "grad z (cached dispatch)", "grad topk_weights"]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"rank {rank}: {name} has shape {list(a.shape)}, want {list(b.shape)}"
        if b.numel() == 0:
            continue
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        assert err <= rtol, f"rank {rank} {algorithm}: {name} differs from the dense model (relative error {err:.2e})"
    assert live == 0, f"rank {rank}: {live} dispatch handles still registered after backward"


@pytest.mark.parametrize("algorithm", ["flat", "two_hop"])
def test_fp32_gradients_match_dense(pools, algorithm):
    case = Case(num_nodes=2, nvl=2, tokens=(7, 0, 12, 9), hidden=H, num_experts=E, topk=3, kind="fp32", seed=4)
    pools(4).run(check_against_dense, case, algorithm, torch.float32, 1e-5)


def test_bf16_gradients_match_dense(pools):
    case = Case(num_nodes=2, nvl=2, tokens=(10, 6, 0, 8), hidden=H, num_experts=E, topk=3, kind="bf16", seed=8)
    pools(4).run(check_against_dense, case, "two_hop", torch.bfloat16, 2e-2)


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("kind,dtype,rtol", [("fp32", torch.float32, 1e-5), ("bf16", torch.bfloat16, 2e-2)])
def test_sim_gradients_match_dense(pools, kind, dtype, rtol, nodes):
    """The same autograd graph on epcomm's kernels (1 x 4: intranode, 2 x 2: two-hop): combine's backward
    is a cached dispatch kernel, dispatch's backward a combine kernel."""
    case = Case(num_nodes=nodes, nvl=4 // nodes, tokens=(7, 0, 12, 9), hidden=H, num_experts=E, topk=3, kind=kind,
                seed=4)
    pools(4).run(check_against_dense, case, "auto", dtype, rtol, "sim")


def test_sim_and_torch_gradients_are_identical(pools):
    """Not just close: the kernels reproduce the torch backend's forward and backward bit for bit."""
    case = Case(num_nodes=1, nvl=4, tokens=(5, 11, 0, 8), hidden=H, num_experts=E, topk=2, kind="fp32", seed=6)
    got = pools(4).run(distributed_grads, case, "flat", torch.float32, "sim")
    ref = pools(4).run(distributed_grads, case, "flat", torch.float32, "torch")
    for (outs, _), (want, _) in zip(got, ref):
        assert all(torch.equal(a, b) for a, b in zip(outs, want))


def fp8_forward_only(rank, world, backend="torch"):
    import epcomm
    from epcomm import ops
    from epcomm.fp8 import per_token_cast_to_fp8

    buf = epcomm.Buffer(None, backend=backend, num_nvl_ranks=2)
    case = Case(num_nodes=1, nvl=2, tokens=(6, 5), hidden=128, num_experts=4, topk=2, kind="bf16")
    inp = make_input(case, rank)
    fp8 = per_token_cast_to_fp8(inp.x)
    with torch.no_grad():
        got = ops.dispatch(buf, fp8, inp.topk_idx, inp.topk_weights, 4)
    assert isinstance(got.recv_x, tuple) and got.recv_x[0].dtype == torch.float8_e4m3fn
    with pytest.raises(RuntimeError, match="FP8 dispatch is forward-only"):
        ops.dispatch(buf, fp8, inp.topk_idx, inp.topk_weights.clone().requires_grad_(), 4)
    return got.recv_x[0].size(0)


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_fp8_dispatch_is_forward_only(pools, backend):
    pools(2).run(fp8_forward_only, backend)
