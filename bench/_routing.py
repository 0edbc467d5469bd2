"""Routings for the benchmarks: one ``topk_idx`` per rank, all ranks' at once.

Every routing is generated *globally* (all ranks' tokens from one seeded
generator) and each rank takes its slice. That way

* every rank knows every rank's routing without communicating, so the
  benchmark can compute the exact bytes each algorithm must move (and the
  transport ceiling's split sizes) locally;
* a skewed expert popularity (Zipf) is the same on every rank, as it is for a
  real model (a per-rank generator would give each rank its own hot experts
  and average the skew away);
* the cluster model (one process) sees the same routing the distributed
  benchmark does.

Kinds:

``uniform``  node-limited uniform routing (:func:`epcomm.routing.random_topk_idx`).
``zipf``     Zipf-skewed expert popularity, hot experts scattered over nodes
             (:func:`epcomm.routing.zipf_topk_idx`, ``alpha``).
``khot``     k-hot incast: a fraction ``khot_frac`` of the tokens choose all their
             experts on the first ``khot_ranks`` ranks (many tokens, few
             receivers); the rest route uniformly.
``gate``     DeepSeek-V3's node-limited gate (:func:`epcomm.routing.node_limited_gate`)
             on random logits.
"""

from __future__ import annotations

import math

import torch

from epcomm.routing import node_limited_gate, random_topk_idx, zipf_topk_idx

ROUTINGS = ("uniform", "zipf", "khot", "gate")


def global_topk_idx(
    kind: str,
    *,
    world: int,
    nvl: int,
    tokens: int,
    experts: int,
    topk: int,
    max_nodes: int = 4,
    seed: int = 0,
    zipf_alpha: float = 1.0,
    khot_ranks: int = 2,
    khot_frac: float = 0.75,
) -> torch.Tensor:
    """``int64 [world, tokens, topk]``: rank ``r``'s ``topk_idx`` is ``[r]``.

    Deterministic in ``seed``; the same call on every rank gives the same tensor.
    """
    if kind not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {kind!r}")
    if world % nvl or experts % world:
        raise ValueError(f"need world % nvl == 0 and experts % world == 0 (world={world}, nvl={nvl}, experts={experts})")
    nodes = world // nvl
    total = world * tokens
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        idx = random_topk_idx(total, experts, topk, num_nodes=nodes, max_nodes=max_nodes, generator=g)
    elif kind == "zipf":
        idx = zipf_topk_idx(
            total, experts, topk, alpha=zipf_alpha, num_nodes=nodes,
            max_nodes=max_nodes if max_nodes < nodes else None, generator=g,
        )
    elif kind == "gate":
        logits = torch.randn(total, experts, generator=g)
        idx = node_limited_gate(logits, None, top_k=topk, num_nodes=nodes, max_nodes=max_nodes).topk_idx
    else:  # khot
        per_rank = experts // world
        hot_ranks = max(khot_ranks, math.ceil(topk / per_rank))
        hot_nodes = math.ceil(hot_ranks / nvl)
        if hot_ranks > world or hot_nodes > max_nodes:
            raise ValueError(
                f"k-hot routing needs {hot_ranks} hot ranks on {hot_nodes} nodes; "
                f"have {world} ranks, max_nodes={max_nodes}"
            )
        idx = random_topk_idx(total, experts, topk, num_nodes=nodes, max_nodes=max_nodes, generator=g)
        hot = torch.rand(total, generator=g) < khot_frac
        num_hot = int(hot.sum())
        if num_hot:
            hot_experts = hot_ranks * per_rank
            idx[hot] = random_topk_idx(num_hot, hot_experts, topk, num_nodes=1, max_nodes=1, generator=g)
    return idx.view(world, tokens, topk).contiguous()


def routing_params(args) -> dict:
    """The keyword arguments of :func:`global_topk_idx` taken from parsed CLI ``args``."""
    return dict(
        max_nodes=args.max_nodes, seed=args.seed, zipf_alpha=args.zipf_alpha,
        khot_ranks=args.khot_ranks, khot_frac=args.khot_frac,
    )


def add_routing_args(parser) -> None:
    parser.add_argument("--routing", choices=ROUTINGS, default="gate",
                        help="token routing (default: DeepSeek-V3 node-limited gate)")
    parser.add_argument("--max-nodes", type=int, default=4, help="most nodes per token (V3: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zipf-alpha", type=float, default=1.0, help="Zipf exponent of expert popularity")
    parser.add_argument("--khot-ranks", type=int, default=2, help="k-hot: number of hot (incast) ranks")
    parser.add_argument("--khot-frac", type=float, default=0.75, help="k-hot: fraction of tokens sent to hot ranks")
