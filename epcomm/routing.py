"""Node-limited MoE routing (the DeepSeek-V3 gate) and synthetic routings.

The communication kernels of an expert-parallel library do not choose experts;
the router does.  DeepSeek-V3's router is what makes the library's
"at most ``max_nodes`` nodes per token" budget hold, so this module provides:

* :func:`node_limited_gate` -- the V3 gate: sigmoid affinities, an
  auxiliary-loss-free balancing bias that steers *selection only*, a node
  limit (each token's experts live on at most ``max_nodes`` nodes) and
  normalised, scaled gate weights.
* :func:`update_bias` -- the V3 bias update rule
  ``b_i += rate * sign(mean_load - load_i)``.
* :func:`num_nodes_per_token` -- how many distinct nodes each token's routing
  touches (``-1`` entries ignored); the library uses it to enforce the cap.
* :func:`random_topk_idx` and :func:`zipf_topk_idx` -- deterministic synthetic
  routings (uniform or Zipf-skewed expert popularity) for tests and
  benchmarks.

Expert placement convention used throughout: the ``E`` experts are split
evenly and contiguously over the ``M`` nodes, node ``n`` hosts experts
``[n * E / M, (n + 1) * E / M)``.

Tie-breaking convention used throughout: whenever a "best ``k``" choice is
made (best nodes, best experts), candidates are ranked by value, descending,
and equal values are ranked by *ascending index* (a stable sort).  The result
is therefore fully deterministic and identical on every device, unlike
``torch.topk`` whose order among equal values is unspecified.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GateOutput",
    "node_limited_gate",
    "update_bias",
    "num_nodes_per_token",
    "random_topk_idx",
    "zipf_topk_idx",
]


class GateOutput(NamedTuple):
    """Result of :func:`node_limited_gate`.

    Attributes:
        topk_idx: ``int64 [N, top_k]`` chosen expert ids per token, ordered by
            descending biased affinity (ties: lower expert id first).  Every
            entry is a valid expert id (the gate never emits ``-1``) and the
            ids of one row are distinct.
        topk_weights: ``float32 [N, top_k]`` gate weights aligned with
            ``topk_idx``: the *unbiased* affinities of the chosen experts,
            normalised to sum to 1 per token, times ``routed_scaling_factor``.
        affinities: ``float32 [N, E]`` the unbiased sigmoid affinities
            ``s = sigmoid(scores)`` of every expert.
    """

    topk_idx: Tensor
    topk_weights: Tensor
    affinities: Tensor


# --------------------------------------------------------------------------
# argument checking helpers
# --------------------------------------------------------------------------


def _check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int, or raise if it is not a (non-bool) integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_tensor(name: str, value: object, ndim: int) -> Tensor:
    """Raise TypeError unless ``value`` is a tensor, ValueError unless it has ``ndim`` dims."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def _check_placement(num_experts: int, num_nodes: int, max_nodes: int) -> tuple[int, int]:
    """Validate the even, contiguous expert placement.

    Returns:
        ``(experts_per_node, nodes_kept)`` with
        ``nodes_kept = min(max_nodes, num_nodes)``.
    """
    _check_int("num_experts", num_experts, minimum=1)
    _check_int("num_nodes", num_nodes, minimum=1)
    _check_int("max_nodes", max_nodes, minimum=1)
    if num_experts % num_nodes != 0:
        raise ValueError(
            f"num_experts ({num_experts}) must be divisible by num_nodes ({num_nodes}): "
            f"experts are split evenly and contiguously over nodes"
        )
    return num_experts // num_nodes, min(max_nodes, num_nodes)


def _check_top_k(top_k: object, experts_per_node: int, nodes_kept: int, max_nodes: int) -> int:
    """Validate ``1 <= top_k <= nodes_kept * experts_per_node``."""
    _check_int("top_k", top_k, minimum=1)
    available = nodes_kept * experts_per_node
    if top_k > available:  # type: ignore[operator]
        raise ValueError(
            f"top_k ({top_k}) exceeds the {available} experts available on "
            f"min(max_nodes={max_nodes}, num_nodes)={nodes_kept} nodes of "
            f"{experts_per_node} experts each"
        )
    return top_k  # type: ignore[return-value]


def _stable_topk_indices(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries along the last dim.

    Ordered by value descending; equal values are ordered by ascending index.

    Args:
        values: ``[..., L]`` floating tensor without NaN.
        k: number of indices to keep, ``0 <= k <= L``.

    Returns:
        ``int64 [..., k]`` indices into the last dim of ``values``.
    """
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


# --------------------------------------------------------------------------
# the gate
# --------------------------------------------------------------------------


def node_limited_gate(
    scores: Tensor,
    bias: Tensor | None = None,
    *,
    top_k: int,
    num_nodes: int,
    max_nodes: int = 4,
    group_top: int = 2,
    routed_scaling_factor: float = 1.0,
) -> GateOutput:
    """DeepSeek-V3 node-limited top-k gate with auxiliary-loss-free bias.

    For each token ``t`` (one row of ``scores``):

    1. Affinities ``s = sigmoid(scores.float())`` (float32).
    2. Biased affinities ``b = s + bias`` (float32; ``b = s`` without bias).
       The bias only steers *which* experts are chosen; it never enters the
       weights (auxiliary-loss-free load balancing).
    3. Node score of node ``n`` = sum of the ``group_top`` largest biased
       affinities among the experts hosted on ``n`` (experts
       ``[n*E/M, (n+1)*E/M)``), accumulated in float32 in descending order.
    4. Keep the ``min(max_nodes, num_nodes)`` nodes with the best node scores.
    5. Choose the ``top_k`` experts with the largest biased affinity among the
       experts of the kept nodes.
    6. Weights = the unbiased ``s`` of the chosen experts divided by their sum,
       times ``routed_scaling_factor``.

    Ties (equal node scores in step 4, equal biased affinities in step 5) go
    to the lower node / expert id, so the result is deterministic.  With
    DeepSeek-V3's settings (256 experts on 8 nodes, ``max_nodes=4``,
    ``top_k=8``, ``group_top=2``) each token reaches at most 4 nodes.

    Args:
        scores: ``[N, E]`` router logits, any floating dtype, on any device.
            Must not contain NaN (checked, which synchronises with the device).
        bias: ``[E]`` floating (normally float32) balancing bias on the same
            device as ``scores``, or ``None`` for no bias.  Must be finite.
        top_k: experts per token, ``1 <= top_k <= min(max_nodes, num_nodes) *
            E / num_nodes``.
        num_nodes: number of nodes ``M`` the experts are spread over; must
            divide ``E``.
        max_nodes: most nodes one token may reach (V3: 4); values above
            ``num_nodes`` mean "no limit".
        group_top: how many of a node's best experts form its node score
            (V3: ``top_k / max_nodes`` = 2); ``1 <= group_top <= E / M``.
        routed_scaling_factor: positive finite factor applied to the
            normalised weights (V3 uses 2.5).

    Returns:
        :class:`GateOutput` with ``topk_idx`` (``int64 [N, top_k]``, sorted by
        descending biased affinity), ``topk_weights`` (``float32 [N, top_k]``,
        each row sums to ``routed_scaling_factor``; a row whose chosen
        affinities all underflow to 0 gets all-zero weights) and
        ``affinities`` (``float32 [N, E]``), all on ``scores.device``.

    Raises:
        TypeError: ``scores``/``bias`` not floating tensors, or an integer
            argument of the wrong type.
        ValueError: bad shapes, devices, ``E`` not divisible by ``num_nodes``,
            ``top_k``/``group_top`` out of range, non-positive scaling factor,
            NaN scores or non-finite bias.
    """
    _check_tensor("scores", scores, 2)
    if not scores.is_floating_point():
        raise TypeError(f"scores must have a floating dtype, got {scores.dtype}")
    num_tokens, num_experts = scores.shape
    if num_experts == 0:
        raise ValueError(f"scores must have at least one expert column, got shape {tuple(scores.shape)}")
    experts_per_node, nodes_kept = _check_placement(num_experts, num_nodes, max_nodes)
    top_k = _check_top_k(top_k, experts_per_node, nodes_kept, max_nodes)
    _check_int("group_top", group_top, minimum=1)
    if group_top > experts_per_node:
        raise ValueError(
            f"group_top ({group_top}) exceeds the {experts_per_node} experts per node "
            f"(num_experts={num_experts}, num_nodes={num_nodes})"
        )
    scale = _check_real("routed_scaling_factor", routed_scaling_factor)
    if scale <= 0:
        raise ValueError(f"routed_scaling_factor must be > 0, got {routed_scaling_factor}")

    if bias is not None:
        _check_tensor("bias", bias, 1)
        if not bias.is_floating_point():
            raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
        if bias.shape[0] != num_experts:
            raise ValueError(
                f"bias must have shape [num_experts={num_experts}], got {tuple(bias.shape)}"
            )
        if bias.device != scores.device:
            raise ValueError(f"bias is on {bias.device} but scores are on {scores.device}")
        if not bool(torch.isfinite(bias).all()):
            raise ValueError("bias must be finite, got NaN or infinite entries")
    if num_tokens > 0 and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")

    affinities = torch.sigmoid(scores.float())  # [N, E] fp32
    biased = affinities if bias is None else affinities + bias.float()

    # Node scores: sum of the group_top best biased affinities per node,
    # accumulated in a fixed (descending) order so the value is well defined.
    per_node = biased.view(num_tokens, num_nodes, experts_per_node)
    best = torch.sort(per_node, dim=-1, descending=True).values
    node_scores = best[..., 0]
    for j in range(1, group_top):
        node_scores = node_scores + best[..., j]

    if nodes_kept < num_nodes:
        kept = _stable_topk_indices(node_scores, nodes_kept)  # [N, nodes_kept]
        node_mask = torch.zeros(num_tokens, num_nodes, dtype=torch.bool, device=scores.device)
        node_mask.scatter_(1, kept, True)
        expert_mask = node_mask.repeat_interleave(experts_per_node, dim=1)  # [N, E]
        candidates = biased.masked_fill(~expert_mask, float("-inf"))
    else:
        candidates = biased

    topk_idx = _stable_topk_indices(candidates, top_k)  # int64 [N, top_k]
    chosen = affinities.gather(1, topk_idx)
    denom = chosen.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    topk_weights = chosen / denom
    if scale != 1.0:
        topk_weights = topk_weights * scale
    # contiguous: dispatch requires it, as DeepEP does
    return GateOutput(topk_idx.contiguous(), topk_weights.contiguous(), affinities)


def update_bias(bias: Tensor, tokens_per_expert: Tensor, update_rate: float) -> Tensor:
    """DeepSeek-V3 auxiliary-loss-free bias update.

    ``new_bias_i = bias_i + update_rate * sign(mean_load - load_i)``: an
    overloaded expert (more tokens than the mean) has its bias lowered by
    ``update_rate``, an underloaded one raised by it, one exactly at the mean
    is left unchanged.  The comparison with the mean is exact for integer
    loads (it is done as ``sum(load) - E * load_i`` in float64).

    Args:
        bias: ``[E]`` floating bias (normally float32).
        tokens_per_expert: ``[E]`` load of each expert over the step, any
            real dtype (normally int32/int64 counts), on ``bias.device``.
        update_rate: the bias update speed gamma (V3: 0.001), finite, >= 0.

    Returns:
        A new ``[E]`` tensor with ``bias``'s dtype and device; the input is
        not modified.

    Raises:
        TypeError: non-tensor inputs, non-floating ``bias``, complex/bool
            ``tokens_per_expert`` or non-real ``update_rate``.
        ValueError: shapes that are not 1-D of equal length, different
            devices, or a negative / non-finite ``update_rate``.
    """
    _check_tensor("bias", bias, 1)
    _check_tensor("tokens_per_expert", tokens_per_expert, 1)
    if not bias.is_floating_point():
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    if tokens_per_expert.dtype == torch.bool or tokens_per_expert.is_complex():
        raise TypeError(f"tokens_per_expert must be a real numeric tensor, got {tokens_per_expert.dtype}")
    if tokens_per_expert.shape != bias.shape:
        raise ValueError(
            f"tokens_per_expert shape {tuple(tokens_per_expert.shape)} does not match "
            f"bias shape {tuple(bias.shape)}"
        )
    if tokens_per_expert.device != bias.device:
        raise ValueError(
            f"tokens_per_expert is on {tokens_per_expert.device} but bias is on {bias.device}"
        )
    rate = _check_real("update_rate", update_rate)
    if rate < 0:
        raise ValueError(f"update_rate must be >= 0, got {update_rate}")

    load = tokens_per_expert.to(torch.float64)
    # sign(mean - load_i) == sign(sum - E * load_i), without the division.
    direction = torch.sign(load.sum() - bias.shape[0] * load)
    return (bias.to(torch.float64) + rate * direction).to(bias.dtype)


def num_nodes_per_token(topk_idx: Tensor, num_experts: int, num_nodes: int) -> Tensor:
    """Number of distinct nodes each token's routing reaches.

    Expert ``e`` lives on node ``e // (num_experts / num_nodes)``; ``-1``
    entries ("no expert") are ignored, so an all ``-1`` row counts 0 nodes.

    Args:
        topk_idx: ``[N, K]`` integer (normally int64) expert ids in
            ``[-1, num_experts)``.
        num_experts: total number of experts ``E``.
        num_nodes: number of nodes ``M``; must divide ``E``.

    Returns:
        ``int64 [N]`` on ``topk_idx.device``: distinct nodes per token.

    Raises:
        TypeError: ``topk_idx`` not an integer tensor, or non-int counts.
        ValueError: ``topk_idx`` not 2-D, ids outside ``[-1, num_experts)``
            (checked, which synchronises with the device) or ``num_experts``
            not divisible by ``num_nodes``.
    """
    _check_tensor("topk_idx", topk_idx, 2)
    if topk_idx.is_floating_point() or topk_idx.is_complex() or topk_idx.dtype == torch.bool:
        raise TypeError(f"topk_idx must have an integer dtype, got {topk_idx.dtype}")
    experts_per_node, _ = _check_placement(num_experts, num_nodes, 1)
    num_tokens = topk_idx.shape[0]
    if topk_idx.numel() > 0:
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(
                f"topk_idx entries must lie in [-1, num_experts={num_experts}), "
                f"got values in [{lo}, {hi}]"
            )
    idx = topk_idx.long()
    # -1 maps to an extra "nowhere" column that is dropped afterwards.
    node = torch.where(idx >= 0, torch.div(idx, experts_per_node, rounding_mode="floor"), num_nodes)
    hit = torch.zeros(num_tokens, num_nodes + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, node, True)
    return hit[:, :num_nodes].sum(dim=1, dtype=torch.int64)


# --------------------------------------------------------------------------
# synthetic routings
# --------------------------------------------------------------------------


def _check_generator(generator: object) -> torch.Generator | None:
    """Accept ``None`` or a CPU ``torch.Generator``."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    return generator


def _check_drop_prob(drop_prob: object) -> float:
    """Return ``drop_prob`` as a float in ``[0, 1]``, or raise TypeError/ValueError."""
    p = _check_real("drop_prob", drop_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob}")
    return p


def _finish_routing(
    topk_idx: Tensor,
    *,
    drop_prob: float,
    sort: bool,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """Apply optional sorting and random ``-1`` drops, then move to ``device``."""
    if sort:
        topk_idx = torch.sort(topk_idx, dim=1).values
    if drop_prob > 0.0:
        drop = torch.rand(topk_idx.shape, generator=generator) < drop_prob
        topk_idx = topk_idx.masked_fill(drop, -1)
    topk_idx = topk_idx.contiguous()
    return topk_idx if device is None else topk_idx.to(device)


def _gumbel_keys(log_weights: Tensor, generator: torch.Generator | None) -> Tensor:
    """``log_weights`` plus i.i.d. standard Gumbel noise (same shape, float64).

    The indices of the ``k`` largest keys are a weighted sample of ``k``
    distinct indices without replacement (the Gumbel-top-k trick).
    """
    u = torch.rand(log_weights.shape, generator=generator, dtype=torch.float64)
    u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1.0 - 2.0**-53)
    return log_weights - torch.log(-torch.log(u))


def _node_limited_sample(
    log_weights: Tensor,
    num_tokens: int,
    num_experts: int,
    top_k: int,
    num_nodes: int,
    nodes_kept: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Sample distinct, node-limited experts per token by Gumbel-top-k.

    Nodes are first drawn without replacement with probability proportional to
    the total weight of their experts (only when ``nodes_kept < num_nodes``),
    then ``top_k`` experts are drawn without replacement, proportionally to
    their weights, among the experts of the drawn nodes.

    Args:
        log_weights: ``float64 [E]`` log popularity of every expert.

    Returns:
        ``int64 [num_tokens, top_k]`` expert ids (CPU).
    """
    experts_per_node = num_experts // num_nodes
    expert_logw = log_weights.expand(num_tokens, num_experts)
    if nodes_kept < num_nodes:
        node_logw = torch.logsumexp(log_weights.view(num_nodes, experts_per_node), dim=1)
        node_keys = _gumbel_keys(node_logw.expand(num_tokens, num_nodes), generator)
        kept = _stable_topk_indices(node_keys, nodes_kept)
        node_mask = torch.zeros(num_tokens, num_nodes, dtype=torch.bool)
        node_mask.scatter_(1, kept, True)
        expert_mask = node_mask.repeat_interleave(experts_per_node, dim=1)
        expert_logw = expert_logw.masked_fill(~expert_mask, float("-inf"))
    keys = _gumbel_keys(expert_logw, generator)
    return _stable_topk_indices(keys, top_k)


def random_topk_idx(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    num_nodes: int,
    max_nodes: int = 4,
    generator: torch.Generator | None = None,
    drop_prob: float = 0.0,
    sort: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random node-limited routing, for tests and benchmarks.

    Each token first draws ``min(max_nodes, num_nodes)`` distinct nodes
    uniformly, then ``top_k`` distinct experts uniformly among the experts of
    those nodes.  Each entry is then independently replaced by ``-1`` with
    probability ``drop_prob``.  All randomness comes from ``generator`` (on
    the CPU), so a generator seeded the same way yields the same tensor.

    Args:
        num_tokens: ``N >= 0``.
        num_experts: ``E >= 1``, divisible by ``num_nodes``.
        top_k: experts per token, ``1 <= top_k <= min(max_nodes, num_nodes) *
            E / num_nodes``.
        num_nodes: number of nodes ``M`` the experts are split over.
        max_nodes: most nodes a token may reach.
        generator: CPU ``torch.Generator``; ``None`` uses torch's global RNG
            (then the result is not reproducible by itself).
        drop_prob: probability in ``[0, 1]`` that an entry becomes ``-1``.
        sort: sort each row's expert ids ascending (before dropping); if
            False a row is in random order.
        device: where to put the result (default CPU).

    Returns:
        ``int64 [N, top_k]`` expert ids; the non-negative ids of a row are
        distinct and reach at most ``min(max_nodes, num_nodes)`` nodes.

    Raises:
        TypeError: wrong argument types.
        ValueError: out-of-range sizes or ``drop_prob``, non-CPU generator.
    """
    _check_int("num_tokens", num_tokens, minimum=0)
    experts_per_node, nodes_kept = _check_placement(num_experts, num_nodes, max_nodes)
    top_k = _check_top_k(top_k, experts_per_node, nodes_kept, max_nodes)
    generator = _check_generator(generator)
    p = _check_drop_prob(drop_prob)
    log_weights = torch.zeros(num_experts, dtype=torch.float64)
    idx = _node_limited_sample(
        log_weights, num_tokens, num_experts, top_k, num_nodes, nodes_kept, generator
    )
    return _finish_routing(idx, drop_prob=p, sort=sort, generator=generator, device=device)


def zipf_topk_idx(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    alpha: float = 1.0,
    num_nodes: int = 1,
    max_nodes: int | None = None,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_prob: float = 0.0,
    sort: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Routing with Zipf-skewed expert popularity, for imbalance benchmarks.

    Expert of popularity rank ``r`` (1 = hottest) has weight ``r ** -alpha``.
    With ``shuffle`` the ranks are assigned to experts by a random permutation
    drawn from ``generator`` (so the hot experts are scattered over nodes);
    without it expert 0 is the hottest, expert 1 next, and so on.  Each token
    draws ``top_k`` distinct experts, proportionally to weight, without
    replacement (Gumbel-top-k).  If ``max_nodes`` is given and smaller than
    ``num_nodes``, each token first draws that many distinct nodes
    (proportionally to the summed weight of their experts) and only picks
    experts on them.  Entries are then dropped to ``-1`` with probability
    ``drop_prob``.  Deterministic given a seeded ``generator``.

    Args:
        num_tokens: ``N >= 0``.
        num_experts: ``E >= 1``, divisible by ``num_nodes``.
        top_k: experts per token (at most the experts on the reachable nodes).
        alpha: Zipf exponent ``>= 0``; 0 is uniform, larger is more skewed.
        num_nodes: number of nodes ``M`` the experts are split over.
        max_nodes: most nodes a token may reach; ``None`` means no limit.
        generator: CPU ``torch.Generator`` or ``None`` (global RNG).
        shuffle: randomly permute which expert gets which popularity rank.
        drop_prob: probability in ``[0, 1]`` that an entry becomes ``-1``.
        sort: sort each row's expert ids ascending (before dropping).
        device: where to put the result (default CPU).

    Returns:
        ``int64 [N, top_k]`` expert ids; non-negative ids of a row are
        distinct (and respect the node limit when one is given).

    Raises:
        TypeError: wrong argument types.
        ValueError: out-of-range sizes, ``alpha`` or ``drop_prob``; non-CPU
            generator.
    """
    _check_int("num_tokens", num_tokens, minimum=0)
    a = _check_real("alpha", alpha)
    if a < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    limit = num_nodes if max_nodes is None else max_nodes
    experts_per_node, nodes_kept = _check_placement(num_experts, num_nodes, limit)
    top_k = _check_top_k(top_k, experts_per_node, nodes_kept, limit)
    generator = _check_generator(generator)
    p = _check_drop_prob(drop_prob)

    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    log_weights_by_rank = -a * torch.log(ranks)
    if shuffle:
        perm = torch.randperm(num_experts, generator=generator)
        log_weights = torch.empty_like(log_weights_by_rank)
        log_weights[perm] = log_weights_by_rank  # expert perm[r] gets rank r+1
    else:
        log_weights = log_weights_by_rank
    idx = _node_limited_sample(
        log_weights, num_tokens, num_experts, top_k, num_nodes, nodes_kept, generator
    )
    return _finish_routing(idx, drop_prob=p, sort=sort, generator=generator, device=device)
