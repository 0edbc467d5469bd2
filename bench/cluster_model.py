"""Cluster model: predict dispatch/combine time at EP16..EP256 from a real routing.

    python bench/cluster_model.py                       # gate routing, EP8..EP256, vs DeepEP's H800 table
    python bench/cluster_model.py --routing zipf --nvl-bw 160 --net-bw 50 --json model.json

One process, no communication. From the ``topk_idx`` of every rank (generated
by ``bench/_routing.py``, the same routings the distributed benchmark uses) it
builds the exact traffic matrices the algorithms move:

* ``count[s, d]``       tokens of rank s that rank d needs (flat: one row each);
* ``node_count[s, n]``  tokens of rank s that node n needs ((token, node) pairs);
* ``hop1[s, f]``        two-hop network hop: s -> its rail peer f on each node
                        (``node_count`` placed on the rail; the own-node entry is s itself);
* ``hop2[f, d]``        two-hop NVLink forward: forwarder f=(n, l) -> d=(n, l'),
                        ``sum over sources s with local(s) = l of count[s, d]``;
* ``expert_count[s, d]`` (token, expert) pairs: the per-expert dispatcher's rows.

The distributed benchmark checks these matrices against epcomm's byte counters
(``buffer.traffic``) exactly, so the model starts from the bytes the library
really moves.

Time model (documented in bench/RESULTS.md). Each GPU has one NVLink port of
``nvl_bw`` GB/s and one network port of ``net_bw`` GB/s per direction (full
duplex; the H800 figures are *effective* rates). A phase over a link class
takes ``max over GPUs of max(bytes sent, bytes received) / rate`` (the most
loaded port bounds it; self copies are free).

* flat: every row goes straight to its destination; NVLink and network rows
  move at the same time: ``t = max(t_nvl, t_net)``.
* two-hop, pipelined (default; what DeepEP's internode kernels do, chunk by
  chunk): ``t = max(t_net(hop1), t_nvl(hop2))``.
* two-hop, serial (what epcomm's torch backend does, one collective after the
  other): ``t = t_net(hop1) + t_nvl(hop2)``.
* combine is the same traffic reversed; two-hop combine sends one node partial
  per (token, node) over the network, ``--combine-partial`` bytes per element
  (bf16 = 2 like DeepEP's kernels; epcomm's torch backend sends fp32 = 4).

A fixed ``--overhead-us`` per operation (launch, notify, barrier) can be added;
it defaults to 0, so the predictions are pure link-bound lower bounds on time
(upper bounds on bandwidth).

Bandwidth uses DeepEP's accounting: network ("RDMA") bandwidth = (token,
destination node) pairs including the local node x row bytes / time; NVLink
bandwidth = received rows x row bytes / time; both per GPU (the mean over
ranks). Row bytes: FP8 dispatch ``H + 4 H / 128``, BF16 combine ``2 H``.

Large EP sizes sample ``--max-sampled-tokens`` tokens in total (EP64 at 4096
tokens per rank fits exactly; EP128 samples 2048 per rank, EP256 1024) and
scale the bytes to ``--tokens`` per rank; the tables say when they did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _routing import add_routing_args, global_topk_idx, routing_params  # noqa: E402

LINKS = ("self", "nvl", "rdma")

# DeepEP V1 normal mode, H800 (anchors.md): EP -> (dispatch GB/s, combine GB/s, accounting)
DEEPEP_H800 = {
    8: (153.0, 158.0, "nvl"),
    16: (43.0, 43.0, "rdma"),
    32: (58.0, 57.0, "rdma"),
    64: (51.0, 50.0, "rdma"),
}


def fp8_row_bytes(hidden: int) -> int:
    return hidden + 4 * (hidden // 128)


def link_classes(world: int, nvl: int) -> torch.Tensor:
    """``int64 [R, R]``: 0 self, 1 NVLink (same node), 2 network."""
    r = torch.arange(world)
    same_node = (r.unsqueeze(1) // nvl) == (r.unsqueeze(0) // nvl)
    cls = torch.where(same_node, torch.ones(world, world, dtype=torch.int64), torch.full((world, world), 2))
    cls.fill_diagonal_(0)
    return cls


@dataclass
class TrafficMatrices:
    """Row counts between ranks (``[R, R]`` int64 unless noted); see the module docs."""

    world: int
    nvl: int
    tokens: int  # tokens per rank the matrices were computed from
    count: torch.Tensor
    node_count: torch.Tensor  # [R, M]
    hop1: torch.Tensor
    hop2: torch.Tensor
    expert_count: torch.Tensor
    link: torch.Tensor

    @property
    def nodes(self) -> int:
        return self.world // self.nvl

    def rows_by_link(self, mat: torch.Tensor) -> dict[str, int]:
        return {name: int(mat[self.link == c].sum()) for c, name in enumerate(LINKS)}

    def pairs(self) -> dict[str, int]:
        """Routing totals over all ranks."""
        node_of = torch.arange(self.world) // self.nvl
        own_node = self.node_count.gather(1, node_of.unsqueeze(1)).sum()
        return {
            "token_rank_pairs": int(self.count.sum()),
            "token_node_pairs": int(self.node_count.sum()),
            "token_remote_node_pairs": int(self.node_count.sum() - own_node),
            "token_expert_pairs": int(self.expert_count.sum()),
            "token_expert_remote_node_pairs": self.rows_by_link(self.expert_count)["rdma"],
            "token_rank_remote_node_pairs": self.rows_by_link(self.count)["rdma"],
        }


def traffic_matrices(topk_all: torch.Tensor, experts: int, nvl: int) -> TrafficMatrices:
    """The matrices of the routing ``topk_all`` (``int64 [R, N, K]``, ``-1`` = no expert)."""
    world, tokens, topk = topk_all.shape
    nodes = world // nvl
    per_rank = experts // world
    rank_of = torch.where(topk_all >= 0, torch.div(topk_all, per_rank, rounding_mode="floor"),
                          torch.full_like(topk_all, world))  # [R, N, K], world = nowhere
    in_rank = torch.zeros(world * tokens, world + 1, dtype=torch.bool)
    in_rank.scatter_(1, rank_of.view(world * tokens, topk), True)
    in_rank = in_rank[:, :world].view(world, tokens, world)
    count = in_rank.sum(1, dtype=torch.int64)  # [R(src), R(dst)]
    node_count = in_rank.view(world, tokens, nodes, nvl).any(3).sum(1, dtype=torch.int64)  # [R, M]
    del in_rank
    src = torch.arange(world).view(world, 1, 1).expand_as(rank_of)
    flat = (src * (world + 1) + rank_of).flatten()
    expert_count = torch.bincount(flat, minlength=world * (world + 1)).view(world, world + 1)[:, :world].contiguous()

    r = torch.arange(world)
    local, node = r % nvl, r // nvl
    hop1 = torch.zeros(world, world, dtype=torch.int64)
    for n in range(nodes):  # s -> (n, local(s))
        hop1[r, n * nvl + local] = node_count[:, n]
    per_local = count.view(nodes, nvl, world).sum(0)  # [l, d]: rows from sources with local index l
    same_node = node.unsqueeze(1) == node.unsqueeze(0)
    hop2 = torch.where(same_node, per_local[local], torch.zeros_like(count))
    return TrafficMatrices(world, nvl, tokens, count, node_count, hop1, hop2, expert_count, link_classes(world, nvl))


def expected_traffic(tm: TrafficMatrices, hidden: int, fp8: bool, combine_partial_bytes: int = 4) -> dict:
    """Rows and payload bytes per algorithm, operation and link class, summed over ranks.

    Exactly what epcomm's ``buffer.traffic`` (and the per-expert baseline) must
    record: ``{algo: {op: {link: {"rows", "payload_bytes"}}}}``.
    """
    rb_dispatch = fp8_row_bytes(hidden) if fp8 else 2 * hidden
    rb_combine = 2 * hidden

    def of(parts: list[tuple[torch.Tensor, int]]) -> dict:
        out = {link: {"rows": 0, "payload_bytes": 0} for link in LINKS}
        for mat, rb in parts:
            for link, rows in tm.rows_by_link(mat).items():
                out[link]["rows"] += rows
                out[link]["payload_bytes"] += rows * rb
        return out

    partial = combine_partial_bytes * hidden
    return {
        "flat": {
            "dispatch": of([(tm.count, rb_dispatch)]),
            "cached dispatch": of([(tm.count, rb_dispatch)]),
            "combine": of([(tm.count.t(), rb_combine)]),
        },
        "two_hop": {
            "dispatch": of([(tm.hop1, rb_dispatch), (tm.hop2, rb_dispatch)]),
            "cached dispatch": of([(tm.hop1, rb_dispatch), (tm.hop2, rb_dispatch)]),
            "combine": of([(tm.hop2.t(), rb_combine), (tm.hop1.t(), partial)]),
        },
        "per_expert": {
            "dispatch": of([(tm.expert_count, rb_dispatch)]),
            "combine": of([(tm.expert_count.t(), rb_combine)]),
        },
    }


# ----------------------------------------------------------------------------- time model
def port_time(tm: TrafficMatrices, mat: torch.Tensor, row_bytes: float, link: str, rate_Bps: float) -> float:
    """Seconds the busiest port of class ``link`` needs for the rows ``mat`` (send or receive side)."""
    c = LINKS.index(link)
    masked = torch.where(tm.link == c, mat, torch.zeros_like(mat)).double() * row_bytes
    if masked.sum() == 0:
        return 0.0
    return float(torch.maximum(masked.sum(1), masked.sum(0)).max()) / rate_Bps


def predict(tm: TrafficMatrices, *, hidden: int, tokens: int, fp8_dispatch: bool, combine_partial_bytes: int,
            nvl_GBps: float, net_GBps: float, overhead_s: float = 0.0) -> dict:
    """Predicted seconds and DeepEP-accounted bandwidth per algorithm and operation.

    ``tokens`` is the real tokens per rank; the matrices may come from fewer
    (sampled) tokens and are scaled by ``tokens / tm.tokens``.
    """
    scale = tokens / tm.tokens
    nvl_Bps, net_Bps = nvl_GBps * 1e9, net_GBps * 1e9
    rb = {"dispatch": fp8_row_bytes(hidden) if fp8_dispatch else 2 * hidden, "combine": 2 * hidden}
    partial_rb = combine_partial_bytes * hidden
    pairs = tm.pairs()
    out: dict = {}
    for op in ("dispatch", "combine"):
        rev = op == "combine"
        row = rb[op] * scale
        cnt = tm.count.t() if rev else tm.count
        h1 = tm.hop1.t() if rev else tm.hop1
        h2 = tm.hop2.t() if rev else tm.hop2
        ex = tm.expert_count.t() if rev else tm.expert_count
        net_row = partial_rb * scale if rev else row
        phases = {
            "flat": {"nvl": port_time(tm, cnt, row, "nvl", nvl_Bps), "net": port_time(tm, cnt, row, "rdma", net_Bps)},
            "two_hop": {"nvl": port_time(tm, h2, row, "nvl", nvl_Bps), "net": port_time(tm, h1, net_row, "rdma", net_Bps)},
            "per_expert": {"nvl": port_time(tm, ex, row, "nvl", nvl_Bps), "net": port_time(tm, ex, row, "rdma", net_Bps)},
        }
        # DeepEP accounting, per GPU (mean over ranks), at the real token count
        acc_rdma = pairs["token_node_pairs"] * rb[op] * scale / tm.world
        acc_nvl = pairs["token_rank_pairs"] * rb[op] * scale / tm.world
        for algo, ph in phases.items():
            t = max(ph["nvl"], ph["net"]) + overhead_s
            entry = {"t_nvl_us": ph["nvl"] * 1e6, "t_net_us": ph["net"] * 1e6, "t_us": t * 1e6,
                     "bound": "NVLink" if ph["nvl"] >= ph["net"] else "network"}
            if algo == "two_hop":
                entry["t_serial_us"] = (ph["nvl"] + ph["net"] + overhead_s) * 1e6
            entry["rdma_GBps_deepep"] = acc_rdma / t / 1e9 if t > 0 and tm.nodes > 1 else None
            entry["nvl_GBps_deepep"] = acc_nvl / t / 1e9 if t > 0 else None
            if algo == "two_hop":
                ts = entry["t_serial_us"] / 1e6
                entry["rdma_GBps_deepep_serial"] = acc_rdma / ts / 1e9 if ts > 0 and tm.nodes > 1 else None
            out.setdefault(algo, {})[op] = entry
    # bytes per GPU on the busiest port, for the table
    out["bytes"] = {
        "net_MB_per_gpu_two_hop": float(torch.where(tm.link == 2, tm.hop1, 0).sum(1).max()) * rb["dispatch"] * scale / 1e6,
        "net_MB_per_gpu_flat": float(torch.where(tm.link == 2, tm.count, 0).sum(1).max()) * rb["dispatch"] * scale / 1e6,
        "nvl_MB_per_gpu_two_hop": float(torch.where(tm.link == 1, tm.hop2, 0).sum(1).max()) * rb["dispatch"] * scale / 1e6,
    }
    out["pairs_per_token"] = {k: v / (tm.world * tm.tokens) for k, v in pairs.items()}
    return out


def run_model(args) -> dict:
    eps = [int(e) for e in args.ep.split(",")]
    rows = []
    for ep in eps:
        nvl = min(args.nvl_ranks, ep)
        sampled = min(args.tokens, max(1, args.max_sampled_tokens // ep))
        topk_all = global_topk_idx(args.routing, world=ep, nvl=nvl, tokens=sampled, experts=args.experts,
                                   topk=args.topk, **routing_params(args))
        tm = traffic_matrices(topk_all, args.experts, nvl)
        del topk_all
        pred = predict(tm, hidden=args.hidden, tokens=args.tokens, fp8_dispatch=not args.bf16_dispatch,
                       combine_partial_bytes=2 if args.combine_partial == "bf16" else 4,
                       nvl_GBps=args.nvl_bw, net_GBps=args.net_bw, overhead_s=args.overhead_us * 1e-6)
        row = {"ep": ep, "nodes": ep // nvl, "nvl_ranks": nvl, "sampled_tokens_per_rank": sampled, "prediction": pred}
        if ep in DEEPEP_H800 and nvl == 8 and args.tokens == 4096 and args.hidden == 7168 and args.topk == 8:
            d_pub, c_pub, acc = DEEPEP_H800[ep]
            algo = "flat" if ep // nvl == 1 else "two_hop"
            key = "nvl_GBps_deepep" if acc == "nvl" else "rdma_GBps_deepep"
            d_pred, c_pred = pred[algo]["dispatch"][key], pred[algo]["combine"][key]
            row["deepep"] = {
                "algorithm": algo, "accounting": acc,
                "dispatch_published_GBps": d_pub, "dispatch_predicted_GBps": d_pred,
                "dispatch_error_pct": 100 * (d_pred - d_pub) / d_pub,
                "combine_published_GBps": c_pub, "combine_predicted_GBps": c_pred,
                "combine_error_pct": 100 * (c_pred - c_pub) / c_pub,
            }
        rows.append(row)
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "model": "link-bound: phase = max over GPUs of max(sent, received)/rate; flat = max(nvl, net); "
                 "two-hop pipelined = max(net hop, nvl forward), serial = sum",
        "rows": rows,
    }


def print_model(result: dict, file=sys.stdout) -> None:
    cfg = result["config"]
    print(f"cluster model: routing {cfg['routing']}, {cfg['tokens']} tokens/rank, hidden {cfg['hidden']}, "
          f"top-{cfg['topk']} of {cfg['experts']} experts, <= {cfg['max_nodes']} nodes/token, "
          f"{'BF16' if cfg['bf16_dispatch'] else 'FP8'} dispatch, BF16 combine ({cfg['combine_partial']} node partials), "
          f"NVLink {cfg['nvl_bw']:g} GB/s, network {cfg['net_bw']:g} GB/s per GPU, overhead {cfg['overhead_us']:g} us",
          file=file)
    print(f"{'EP':>4} {'nodes':>5} {'nodes/tok':>9} {'algo':<10} {'op':<8} {'t_net us':>9} {'t_nvl us':>9} "
          f"{'t us':>8} {'serial us':>9} {'bound':<8} {'RDMA GB/s':>9} {'NVL GB/s':>9}", file=file)
    for row in result["rows"]:
        p = row["prediction"]
        note = "" if row["sampled_tokens_per_rank"] == cfg["tokens"] else f"  (sampled {row['sampled_tokens_per_rank']} tok/rank)"
        for algo in ("two_hop", "flat", "per_expert"):
            if row["nodes"] == 1 and algo == "two_hop":
                continue
            for op in ("dispatch", "combine"):
                e = p[algo][op]
                rdma = f"{e['rdma_GBps_deepep']:9.1f}" if e["rdma_GBps_deepep"] is not None else f"{'-':>9}"
                serial = f"{e['t_serial_us']:9.0f}" if "t_serial_us" in e else f"{'-':>9}"
                print(f"{row['ep']:>4} {row['nodes']:>5} {p['pairs_per_token']['token_node_pairs']:>9.2f} {algo:<10} "
                      f"{op:<8} {e['t_net_us']:9.0f} {e['t_nvl_us']:9.0f} {e['t_us']:8.0f} {serial} {e['bound']:<8} "
                      f"{rdma} {e['nvl_GBps_deepep']:9.1f}{note}", file=file)
    cmp_rows = [r for r in result["rows"] if "deepep" in r]
    if cmp_rows:
        print("\nvs DeepEP's published H800 table (4096 tokens, hidden 7168, top-8, FP8 dispatch, BF16 combine):", file=file)
        print(f"{'EP':>4} {'algo':<8} {'acct':<5} {'dispatch pub':>12} {'pred':>7} {'err':>7}   "
              f"{'combine pub':>11} {'pred':>7} {'err':>7}", file=file)
        for r in cmp_rows:
            d = r["deepep"]
            print(f"{r['ep']:>4} {d['algorithm']:<8} {d['accounting']:<5} {d['dispatch_published_GBps']:>12.0f} "
                  f"{d['dispatch_predicted_GBps']:>7.1f} {d['dispatch_error_pct']:>+6.0f}%   "
                  f"{d['combine_published_GBps']:>11.0f} {d['combine_predicted_GBps']:>7.1f} {d['combine_error_pct']:>+6.0f}%",
                  file=file)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", default="8,16,32,64,128,256", help="comma-separated EP sizes (ranks)")
    parser.add_argument("--nvl-ranks", type=int, default=8, help="GPUs per node")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--nvl-bw", type=float, default=160.0, help="NVLink GB/s per GPU per direction")
    parser.add_argument("--net-bw", type=float, default=50.0, help="network GB/s per GPU per direction")
    parser.add_argument("--overhead-us", type=float, default=0.0, help="fixed time added to every operation")
    parser.add_argument("--bf16-dispatch", action="store_true", help="BF16 instead of FP8 dispatch rows")
    parser.add_argument("--combine-partial", choices=("bf16", "fp32"), default="bf16",
                        help="two-hop combine's node partials on the network (DeepEP: bf16; epcomm torch: fp32)")
    parser.add_argument("--max-sampled-tokens", type=int, default=262144,
                        help="sample at most this many tokens in total and scale (memory/time cap)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_routing_args(parser)
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    result = run_model(args)
    print_model(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
