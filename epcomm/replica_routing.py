"""Routing (token, logical expert) pairs to the physical replicas of a :class:`~epcomm.eplb.Placement`.

A router picks *logical* experts; with redundant experts each logical expert has
one or more *physical* slots (replicas, identical weights). Dispatch works on
physical ids: :func:`logical_to_physical` maps every pair of ``topk_idx`` to one
slot, and the result goes to :meth:`Buffer.get_dispatch_layout` / ``dispatch``
with ``num_experts = placement.num_physical``. epcomm's uniform rule (expert
``p`` on rank ``p // (R / P)``) is the placement's slot-to-GPU rule, so nothing
else changes; combine is unchanged because the gate weights travel with the
pairs.

Conventions: slot ``p`` lives on GPU (rank) ``p // placement.slots_per_gpu``;
GPU ``g`` on node ``g // num_nvl_ranks``. Every function here is deterministic:
the same inputs give the same slots on every rank and every run.

Policies
--------
``"local"`` (static; needs nothing but this rank's ``topk_idx``). For each pair:

1. the replicas of the expert on this rank, if any (no communication at all);
2. else the replicas on this rank's node (NVLink, no network bytes);
3. else all replicas, preferring those on a node the token already goes to
   (a two-hop dispatch sends a token once per destination node, so a replica
   on an already-used node costs no extra network row, and the token's node
   count does not grow).

Within the chosen set the ``k``-th pair of an expert on this rank (pairs in
token-major order) takes candidate ``(k + rank) mod m``: every rank spreads each
expert's pairs evenly over its candidates (counts differ by at most one), and
the ``+ rank`` offset keeps ranks with few tokens from all picking the first.

``"dynamic"`` (per step; needs ``expert_counts``, every rank's per-logical-expert
pair counts, from :func:`gather_expert_counts`: one ``all_gather`` of
``[world, n]`` int64). Every rank computes the same plan from those counts
(:func:`dynamic_plan`), without further communication:

1. each expert's global count is split over the GPUs holding its replicas so
   that the largest per-GPU load is *minimal* (exact integer optimum: binary
   search on the load, a max-flow feasibility check per candidate load);
2. each source rank's share of each GPU's quota is fixed by a transport that
   fills own-rank, then own-node, then the rest (in rank order);
3. rank ``s`` sends its ``k``-th pair of expert ``e`` to the GPU whose interval
   of its share contains ``k``; several replicas of ``e`` on one GPU split the
   GPU's pairs round-robin.

Node cap
--------
After mapping, the distinct nodes of each token are counted; a token over
``max_nodes_per_token`` raises ``ValueError``. Both policies avoid that where
the replicas allow: the local policy through rule 3 above; the dynamic policy
re-maps only the tokens its quota assignment pushed over the cap, with the
local policy's node preference (this moves a few pairs off their quota, so the
load can exceed the plan's optimum by those pairs). Placements from
:func:`~epcomm.eplb.rebalance_experts`' hierarchical policy keep all replicas
of an expert on one node, so there the mapping never changes a token's nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._comm import _all_gather_single
from .eplb import Placement

__all__ = [
    "POLICIES",
    "dynamic_plan",
    "gather_expert_counts",
    "logical_counts",
    "logical_to_physical",
    "optimal_max_load",
    "rank_loads",
]

POLICIES = ("local", "dynamic")


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_placement(placement: object) -> Placement:
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be an epcomm.eplb.Placement, got {type(placement).__name__}")
    if placement.layered:
        raise ValueError(
            f"placement has {placement.num_layers} layers; replica routing maps one layer at a time: "
            f"pass placement.layer(i)"
        )
    return placement


def _check_topk_idx(topk_idx: object, num_logical: int) -> Tensor:
    if not isinstance(topk_idx, Tensor):
        raise TypeError(f"topk_idx must be a torch.Tensor, got {type(topk_idx).__name__}")
    if topk_idx.dtype != torch.int64 or topk_idx.dim() != 2:
        raise ValueError(
            f"topk_idx must be int64 [num_tokens, num_topk], got {topk_idx.dtype} of shape {tuple(topk_idx.shape)}"
        )
    if topk_idx.numel():
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_logical:
            raise ValueError(
                f"topk_idx entries must be -1 (no expert) or logical expert ids in [0, {num_logical}), "
                f"got values in [{lo}, {hi}]; pass logical ids, not physical ones"
            )
    return topk_idx


def _check_topology(placement: Placement, rank: object, num_nvl_ranks: object) -> tuple[int, int]:
    """``(rank, num_nvl_ranks)`` checked against the placement's GPU count."""
    P = placement.num_gpus
    if not _is_int(rank) or not 0 <= rank < P:  # type: ignore[operator]
        raise ValueError(f"rank must be an int in [0, placement.num_gpus={P}), got {rank!r}")
    nvl = P if num_nvl_ranks is None else num_nvl_ranks
    if not _is_int(nvl) or nvl < 1 or P % nvl:  # type: ignore[operator]
        raise ValueError(
            f"num_nvl_ranks must be a positive divisor of placement.num_gpus={P} (ranks per node), got {nvl!r}"
        )
    return rank, nvl  # type: ignore[return-value]


def _check_counts(expert_counts: object, num_gpus: int, num_logical: int) -> Tensor:
    if not isinstance(expert_counts, Tensor):
        raise TypeError(
            f"expert_counts must be an int64 [world={num_gpus}, num_logical={num_logical}] tensor "
            f"(from gather_expert_counts), got {type(expert_counts).__name__}"
        )
    if expert_counts.dtype != torch.int64 or tuple(expert_counts.shape) != (num_gpus, num_logical):
        raise ValueError(
            f"expert_counts must be int64 [world={num_gpus}, num_logical={num_logical}] "
            f"(from gather_expert_counts), got {expert_counts.dtype} of shape {tuple(expert_counts.shape)}"
        )
    if expert_counts.numel() and int(expert_counts.min()) < 0:
        raise ValueError("expert_counts must be >= 0 (pair counts)")
    return expert_counts.cpu()


# --------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------


def logical_counts(topk_idx: Tensor, num_logical: int) -> Tensor:
    """Pairs per logical expert in ``topk_idx`` (``-1`` ignored): int64 ``[num_logical]`` on the CPU."""
    _check_topk_idx(topk_idx, num_logical)
    ids = topk_idx[topk_idx >= 0].cpu()
    return torch.bincount(ids, minlength=num_logical).to(torch.int64)


def gather_expert_counts(topk_idx: Tensor, num_logical: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's pairs per logical expert, for ``policy="dynamic"`` (a collective: one ``all_gather``).

    Args:
        topk_idx: int64 ``[num_tokens, num_topk]``, this rank's logical routing (``-1``: no expert).
        num_logical: logical experts ``n``.
        group: process group (``None``: the default group); NCCL groups get a CUDA tensor.

    Returns:
        int64 ``[world, n]`` on the CPU, row ``s`` = rank ``s``'s counts; identical on every rank.
        ``.sum(0)`` is the step's global per-expert load.
    """
    counts = logical_counts(topk_idx, num_logical)
    device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
    world = dist.get_world_size(group)
    out = torch.empty(world * num_logical, dtype=torch.int64, device=device)
    _all_gather_single(out, counts.to(device), group=group)
    return out.view(world, num_logical).cpu()


# --------------------------------------------------------------------------
# placement tables
# --------------------------------------------------------------------------


def _tables(placement: Placement, nvl: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(slots [n, M] (-1 padded), count [n], gpu_of [n, M], node_of [n, M])`` of every replica."""
    cnt = placement.logcnt.cpu()
    slots = placement.log2phy.cpu()[:, : int(cnt.max())]
    valid = slots >= 0
    gpu = torch.where(valid, slots // placement.slots_per_gpu, -1)
    node = torch.where(valid, gpu // nvl, -1)
    return slots, cnt, gpu, node


def _candidates(placement: Placement, rank: int, nvl: int) -> tuple[Tensor, Tensor]:
    """The local policy's tiers: per expert, its replicas on ``rank``, else on its node, else all.

    Returns ``(cand [n, M] (-1 padded, ascending), ncand [n])``.
    """
    slots, cnt, gpu, node = _tables(placement, nvl)
    valid = slots >= 0
    own = valid & (gpu == rank)
    near = valid & (node == rank // nvl)
    choice = torch.where(own.any(1, keepdim=True), own, torch.where(near.any(1, keepdim=True), near, valid))
    return _compact(slots, choice)


def _compact(slots: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the ``keep`` entries of each row of ``slots``, moved to the front in order; ``-1`` padded."""
    # stable sort by "not kept" keeps the kept entries first, in their original (ascending) order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    kept = torch.gather(torch.where(keep, slots, -1), 1, order)
    return kept, keep.sum(1)


def _occurrence(topk_idx: Tensor, num_logical: int) -> Tensor:
    """int64 like ``topk_idx``: the pair's index among this rank's pairs of the same expert (token-major)."""
    flat = topk_idx.reshape(-1)
    key = torch.where(flat >= 0, flat, num_logical)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    starts = torch.searchsorted(sorted_key, sorted_key, right=False)
    occ = torch.empty_like(flat)
    occ[order] = torch.arange(flat.numel()) - starts
    return occ.view_as(topk_idx)


# --------------------------------------------------------------------------
# node-aware choice among candidates
# --------------------------------------------------------------------------


def _map_preferring_used_nodes(
    idx: Tensor, occ: Tensor, cand: Tensor, ncand: Tensor, spg: int, nvl: int, num_nodes: int, rank: int
) -> tuple[Tensor, Tensor]:
    """Map ``idx`` ``[T, K]`` to slots among ``cand``; return ``(slots [T, K], used nodes [T, N] bool)``.

    Experts whose candidates all sit on one node are mapped first (their node is
    forced); then, column by column, the others take a candidate on a node the
    token already uses if one exists, else any candidate; both spread by
    ``(occ + rank) mod count``.
    """
    T, K = idx.shape
    valid = idx >= 0
    e = idx.clamp_min(0)
    cnode = torch.where(cand >= 0, cand // spg // nvl, -1)  # [n, M]
    first_node = cnode[:, :1]
    single_node = ((cnode == first_node) | (cand < 0)).all(1)  # [n]
    spread = (occ + rank) % ncand[e]  # [T, K]
    slots = torch.where(valid, torch.gather(cand[e], 2, spread.unsqueeze(2)).squeeze(2), -1)
    used = torch.zeros(T, num_nodes, dtype=torch.bool)
    forced = valid & single_node[e]
    rows = torch.arange(T).unsqueeze(1).expand(T, K)
    used[rows[forced], cnode[e[forced], 0]] = True
    flexible = valid & ~single_node[e]
    for k in range(K):
        todo = flexible[:, k].nonzero().flatten()
        if todo.numel() == 0:
            continue
        ek = e[todo, k]
        c, cn = cand[ek], cnode[ek]  # [t, M]
        pref = (c >= 0) & torch.gather(used[todo], 1, cn.clamp_min(0))
        npref = pref.sum(1)
        pick_set = torch.where((npref > 0).unsqueeze(1), pref, c >= 0)
        npick = pick_set.sum(1)
        target = (occ[todo, k] + rank) % npick  # the target-th True of pick_set
        pos = (torch.cumsum(pick_set.to(torch.int64), 1) - 1 == target.unsqueeze(1)) & pick_set
        col = pos.to(torch.int8).argmax(1)
        chosen = c.gather(1, col.unsqueeze(1)).squeeze(1)
        slots[todo, k] = chosen
        used[todo, chosen // spg // nvl] = True
    return slots, used


def _check_node_cap(idx: Tensor, slots: Tensor, used: Tensor, cap: int, rank: int, spg: int, nvl: int) -> None:
    over = used.sum(1) > cap
    if bool(over.any()):
        t = int(over.nonzero()[0])
        pairs = [(int(e), int(s), int(s) // spg // nvl) for e, s in zip(idx[t], slots[t]) if int(e) >= 0]
        raise ValueError(
            f"rank {rank}: {int(over.sum())} token(s) would go to more than max_nodes_per_token={cap} nodes "
            f"after replica routing; token {t} (logical expert, slot, node): {pairs}. No choice of replicas "
            f"keeps it within the cap: route with a node-limited gate over the placement's nodes, use a "
            f"hierarchical placement (rebalance_experts with num_groups divisible by num_nodes keeps every "
            f"expert's replicas on one node), or raise max_nodes_per_token"
        )


# --------------------------------------------------------------------------
# dynamic policy: exact min-max split of each step's counts over replicas
# --------------------------------------------------------------------------


def _max_flow(cap: list[dict[int, int]], source: int, sink: int) -> tuple[int, list[dict[int, int]]]:
    """Dinic's max flow on a small graph given as residual capacities ``cap[u][v]``; returns (value, flow).

    Deterministic: adjacency is visited in ascending node order.
    """
    num = len(cap)
    residual = [dict(c) for c in cap]
    for u in range(num):
        for v in list(cap[u]):
            residual[v].setdefault(u, 0)
    adj = [sorted(residual[u]) for u in range(num)]
    total = 0
    while True:
        level = [-1] * num
        level[source] = 0
        queue = [source]
        for u in queue:
            for v in adj[u]:
                if level[v] < 0 and residual[u][v] > 0:
                    level[v] = level[u] + 1
                    queue.append(v)
        if level[sink] < 0:
            break
        it = [0] * num

        def push(u: int, limit: int) -> int:
            if u == sink:
                return limit
            while it[u] < len(adj[u]):
                v = adj[u][it[u]]
                if level[v] == level[u] + 1 and residual[u][v] > 0:
                    got = push(v, min(limit, residual[u][v]))
                    if got:
                        residual[u][v] -= got
                        residual[v][u] += got
                        return got
                it[u] += 1
            return 0

        while True:
            got = push(source, 1 << 62)
            if not got:
                break
            total += got
    flow = [{v: cap[u][v] - residual[u][v] for v in cap[u]} for u in range(num)]
    return total, flow


def _split_over_gpus(totals: Tensor, placement: Placement) -> tuple[Tensor, int]:
    """``(quota int64 [n, P], max load)``: each expert's count split over its replicas' GPUs, min-max optimal.

    Experts whose replicas share one GPU load it fixedly; the others ("flexible")
    are a transportation problem. A load ``L`` is feasible iff the max flow
    source -> expert (its count) -> its GPUs -> sink (``L - fixed load``)
    saturates every expert; the smallest feasible integer ``L`` is found by
    binary search between ``max(ceil(total / P), largest fixed load)`` (a lower
    bound) and the largest fixed load plus every flexible pair (feasible).
    """
    n, P = placement.num_logical, placement.num_gpus
    slots, _, gpu, _ = _tables(placement, P)
    quota = torch.zeros(n, P, dtype=torch.int64)
    fixed = [0] * P
    flexible: list[tuple[int, list[int]]] = []
    tot = totals.tolist()
    for e in range(n):
        gpus = sorted({int(g) for g in gpu[e] if int(g) >= 0})
        if len(gpus) == 1 or tot[e] == 0:
            quota[e, gpus[0]] = tot[e]
            fixed[gpus[0]] += tot[e]
        else:
            flexible.append((e, gpus))
    flex_total = sum(tot[e] for e, _ in flexible)
    lo = max(max(fixed), -(-sum(tot) // P))
    hi = max(fixed) + flex_total
    if not flexible:
        return quota, max(fixed)
    F = len(flexible)
    source, sink = F + P, F + P + 1

    def graph(load: int) -> list[dict[int, int]]:
        cap: list[dict[int, int]] = [dict() for _ in range(F + P + 2)]
        for i, (e, gpus) in enumerate(flexible):
            cap[source][i] = tot[e]
            for g in gpus:
                cap[i][F + g] = tot[e]
        for g in range(P):
            cap[F + g][sink] = load - fixed[g]
        return cap

    while lo < hi:
        mid = (lo + hi) // 2
        if _max_flow(graph(mid), source, sink)[0] == flex_total:
            hi = mid
        else:
            lo = mid + 1
    _, flow = _max_flow(graph(lo), source, sink)
    for i, (e, gpus) in enumerate(flexible):
        for g in gpus:
            quota[e, g] = flow[i][F + g]
    return quota, lo


def _transport(supply: list[int], demand: dict[int, int], nvl: int) -> list[tuple[int, int, int]]:
    """Split ``demand[g]`` (one expert's GPU quotas) over sources ``supply[s]``: own rank, own node, then the rest.

    ``sum(supply) == sum(demand.values())``. Each stage is a north-west-corner fill in
    rank order, so the result depends only on the inputs. Returns ``(s, g, pairs)`` triples.
    """
    share: list[tuple[int, int, int]] = []
    sup, dem = list(supply), dict(demand)

    def fill(sources: list[int], sinks: list[int]) -> None:
        j = 0
        for s in sources:
            while sup[s] and j < len(sinks):
                g = sinks[j]
                take = min(sup[s], dem[g])
                if take:
                    share.append((s, g, take))
                    sup[s] -= take
                    dem[g] -= take
                if not dem[g]:
                    j += 1

    gpus = sorted(dem)
    for g in gpus:  # own rank
        fill([g], [g])
    for node in sorted({g // nvl for g in gpus}):  # own node
        fill(list(range(node * nvl, (node + 1) * nvl)), [g for g in gpus if g // nvl == node and dem[g]])
    fill(list(range(len(sup))), [g for g in gpus if dem[g]])  # the rest
    return share


def dynamic_plan(expert_counts: Tensor, placement: Placement, *, num_nvl_ranks: int | None = None) -> Tensor:
    """The dynamic policy's plan: pairs each source rank sends to each GPU for each logical expert.

    Args:
        expert_counts: int64 ``[world, n]``, every rank's pairs per logical expert
            (:func:`gather_expert_counts`); ``world == placement.num_gpus``.
        placement: a single-layer :class:`~epcomm.eplb.Placement`.
        num_nvl_ranks: ranks per node (``None``: one node); only steers locality.

    Returns:
        int64 ``[world, n, P]``: ``plan[s, e, g]`` pairs of expert ``e`` from rank
        ``s`` go to GPU ``g`` (only GPUs holding a replica of ``e``). Summed over
        ``s`` and ``e`` it gives each GPU's load, whose maximum is the smallest
        any split of these counts over the replicas can reach
        (:func:`optimal_max_load`). Identical on every rank for identical counts.
    """
    placement = _check_placement(placement)
    _, nvl = _check_topology(placement, 0, num_nvl_ranks)
    counts = _check_counts(expert_counts, placement.num_gpus, placement.num_logical)
    quota, _ = _split_over_gpus(counts.sum(0), placement)
    world, n = counts.shape
    plan = torch.zeros(world, n, world, dtype=torch.int64)
    # an expert whose quota sits on one GPU: every source sends it all its pairs (no transport needed)
    gpus_used = (quota > 0).sum(1)
    single = (gpus_used <= 1).nonzero().flatten()
    target = quota[single].argmax(1)
    plan[:, single, target] = counts[:, single]
    supply_all = counts.t().tolist()
    for e in (gpus_used > 1).nonzero().flatten().tolist():
        demand = {g: q for g, q in enumerate(quota[e].tolist()) if q}
        for s, g, take in _transport(supply_all[e], demand, nvl):
            plan[s, e, g] = take
    return plan


def optimal_max_load(total_counts: Tensor, placement: Placement) -> int:
    """Smallest possible max per-GPU load for per-logical-expert counts ``total_counts`` int64 ``[n]``.

    The optimum over every split of each expert's pairs over its replicas
    (what :func:`dynamic_plan` attains, before any node-cap repair).
    """
    placement = _check_placement(placement)
    if not isinstance(total_counts, Tensor) or total_counts.shape != (placement.num_logical,):
        raise ValueError(f"total_counts must be a [{placement.num_logical}] tensor")
    return _split_over_gpus(total_counts.to(torch.int64).cpu(), placement)[1]


def _map_dynamic(idx: Tensor, occ: Tensor, placement: Placement, plan_row: Tensor, nvl: int) -> Tensor:
    """Rank's pairs -> slots following its row of the plan, ``plan_row`` ``[n, P]``."""
    slots_tab, cnt, gpu, _ = _tables(placement, nvl)
    n, P = plan_row.shape
    valid = idx >= 0
    e = idx.clamp_min(0)
    # the k-th pair of e goes to the GPU whose interval [start_g, start_g + plan[e, g]) holds k
    ends = torch.cumsum(plan_row, 1)  # [n, P]
    g = torch.searchsorted(ends[e.reshape(-1)], occ.reshape(-1, 1), right=True).reshape(idx.shape)
    g = g.clamp_max(P - 1)
    start = torch.where(g > 0, ends[e, (g - 1).clamp_min(0)], 0)
    within = occ - start  # index among this rank's pairs of e sent to GPU g
    on_g = (gpu[e] == g.unsqueeze(2)) & (slots_tab[e] >= 0)  # [T, K, M]
    nslots = on_g.sum(2).clamp_min(1)
    target = within % nslots
    pos = (torch.cumsum(on_g.to(torch.int64), 2) - 1 == target.unsqueeze(2)) & on_g
    col = pos.to(torch.int8).argmax(2)
    slot = torch.gather(slots_tab[e], 2, col.unsqueeze(2)).squeeze(2)
    return torch.where(valid, slot, -1)


# --------------------------------------------------------------------------
# the mapping
# --------------------------------------------------------------------------


def logical_to_physical(
    topk_idx: Tensor,
    placement: Placement,
    rank: int,
    *,
    num_nvl_ranks: int | None = None,
    policy: str = "local",
    max_nodes_per_token: int = 4,
    expert_counts: Tensor | None = None,
) -> Tensor:
    """Map each (token, logical expert) pair to one physical replica (see the module docstring).

    Args:
        topk_idx: int64 ``[num_tokens, num_topk]``, logical expert ids, ``-1`` = no expert.
        placement: a single-layer :class:`~epcomm.eplb.Placement` (``placement.layer(i)``
            of a layered one) with ``num_gpus`` equal to the group size.
        rank: this rank, in ``[0, placement.num_gpus)``.
        num_nvl_ranks: ranks per node (the Buffer's ``num_nvl_ranks``); ``None`` means
            one node of ``placement.num_gpus`` ranks.
        policy: ``"local"`` (static: own rank, own node, then spread) or ``"dynamic"``
            (per-step min-max split; needs ``expert_counts``).
        max_nodes_per_token: the Buffer's node cap, checked after mapping.
        expert_counts: ``"dynamic"`` only: int64 ``[world, n]`` from :func:`gather_expert_counts`
            for this step (the same tensor on every rank).

    Returns:
        int64 ``[num_tokens, num_topk]`` on ``topk_idx``'s device: physical slot ids in
        ``[0, placement.num_physical)``, ``-1`` where ``topk_idx`` is ``-1``. Feed it to
        dispatch with ``num_experts=placement.num_physical``.

    Raises:
        TypeError / ValueError: bad arguments (named), or a token that the mapping cannot
            keep within ``max_nodes_per_token`` nodes.
    """
    placement = _check_placement(placement)
    n, spg = placement.num_logical, placement.slots_per_gpu
    idx = _check_topk_idx(topk_idx, n)
    rank, nvl = _check_topology(placement, rank, num_nvl_ranks)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not _is_int(max_nodes_per_token) or max_nodes_per_token < 1:
        raise ValueError(f"max_nodes_per_token must be an int >= 1, got {max_nodes_per_token!r}")
    if policy == "local" and expert_counts is not None:
        raise ValueError("expert_counts is only used by policy='dynamic'; drop it or pass policy='dynamic'")
    if policy == "dynamic" and expert_counts is None:
        raise ValueError(
            "policy='dynamic' needs expert_counts: every rank's per-logical-expert counts for this step, "
            "from epcomm.eplb.gather_expert_counts(topk_idx, num_logical, group) (one all_gather)"
        )
    device = idx.device
    idx = idx.cpu()
    num_nodes = placement.num_gpus // nvl
    occ = _occurrence(idx, n)
    if policy == "local":
        cand, ncand = _candidates(placement, rank, nvl)
        slots, used = _map_preferring_used_nodes(idx, occ, cand, ncand, spg, nvl, num_nodes, rank)
    else:
        counts = _check_counts(expert_counts, placement.num_gpus, n)
        if not torch.equal(counts[rank], logical_counts(idx, n)):
            raise ValueError(
                f"expert_counts[{rank}] does not match this rank's topk_idx: pass this step's counts "
                f"(gather_expert_counts on the same topk_idx)"
            )
        plan = dynamic_plan(counts, placement, num_nvl_ranks=nvl)
        slots = _map_dynamic(idx, occ, placement, plan[rank], nvl)
        used = torch.zeros(idx.shape[0], num_nodes, dtype=torch.bool)
        valid = idx >= 0
        rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
        used[rows[valid], slots[valid] // spg // nvl] = True
        over = (used.sum(1) > max_nodes_per_token).nonzero().flatten()
        if over.numel():
            # repair only the tokens the quotas pushed over the cap, with the node-preferring choice
            slots_tab, cnt, _, _ = _tables(placement, nvl)
            fixed_slots, fixed_used = _map_preferring_used_nodes(
                idx[over], occ[over], slots_tab, cnt, spg, nvl, num_nodes, rank
            )
            slots[over], used[over] = fixed_slots, fixed_used
    _check_node_cap(idx, slots, used, max_nodes_per_token, rank, spg, nvl)
    return slots.to(device)


def rank_loads(physical_idx: Tensor, placement: Placement) -> Tensor:
    """Pairs per GPU in a (mapped) ``physical_idx`` ``[num_tokens, num_topk]``: int64 ``[P]`` (``-1`` ignored)."""
    placement = _check_placement(placement)
    ids = physical_idx[physical_idx >= 0].cpu()
    per_slot = torch.bincount(ids, minlength=placement.num_physical)
    return per_slot.view(placement.num_gpus, placement.slots_per_gpu).sum(1)
