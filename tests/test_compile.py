"""torch.compile traces a layer that uses the epcomm custom ops as one graph (fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

H, E, K = 16, 4, 2


class TinyMoE(torch.nn.Module):
    """Router + top-k gate, dispatch, per-local-expert matmuls (no grouping), combine."""

    def __init__(self, comm, rank: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.comm = comm
        self.router = torch.nn.Parameter(torch.randn(H, E, generator=g))
        self.experts = torch.nn.Parameter(torch.randn(comm.num_local_experts, H, H, generator=g) / H**0.5 + rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        affinity = (x @ self.router).sigmoid()
        weights, topk_idx = torch.topk(affinity, K)
        weights = weights / weights.sum(-1, keepdim=True)
        got = self.comm.dispatch(x, topk_idx, weights)
        y = torch.zeros_like(got.recv_x)
        for e in range(self.comm.num_local_experts):
            gate = (got.recv_topk_weights * (got.recv_topk_idx == e)).sum(1, keepdim=True)
            y = y + gate * (got.recv_x @ self.experts[e])
        return self.comm.combine(y, got, x.size(0)) + x


def step(model, x):
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return [out.detach(), *grads]


def compile_matches_eager(rank, world, backend="torch"):
    from torch._dynamo.backends.debugging import aot_eager

    import epcomm
    from epcomm.moe import ExpertParallel

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    comm = ExpertParallel(epcomm.Buffer(None, backend=backend, num_nvl_ranks=world), E)
    model = TinyMoE(comm, rank)
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    for n in (6 + rank, 9 + 2 * rank):  # a second batch size: recompiles with a dynamic token count
        x = torch.randn(n, H, generator=torch.Generator().manual_seed(10 * n + rank))
        want = step(model, x)
        got = step(compiled, x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert graphs and all("epcomm.dispatch" in code and "epcomm.combine" in code for code in graphs), graphs
    assert epcomm.ops.num_live_handles() == 0, "compiled forward/backward leaked dispatch handles"
    return len(graphs)


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_compile_fullgraph_matches_eager(pools, backend):
    counts = pools(2).run(compile_matches_eager, backend)
    assert all(c >= 1 for c in counts)


def test_fake_dispatch_has_unbacked_row_count(pools):
    pools(2).run(fake_shapes)


def fake_shapes(rank, world):
    """Tracing alone (no communication): dispatch's row count is a fresh unbacked SymInt."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import epcomm
    from epcomm import ops

    buf = epcomm.Buffer(None, backend="torch", num_nvl_ranks=world)
    key = ops.buffer_key(buf)
    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty(5, H)
        idx = torch.zeros(5, K, dtype=torch.int64)
        w = torch.empty(5, K)
        recv_x, scales, recv_idx, recv_w, counts, handle = torch.ops.epcomm.dispatch(x, None, idx, w, key, E, 1)
        assert isinstance(recv_x.shape[0], torch.SymInt) and recv_x.shape[1] == H
        assert recv_idx.shape[0] == recv_x.shape[0] and recv_w.shape[0] == recv_x.shape[0]  # one symbol
        assert tuple(counts.shape) == (E // world,) and handle.dtype == torch.int64
        combined, _ = torch.ops.epcomm.combine(recv_x, None, handle, 5)
        assert tuple(combined.shape) == (5, H)
