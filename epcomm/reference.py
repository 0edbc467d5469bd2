"""Executable specification of dispatch and combine, in one process.

Written token by token from the contract, deliberately not sharing code with
any backend, so that tests and the demo can check every backend against it.
The one definition it shares is the contract's expert placement: which global
experts a rank hosts (:meth:`ExpertPlacement.local_experts
<epcomm.placement.ExpertPlacement.local_experts>`, a ``range``), checked
against brute-force loops in ``tests/test_placement.py``.
Inputs are the per-rank arguments of all ranks; outputs are what each rank
must receive. Slow by design: use it on test-sized problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .placement import ExpertPlacement

__all__ = ["RankInput", "ReferenceDispatch", "reference_dispatch", "reference_combine"]


@dataclass
class RankInput:
    """One rank's dispatch arguments: ``x`` ``[N, H]`` (or FP8 pair) and ``topk_idx`` ``[N, K]``."""

    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor | None = None


@dataclass
class ReferenceDispatch:
    """What one rank receives."""

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor | None
    num_recv_tokens_per_expert: list[int]  # not rounded
    sources: list[tuple[int, int]]  # (source rank, source token) of each received row


def reference_dispatch(inputs: list[RankInput], num_experts: int, rank: int) -> ReferenceDispatch:
    """Rows rank ``rank`` receives: one per (token, rank) pair, by source rank then token."""
    # the global ids of this rank's experts; local id i is hosted[i] (-1 is never in it)
    hosted = ExpertPlacement.uniform(num_experts, len(inputs)).local_experts(rank)
    rows, scales, idx, weights, sources = [], [], [], [], []
    for s, inp in enumerate(inputs):
        data = inp.x[0] if isinstance(inp.x, tuple) else inp.x
        for t, expert_row in enumerate(inp.topk_idx.tolist()):
            if not any(e in hosted for e in expert_row):
                continue
            sources.append((s, t))
            rows.append(data[t])
            if isinstance(inp.x, tuple):
                scales.append(inp.x[1][t])
            local = [hosted.index(e) if e in hosted else -1 for e in expert_row]
            idx.append(torch.tensor(local, dtype=torch.int64))
            if inp.topk_weights is not None:
                w = inp.topk_weights[t].clone()
                w[torch.tensor(local) < 0] = 0.0
                weights.append(w)
    first = inputs[0]
    hidden = (first.x[0] if isinstance(first.x, tuple) else first.x).size(1)
    dtype = (first.x[0] if isinstance(first.x, tuple) else first.x).dtype
    num_topk = first.topk_idx.size(1)
    recv_data = torch.stack(rows) if rows else torch.empty(0, hidden, dtype=dtype)
    recv_x = recv_data
    if isinstance(first.x, tuple):
        recv_x = (recv_data, torch.stack(scales) if scales else torch.empty(0, hidden // 128))
    recv_idx = torch.stack(idx) if idx else torch.empty(0, num_topk, dtype=torch.int64)
    recv_w = None
    if first.topk_weights is not None:
        recv_w = torch.stack(weights) if weights else torch.empty(0, num_topk)
    counts = [int((recv_idx == e).sum()) for e in range(len(hosted))]
    return ReferenceDispatch(recv_x, recv_idx, recv_w, counts, sources)


def reference_combine(
    recv_sources: list[list[tuple[int, int]]],
    expert_outputs: list[torch.Tensor],
    num_tokens: int,
    rank: int,
    num_nvl_ranks: int,
    node_partials: str | torch.dtype = "rows_dtype",
) -> torch.Tensor:
    """``combined_x`` of rank ``rank``: per token, the fp32 sum of its rows per node, then over nodes.

    Args:
        recv_sources: per rank ``d``, the (source rank, token) of each row it received.
        expert_outputs: per rank ``d``, ``[num_recv_d, H]`` the rows it sends back.
        num_tokens: tokens rank ``rank`` dispatched.
        node_partials: ``"rows_dtype"`` rounds each node's partial to the rows' dtype (what
            two-hop combine sends across nodes), ``"float32"`` keeps it (one rounding in all), a
            dtype rounds it to that dtype (float32 rows of a bf16 combine with bias).
    Order: ``acc = 0``; for each node ascending: ``partial = 0``; ``partial += float(row_d)``
    for each rank ``d`` of the node ascending holding a row of the token; in ``rows_dtype`` mode,
    when the group spans several nodes, ``partial = float(dtype(partial))``; ``acc += partial``.
    Finally ``dtype(acc)``.
    """
    if node_partials not in ("rows_dtype", "float32") and not isinstance(node_partials, torch.dtype):
        raise ValueError(f"node_partials must be 'rows_dtype', 'float32' or a dtype, got {node_partials!r}")
    world = len(expert_outputs)
    hidden = expert_outputs[0].size(1)
    dtype = expert_outputs[0].dtype
    partial_dtype = {"rows_dtype": dtype, "float32": torch.float32}.get(node_partials, node_partials)
    where: dict[int, dict[int, int]] = {t: {} for t in range(num_tokens)}  # token -> {d: row}
    for d in range(world):
        for row, (s, t) in enumerate(recv_sources[d]):
            if s == rank:
                where[t][d] = row
    out = torch.zeros(num_tokens, hidden, dtype=dtype)
    for t in range(num_tokens):
        acc = torch.zeros(hidden, dtype=torch.float32)
        for node in range(world // num_nvl_ranks):
            node_ranks = [d for d in range(node * num_nvl_ranks, (node + 1) * num_nvl_ranks) if d in where[t]]
            if not node_ranks:
                continue
            partial = torch.zeros(hidden, dtype=torch.float32)
            for d in node_ranks:
                partial = partial + expert_outputs[d][where[t][d]].float()
            if world > num_nvl_ranks:  # partials cross nodes only when there are several
                partial = partial.to(partial_dtype).float()
            acc = acc + partial
        out[t] = acc.to(dtype)
    return out
