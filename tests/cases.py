"""Deterministic multi-rank test problems and the per-rank check against the reference.

Every rank can regenerate every rank's inputs from the case's seed, so each
rank checks its own outputs against :mod:`epcomm.reference` without
communicating.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

import epcomm
from backend_selection import selected_backends
from epcomm.reference import RankInput, reference_combine, reference_dispatch


@dataclass(frozen=True)
class Case:
    num_nodes: int
    nvl: int
    tokens: tuple[int, ...]  # per rank
    hidden: int = 256
    num_experts: int = 32
    topk: int = 4
    kind: str = "bf16"  # bf16 | fp8 | fp16 | fp32
    drop_prob: float = 0.1
    max_nodes: int = 4
    alignment: int = 1
    with_weights: bool = True
    seed: int = 0
    node_partials: str = "rows_dtype"  # Buffer(combine_node_partials=...)

    @property
    def world(self) -> int:
        return self.num_nodes * self.nvl


def make_input(case: Case, rank: int) -> RankInput:
    """Random node-limited routing with -1 entries, and random rows, for ``rank``."""
    g = torch.Generator().manual_seed(case.seed * 7919 + rank)
    n, e, m = case.tokens[rank], case.num_experts, case.num_nodes
    per_node = e // m
    kept = min(case.max_nodes, m)
    node_keys = torch.rand(n, m, generator=g)
    keep_nodes = torch.zeros(n, m, dtype=torch.bool)
    keep_nodes.scatter_(1, node_keys.topk(kept, dim=1).indices, True)
    expert_keys = torch.rand(n, e, generator=g)
    expert_keys[~keep_nodes.repeat_interleave(per_node, dim=1)] = -1.0
    topk_idx = expert_keys.topk(case.topk, dim=1).indices
    topk_idx[torch.rand(n, case.topk, generator=g) < case.drop_prob] = -1
    weights = torch.rand(n, case.topk, generator=g) if case.with_weights else None
    if case.kind == "fp8":
        data = (torch.randn(n, case.hidden, generator=g) * 64).to(torch.float8_e4m3fn)
        scales = torch.rand(n, case.hidden // 128, generator=g) + 0.5
        x = (data, scales)
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.kind]
        x = torch.randn(n, case.hidden, generator=g).to(dtype)
    return RankInput(x, topk_idx, weights)


def expert_output(recv_x, rank: int) -> torch.Tensor:
    """A deterministic stand-in for the experts: rows scaled by a per-rank factor, in bf16/fp32."""
    if isinstance(recv_x, tuple):
        data, scales = recv_x
        rows = data.float() * scales.repeat_interleave(128, dim=1)
        return (rows * (rank + 1) / 3).to(torch.bfloat16)
    return (recv_x.float() * (rank + 1) / 3).to(recv_x.dtype)


def same_bits(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@dataclass
class RankReport:
    traffic: dict = field(default_factory=dict)
    digest: list = field(default_factory=list)
    backend: str = ""  # the implementation that ran (Buffer._impl.name)
    kernel_epochs: int = 0  # sim: notifies counted on the device in the current layout (0 for torch)


def backends_for(num_nodes: int) -> list[str]:
    """The backends that run a topology of ``num_nodes`` nodes (sim: intranode kernels on one node,
    the two-hop internode kernels on several; cuda: one node, and only when EPCOMM_TEST_BACKENDS asks
    for it, see conftest.py)."""
    backends = ["torch", "sim"]
    if num_nodes == 1 and "cuda" in selected_backends():
        backends.append("cuda")
    return backends


def algorithms_for(num_nodes: int, backend: str) -> list[str]:
    """The algorithms ``backend`` runs on ``num_nodes`` nodes (the kernels are two-hop across nodes)."""
    if num_nodes == 1:
        return ["flat"]
    return ["two_hop"] if backend != "torch" else ["flat", "two_hop"]


def check_case(rank: int, world: int, case: Case, algorithm: str, rounds: int = 1, backend: str = "torch",
               num_nvl_bytes: int = 0) -> RankReport:
    """Dispatch, cached dispatch and combine on this rank; assert each output equals the reference."""
    buf = epcomm.Buffer(None, num_nvl_bytes, backend=backend, num_nvl_ranks=case.nvl, algorithm=algorithm,
                        max_nodes_per_token=case.max_nodes, timeout_s=60, combine_node_partials=case.node_partials)
    report = RankReport(backend=buf._impl.name)
    for _ in range(rounds):
        digest, report.traffic = check_round(buf, case, rank, world)
        report.digest.append(digest)
    report.kernel_epochs = buf._impl.notify_epoch() if backend == "sim" else 0  # a host read of the buffer
    return report


def _moved(value, device: torch.device):
    """A tensor, an FP8 pair or None on ``device``."""
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    return value.to(device) if isinstance(value, torch.Tensor) else value


def kernel_device(buf: "epcomm.Buffer") -> torch.device:
    """Where ``buf``'s backend wants its tensors: the current GPU for cuda, the CPU otherwise."""
    return getattr(buf._impl, "device", torch.device("cpu"))


def check_round(buf: "epcomm.Buffer", case: Case, rank: int, world: int) -> tuple[str, dict]:
    """One dispatch + cached dispatch + combine, checked; returns (digest of outputs, traffic).
    Inputs go to the backend's device, outputs come back to the CPU for the reference."""
    inputs = [make_input(case, r) for r in range(world)]
    device, cpu = kernel_device(buf), torch.device("cpu")
    mine = RankInput(_moved(inputs[rank].x, device), _moved(inputs[rank].topk_idx, device),
                     _moved(inputs[rank].topk_weights, device))
    refs = [reference_dispatch(inputs, case.num_experts, d) for d in range(world)]
    ref = refs[rank]
    buf.reset_traffic()
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(mine.topk_idx, case.num_experts)
    recv_x, recv_idx, recv_w, counts, handle, event = buf.dispatch(
        mine.x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights,
        expert_alignment=case.alignment,
    )
    event.current_stream_wait()
    recv_w_on_device = recv_w
    recv_x, recv_idx, recv_w = _moved(recv_x, cpu), _moved(recv_idx, cpu), _moved(recv_w, cpu)
    assert same_bits(recv_x, ref.recv_x), f"rank {rank}: recv_x differs from the reference"
    assert torch.equal(recv_idx, ref.recv_topk_idx), f"rank {rank}: recv_topk_idx differs"
    assert same_bits(recv_w, ref.recv_topk_weights), f"rank {rank}: recv_topk_weights differs"
    aligned = [-(-c // case.alignment) * case.alignment for c in ref.num_recv_tokens_per_expert]
    assert counts == aligned, f"rank {rank}: per-expert counts {counts} != {aligned}"
    assert handle.num_recv_tokens == len(ref.sources)

    cached = buf.dispatch(mine.x, handle=handle)
    assert same_bits(_moved(cached[0], cpu), ref.recv_x), f"rank {rank}: cached dispatch differs"
    assert all(v is None for v in cached[1:5])

    outputs = [expert_output(r.recv_x, d) for d, r in enumerate(refs)]
    combined, combined_w, _ = buf.combine(_moved(outputs[rank], device), handle, topk_weights=recv_w_on_device)
    combined, combined_w = _moved(combined, cpu), _moved(combined_w, cpu)
    sources = [r.sources for r in refs]
    want = reference_combine(sources, outputs, case.tokens[rank], rank, case.nvl, case.node_partials)
    assert same_bits(combined, want), f"rank {rank}: combined_x differs from the reference"
    if case.with_weights:
        want_w = reference_combine(sources, [r.recv_topk_weights for r in refs], case.tokens[rank], rank, case.nvl,
                                   case.node_partials)
        assert same_bits(combined_w, want_w), f"rank {rank}: combined_topk_weights differs"
    digest = hashlib.sha256()
    for t in (recv_x if isinstance(recv_x, tuple) else (recv_x,)) + (combined, combined_w if combined_w is not None else combined):
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), buf.traffic.as_dict()


def expected_pairs(case: Case) -> tuple[int, int]:
    """(token, destination node) pairs and (token, destination rank) pairs that cross nodes."""
    node_pairs = rank_pairs = 0
    per_rank = case.num_experts // case.world
    for s in range(case.world):
        src_node = s // case.nvl
        for row in make_input(case, s).topk_idx.tolist():
            ranks = {e // per_rank for e in row if e >= 0}
            nodes = {r // case.nvl for r in ranks}
            node_pairs += len(nodes - {src_node})
            rank_pairs += sum(1 for r in ranks if r // case.nvl != src_node)
    return node_pairs, rank_pairs
