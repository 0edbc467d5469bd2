"""Expert placement quality: max/mean GPU load before and after redundant-expert placement.

    python bench/eplb_quality.py                         # the table in bench/RESULTS.md (well under a minute)
    python bench/eplb_quality.py --layers 4 --zipf-alpha 1.2 --json eplb.json

One process, no communication. For every combination of

* logical experts ``n`` in ``--experts`` (64, 128, 256),
* GPUs ``P`` in ``--gpus`` (8, 16, 32, 64), 8 per node (``num_nodes = max(1, P // 8)``),
* redundant slots in ``--redundant`` (0, 8, 16, 32): ``num_replicas = n + redundant``,
  skipped unless it is a multiple of ``P``,

and two kinds of per-expert load (``--layers`` independent draws each):

``zipf``  expert of popularity rank ``r`` has load ``r ** -alpha`` (``--zipf-alpha``), the
          ranks shuffled over experts;
``gate``  tokens per expert when DeepSeek-V3's node-limited gate
          (:func:`epcomm.routing.node_limited_gate`: top-8, 8 expert groups, at most 4
          groups per token) routes ``--tokens`` tokens whose logits are standard normal
          plus a per-expert popularity offset of standard deviation ``--gate-skew``,

it reports the most loaded GPU divided by the mean GPU load (``sum(load) / P``):

``before``   no replicas, expert ``e`` on GPU ``e // (n / P)`` (epcomm's placement today);
``greedy``   :func:`epcomm.eplb.greedy_baseline`;
``policy``   :func:`epcomm.eplb.rebalance_experts` with ``num_groups = 8``;
``bound``    :func:`epcomm.eplb.fractional_lower_bound` for placements that keep groups on
             nodes (what the policy and the baseline produce; no placement of that kind can
             do better);
``free``     the same bound without the group constraint (any placement);
``pol/bnd``  policy / bound (1.00 = provably optimal).

Each figure is the mean over the layers; the JSON has every layer's values.

``--section routing`` (or ``all``) measures replica *routing* per step instead
(:func:`epcomm.eplb.logical_to_physical`): ``P`` ranks (8 per node) each route
``--routing-tokens`` tokens through the node-limited gate, ``n`` = ``--routing-experts``
logical experts, ``P`` redundant slots (one per GPU), the placement computed by
:func:`~epcomm.eplb.rebalance_experts` from ``--warmup`` steps and then kept for
``--steps`` measured steps. ``skewed``: fixed per-expert popularity (std
``--routing-skew`` on the logits), so only sampling noise differs between steps;
``shifting``: the popularity takes a random step of std ``--drift`` every step, so
the placement grows stale. Per step, max rank load / mean rank load for

``before``   no replicas (contiguous placement);
``local``    the static policy (own rank, own node, then spread);
``dynamic``  ``policy="dynamic"`` from the step's ``[world, n]`` counts (its plan: the
             exact min-max split of the step's counts over the replicas);

with the share of (token, expert) pairs sent to another node (each such pair is not
always a network row, as two-hop dispatch merges a token's pairs per node) and the
time :func:`~epcomm.eplb.dynamic_plan` takes per step on one rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from epcomm.eplb import (
    Placement,
    dynamic_plan,
    fractional_lower_bound,
    greedy_baseline,
    logical_counts,
    logical_to_physical,
    rank_loads,
    rebalance_experts,
)
from epcomm.routing import node_limited_gate

GPUS_PER_NODE = 8
NUM_GROUPS = 8
TOP_K = 8
MAX_GROUPS_PER_TOKEN = 4


def zipf_loads(n: int, layers: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """float64 ``[layers, n]``: Zipf popularity ``r ** -alpha``, ranks shuffled per layer, summing to 1e6."""
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    rows = [(ranks ** -alpha)[torch.randperm(n, generator=generator)] for _ in range(layers)]
    w = torch.stack(rows)
    return w / w.sum(dim=1, keepdim=True) * 1e6


def gate_loads(n: int, layers: int, tokens: int, skew: float, generator: torch.Generator) -> torch.Tensor:
    """int64 ``[layers, n]``: tokens routed to each expert by the node-limited gate on skewed logits."""
    rows = []
    for _ in range(layers):
        popularity = torch.randn(n, generator=generator) * skew
        logits = torch.randn(tokens, n, generator=generator) + popularity
        idx = node_limited_gate(logits, None, top_k=TOP_K, num_nodes=NUM_GROUPS,
                                max_nodes=MAX_GROUPS_PER_TOKEN).topk_idx
        rows.append(torch.bincount(idx.flatten(), minlength=n))
    return torch.stack(rows)


def measure(weight: torch.Tensor, n: int, gpus: int, redundant: int) -> dict:
    """One table row: every ratio per layer and its mean over layers."""
    nodes = max(1, gpus // GPUS_PER_NODE)
    replicas = n + redundant
    mean = weight.double().sum(dim=1) / gpus
    ratios = {
        "before": Placement.contiguous(n, gpus, num_layers=weight.shape[0]).gpu_loads(weight),
        "greedy": Placement(*greedy_baseline(weight, replicas, NUM_GROUPS, nodes, gpus), num_gpus=gpus).gpu_loads(weight),
    }
    t0 = time.perf_counter()
    policy = rebalance_experts(weight, replicas, NUM_GROUPS, nodes, gpus)
    policy_s = time.perf_counter() - t0
    ratios["policy"] = Placement(*policy, num_gpus=gpus).gpu_loads(weight)
    per_layer = {k: (v.max(dim=1).values / mean).tolist() for k, v in ratios.items()}
    per_layer["bound"] = (fractional_lower_bound(weight, replicas, gpus, num_groups=NUM_GROUPS, num_nodes=nodes)
                          / mean).tolist()
    per_layer["free"] = (fractional_lower_bound(weight, replicas, gpus) / mean).tolist()
    per_layer["policy_over_bound"] = [p / b for p, b in zip(per_layer["policy"], per_layer["bound"])]
    per_layer["policy_minus_greedy"] = [p - g for p, g in zip(per_layer["policy"], per_layer["greedy"])]
    row = {
        "experts": n, "gpus": gpus, "nodes": nodes, "redundant": redundant, "replicas": replicas,
        "slots_per_gpu": replicas // gpus, "policy_seconds": policy_s,
        "expert_max_over_mean": (weight.double().max(dim=1).values / weight.double().mean(dim=1)).mean().item(),
    }
    row.update({k: sum(v) / len(v) for k, v in per_layer.items()})
    row["policy_over_bound_max"] = max(per_layer["policy_over_bound"])
    row["per_layer"] = per_layer
    return row


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for kind in ("zipf", "gate"):
        for n in args.experts:
            if kind == "zipf":
                weight = zipf_loads(n, args.layers, args.zipf_alpha, generator)
            else:
                weight = gate_loads(n, args.layers, args.tokens, args.gate_skew, generator)
            for gpus in args.gpus:
                for redundant in args.redundant:
                    if (n + redundant) % gpus or n % gpus:
                        continue
                    rows.append({"loads": kind, **measure(weight, n, gpus, redundant)})
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {
            "gpus_per_node": GPUS_PER_NODE, "num_groups": NUM_GROUPS, "top_k": TOP_K,
            "max_groups_per_token": MAX_GROUPS_PER_TOKEN},
        "rows": rows,
        "elapsed_s": time.perf_counter() - started,
    }


COLUMNS = ("before", "greedy", "policy", "bound", "free", "policy_over_bound")
HEADERS = ("before", "greedy", "policy", "bound", "free", "pol/bnd")


def print_table(result: dict, file=sys.stdout) -> None:
    cfg = result["config"]
    print(f"max/mean GPU load, mean over {cfg['layers']} layers; zipf alpha {cfg['zipf_alpha']}; gate: "
          f"{cfg['tokens']} tokens, top-{cfg['top_k']}, {cfg['num_groups']} groups, <= {cfg['max_groups_per_token']} "
          f"per token, popularity skew {cfg['gate_skew']}; {cfg['gpus_per_node']} GPUs per node", file=file)
    print(file=file)
    head = ("| loads | experts | exp max/mean | GPUs | nodes | redundant | slots/GPU | "
            + " | ".join(HEADERS) + " |")
    print(head, file=file)
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(COLUMNS), file=file)
    for r in result["rows"]:
        cells = [f"{r[c]:.2f}" if c != "policy_over_bound" else f"{r[c]:.3f}" for c in COLUMNS]
        print(f"| {r['loads']} | {r['experts']} | {r['expert_max_over_mean']:.1f} | {r['gpus']} | {r['nodes']} | "
              f"{r['redundant']} | {r['slots_per_gpu']} | " + " | ".join(cells) + " |", file=file)
    rows = result["rows"]
    worst_gap = max(max(r["per_layer"]["policy_minus_greedy"]) for r in rows)
    ratios = [x for r in rows for x in r["per_layer"]["policy_over_bound"]]
    print(file=file)
    print(f"{len(rows)} rows, {len(ratios)} layer placements in {result['elapsed_s']:.1f} s; "
          f"policy - greedy (max/mean) at most {worst_gap:+.4f}; policy / bound: "
          f"mean {sum(ratios) / len(ratios):.3f}, max {max(ratios):.3f}, "
          f"{sum(x <= 1.001 for x in ratios)} of {len(ratios)} within 0.1%", file=file)


# ---------------------------------------------------------------- replica routing per step


def routing_steps(n: int, gpus: int, tokens: int, steps: int, skew: float, drift: float,
                  generator: torch.Generator) -> list[list[torch.Tensor]]:
    """``steps`` lists of ``gpus`` logical ``topk_idx`` ``[tokens, TOP_K]`` from the node-limited gate.

    The per-expert popularity offset starts at std ``skew`` and takes a Gaussian step of std ``drift``
    after every step (0: stationary).
    """
    popularity = torch.randn(n, generator=generator) * skew
    out = []
    for _ in range(steps):
        out.append([node_limited_gate(torch.randn(tokens, n, generator=generator) + popularity, None, top_k=TOP_K,
                                      num_nodes=NUM_GROUPS, max_nodes=MAX_GROUPS_PER_TOKEN).topk_idx
                    for _ in range(gpus)])
        popularity = popularity + torch.randn(n, generator=generator) * drift
    return out


def measure_routing(steps: list[list[torch.Tensor]], warmup: int, n: int, gpus: int, hierarchical: bool) -> dict:
    """One routing row: per-step max/mean rank load of no replicas, the local and the dynamic policy."""
    nvl = min(GPUS_PER_NODE, gpus)
    nodes = gpus // nvl
    counts = [torch.stack([logical_counts(idx, n) for idx in ranks]) for ranks in steps]
    warm = sum(counts[:warmup]).sum(0, keepdim=True).double()
    groups, placement_nodes = (NUM_GROUPS, nodes) if hierarchical else (1, 1)
    placement = Placement.rebalance(warm, n + gpus, groups, placement_nodes, gpus).layer(0)
    before_p = Placement.contiguous(n, gpus)
    node_of = torch.arange(gpus) // nvl
    per_step: dict[str, list[float]] = {k: [] for k in ("before", "local", "dynamic", "local_xnode", "dynamic_xnode",
                                                          "plan_ms")}
    for ranks, c in zip(steps[warmup:], counts[warmup:]):
        mean = float(c.sum()) / gpus
        per_step["before"].append(float(before_p.gpu_loads(c.sum(0)).max()) / mean)
        local = torch.zeros(gpus, dtype=torch.int64)
        cross = 0
        for r, idx in enumerate(ranks):
            # a global placement ignores the gate's groups, so a token may reach every node: no cap there
            phys = logical_to_physical(idx, placement, r, num_nvl_ranks=nvl,
                                       max_nodes_per_token=MAX_GROUPS_PER_TOKEN if hierarchical else nodes)
            local += rank_loads(phys, placement)
            dest = phys[phys >= 0] // placement.slots_per_gpu
            cross += int((node_of[dest] != node_of[r]).sum())
        per_step["local"].append(float(local.max()) / mean)
        per_step["local_xnode"].append(cross / float(c.sum()))
        t0 = time.perf_counter()
        plan = dynamic_plan(c, placement, num_nvl_ranks=nvl)  # what every rank computes, once per step
        per_step["plan_ms"].append((time.perf_counter() - t0) * 1e3)
        per_step["dynamic"].append(float(plan.sum((0, 1)).max()) / mean)
        sent = plan.sum(1)  # [source rank, destination GPU]
        per_step["dynamic_xnode"].append(float(sent[node_of[:, None] != node_of[None, :]].sum()) / float(c.sum()))
    row = {"gpus": gpus, "nodes": nodes, "redundant": gpus, "placement": "hier" if hierarchical else "global"}
    row.update({k: sum(v) / len(v) for k, v in per_step.items()})
    row["local_worst"] = max(per_step["local"])
    row["dynamic_worst"] = max(per_step["dynamic"])
    row["per_step"] = per_step
    return row


def run_routing(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    n = args.routing_experts
    for kind, drift in (("skewed", 0.0), ("shifting", args.drift)):
        for gpus in args.routing_gpus:
            steps = routing_steps(n, gpus, args.routing_tokens, args.warmup + args.steps, args.routing_skew, drift,
                                  generator)
            for hierarchical in (True, False):
                rows.append({"routing": kind, "experts": n, **measure_routing(steps, args.warmup, n, gpus,
                                                                              hierarchical)})
    return {"config": {"experts": n, "tokens_per_rank": args.routing_tokens, "warmup": args.warmup,
                       "steps": args.steps, "skew": args.routing_skew, "drift": args.drift, "top_k": TOP_K,
                       "gpus_per_node": GPUS_PER_NODE, "seed": args.seed},
            "rows": rows, "elapsed_s": time.perf_counter() - started}


def print_routing_table(result: dict, file=sys.stdout) -> None:
    cfg = result["config"]
    print(f"replica routing: max/mean rank load per step (mean over {cfg['steps']} steps, worst step in brackets); "
          f"{cfg['experts']} logical experts, top-{cfg['top_k']} node-limited gate, {cfg['tokens_per_rank']} "
          f"tokens/rank, popularity skew {cfg['skew']}, drift {cfg['drift']}/step (shifting); placement from "
          f"{cfg['warmup']} warm-up steps, one redundant slot per GPU; {cfg['gpus_per_node']} GPUs per node", file=file)
    print(file=file)
    print("| routing | placement | GPUs | nodes | before | local | dynamic | cross-node pairs local | dynamic | "
          "plan ms |", file=file)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", file=file)
    for r in result["rows"]:
        print(f"| {r['routing']} | {r['placement']} | {r['gpus']} | {r['nodes']} | {r['before']:.2f} | "
              f"{r['local']:.2f} ({r['local_worst']:.2f}) | {r['dynamic']:.3f} ({r['dynamic_worst']:.3f}) | "
              f"{100 * r['local_xnode']:.1f}% | {100 * r['dynamic_xnode']:.1f}% | {r['plan_ms']:.0f} |", file=file)
    print(file=file)
    print(f"{len(result['rows'])} rows in {result['elapsed_s']:.1f} s", file=file)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=parse_ints, default=[64, 128, 256], help="logical experts (comma list)")
    parser.add_argument("--gpus", type=parse_ints, default=[8, 16, 32, 64], help="GPUs (comma list), 8 per node")
    parser.add_argument("--redundant", type=parse_ints, default=[0, 8, 16, 32], help="redundant slots (comma list)")
    parser.add_argument("--layers", type=int, default=2, help="independent load draws per row")
    parser.add_argument("--zipf-alpha", type=float, default=1.1, help="Zipf exponent of the zipf loads")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens routed by the gate per layer")
    parser.add_argument("--gate-skew", type=float, default=0.3,
                        help="std of the per-expert logit offset (expert popularity) for the gate loads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--section", choices=("placement", "routing", "all"), default="placement",
                        help="placement quality (the default), replica routing per step, or both")
    parser.add_argument("--routing-experts", type=int, default=256, help="routing: logical experts")
    parser.add_argument("--routing-gpus", type=parse_ints, default=[16, 32, 64], help="routing: GPUs (comma list)")
    parser.add_argument("--routing-tokens", type=int, default=256, help="routing: tokens per rank per step")
    parser.add_argument("--routing-skew", type=float, default=0.5, help="routing: std of the popularity offset")
    parser.add_argument("--drift", type=float, default=0.15, help="routing: popularity random-walk std per step")
    parser.add_argument("--warmup", type=int, default=2, help="routing: steps the placement is computed from")
    parser.add_argument("--steps", type=int, default=4, help="routing: measured steps")
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    result: dict = {}
    if args.section in ("placement", "all"):
        result["placement"] = run(args)
        print_table(result["placement"])
    if args.section in ("routing", "all"):
        if args.section == "all":
            print()
        result["routing"] = run_routing(args)
        print_routing_table(result["routing"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result["placement"] if args.section == "placement" else result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
