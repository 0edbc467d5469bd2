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
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from epcomm.eplb import Placement, fractional_lower_bound, greedy_baseline, rebalance_experts
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
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
