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
  (bf16 = 2 like DeepEP's kernels and epcomm's default; fp32 = 4 with
  ``Buffer(combine_node_partials="float32")``).

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

Low-latency mode (``--ll``): one message per (token, expert) pair (16-byte header + FP8 payload for
dispatch, a bf16 row for combine), NVLink inside a node, the GPU's NIC across nodes, ``t = fixed +
max(t_nvl, t_net)`` with each port's busiest GPU, compared with DeepEP's published LL table
(``DEEPEP_LL_H800``). The fixed term is fitted (one value for all rows) unless ``--ll-fixed-us`` is
given; the bandwidths are ``--nvl-bw`` / ``--net-bw``. See bench/RESULTS.md, "Low-latency mode".

    python bench/cluster_model.py --ll --json model_ll.json
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

LINKS = ("self", "nvlink", "network")  # epcomm.LinkClass values, in its (and the C++ transport's) order

# DeepEP V1 normal mode, H800 (anchors.md): EP -> (dispatch GB/s, combine GB/s, accounting); the accounting is
# DeepEP's bandwidth figure ("nvl": its NVL GB/s, "rdma": its RDMA GB/s), not a link class
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
            "token_expert_remote_node_pairs": self.rows_by_link(self.expert_count)["network"],
            "token_rank_remote_node_pairs": self.rows_by_link(self.count)["network"],
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
            "flat": {"nvlink": port_time(tm, cnt, row, "nvlink", nvl_Bps),
                     "network": port_time(tm, cnt, row, "network", net_Bps)},
            "two_hop": {"nvlink": port_time(tm, h2, row, "nvlink", nvl_Bps),
                        "network": port_time(tm, h1, net_row, "network", net_Bps)},
            "per_expert": {"nvlink": port_time(tm, ex, row, "nvlink", nvl_Bps),
                           "network": port_time(tm, ex, row, "network", net_Bps)},
        }
        # DeepEP accounting, per GPU (mean over ranks), at the real token count
        acc_rdma = pairs["token_node_pairs"] * rb[op] * scale / tm.world
        acc_nvl = pairs["token_rank_pairs"] * rb[op] * scale / tm.world
        for algo, ph in phases.items():
            t = max(ph["nvlink"], ph["network"]) + overhead_s
            entry = {"t_nvl_us": ph["nvlink"] * 1e6, "t_net_us": ph["network"] * 1e6, "t_us": t * 1e6,
                     "bound": "NVLink" if ph["nvlink"] >= ph["network"] else "network"}
            if algo == "two_hop":
                entry["t_serial_us"] = (ph["nvlink"] + ph["network"] + overhead_s) * 1e6
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


# ----------------------------------------------------------------------------- low-latency (LL) mode
# DeepEP V1 LL, H800 + CX7 400 Gb/s, 128 tokens/rank, hidden 7168, top-8, FP8 dispatch / BF16 combine
# (DeepEP V1 README, low-latency kernels table): EP -> (dispatch us, dispatch GB/s, combine us, combine GB/s)
DEEPEP_LL_H800 = {
    8: (77.0, 98.0, 114.0, 127.0),
    16: (118.0, 63.0, 195.0, 74.0),
    32: (155.0, 48.0, 273.0, 53.0),
    64: (173.0, 43.0, 314.0, 46.0),
    128: (192.0, 39.0, 369.0, 39.0),
    256: (194.0, 39.0, 360.0, 40.0),
}
LL_HEADER_BYTES = 16  # a kernel message's header (epcomm.low_latency.LowLatencyLayout; DeepEP's is 16 B too)


def ll_message_bytes(hidden: int, fp8_dispatch: bool = True) -> dict[str, int]:
    """Bytes of one (token, expert) message on the wire: dispatch header + payload, combine a bf16 row."""
    return {"dispatch": LL_HEADER_BYTES + (fp8_row_bytes(hidden) if fp8_dispatch else 2 * hidden),
            "combine": 2 * hidden}


def ll_port_messages(tm: TrafficMatrices, allow_nvlink: bool = True) -> dict:
    """Messages on the busiest port of each class, per op: ``max over GPUs of max(sent, received)``.

    One message per (token, expert) pair; combine is dispatch reversed. Without ``allow_nvlink`` every
    message to another GPU goes through the NIC (DeepEP with ``allow_nvlink_for_low_latency_mode=False``).
    Self messages are free.
    """
    link = tm.link if allow_nvlink else torch.where(tm.link == 1, torch.full_like(tm.link, 2), tm.link)
    out = {}
    for op in ("dispatch", "combine"):
        mat = tm.expert_count if op == "dispatch" else tm.expert_count.t()
        out[op] = {}
        for name, c in (("nvlink", 1), ("network", 2)):
            masked = torch.where(link == c, mat, torch.zeros_like(mat))
            out[op][name] = int(torch.maximum(masked.sum(1), masked.sum(0)).max()) if masked.sum() else 0
    return out


def ll_link_times(port_messages: dict, *, hidden: int, fp8_dispatch: bool, nvl_GBps: float, net_GBps: float,
                  msg_overhead_us: float = 0.0) -> dict:
    """Link-bound us of an LL dispatch and combine from :func:`ll_port_messages`.

    A port (one NVLink, one NIC per GPU, full duplex) takes ``messages * (message bytes / rate +
    msg_overhead)`` for its busiest GPU (all of an op's messages have one size); NVLink and network run at
    the same time, so an op takes ``max(t_nvl, t_net)``.
    """
    out = {}
    for op, msg in ll_message_bytes(hidden, fp8_dispatch).items():
        n = port_messages[op]
        t_nvl = n["nvlink"] * (msg / (nvl_GBps * 1e3) + msg_overhead_us)
        t_net = n["network"] * (msg / (net_GBps * 1e3) + msg_overhead_us)
        out[op] = {"t_nvl_us": t_nvl, "t_net_us": t_net, "t_link_us": max(t_nvl, t_net),
                   "bound": "NVLink" if t_nvl >= t_net else "network", "port_messages": dict(n)}
    return out


def ll_torch_reference_us(world: int, nvl: int, *, hidden: int, experts: int, num_max: int, fp8_dispatch: bool,
                          nvl_GBps: float, net_GBps: float) -> dict[str, float]:
    """Link-bound us of epcomm's torch LL reference on the same links: every rank sends its whole fixed slot
    array to every other rank (dispatch ``4 E_loc + E_loc M (4 + payload)`` B, combine ``E_loc M 2H`` B per peer)."""
    e_loc = experts // world
    payload = fp8_row_bytes(hidden) if fp8_dispatch else 2 * hidden
    chunks = {"dispatch": 4 * e_loc + e_loc * num_max * (4 + payload), "combine": e_loc * num_max * 2 * hidden}
    nodes = world // nvl
    return {op: max((nvl - 1) * c / (nvl_GBps * 1e9), (world - nvl) * c / (net_GBps * 1e9) if nodes > 1 else 0.0) * 1e6
            for op, c in chunks.items()}


def _fit_fixed_us(link_us: list[float], published_us: list[float]) -> float:
    """The one fixed term f minimising sum(((f + link) - published) / published)^2 (closed form)."""
    w = [1 / p**2 for p in published_us]
    return sum((p - l) * wi for p, l, wi in zip(published_us, link_us, w)) / sum(w)


def run_ll_model(args) -> dict:
    """LL latency at EP sizes ``args.ep`` vs DeepEP's published table (see bench/RESULTS.md, "Low-latency mode")."""
    eps = [int(e) for e in args.ep.split(",")]
    fp8 = not args.bf16_dispatch
    matrices = {}
    for ep in eps:
        nvl = min(args.nvl_ranks, ep)
        max_nodes = args.ll_max_nodes or ep // nvl
        topk_all = global_topk_idx(args.ll_routing, world=ep, nvl=nvl, tokens=args.ll_tokens, experts=args.experts,
                                   topk=args.topk, max_nodes=max_nodes, seed=args.seed, zipf_alpha=args.zipf_alpha,
                                   khot_ranks=args.khot_ranks, khot_frac=args.khot_frac)
        matrices[ep] = traffic_matrices(topk_all, args.experts, nvl)
        del topk_all

    ports = {allow: {ep: ll_port_messages(tm, allow) for ep, tm in matrices.items()} for allow in (True, False)}

    def link_times(msg_us: float, allow_nvlink: bool = True) -> dict:
        return {ep: ll_link_times(n, hidden=args.hidden, fp8_dispatch=fp8, nvl_GBps=args.nvl_bw, net_GBps=args.net_bw,
                                  msg_overhead_us=msg_us) for ep, n in ports[allow_nvlink].items()}

    comparable = args.ll_tokens == 128 and args.hidden == 7168 and args.topk == 8 and fp8
    pub = {ep: DEEPEP_LL_H800[ep] for ep in eps if ep in DEEPEP_LL_H800 and comparable}

    def fitted(times: dict, ops: tuple[str, ...] = ("dispatch", "combine")) -> float:
        link, published = [], []
        for ep, (d_us, _, c_us, _) in pub.items():
            for op, p_us in (("dispatch", d_us), ("combine", c_us)):
                if op in ops:
                    link.append(times[ep][op]["t_link_us"])
                    published.append(p_us)
        return _fit_fixed_us(link, published) if published else 0.0

    main_times = link_times(args.ll_msg_us)
    fixed_us = args.ll_fixed_us if args.ll_fixed_us is not None else fitted(main_times)
    fixed_source = "given (--ll-fixed-us)" if args.ll_fixed_us is not None else \
        f"fitted: one value for all {2 * len(pub)} published latencies (least squares of the relative error)"

    def table(times: dict, fixed: float) -> list[dict]:
        rows = []
        for ep, tm in matrices.items():
            row = {"ep": ep, "nodes": tm.nodes, "nvl_ranks": tm.nvl,
                   "messages_per_rank": int(tm.expert_count.sum()) / ep,
                   "recv_messages_max": int(tm.expert_count.sum(0).max()),
                   "remote_node_messages_per_rank": int(tm.expert_count[tm.link == 2].sum()) / ep}
            for op in ("dispatch", "combine"):
                e = dict(times[ep][op], t_us=times[ep][op]["t_link_us"] + fixed)
                if ep in pub:
                    d_us, d_gbps, c_us, c_gbps = pub[ep]
                    p_us, p_gbps = (d_us, d_gbps) if op == "dispatch" else (c_us, c_gbps)
                    e.update(published_us=p_us, published_GBps=p_gbps, error_pct=100 * (e["t_us"] - p_us) / p_us,
                             # DeepEP's GB/s = (token, expert) pairs x message bytes / time: check the anchor's pairs
                             published_bytes_per_rank_implied=p_gbps * 1e3 * p_us)
                row[op] = e
            row["torch_reference_link_us"] = ll_torch_reference_us(
                ep, tm.nvl, hidden=args.hidden, experts=args.experts, num_max=args.ll_tokens, fp8_dispatch=fp8,
                nvl_GBps=args.nvl_bw, net_GBps=args.net_bw)
            rows.append(row)
        return rows

    def summary(rows: list[dict]) -> dict | None:
        errs = [abs(r[op]["error_pct"]) for r in rows for op in ("dispatch", "combine") if "error_pct" in r[op]]
        return {"mean_abs_error_pct": sum(errs) / len(errs), "max_abs_error_pct": max(errs)} if errs else None

    variants = {}
    for name, msg_us, allow, fixed in (
            ("link-bound only (no fixed term)", args.ll_msg_us, True, 0.0),
            ("fixed term fitted on the 6 dispatch rows only (combine out of sample)", args.ll_msg_us, True,
             fitted(main_times, ("dispatch",))),
            ("network only, no NVLink (fixed term as fitted above)", args.ll_msg_us, False, fixed_us)):
        rows = table(link_times(msg_us, allow), fixed)
        comb = [abs(r["combine"]["error_pct"]) for r in rows if "error_pct" in r["combine"]]
        variants[name] = {"fixed_us": fixed, "summary": summary(rows),
                          "combine_mean_abs_error_pct": sum(comb) / len(comb) if comb else None,
                          "t_us": {r["ep"]: [r["dispatch"]["t_us"], r["combine"]["t_us"]] for r in rows}}
    # sensitivity: both a fixed term and a per-message overhead fitted (grid over the overhead)
    best = None
    for i in range(0, 201):
        msg_us = 0.001 * i
        times = link_times(msg_us)
        f = fitted(times)
        s = summary(table(times, f))
        if s and (best is None or s["mean_abs_error_pct"] < best[2]["mean_abs_error_pct"]):
            best = (msg_us, f, s)
    if best:
        variants["fixed term + per-message overhead, both fitted"] = {
            "msg_overhead_us": best[0], "fixed_us": best[1], "summary": best[2]}
    rows = table(main_times, fixed_us)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "constants": {
            "nvl_GBps": (args.nvl_bw, "NVLink per GPU per direction, effective (the normal-mode model's; DeepEP "
                                      "normal mode measures 153-158 GB/s on H800)"),
            "net_GBps": (args.net_bw, "NIC per GPU per direction: 400 Gb/s CX7 line rate, from the spec"),
            "msg_overhead_us": (args.ll_msg_us, "per message on a port (given; 0 = none)"),
            "fixed_us": (fixed_us, fixed_source),
            "message_bytes": ll_message_bytes(args.hidden, fp8),
        },
        "model": "t = fixed + max(t_nvl, t_net); t_port = max over GPUs of max(sent, received) of "
                 "(bytes / rate + messages * msg_overhead); one message per (token, expert) pair, self free; "
                 "combine is dispatch's traffic reversed with bf16 rows",
        "rows": rows, "summary": summary(rows), "variants": variants,
    }


def print_ll_model(result: dict, file=sys.stdout) -> None:
    cfg, k = result["config"], result["constants"]
    print(f"LL model: {cfg['ll_tokens']} tokens/rank, hidden {cfg['hidden']}, top-{cfg['topk']} of {cfg['experts']} "
          f"experts, routing {cfg['ll_routing']} ({'no node limit' if not cfg['ll_max_nodes'] else '<= %d nodes' % cfg['ll_max_nodes']}), "
          f"{cfg['nvl_ranks']} GPUs per node; messages: dispatch {k['message_bytes']['dispatch']} B, combine "
          f"{k['message_bytes']['combine']} B", file=file)
    print(f"constants: NVLink {k['nvl_GBps'][0]:g} GB/s, NIC {k['net_GBps'][0]:g} GB/s, per-message "
          f"{k['msg_overhead_us'][0]:g} us, fixed {k['fixed_us'][0]:.1f} us ({k['fixed_us'][1]})", file=file)
    print(f"{'EP':>4} {'nodes':>5} {'remote msg':>10} {'max recv':>8} {'op':<8} {'t_nvl':>7} {'t_net':>7} {'bound':<8} "
          f"{'pred us':>8} {'pub us':>7} {'error':>7} {'torch ref us':>12}", file=file)
    for r in result["rows"]:
        for op in ("dispatch", "combine"):
            e = r[op]
            pub = f"{e['published_us']:7.0f} {e['error_pct']:+6.0f}%" if "published_us" in e else f"{'-':>7} {'-':>7}"
            print(f"{r['ep']:>4} {r['nodes']:>5} {r['remote_node_messages_per_rank']:>10.0f} {r['recv_messages_max']:>8} "
                  f"{op:<8} {e['t_nvl_us']:7.1f} {e['t_net_us']:7.1f} {e['bound']:<8} {e['t_us']:8.1f} {pub} "
                  f"{r['torch_reference_link_us'][op] + k['fixed_us'][0]:12.0f}", file=file)
    if result["summary"]:
        s = result["summary"]
        print(f"error vs DeepEP: mean |error| {s['mean_abs_error_pct']:.1f}%, max {s['max_abs_error_pct']:.1f}%", file=file)
    for name, v in result["variants"].items():
        if v["summary"]:
            extra = f", per-message {v['msg_overhead_us']:.3f} us" if "msg_overhead_us" in v else ""
            comb = f" (combine alone {v['combine_mean_abs_error_pct']:.1f}%)" if v.get("combine_mean_abs_error_pct") else ""
            print(f"  variant {name}: fixed {v['fixed_us']:.1f} us{extra}: mean |error| "
                  f"{v['summary']['mean_abs_error_pct']:.1f}%{comb}, max {v['summary']['max_abs_error_pct']:.1f}%", file=file)
    print("torch ref us: epcomm's torch LL reference (fixed slot arrays to every peer) on the same links, + the fixed term",
          file=file)


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
                        help="two-hop combine's node partials on the network (DeepEP and epcomm's default: bf16; "
                             "epcomm with combine_node_partials='float32': fp32)")
    parser.add_argument("--max-sampled-tokens", type=int, default=262144,
                        help="sample at most this many tokens in total and scale (memory/time cap)")
    parser.add_argument("--ll", action="store_true", help="the low-latency (LL) mode model instead (vs DeepEP's LL table)")
    parser.add_argument("--ll-tokens", type=int, default=128, help="LL: tokens per rank (= num_max)")
    parser.add_argument("--ll-routing", default="uniform", choices=("uniform", "zipf", "khot", "gate"),
                        help="LL: routing (DeepEP's LL test: uniform over all experts)")
    parser.add_argument("--ll-max-nodes", type=int, default=0, help="LL: most nodes per token (0: no limit)")
    parser.add_argument("--ll-fixed-us", type=float, default=None,
                        help="LL: fixed us per op (launch, signalling, receive copy); default: fitted to DeepEP's table")
    parser.add_argument("--ll-msg-us", type=float, default=0.0, help="LL: per-message overhead on a port, us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_routing_args(parser)
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    if args.ll:
        result = run_ll_model(args)
        print_ll_model(result)
    else:
        result = run_model(args)
        print_model(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
