"""Expert-parallel load balancing (EPLB): where to put redundant expert replicas.

A MoE layer has ``n`` *logical* experts whose loads (tokens routed to each,
measured over some window) are uneven. With ``R >= n`` *physical* expert slots
spread evenly over ``P`` GPUs (``R / P`` slots each), the hot experts can be
replicated: a logical expert with ``c`` replicas has its load split evenly over
them (a dispatcher that routes to replicas spreads the expert's tokens over
them; epcomm's dispatch does not route to replicas yet). This module decides
how many replicas each expert gets and which slot each replica takes, so that
the most loaded GPU carries as little as possible.

Conventions (the same in every function here):

* Physical slot ``p`` lives on GPU ``p // (R / P)``; GPU ``g`` lives on node
  ``g // (P / num_nodes)``. The slots of one GPU are listed by ascending logical
  expert id.
* ``phy2log``: ``int64 [L, R]``, the logical expert held by each slot.
* ``log2phy``: ``int64 [L, n, M]``, the slots of each logical expert, ascending,
  padded with ``-1``; ``M`` is the largest replica count over all layers.
* ``logcnt``:  ``int64 [L, n]``, replicas per logical expert (always ``>= 1``).
* Expert groups are contiguous blocks of ``n / num_groups`` logical experts (the
  groups a group-limited router such as DeepSeek-V3's picks from).

Policy (:func:`rebalance_experts`), per layer:

* **Hierarchical** when ``num_groups % num_nodes == 0``: whole groups are packed
  onto nodes, ``num_groups / num_nodes`` per node, balancing node load (the
  partition with the smallest maximum node load, found exhaustively when there
  are at most 20000 partitions, else largest-first), so a router that limits each
  token to a few groups also limits it to the nodes holding them. Each node then
  fills its own ``R / num_nodes`` slots with its own experts:

  1. replica counts: water-filling (start from one replica each and give the next
     one to the expert with the largest load per replica, which minimises the
     largest replica load), plus a few alternatives (below);
  2. packing onto the node's GPUs with exactly ``R / P`` slots each: replicas by
     descending load, each onto the least loaded GPU that still has a free slot;
  3. local search: swap replicas between the most loaded GPU and another while
     that lowers the pair's maximum, and move a slot from a replicated expert to
     another expert while that lowers the node's maximum (replica counts change).
* **Global** otherwise: the same on one node made of all GPUs (groups play no
  part).

Packing is NP-hard and the local search stops at local optima, so step 1 has
alternatives, each taken through steps 2-3: "targeted" counts (every replica
at most the node's lower bound, leftover slots as fillers on the coldest
experts), counts in proportion to load, the baseline's round-robin counts, 8
random draws from a generator with a fixed seed (so the result is still
deterministic), and the baseline's own placement.
Per node the candidate with the smallest maximum GPU load wins; in hierarchical
mode this is done for the balanced and for the baseline's contiguous
group-to-node assignment and the better layer is kept. Since the baseline's
placement, improved by a search that never raises the maximum, is always a
candidate, ``max GPU load(policy) <= max GPU load(greedy_baseline)`` for every
input (up to float rounding of the per-GPU sums), not just usually.

:func:`fractional_lower_bound` is a lower bound on the maximum GPU load of *any*
placement with the same ``R`` and ``P`` (given the groups and nodes: of any that
keeps groups on nodes), so ``policy / bound`` bounds how far the policy can be
from optimal.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Placement",
    "fractional_lower_bound",
    "greedy_baseline",
    "rebalance_experts",
]


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------


def _check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int, or TypeError (not an int) / ValueError (``< minimum``) naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_weight(weight: object, *, ndims: tuple[int, ...] = (2,)) -> Tensor:
    """Validate the loads; return them as a float64 CPU tensor of the same shape.

    Raises:
        TypeError: not a tensor, or a bool/complex dtype.
        ValueError: wrong number of dims, an empty dim, NaN/inf or negative entries
            (the message names the first offending entry).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"weight must be a real (float or int) tensor, got {weight.dtype}")
    if weight.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        shape = "[num_layers, num_logical]" if ndims == (2,) else "[num_logical] or [num_layers, num_logical]"
        raise ValueError(f"weight must be {want} {shape}, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"weight must be finite, got {w[where].item()} at index {where}")
    neg = w < 0
    if bool(neg.any()):
        where = tuple(int(i) for i in neg.nonzero()[0])
        raise ValueError(f"weight must be >= 0 (loads), got {w[where].item()} at index {where}")
    return w


def _check_sizes(n_logical: int, num_replicas: object, num_gpus: object) -> tuple[int, int]:
    """Validate ``num_replicas`` and ``num_gpus`` against ``n_logical``; return them."""
    _check_int("num_replicas", num_replicas)
    _check_int("num_gpus", num_gpus)
    if num_replicas < n_logical:  # type: ignore[operator]
        raise ValueError(
            f"num_replicas ({num_replicas}) must be >= the number of logical experts ({n_logical}): "
            f"every logical expert needs at least one physical slot"
        )
    if num_replicas % num_gpus:  # type: ignore[operator]
        raise ValueError(
            f"num_replicas ({num_replicas}) must be divisible by num_gpus ({num_gpus}): "
            f"every GPU gets the same number of physical slots"
        )
    return num_replicas, num_gpus  # type: ignore[return-value]


def _check_problem(
    weight: object, num_replicas: object, num_groups: object, num_nodes: object, num_gpus: object
) -> tuple[Tensor, int, int, int, int]:
    """All of :func:`rebalance_experts`' checks; returns ``(w float64 [L, n], R, G, N, P)``."""
    w = _check_weight(weight)
    n = w.shape[1]
    R, P = _check_sizes(n, num_replicas, num_gpus)
    G = _check_int("num_groups", num_groups)
    N = _check_int("num_nodes", num_nodes)
    if P % N:
        raise ValueError(
            f"num_gpus ({P}) must be divisible by num_nodes ({N}): every node has the same number of GPUs"
        )
    if n % G:
        raise ValueError(
            f"the number of logical experts ({n}, weight.shape[1]) must be divisible by num_groups ({G}): "
            f"groups are equal contiguous blocks of experts"
        )
    # R % N == 0 and R / N >= n / N follow from R % P == 0, P % N == 0 and R >= n.
    return w, R, G, N, P


# --------------------------------------------------------------------------
# building blocks (one layer, plain Python / numpy, float64)
# --------------------------------------------------------------------------


def _water_fill(loads: np.ndarray, slots: int) -> list[int]:
    """Replica counts ``c >= 1`` with ``sum(c) == slots`` minimising ``max(loads / c)``.

    Starts from one replica each and gives the next replica to the expert with the
    largest load per replica (ties: lowest index). This greedy is optimal for the
    min-max objective: the expert it picks has to receive another replica in every
    solution whose maximum is below its current per-replica load.
    """
    counts = [1] * len(loads)
    heap = [(-float(x), i) for i, x in enumerate(loads)]
    heapq.heapify(heap)
    for _ in range(slots - len(loads)):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-float(loads[i]) / counts[i], i))
    return counts


def _round_robin(loads: np.ndarray, slots: int) -> list[int]:
    """The baseline's replica counts: extra replicas one each to the hottest experts by raw load.

    Experts are ranked by load, descending (ties: lowest index); extra replica ``t``
    goes to the expert of rank ``t mod len(loads)``.
    """
    order = sorted(range(len(loads)), key=lambda i: (-float(loads[i]), i))
    counts = [1] * len(loads)
    for t in range(slots - len(loads)):
        counts[order[t % len(loads)]] += 1
    return counts


def _replicas(counts: list[int]) -> list[int]:
    """Replica list in logical order: expert ``i`` repeated ``counts[i]`` times (local ids)."""
    return [i for i, c in enumerate(counts) for _ in range(c)]


def _largest_first(loads: np.ndarray, num_bins: int, capacity: int) -> list[list[int]]:
    """Pack items into ``num_bins`` bins of exactly ``capacity`` items, balancing load.

    Items in descending load (ties: lowest index), each onto the least loaded bin
    that still has room (ties: lowest bin). ``len(loads) == num_bins * capacity``.

    Returns:
        ``num_bins`` lists of item indices.
    """
    order = sorted(range(len(loads)), key=lambda i: (-float(loads[i]), i))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    totals = [0.0] * num_bins
    for i in order:
        b = min((g for g in range(num_bins) if len(bins[g]) < capacity), key=lambda g: (totals[g], g))
        bins[b].append(i)
        totals[b] += float(loads[i])
    return bins


# Largest [moved experts, receiving experts, GPUs] array a count move builds at once.
_MOVE_CHUNK = 1 << 22

# A move must lower the maximum by more than this fraction: smaller "gains" are float
# rounding of the predicted loads, and chasing them could loop until the round cap.
_MIN_GAIN = 1e-9


def _swap_search(bins: np.ndarray, per_replica: np.ndarray) -> None:
    """Swap replicas between the most loaded GPU and the others while that lowers the pair's maximum.

    ``bins`` is ``int64 [B, k]`` (the expert of each slot of each GPU), changed in
    place; ``per_replica[e]`` is the load of one replica of expert ``e``. Each round
    takes the most loaded GPU ``a`` (lowest index on ties) and, over every slot ``i``
    of ``a`` and slot ``j`` of another GPU ``b``, the swap minimising
    ``max(load(a) - l_i + l_j, load(b) - l_j + l_i)``; it is applied only if that is
    below ``load(a)`` by more than ``_MIN_GAIN`` of it. An applied swap lowers one
    GPU at the old maximum and keeps the other below it, so the descending-sorted
    vector of GPU loads decreases lexicographically and the search ends (a round
    cap guards against float pathologies). Replica counts and slots per GPU never
    change.
    """
    if bins.shape[0] < 2:
        return
    vals = per_replica[bins]  # [B, k]
    for _ in range(8 * bins.size + 16):
        totals = vals.sum(axis=1)
        a = int(np.argmax(totals))
        top = totals[a]
        delta = vals[a][:, None, None] - vals[None, :, :]  # [k, B, k]: l_i - l_j
        new_max = np.maximum(top - delta, totals[None, :, None] + delta)
        ok = (delta > 0) & (new_max < top * (1.0 - _MIN_GAIN))
        ok[:, a, :] = False
        if not ok.any():
            return
        i, b, j = np.unravel_index(int(np.argmin(np.where(ok, new_max, np.inf))), new_max.shape)
        bins[a, i], bins[b, j] = bins[b, j], bins[a, i]
        vals[a, i], vals[b, j] = vals[b, j], vals[a, i]


def _count_move(bins: np.ndarray, w: np.ndarray) -> bool:
    """Re-purpose one slot to lower the maximum GPU load; ``True`` if one was found (applied in place).

    A move takes a slot holding expert ``x`` with ``c_x >= 2`` replicas and gives it
    to expert ``y != x``: ``x``'s remaining replicas each carry ``w_x / (c_x - 1)``,
    ``y``'s ``w_y / (c_y + 1)``, which changes the load of every GPU holding either.
    The most loaded GPU ``a`` can only get lighter if the changed slot is on ``a``
    or ``y`` already has a replica on ``a`` (``x``'s other replicas only get
    heavier), so only those moves are evaluated; that loses no improving move. The
    one with the smallest new maximum is applied if that is below the current
    maximum by more than ``_MIN_GAIN`` of it (ties: first found). This fixes what
    the per-replica water level cannot see, e.g. a cold expert's second replica as
    the filler that lets two hot experts sit on separate GPUs.
    """
    num_bins, n = bins.shape[0], len(w)
    held = np.zeros((num_bins, n))
    np.add.at(held, (np.repeat(np.arange(num_bins), bins.shape[1]), bins.ravel()), 1.0)  # [B, n]
    counts = held.sum(axis=0)
    movable = np.nonzero(counts >= 2)[0]
    if len(movable) == 0:
        return False
    per = w / counts
    loads = held @ per  # [B]
    a = int(np.argmax(loads))
    top = loads[a]
    y_new = w / (counts + 1)
    dy = held.T * (y_new - per)[:, None]  # [n, B]: GPU load change from y's replicas
    on_a = np.nonzero(held[a] > 0)[0]
    everyone = np.arange(n)
    best: tuple[float, int, int, int] | None = None
    # (1) a slot on a changes from x to any y; (2) any slot of any x goes to a y already on a
    for xs_all, ys, only_a in ((np.intersect1d(movable, on_a), everyone, True), (movable, on_a, False)):
        chunk = max(1, _MOVE_CHUNK // (len(ys) * num_bins))  # bounds the [chunk, ny, B] temporaries
        for start in range(0, len(xs_all), chunk):
            xs = xs_all[start:start + chunk]
            x_new = w[xs] / (counts[xs] - 1)
            dx = held[:, xs].T * (x_new - per[xs])[:, None]  # [nx, B]
            after = loads + dx[:, None, :] + dy[ys][None, :, :]  # [nx, ny, B]: before the slot changes
            shift = y_new[ys][None, :] - x_new[:, None]  # [nx, ny]: the changed slot's own change
            first = np.argmax(after, axis=2)
            top1 = np.take_along_axis(after, first[..., None], axis=2)[..., 0]
            if num_bins > 1:
                top2 = np.partition(after, num_bins - 2, axis=2)[..., num_bins - 2]
            else:
                top2 = np.full_like(top1, -np.inf)
            others = np.where(first[..., None] == np.arange(num_bins), top2[..., None], top1[..., None])
            new_max = np.maximum(others, after + shift[..., None])  # [nx, ny, B]: slot on GPU g changes
            ok = (held[:, xs].T > 0)[:, None, :] & (xs[:, None] != ys[None, :])[..., None]
            if only_a:
                ok &= (np.arange(num_bins) == a)[None, None, :]
            new_max = np.where(ok, new_max, np.inf)
            flat = int(np.argmin(new_max))
            if best is None or new_max.flat[flat] < best[0]:
                xi, yi, g = np.unravel_index(flat, new_max.shape)
                best = (float(new_max.flat[flat]), int(xs[xi]), int(ys[yi]), int(g))
    if best is None or not best[0] < top * (1.0 - _MIN_GAIN):
        return False
    _, x, y, g = best
    slot = int(np.nonzero(bins[g] == x)[0][0])
    bins[g, slot] = y
    return True


def _refine(bins: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Alternate :func:`_swap_search` and :func:`_count_move` until neither helps (copy of ``bins``).

    The maximum GPU load never rises and each count move lowers it strictly, so this
    ends; a round cap bounds the work.
    """
    bins = bins.copy()
    for _ in range(4 * bins.size + 16):
        _swap_search(bins, w / np.bincount(bins.ravel(), minlength=len(w)))
        if not _count_move(bins, w):
            break
    return bins


def _max_gpu_load(bins: np.ndarray, w: np.ndarray) -> float:
    per = w / np.bincount(bins.ravel(), minlength=len(w))
    return float(per[bins].sum(axis=1).max())


# Levels (times the node's lower bound) tried by the targeted replica counts.
_TARGET_LEVELS = (1.0, 0.97, 1.03)


def _targeted(loads: np.ndarray, slots: int, level: float) -> list[int] | None:
    """Replica counts aiming every replica at or below ``level``; ``None`` if ``level <= 0``.

    Expert ``e`` gets ``max(1, ceil(w_e / T))`` replicas, ``T`` starting at ``level``
    and raised by 2% until they fit in ``slots`` (at ``T = max(w)`` they do); the
    slots left over go one each to the *coldest* experts (round-robin up the load
    ranking), as near-free fillers. Water-filling would instead spend them on the
    hottest experts, which lowers the largest replica but can leave every GPU with a
    hot replica plus a warm one, where a hot expert split into exactly enough
    GPU-sized pieces plus cold fillers packs better.
    """
    if not level > 0:
        return None
    T = level
    while True:
        counts = np.maximum(1, np.ceil(loads / T * (1.0 - 1e-12))).astype(np.int64)
        if counts.sum() <= slots:
            break
        T *= 1.02
    result = [int(c) for c in counts]
    order = sorted(range(len(loads)), key=lambda i: (float(loads[i]), i))
    for t in range(slots - sum(result)):
        result[order[t % len(loads)]] += 1
    return result


def _proportional(loads: np.ndarray, slots: int) -> list[int] | None:
    """One replica each plus the extra slots in proportion to load (largest remainders); ``None`` if all loads are 0."""
    total = float(loads.sum())
    if not total > 0:
        return None
    extra = slots - len(loads)
    share = loads / total * extra
    counts = np.floor(share).astype(np.int64)
    left = extra - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:left]] += 1
    return [int(c) + 1 for c in counts]


# Extra starting points per node: replica counts drawn at random (in proportion to load)
# from a generator with a fixed seed, so the policy stays deterministic.
_RANDOM_STARTS = 8
_SEED = 0x5EED


def _sampled(loads: np.ndarray, slots: int, starts: int) -> list[list[int]]:
    """``starts`` count vectors: one replica each, extra slots drawn with probability proportional to load."""
    total = float(loads.sum())
    extra = slots - len(loads)
    if not total > 0 or extra == 0:
        return []
    rng = np.random.default_rng(_SEED)
    out = []
    for _ in range(starts):
        counts = np.ones(len(loads), dtype=np.int64)
        np.add.at(counts, rng.choice(len(loads), size=extra, p=loads / total), 1)
        out.append([int(c) for c in counts])
    return out


def _place_node(w_node: np.ndarray, slots: int, num_gpus: int, *, policy: bool) -> np.ndarray:
    """Place one node's experts on its GPUs: ``int64 [num_gpus, slots / num_gpus]`` local expert ids.

    ``policy=False`` is the greedy baseline (round-robin counts, replicas dealt
    round-robin over the GPUs). With ``policy=True``: replica counts by
    water-filling, by :func:`_targeted` at the levels ``_TARGET_LEVELS`` times the
    node's lower bound, in proportion to load, by the baseline's round-robin and
    ``_RANDOM_STARTS`` seeded random draws, each packed largest-first, plus the
    baseline's own placement; each improved by :func:`_refine`; the one with the
    smallest maximum GPU load wins (the first on ties).
    """
    capacity = slots // num_gpus
    # replica i (logical order) on GPU i mod num_gpus: an expert's replicas land on different GPUs
    baseline = np.array(_replicas(_round_robin(w_node, slots)), dtype=np.int64)
    baseline = baseline.reshape(capacity, num_gpus).T.copy()
    if not policy:
        return baseline
    bound = _bound_one(w_node, slots, num_gpus)
    count_choices = [_water_fill(w_node, slots)]
    count_choices += [_targeted(w_node, slots, bound * f) for f in _TARGET_LEVELS]
    count_choices += [_proportional(w_node, slots), _round_robin(w_node, slots)]
    count_choices += _sampled(w_node, slots, _RANDOM_STARTS)
    candidates = []
    for counts in count_choices:
        if counts is None:
            continue
        reps = _replicas(counts)
        rep_loads = np.array([w_node[e] / counts[e] for e in reps], dtype=np.float64)
        packed = _largest_first(rep_loads, num_gpus, capacity)
        candidates.append(np.array([[reps[i] for i in b] for b in packed], dtype=np.int64))
    candidates.append(baseline)
    best: tuple[float, np.ndarray] | None = None
    for bins in candidates:
        bins = _refine(bins, w_node)
        value = _max_gpu_load(bins, w_node)
        if best is None or value < best[0]:
            best = (value, bins)
    assert best is not None
    return best[1]


def _num_partitions(num_groups: int, num_nodes: int) -> int:
    """Ways to split ``num_groups`` groups into ``num_nodes`` unlabeled blocks of equal size."""
    size = num_groups // num_nodes
    return math.factorial(num_groups) // (math.factorial(size) ** num_nodes * math.factorial(num_nodes))


def _min_max_partition(
    num_groups: int, num_nodes: int, value: dict[tuple[int, ...], float]
) -> tuple[float, list[tuple[int, ...]]]:
    """The split of ``range(num_groups)`` into ``num_nodes`` equal blocks minimising the largest ``value[block]``.

    Exhaustive search with pruning; blocks are ascending tuples, the block holding
    the lowest unplaced group is chosen first, and the first partition found with
    the smallest maximum wins (so the result is deterministic).
    """
    size = num_groups // num_nodes
    best: tuple[float, list[tuple[int, ...]]] = (math.inf, [])

    def search(remaining: tuple[int, ...], worst: float, chosen: list[tuple[int, ...]]) -> None:
        nonlocal best
        if worst >= best[0]:
            return
        if not remaining:
            best = (worst, list(chosen))
            return
        first, rest = remaining[0], remaining[1:]
        for mates in itertools.combinations(rest, size - 1):
            block = (first, *mates)
            chosen.append(block)
            search(tuple(g for g in rest if g not in mates), max(worst, value[block]), chosen)
            chosen.pop()

    search(tuple(range(num_groups)), -math.inf, [])
    return best


# Group-to-node packing is exact (all partitions searched) up to this many partitions.
_MAX_EXACT_PARTITIONS = 20_000


def _group_assignments(group_loads: np.ndarray, num_nodes: int) -> list[list[list[int]]]:
    """The policy's candidate group-to-node assignments (groups per node, ascending), best guess first.

    Balanced: the partition with the smallest maximum node load when there are at
    most ``_MAX_EXACT_PARTITIONS`` partitions, else largest-first packing; then the
    contiguous assignment (the baseline's), if different.
    """
    G = len(group_loads)
    size = G // num_nodes
    if _num_partitions(G, num_nodes) <= _MAX_EXACT_PARTITIONS:
        sums = {b: float(group_loads[list(b)].sum()) for b in itertools.combinations(range(G), size)}
        balanced = [list(b) for b in _min_max_partition(G, num_nodes, sums)[1]]
    else:
        balanced = [sorted(b) for b in _largest_first(group_loads, num_nodes, size)]
    contiguous = [list(range(j * size, (j + 1) * size)) for j in range(num_nodes)]
    return [balanced] if balanced == contiguous else [balanced, contiguous]


def _layer_placement(
    w: np.ndarray, R: int, G: int, N: int, P: int, *, policy: bool
) -> list[int]:
    """``phy2log`` of one layer (a list of ``R`` logical ids) for the policy or the baseline."""
    n = len(w)
    hierarchical = G % N == 0
    nodes = N if hierarchical else 1
    slots_per_node, gpus_per_node = R // nodes, P // nodes
    per_group = n // G
    if nodes == 1:
        assignments = [[list(range(n))]]
    else:
        size = G // nodes
        if policy:
            group_sets = _group_assignments(w.reshape(G, per_group).sum(axis=1), nodes)
        else:  # contiguous: node j holds groups [j * size, (j + 1) * size)
            group_sets = [[list(range(j * size, (j + 1) * size)) for j in range(nodes)]]
        assignments = [
            [[e for g in groups for e in range(g * per_group, (g + 1) * per_group)] for groups in node_groups]
            for node_groups in group_sets
        ]
    best: tuple[float, list[int]] | None = None
    for node_experts in assignments:
        phy2log: list[int] = []
        for experts in node_experts:
            for gpu in _place_node(w[experts], slots_per_node, gpus_per_node, policy=policy).tolist():
                phy2log.extend(sorted(experts[i] for i in gpu))
        if len(assignments) == 1:
            return phy2log
        value = float(_gpu_loads_np(np.asarray(phy2log), w, P).max())
        if best is None or value < best[0]:
            best = (value, phy2log)
    assert best is not None
    return best[1]


def _gpu_loads_np(phy2log: np.ndarray, w: np.ndarray, num_gpus: int) -> np.ndarray:
    """Load per GPU (float64 ``[P]``) of one layer: each slot carries ``w[e] / count[e]``."""
    counts = np.bincount(phy2log, minlength=len(w))
    per_slot = w[phy2log] / counts[phy2log]
    return per_slot.reshape(num_gpus, -1).sum(axis=1)


def _assemble(phy2log_rows: list[list[int]], n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(phy2log, log2phy, logcnt)`` tensors from per-layer ``phy2log`` lists."""
    phy2log = torch.tensor(phy2log_rows, dtype=torch.int64)  # [L, R]
    L, R = phy2log.shape
    logcnt = torch.zeros(L, n, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    width = int(logcnt.max())
    log2phy = torch.full((L, n, width), -1, dtype=torch.int64)
    for layer, row in enumerate(phy2log_rows):
        fill = [0] * n
        for p, e in enumerate(row):
            log2phy[layer, e, fill[e]] = p
            fill[e] += 1
    return phy2log, log2phy, logcnt


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def rebalance_experts(
    weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose replica counts and slots for every logical expert of every layer.

    See the module docstring for the policy (hierarchical when
    ``num_groups % num_nodes == 0``, global otherwise) and its guarantee: the
    maximum GPU load is never above :func:`greedy_baseline`'s. Deterministic: the
    same input gives the same output (ties always go to the lowest index).

    Args:
        weight: ``[L, n]`` load of each logical expert per layer (e.g. tokens routed
            to it), any float or int dtype, finite and ``>= 0``; any device (the work
            is done on the CPU).
        num_replicas: physical slots per layer ``R``, ``>= n`` and a multiple of
            ``num_gpus``.
        num_groups: expert groups ``G`` (contiguous blocks of ``n / G`` experts);
            must divide ``n``.
        num_nodes: nodes ``N``; must divide ``num_gpus``.
        num_gpus: GPUs ``P``; each holds ``R / P`` consecutive slots.

    Returns:
        ``(phy2log, log2phy, logcnt)`` on the CPU: ``phy2log`` ``int64 [L, R]``
        (logical expert of each slot; slot ``p`` on GPU ``p // (R / P)``),
        ``log2phy`` ``int64 [L, n, M]`` (each expert's slots ascending, ``-1``
        padded, ``M`` the largest replica count), ``logcnt`` ``int64 [L, n]``
        (replicas per expert, ``>= 1``, each row summing to ``R``). In hierarchical
        mode every group's replicas lie on one node and each node holds
        ``G / N`` groups.

    Raises:
        TypeError: ``weight`` not a real tensor, or an integer argument not an int.
        ValueError: ``weight`` not 2-D, empty, non-finite or negative; a count
            ``< 1``; ``num_replicas < n``; ``num_replicas % num_gpus``;
            ``num_gpus % num_nodes``; ``n % num_groups``. The message names the
            argument and its value.
    """
    w, R, G, N, P = _check_problem(weight, num_replicas, num_groups, num_nodes, num_gpus)
    rows = [_layer_placement(layer, R, G, N, P, policy=True) for layer in w.numpy()]
    return _assemble(rows, w.shape[1])


def greedy_baseline(
    weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The simple placement :func:`rebalance_experts` is measured against.

    Per node (all GPUs form one node unless ``num_groups % num_nodes == 0``, as in
    the policy): the node's extra slots go one each to its hottest experts by raw
    load (round-robin down the load ranking if there are more extra slots than
    experts), and the replicas, listed in logical order, are dealt round-robin over
    the node's GPUs (replica ``i`` to the node's GPU ``i mod (P / N)``, so an
    expert's replicas land on different GPUs). In hierarchical mode groups stay on nodes contiguously (node
    ``j`` holds groups ``[j G/N, (j+1) G/N)``), so the baseline obeys the same
    group-to-node constraint as the policy and answers the same problem.

    Same arguments, checks, return shapes and conventions as
    :func:`rebalance_experts`.
    """
    w, R, G, N, P = _check_problem(weight, num_replicas, num_groups, num_nodes, num_gpus)
    rows = [_layer_placement(layer, R, G, N, P, policy=False) for layer in w.numpy()]
    return _assemble(rows, w.shape[1])


def _min_order_statistics(w: np.ndarray, R: int) -> np.ndarray:
    """``rho[i-1]`` for ``i = 1..R``: a lower bound on the ``i``-th largest replica load.

    Over every choice of replica counts ``c`` (``c_e >= 1``, ``sum c = R``), with
    replica loads ``w_e / c_e`` (``c_e`` copies each), ``r_i(c)`` is the ``i``-th
    largest. Fix ``c`` and let ``T = r_i(c)`` and ``S = {e : w_e / c_e > T}``. Fewer
    than ``i`` replicas exceed ``T``, so ``|S| <= i - 1``; every ``e`` outside ``S``
    has ``c_e >= n_e(T) = max(1, ceil(w_e / T))``; so
    ``R >= |S| + sum_{e not in S} n_e(T)``. Call this condition ``F_i(T)`` (with the
    best ``S``: the ``i - 1`` experts with the largest ``n_e(T) - 1``). ``F_i`` is
    monotone in ``T`` and piecewise constant, changing only at ``T = w_e / m``
    (where ``n_e`` takes the lower value), so ``rho_i = min{T : F_i(T)}`` over the
    candidates ``{0} U {w_e / m : 1 <= m <= R - n + 1}`` (an expert needing more
    than ``R - n + 1`` replicas must be in ``S``, so larger ``m`` change nothing) is
    ``<= r_i(c)`` for every ``c``. ``ceil`` is taken with a tiny downward margin so
    rounding can only make ``rho`` smaller (still a valid bound).
    """
    n = len(w)
    positive = w[w > 0]
    m = np.arange(1, R - n + 2, dtype=np.float64)
    cands = np.unique(np.concatenate([[0.0], (positive[:, None] / m[None, :]).ravel()]))
    targets = np.arange(1, R + 1)
    lo = np.zeros(R, dtype=np.int64)
    hi = np.full(R, len(cands) - 1, dtype=np.int64)  # the largest candidate max(w) is always feasible
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        T = cands[mid]  # [R]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = w[None, :] / T[:, None]
        need = np.ceil(ratio * (1.0 - 1e-12))
        need = np.where(T[:, None] > 0, need, np.where(w[None, :] > 0, R + 1, 1))
        need = np.clip(need, 1, R + 1)
        excess = need.sum(axis=1) - R  # slots short without S
        savings = np.cumsum(-np.sort(-(need - 1), axis=1), axis=1)  # [R, n]: best savings with |S| = s
        savings = np.concatenate([np.zeros((R, 1)), savings], axis=1)
        allowed = np.minimum(targets - 1, n)
        feasible = savings[np.arange(R), allowed] >= excess
        hi = np.where(active & feasible, mid, hi)
        lo = np.where(active & ~feasible, mid + 1, lo)
    return cands[lo]


def _bound_one(w: np.ndarray, R: int, P: int) -> float:
    """:func:`fractional_lower_bound` of one layer (``w`` float64 ``[n]``)."""
    total = float(w.sum())
    if total == 0.0:
        return 0.0
    rho = _min_order_statistics(w, R)
    prefix = np.concatenate([[0.0], np.cumsum(rho)])  # prefix[i] = rho_1 + ... + rho_i
    k = R // P
    bound = total / P
    for j in range(k):  # a GPU with j + 1 of the top j P + 1 replicas, plus k - j - 1 others
        top = j * P + 1
        shared = prefix[top] - prefix[top - j - 1]
        others = prefix[R] - prefix[R - (k - j - 1)]
        bound = max(bound, float(shared + others))
    return bound


# The node-constrained bound enumerates group-to-node partitions only up to these sizes.
_MAX_BLOCKS = 512
_MAX_PARTITIONS = 200_000


def _node_bound(w: np.ndarray, R: int, G: int, N: int, P: int) -> float:
    """Lower bound on the maximum GPU load of every hierarchical placement (``G % N == 0``).

    A hierarchical placement splits the ``G`` groups into ``N`` blocks of ``G / N``
    (one per node) and places each block's experts on its node's ``R / N`` slots and
    ``P / N`` GPUs, so its maximum is at least ``max_j bound(block_j)`` (the global
    bound of that node's sub-problem), hence at least the minimum of that over all
    partitions, which is what this computes by enumeration (with pruning) when the
    numbers of blocks and partitions are small. Otherwise it returns the weaker
    ``node_load / (P / N)``, where ``node_load = max(sum(w) / N, hottest group +
    the G/N - 1 coldest other groups)`` is at most the load of the node holding the
    hottest group.
    """
    size = G // N
    per_group = len(w) // G
    group_loads = w.reshape(G, per_group).sum(axis=1)
    if math.comb(G, size) > _MAX_BLOCKS or _num_partitions(G, N) > _MAX_PARTITIONS:
        hottest = int(np.argmax(group_loads))
        others = np.sort(np.delete(group_loads, hottest))[: size - 1]
        node_load = max(float(group_loads.sum()) / N, float(group_loads[hottest] + others.sum()))
        return node_load / (P // N)
    value: dict[tuple[int, ...], float] = {}
    for block in itertools.combinations(range(G), size):
        experts = np.concatenate([w[g * per_group:(g + 1) * per_group] for g in block])
        value[block] = _bound_one(experts, R // N, P // N)
    return _min_max_partition(G, N, value)[0]


def fractional_lower_bound(
    weight: Tensor,
    num_replicas: int,
    num_gpus: int,
    *,
    num_groups: int | None = None,
    num_nodes: int | None = None,
) -> Tensor:
    """A lower bound on the maximum GPU load of every placement with these sizes.

    A placement gives each logical expert ``e`` some ``c_e >= 1`` replicas
    (``sum c = R``), each carrying ``w_e / c_e`` (the fractional split), and puts
    exactly ``k = R / P`` replicas on each GPU. Let ``r_i`` be the ``i``-th largest
    replica load of a placement and ``rho_i <= r_i`` a lower bound on it over every
    choice of counts (see ``_min_order_statistics``; ``rho_1`` is the water-filling
    value, the smallest possible largest replica). The bound is the largest of:

    1. ``sum(w) / P``: the GPU loads sum to ``sum(w)``, so one is at least the mean.
    2. for ``j = 0 .. k-1``: ``(rho_{jP+1-j} + ... + rho_{jP+1}) + (rho_{R-k+j+2} +
       ... + rho_R)``. Of the ``jP + 1`` largest replicas some GPU holds ``j + 1``
       (pigeonhole: ``P`` GPUs with at most ``j`` each hold only ``jP``); their sum
       is at least that of the ``j + 1`` smallest of them, the ``(jP+1-j)``-th ..
       ``(jP+1)``-th largest. That GPU's other ``k - j - 1`` replicas sum to at
       least the ``k - j - 1`` smallest replica loads. (``j = 0``: the GPU holding
       the largest replica, plus the ``k - 1`` smallest.)

    Each term holds for every placement, including every node-constrained one, so
    the maximum does too. With ``num_groups`` and ``num_nodes`` given and
    ``num_groups % num_nodes == 0`` (the hierarchical policy's case), it is also at
    least the bound of the best group-to-node partition (see ``_node_bound``):
    valid for placements that keep every group on one node, as
    :func:`rebalance_experts` and :func:`greedy_baseline` do there.

    It is not always attainable: it treats the replica counts of each order
    statistic independently and ignores which replicas can share a GPU, so with few
    slots per GPU and a few dominant experts the true optimum is higher.

    Args:
        weight: ``[L, n]`` or ``[n]`` loads (float or int, finite, ``>= 0``).
        num_replicas: ``R >= n``, a multiple of ``num_gpus``.
        num_gpus: ``P``.
        num_groups: ``G`` (divides ``n``), only with ``num_nodes``.
        num_nodes: ``N`` (divides ``P``), only with ``num_groups``.

    Returns:
        float64 ``[L]`` (or a 0-d tensor for 1-D ``weight``) on the CPU.

    Raises:
        TypeError / ValueError: as :func:`rebalance_experts` for these arguments, or
        only one of ``num_groups`` / ``num_nodes`` given.
    """
    w = _check_weight(weight, ndims=(1, 2))
    rows = w.reshape(-1, w.shape[-1])
    if (num_groups is None) != (num_nodes is None):
        raise ValueError(
            f"num_groups and num_nodes go together, got num_groups={num_groups!r}, num_nodes={num_nodes!r}"
        )
    if num_groups is None:
        R, P = _check_sizes(w.shape[-1], num_replicas, num_gpus)
        G = N = 1
    else:
        _, R, G, N, P = _check_problem(rows, num_replicas, num_groups, num_nodes, num_gpus)
    values = []
    for row in rows.numpy():
        bound = _bound_one(row, R, P)
        if N > 1 and G % N == 0 and row.sum() > 0:
            bound = max(bound, _node_bound(row, R, G, N, P))
        values.append(bound)
    return torch.tensor(values, dtype=torch.float64).reshape(w.shape[:-1])


# --------------------------------------------------------------------------
# typed view of a result
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Placement:
    """One layer's (or every layer's) expert placement, as :func:`rebalance_experts` returns it.

    Single layer: ``phy2log`` ``int64 [R]``, ``log2phy`` ``int64 [n, M]``,
    ``logcnt`` ``int64 [n]``. All layers: the same with a leading ``[L]``.
    Construction checks that the three tensors agree (every slot's expert in
    range, ``logcnt`` the slot counts, ``log2phy`` each expert's slots ascending,
    ``-1`` padded) and that ``R`` is a multiple of ``num_gpus``.

    Attributes:
        phy2log: logical expert held by each physical slot.
        log2phy: physical slots of each logical expert, ``-1`` padded.
        logcnt: replicas per logical expert (``>= 1``).
        num_gpus: GPUs ``P``; slot ``p`` lives on GPU ``p // slots_per_gpu``.
    """

    phy2log: Tensor
    log2phy: Tensor
    logcnt: Tensor
    num_gpus: int

    def __post_init__(self) -> None:
        _check_int("num_gpus", self.num_gpus)
        for name in ("phy2log", "log2phy", "logcnt"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype != torch.int64:
                raise ValueError(f"{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        d = self.phy2log.dim()
        if d not in (1, 2) or self.logcnt.dim() != d or self.log2phy.dim() != d + 1:
            raise ValueError(
                f"shapes must be ([R], [n, M], [n]) or ([L, R], [L, n, M], [L, n]), got "
                f"{tuple(self.phy2log.shape)}, {tuple(self.log2phy.shape)}, {tuple(self.logcnt.shape)}"
            )
        p2l, l2p, cnt = (t.cpu().reshape(-1, *t.shape[d - 1:]) for t in (self.phy2log, self.log2phy, self.logcnt))
        L, R = p2l.shape
        n = cnt.shape[1]
        if l2p.shape[:2] != (L, n) or cnt.shape[0] != L:
            raise ValueError(
                f"phy2log {tuple(self.phy2log.shape)}, log2phy {tuple(self.log2phy.shape)} and "
                f"logcnt {tuple(self.logcnt.shape)} disagree on the layers or logical experts"
            )
        if R % self.num_gpus:
            raise ValueError(f"the {R} physical slots must be divisible by num_gpus ({self.num_gpus})")
        if R and (int(p2l.min()) < 0 or int(p2l.max()) >= n):
            raise ValueError(f"phy2log entries must lie in [0, {n}), got [{int(p2l.min())}, {int(p2l.max())}]")
        expected_cnt = torch.zeros(L, n, dtype=torch.int64).scatter_add_(1, p2l, torch.ones_like(p2l))
        if not torch.equal(expected_cnt, cnt):
            raise ValueError("logcnt does not count phy2log's slots per logical expert")
        if int(cnt.min()) < 1:
            raise ValueError("every logical expert needs at least one replica (logcnt >= 1)")
        if l2p.shape[2] < int(cnt.max()):
            raise ValueError(f"log2phy has {l2p.shape[2]} columns, fewer than the {int(cnt.max())} replicas of an expert")
        slots = torch.arange(R).expand(L, R)
        order = torch.sort(p2l * R + slots, dim=1).values % R  # slots grouped by expert, ascending
        expected = torch.full_like(l2p, -1)
        for layer in range(L):
            starts = torch.cat([torch.zeros(1, dtype=torch.int64), cnt[layer].cumsum(0)[:-1]])
            experts = torch.repeat_interleave(torch.arange(n), cnt[layer])
            col = torch.arange(R) - starts[experts]
            expected[layer, experts, col] = order[layer]
        if not torch.equal(expected, l2p):
            raise ValueError("log2phy does not list each logical expert's phy2log slots, ascending and -1 padded")

    # -- construction ------------------------------------------------------

    @classmethod
    def rebalance(
        cls, weight: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
    ) -> Placement:
        """:func:`rebalance_experts` wrapped: all layers of ``weight`` ``[L, n]``."""
        return cls(*rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus), num_gpus=num_gpus)

    @classmethod
    def contiguous(cls, num_logical: int, num_gpus: int, num_layers: int | None = None) -> Placement:
        """No replicas: expert ``e`` on slot ``e``, i.e. GPU ``e // (n / P)`` (epcomm's uniform rule).

        ``num_layers=None`` gives a single-layer placement, an int ``L`` an ``[L, ...]`` one.
        """
        _check_int("num_logical", num_logical)
        _check_int("num_gpus", num_gpus)
        if num_logical % num_gpus:
            raise ValueError(f"num_logical ({num_logical}) must be divisible by num_gpus ({num_gpus})")
        ids = torch.arange(num_logical, dtype=torch.int64)
        p2l, l2p, cnt = ids, ids[:, None].clone(), torch.ones(num_logical, dtype=torch.int64)
        if num_layers is not None:
            _check_int("num_layers", num_layers)
            p2l, l2p, cnt = (t.expand(num_layers, *t.shape).clone() for t in (p2l, l2p, cnt))
        return cls(p2l, l2p, cnt, num_gpus=num_gpus)

    # -- sizes -------------------------------------------------------------

    @property
    def layered(self) -> bool:
        """True when the tensors carry a leading layer dim."""
        return self.phy2log.dim() == 2

    @property
    def num_layers(self) -> int:
        """``L`` (1 for a single-layer placement)."""
        return self.phy2log.shape[0] if self.layered else 1

    @property
    def num_physical(self) -> int:
        """Physical slots per layer ``R``."""
        return self.phy2log.shape[-1]

    @property
    def num_logical(self) -> int:
        """Logical experts ``n``."""
        return self.logcnt.shape[-1]

    @property
    def slots_per_gpu(self) -> int:
        """``R / P``."""
        return self.num_physical // self.num_gpus

    # -- lookups -----------------------------------------------------------

    def layer(self, index: int) -> Placement:
        """Layer ``index`` of a layered placement as a single-layer one (``log2phy`` trimmed)."""
        if not self.layered:
            raise ValueError("layer() needs a layered placement (tensors with a leading [L] dim)")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_layers:
            raise ValueError(f"index must be an int in [0, {self.num_layers}), got {index!r}")
        cnt = self.logcnt[index].clone()
        return Placement(
            self.phy2log[index].clone(), self.log2phy[index, :, : int(cnt.max())].clone(), cnt, self.num_gpus
        )

    def gpu_of_slot(self, slot: int) -> int:
        """GPU holding physical slot ``slot``: ``slot // slots_per_gpu``."""
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_physical:
            raise ValueError(f"slot must be an int in [0, {self.num_physical}), got {slot!r}")
        return slot // self.slots_per_gpu

    def slots_of_gpu(self, gpu: int) -> range:
        """Physical slots of GPU ``gpu``."""
        if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu < self.num_gpus:
            raise ValueError(f"gpu must be an int in [0, {self.num_gpus}), got {gpu!r}")
        return range(gpu * self.slots_per_gpu, (gpu + 1) * self.slots_per_gpu)

    def replicas_of(self, logical: int, layer: int | None = None) -> list[int]:
        """Physical slots of logical expert ``logical``, ascending.

        ``layer`` is required for a layered placement and must be ``None`` otherwise.
        """
        if isinstance(logical, bool) or not isinstance(logical, int) or not 0 <= logical < self.num_logical:
            raise ValueError(f"logical must be an int in [0, {self.num_logical}), got {logical!r}")
        if self.layered:
            if layer is None:
                raise ValueError("layer is required for a layered placement")
            return self.layer(layer).replicas_of(logical)
        if layer is not None:
            raise ValueError(f"layer must be None for a single-layer placement, got {layer!r}")
        count = int(self.logcnt[logical])
        return [int(p) for p in self.log2phy[logical, :count]]

    def gpu_loads(self, weight: Tensor) -> Tensor:
        """Load of each GPU when each logical expert's load is split evenly over its replicas.

        Args:
            weight: loads ``[n]`` (single layer) or ``[L, n]`` (layered), float or int,
                finite and ``>= 0``.

        Returns:
            float64 ``[P]`` or ``[L, P]`` on the CPU; GPU ``g`` sums ``w[e] / logcnt[e]``
            over its slots, in slot order.
        """
        w = _check_weight(weight, ndims=(self.phy2log.dim(),))
        if w.shape[-1] != self.num_logical or (self.layered and w.shape[0] != self.num_layers):
            raise ValueError(
                f"weight must have shape {tuple(self.logcnt.shape)} to match the placement, got {tuple(w.shape)}"
            )
        p2l = self.phy2log.cpu().reshape(-1, self.num_physical)
        rows = [
            torch.from_numpy(_gpu_loads_np(p2l[i].numpy(), w.reshape(-1, self.num_logical)[i].numpy(), self.num_gpus))
            for i in range(p2l.shape[0])
        ]
        out = torch.stack(rows)
        return out if self.layered else out[0]


# --------------------------------------------------------------------------
# re-exports: replica routing and live statistics (separate modules; imported
# last because they import Placement from here)
# --------------------------------------------------------------------------

from .replica_routing import (  # noqa: E402
    dynamic_plan,
    gather_expert_counts,
    logical_counts,
    logical_to_physical,
    optimal_max_load,
    rank_loads,
)
from .load_monitor import LoadMonitor, check_placement_agrees, placement_digest  # noqa: E402

__all__ += [
    "LoadMonitor",
    "check_placement_agrees",
    "dynamic_plan",
    "gather_expert_counts",
    "logical_counts",
    "logical_to_physical",
    "optimal_max_load",
    "placement_digest",
    "rank_loads",
]
