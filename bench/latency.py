"""epcomm low-latency (LL) mode: per-call latency of LL dispatch and combine, with exact byte accounting.

    mpiexec -n 8 python bench/latency.py --backend torch --nvl-ranks 2 --json out.json
    mpiexec -n 4 python bench/latency.py --backend torch --nvl-ranks 4 --reps 10
    torchrun --nproc-per-node 8 bench/latency.py ...                    # same script

Defaults are DeepEP's LL setting: 128 tokens per rank (``num_max_dispatch_tokens_per_rank`` = 128),
hidden 7168, top-8 of 256 experts, FP8 dispatch, BF16 combine; routing as in ``bandwidth.py``
(``bench/_routing.py``; default the node-limited gate).

Measured, each as median / p10 / p90 over warm repetitions (each repetition starts from a barrier
and counts the slowest rank's time, ``bandwidth.py``'s timer):

* ``ll dispatch``: ``Buffer.low_latency_dispatch(x, topk_idx, M, E, use_fp8=True)`` (the receive
  included: no hook), everything the call does (checks, the agreement collective, FP8 cast, packing
  the slots, the exchange, unpacking);
* ``ll combine``: ``Buffer.low_latency_combine(y, topk_idx, topk_weights, handle)`` of that dispatch's
  handle, ``y`` a pre-filled bf16 ``[E_loc, R * M, H]``;
* with ``--sync-free`` also both calls inside :func:`epcomm.low_latency.host_sync_free` (what a CUDA
  graph replays: no agreement collective, no host read of a tensor value);
* the baseline, ``bare dispatch (fixed slots)`` / ``bare combine (fixed slots)``: one bare
  ``dist.all_to_all_single`` with equal splits moving exactly the byte arrays the torch backend's
  LL exchange moves (dispatch: per destination rank ``4 E_loc + E_loc M (4 + payload)`` bytes;
  combine: ``E_loc M 2H`` bytes), from a pre-filled uint8 buffer into one receive buffer kept across
  calls (``_baselines.BareAllToAll(reuse_output=True)``; the backend also keeps its send and receive
  arrays per buffer slot). The ratio ``x bare`` = LL median / this median;
* ``bare dispatch (valid messages)`` / ``bare combine (valid messages)``: the same collective moving
  only what a kernel backend would move (one message per (token, expert) pair: 16-byte header +
  payload for dispatch, a bf16 row for combine; variable splits from the routing), for scale.

On a kernel backend (none has LL mode yet; ``--backend sim`` exits 3 with the backend's message) the
baseline behind ``x bare`` is the valid-messages exchange, and only rows and payload bytes are checked.

Bytes per link class (self / NVLink / network), summed over ranks, from ``buffer.traffic`` (ops
``low_latency_dispatch`` / ``low_latency_combine``: ``rows`` = valid messages, ``payload_bytes`` =
their payload, ``meta_bytes`` = everything else the fixed slot arrays carried), checked against the
bytes computed here from the routing alone. Also checked on the first call: ``recv_count`` equals the
routing's per-expert counts, and combine returns ``sum_k w[n, k] * v(n)`` bit for bit (``y`` holds
``v(n) = n % 200 + 1`` in every row the dispatch delivered from token ``n``).

DeepEP's LL bandwidth figure (its test's accounting): (token, expert) pairs of this rank x message bytes
(dispatch ``16 + H + 4H/128``, combine ``2H``) / time. On CPU "network" and "NVLink" are the same
loopback: bytes are what a cluster would move, times are this machine's.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import socket
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import epcomm  # noqa: E402
from epcomm.backends import resolve_backend  # noqa: E402
from epcomm.errors import EpcommError  # noqa: E402
from epcomm.low_latency import LowLatencyLayout, host_sync_free  # noqa: E402
from epcomm.topology import Topology  # noqa: E402

from _baselines import BareAllToAll  # noqa: E402
from _routing import add_routing_args, global_topk_idx, routing_params  # noqa: E402
from _setup import start_bench  # noqa: E402
from _timing import make_timer  # noqa: E402
from bandwidth import _peak_rss_mib, _reset_peak_rss, epcomm_traffic, filled, quantiles, sum_over_ranks  # noqa: E402
from cluster_model import LINKS, fp8_row_bytes, traffic_matrices  # noqa: E402

HEADER_BYTES = 16  # a kernel backend's message header (LowLatencyLayout: one 16-byte vector)
TORCH_INDEX_BYTES = 4  # the torch backend's message header: the int32 source token index
OPS = {"low_latency_dispatch": "dispatch", "low_latency_combine": "combine"}


# ----------------------------------------------------------------------------- bytes from the routing
def ll_expected_bytes(expert_count: torch.Tensor, link: torch.Tensor, *, hidden: int, num_local_experts: int,
                      num_max: int, fp8: bool) -> dict:
    """Bytes per link class, summed over ranks, computed from the routing alone.

    ``expert_count[s, d]``: (token, expert) pairs of rank ``s`` whose expert is on rank ``d``;
    ``link[s, d]``: 0 self, 1 NVLink, 2 network. Returns ``{"torch": {op: {link: {rows,
    payload_bytes, meta_bytes}}}, "kernel": {op: {link: {messages, bytes}}}}``.
    """
    payload_d = fp8_row_bytes(hidden) if fp8 else 2 * hidden
    payload_c = 2 * hidden
    chunk_d = 4 * num_local_experts + num_local_experts * num_max * (TORCH_INDEX_BYTES + payload_d)
    chunk_c = num_local_experts * num_max * payload_c
    torch_out: dict = {"dispatch": {}, "combine": {}}
    kernel_out: dict = {"dispatch": {}, "combine": {}}
    for c, name in enumerate(LINKS):
        mask = link == c
        rows = int(expert_count[mask].sum())  # combine sends back exactly what dispatch delivered
        peers = int(mask.sum())  # (source, destination) pairs of this class: one fixed chunk each
        for op, payload, chunk in (("dispatch", payload_d, chunk_d), ("combine", payload_c, chunk_c)):
            torch_out[op][name] = {"rows": rows, "payload_bytes": rows * payload,
                                   "meta_bytes": peers * chunk - rows * payload}
        kernel_out["dispatch"][name] = {"messages": rows, "bytes": rows * (HEADER_BYTES + payload_d)}
        kernel_out["combine"][name] = {"messages": rows, "bytes": rows * payload_c}
    return {"torch": torch_out, "kernel": kernel_out,
            "chunk_bytes_per_peer": {"dispatch": chunk_d, "combine": chunk_c},
            "message_bytes": {"torch_dispatch": TORCH_INDEX_BYTES + payload_d,
                              "kernel_dispatch": HEADER_BYTES + payload_d, "combine": payload_c}}


def _value_of_token(n: torch.Tensor) -> torch.Tensor:
    """The per-token value the combine check uses (an integer exact in bf16)."""
    return (n % 200 + 1).float()


# ----------------------------------------------------------------------------- the run
class LLCase:
    def __init__(self, args, rank: int, world: int, device: torch.device) -> None:
        self.args, self.rank, self.world, self.device = args, rank, world, device
        nvl, H, E, K, N = args.nvl_ranks, args.hidden, args.experts, args.topk, args.tokens
        self.topo = Topology(world, rank, nvl)
        self.layout = LowLatencyLayout(args.num_max, H, world, E)
        topk_all = global_topk_idx(args.routing, world=world, nvl=nvl, tokens=N, experts=E, topk=K,
                                   **routing_params(args))
        self.tm = traffic_matrices(topk_all, E, nvl)
        self.expected = ll_expected_bytes(self.tm.expert_count, self.tm.link, hidden=H,
                                          num_local_experts=self.layout.num_local_experts, num_max=args.num_max,
                                          fp8=not args.bf16)
        # per local expert: tokens of every rank routed to it (the receive counts the routing implies)
        e_loc = self.layout.num_local_experts
        mine = topk_all.flatten()
        mine = mine[(mine >= rank * e_loc) & (mine < (rank + 1) * e_loc)] - rank * e_loc
        self.expected_recv_count = torch.bincount(mine, minlength=e_loc).to(torch.int32)
        self.topk_idx = topk_all[rank].contiguous().to(device)
        del topk_all
        g = torch.Generator().manual_seed(10_000 + rank)
        self.x = torch.randn(N, H, generator=g).to(torch.bfloat16).to(device)
        self.weights = torch.rand(N, K, generator=g).to(device)
        valid = self.topk_idx >= 0
        acc = torch.zeros(N, dtype=torch.float32, device=device)  # the combine contract, per token
        v = _value_of_token(torch.arange(N, device=device))
        for k in range(K):
            acc = acc + torch.where(valid[:, k], self.weights[:, k] * v, 0.0)
        self.expected_combine = acc.to(torch.bfloat16).unsqueeze(1).expand(N, H)


def ll_ops(c: LLCase, sync_free: bool):
    """The LL Buffer's calls: ``[(name, fn)]``, and ``first()`` -> (records, verified)."""
    args = c.args
    buf = epcomm.Buffer(None, 0, 0, True, backend=args.backend, num_nvl_ranks=args.nvl_ranks, timeout_s=args.timeout)
    state: dict = {}
    M, E, fp8 = args.num_max, args.experts, not args.bf16

    def dispatch():
        out = buf.low_latency_dispatch(c.x, c.topk_idx, M, E, use_fp8=fp8)
        state["handle"] = out[2]
        return out

    def combine():
        return buf.low_latency_combine(state["y"], c.topk_idx, c.weights, state["handle"])[0]

    def first():
        buf.reset_traffic()
        recv_x, recv_count, handle, _, _ = dispatch()
        counts_ok = bool(torch.equal(recv_count.cpu(), c.expected_recv_count))
        # y: every delivered row holds its source token's value (rows past a count: whatever src_info holds)
        src = handle[0].to(torch.int64).clamp(0, 2**30)
        state["y"] = _value_of_token(src).to(torch.bfloat16).unsqueeze(-1).expand(-1, -1, c.layout.hidden).contiguous()
        del recv_x, src
        got = combine()
        combine_ok = bool(torch.equal(got, c.expected_combine))
        records = {op: epcomm_traffic(buf, op) for op in OPS}
        buf.reset_traffic()
        return records, {"recv_count == routing's per-expert counts": counts_ok,
                         "combine == sum_k w * v(token), bit-exact": combine_ok}

    def dispatch_sync_free():
        with host_sync_free():
            return dispatch()

    def combine_sync_free():
        with host_sync_free():
            return combine()

    ops = [("ll dispatch", "dispatch", dispatch), ("ll combine", "combine", combine)]
    if sync_free:
        ops += [("ll dispatch (host_sync_free)", "dispatch", dispatch_sync_free),
                ("ll combine (host_sync_free)", "combine", combine_sync_free)]
    return ops, first, buf


def bare_ops(c: LLCase):
    """The baselines: bare all_to_all_single of the fixed slot arrays, and of the valid messages only."""
    W, rank, ex = c.world, c.rank, c.tm.expert_count
    chunk = c.expected["chunk_bytes_per_peer"]
    msg = c.expected["message_bytes"]
    ones = [1] * W
    a2a = {
        "bare dispatch (fixed slots)": ("dispatch", BareAllToAll(c.topo, [(ones, ones, chunk["dispatch"])],
                                                                 reuse_output=True)),
        "bare combine (fixed slots)": ("combine", BareAllToAll(c.topo, [(ones, ones, chunk["combine"])],
                                                               reuse_output=True)),
        "bare dispatch (valid messages)": ("dispatch", BareAllToAll(
            c.topo, [(ex[rank].tolist(), ex[:, rank].tolist(), msg["kernel_dispatch"])])),
        "bare combine (valid messages)": ("combine", BareAllToAll(
            c.topo, [(ex[:, rank].tolist(), ex[rank].tolist(), msg["combine"])])),
    }
    scratch = filled(max(a.scratch_bytes for _, a in a2a.values()), c.x)  # pre-filled once, real data
    ops = [(name, op, lambda a=a: a.run(scratch)) for name, (op, a) in a2a.items()]
    records = {name: {link: dict(v, meta_bytes=0) for link, v in a.record.items()} for name, (_, a) in a2a.items()}
    return ops, records, scratch


def run(args, rank: int, world: int, device: torch.device, timer) -> dict:
    args.backend = resolve_backend(args.backend) if args.backend == "auto" else args.backend
    c = LLCase(args, rank, world, device)
    names, kinds, times_all, records, verified, peaks = [], [], [], {}, {}, {}

    def measure(group: str, ops) -> None:
        for _ in range(max(0, args.warmup - 1)):  # the first (checked / byte-counting) call was the first warm-up
            for _, _, fn in ops:
                fn()
        times = [[0.0] * args.reps for _ in ops]
        for i in range(args.reps):
            for j, (_, _, fn) in enumerate(ops):
                times[j][i] = timer(fn)
        for (name, kind, _), t in zip(ops, times):
            names.append(name)
            kinds.append(kind)
            times_all.append(t)
        peaks[group] = _peak_rss_mib()

    # the LL Buffer: its first calls count bytes and check results (untimed, the first warm-up)
    gc.collect()
    _reset_peak_rss()
    ll, first, buf = ll_ops(c, args.sync_free)
    rec, verified = first()
    records["ll dispatch"], records["ll combine"] = rec["low_latency_dispatch"], rec["low_latency_combine"]
    if args.grouped:  # one group alive at a time (less memory; ratios then span load drift between groups)
        measure("ll", ll)
        del ll, first
        buf.destroy()  # collective: frees the LL result slots before the baselines are built
        del buf
        gc.collect()
        _reset_peak_rss()
    bare, bare_records, scratch = bare_ops(c)
    records.update(bare_records)
    for _, _, fn in bare:  # pass 1, as the LL calls' checked first call
        fn()
    if args.grouped:
        measure("bare", bare)
    else:  # default: every repetition runs every op in turn, so a ratio compares calls made moments apart
        measure("all", ll + bare)
        del ll, first
        buf.destroy()
        del buf
    del bare, scratch
    gc.collect()

    t = torch.tensor(times_all, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # slowest rank per repetition
    t = t.cpu()
    rec_names = list(records)
    summed = dict(zip(rec_names, sum_over_ranks([records[n] for n in rec_names], device)))
    rss = torch.tensor(list(peaks.values()), dtype=torch.int64, device=device)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    ok = torch.tensor([int(all(verified.values()))], dtype=torch.int64, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)

    exp = c.expected
    pairs = int(c.tm.expert_count.sum())  # (token, expert) pairs, all ranks
    deepep_bytes = {"dispatch": pairs * exp["message_bytes"]["kernel_dispatch"] / world,
                    "combine": pairs * exp["message_bytes"]["combine"] / world}
    ops_out: dict = {}
    for j, (name, kind) in enumerate(zip(names, kinds)):
        q = quantiles(t[j].tolist())
        entry = {"op": kind, **q, "deepep_GBps": deepep_bytes[kind] / q["median_s"] / 1e9}
        base = name if name in summed else name.split(" (")[0]  # the host_sync_free variants: the same bytes
        if base in summed:
            traffic = summed[base]
            entry["traffic"] = traffic
            entry["bytes_by_link"] = {link: traffic[link]["payload_bytes"] + traffic[link]["meta_bytes"] for link in LINKS}
            if base.startswith("ll ") and args.backend == "torch":  # every byte, slot overhead included
                want = exp["torch"][kind]
                entry["expected"] = want
                entry["bytes_match"] = all(traffic[link] == want[link] for link in LINKS)
            elif base.startswith("ll "):  # a kernel backend: valid messages and their payload (its header is meta)
                want = {link: {f: exp["torch"][kind][link][f] for f in ("rows", "payload_bytes")} for link in LINKS}
                entry["expected"] = want
                entry["bytes_match"] = all(traffic[link][f] == want[link][f] for link in LINKS for f in want[link])
            elif "fixed slots" in name:  # the baseline moves what the LL exchange moved, byte for byte
                want = {link: exp["torch"][kind][link]["payload_bytes"] + exp["torch"][kind][link]["meta_bytes"]
                        for link in LINKS}
                entry["bytes_match"] = entry["bytes_by_link"] == want
            else:  # valid messages: what a kernel backend moves
                want = {link: exp["kernel"][kind][link]["bytes"] for link in LINKS}
                entry["bytes_match"] = entry["bytes_by_link"] == want
        ops_out[name] = entry
    for name, entry in ops_out.items():
        if name.startswith("ll "):  # the bare exchange of the bytes this backend moves
            base = ops_out[f"bare {entry['op']} ({'fixed slots' if args.backend == 'torch' else 'valid messages'})"]
            entry["x_bare"] = entry["median_s"] / base["median_s"]
            entry["x_bare_valid"] = entry["median_s"] / ops_out[f"bare {entry['op']} (valid messages)"]["median_s"]
            ratios = sorted(a / b for a, b in zip(entry["times_s"], base["times_s"]))
            entry["x_bare_paired_median"] = ratios[len(ratios) // 2]  # per repetition (alternating runs only)

    def totals(kind: str) -> dict:
        tt = exp["torch"][kind]
        kk = exp["kernel"][kind]
        torch_wire = sum(tt[link]["payload_bytes"] + tt[link]["meta_bytes"] for link in ("nvlink", "network"))
        kernel_wire = sum(kk[link]["bytes"] for link in ("nvlink", "network"))
        return {"torch_all_links": sum(tt[link]["payload_bytes"] + tt[link]["meta_bytes"] for link in LINKS),
                "kernel_all_links": sum(kk[link]["bytes"] for link in LINKS),
                "torch_off_rank": torch_wire, "kernel_off_rank": kernel_wire,
                "padding_factor_off_rank": torch_wire / kernel_wire if kernel_wire else None}

    per_rank_recv = c.tm.expert_count.sum(0)
    return {
        "ops": ops_out, "expected_bytes": exp, "verified": verified, "verified_all_ranks": bool(ok.item()),
        "totals": {"dispatch": totals("dispatch"), "combine": totals("combine")},
        "routing": {"token_expert_pairs": pairs, "token_rank_pairs": int(c.tm.count.sum()),
                    "recv_messages_per_rank": {"min": int(per_rank_recv.min()), "max": int(per_rank_recv.max())},
                    "deepep_bytes_per_rank": deepep_bytes},
        "memory": {"peak_rss_MiB_max_over_ranks": dict(zip(peaks, rss.tolist()))},
    }


# ----------------------------------------------------------------------------- report
def print_report(result: dict, file=sys.stdout) -> None:
    cfg, env, r = result["config"], result["environment"], result["main"]
    print(f"epcomm {env['epcomm']} LL latency: backend {cfg['backend']}, {env['world_size']} ranks = "
          f"{env['num_nodes']} nodes x {env['nvl_ranks']}, {env['process_group']} on {env['device']} "
          f"({env['cpu_count']} CPUs), torch {env['torch']}", file=file)
    print(f"{cfg['tokens']} tokens/rank (num_max {cfg['num_max']}), hidden {cfg['hidden']}, top-{cfg['topk']} of "
          f"{cfg['experts']} experts, routing {cfg['routing']}, {'BF16' if cfg['bf16'] else 'FP8'} dispatch, BF16 "
          f"combine; {cfg['reps']} reps after {cfg['warmup']} warm-up; timer: {env['timer']}", file=file)
    ro = r["routing"]
    print(f"routing: {ro['token_expert_pairs']} (token, expert) messages in all, received per rank "
          f"{ro['recv_messages_per_rank']['min']}..{ro['recv_messages_per_rank']['max']}", file=file)
    print(file=file)
    hdr = (f"{'operation':<32} {'median ms':>10} {'p10':>8} {'p90':>8} {'x bare':>7} {'x valid':>7} "
           f"{'network MB':>10} {'nvlink MB':>9} {'self MB':>8} {'GB/s*':>7} {'bytes':>5}")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for name, e in r["ops"].items():
        b = e.get("bytes_by_link") or {}
        mb = lambda link, w=8: f"{b[link] / 1e6:{w}.2f}" if link in b else f"{'-':>{w}}"  # noqa: E731
        xb = f"{e['x_bare']:7.2f}" if "x_bare" in e else f"{'':>7}"
        xv = f"{e['x_bare_valid']:7.2f}" if "x_bare_valid" in e else f"{'':>7}"
        match = {True: "ok", False: "DIFF", None: ""}[e.get("bytes_match")]
        print(f"{name:<32} {e['median_s'] * 1e3:10.2f} {e['p10_s'] * 1e3:8.2f} {e['p90_s'] * 1e3:8.2f} {xb} {xv} "
              f"{mb('network', 10)} {mb('nvlink', 9)} {mb('self')} {e['deepep_GBps']:7.3g} {match:>5}", file=file)
    print("MB: all bytes sent (payload + slot overhead), summed over ranks; x bare: median / bare all_to_all_single "
          "of the same fixed slot arrays; x valid: median / bare exchange of the valid messages only; GB/s*: "
          "DeepEP's LL accounting, (token, expert) pairs x message bytes per rank / median", file=file)
    print("\nbytes per link class, summed over ranks (torch reference: valid payload + fixed-slot overhead; "
          "kernel backends: valid messages only):", file=file)
    exp = r["expected_bytes"]
    print(f"{'op':<9} {'link':<7} {'messages':>9} {'payload B':>12} {'overhead B':>12} {'torch total B':>14} "
          f"{'kernel B':>12} {'torch/kernel':>12}", file=file)
    for op in ("dispatch", "combine"):
        for link in LINKS:
            t, k = exp["torch"][op][link], exp["kernel"][op][link]
            total = t["payload_bytes"] + t["meta_bytes"]
            ratio = f"{total / k['bytes']:12.1f}" if k["bytes"] else f"{'-':>12}"
            print(f"{op:<9} {link:<7} {t['rows']:>9} {t['payload_bytes']:>12} {t['meta_bytes']:>12} {total:>14} "
                  f"{k['bytes']:>12} {ratio}", file=file)
    for op, tot in r["totals"].items():
        pf = tot["padding_factor_off_rank"]
        print(f"{op}: off-rank bytes torch {tot['torch_off_rank']} vs kernel {tot['kernel_off_rank']}"
              + (f" ({pf:.1f}x: the fixed slots' padding)" if pf else ""), file=file)
    matches = {n: e["bytes_match"] for n, e in r["ops"].items() if "bytes_match" in e}
    print(f"\nbytes == computed from the routing: {'all ' + str(len(matches)) + ' ops' if all(matches.values()) else matches}",
          file=file)
    print(f"verified (every rank: {'yes' if r['verified_all_ranks'] else 'NO'}): "
          + ", ".join(f"{k}: {v}" for k, v in r["verified"].items()), file=file)
    print("peak RSS per rank (max over ranks): "
          + ", ".join(f"{g} {m} MiB" for g, m in r["memory"]["peak_rss_MiB_max_over_ranks"].items()), file=file)


# ----------------------------------------------------------------------------- main
def estimated_peak_bytes(args) -> int:
    """A rough per-rank peak for CPU runs (measured 3.0 GiB at E=256, M=128, H=7168 with the ops alternating,
    1.9 GiB at E=128): the fixed arrays (send, receive, unpacked, two result slots; combine input, send,
    receive; the baseline's scratch and output) plus the interpreter and torch."""
    msg = 4 + (2 * args.hidden if args.bf16 else fp8_row_bytes(args.hidden))
    slots = args.experts * args.num_max
    per_array = 4 * msg + 4 * 2 * args.hidden if not args.grouped else 4 * msg + 3 * 2 * args.hidden
    return slots * per_array + 400 * 2**20


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch", choices=("torch", "sim", "cuda", "auto"))
    p.add_argument("--nvl-ranks", type=int, default=8, help="ranks per (emulated) node")
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    p.add_argument("--num-max", type=int, default=None, help="num_max_dispatch_tokens_per_rank (default: --tokens)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="BF16 instead of FP8 dispatch")
    add_routing_args(p)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=1, help="warm-up repetitions (the first call of each op, which also "
                   "counts bytes and checks results, is the first)")
    p.add_argument("--sync-free", action="store_true", help="also time both calls inside host_sync_free()")
    p.add_argument("--grouped", action="store_true", help="time the LL calls, free them, then the baselines "
                   "(less peak memory; default: all ops alternate within every repetition)")
    p.add_argument("--no-memory-check", action="store_true", help="CPU: run even if the estimated peak memory "
                   "(all ranks) exceeds 90%% of MemAvailable")
    p.add_argument("--json", help="write every figure and the configuration here (rank 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="epcomm Buffer timeout_s")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    args = p.parse_args(argv)
    if args.num_max is None:
        args.num_max = args.tokens
    if args.tokens > args.num_max:
        p.error("--tokens must be at most --num-max")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = start_bench(args.backend, args.threads, args.nvl_ranks, args.experts)
    if started is None:
        return 2
    rank, world, device = started
    if device.type == "cpu" and not args.no_memory_check:  # rank 0 decides for all: no rank left waiting
        need, avail = estimated_peak_bytes(args) * world, _mem_available_bytes()
        verdict = torch.tensor([1 if avail and need > 0.9 * avail else 0], dtype=torch.int64)
        dist.broadcast(verdict, 0)
        if verdict.item():
            if rank == 0:
                print(f"bench: about {need / 2**30:.1f} GiB needed by {world} ranks (the torch reference's fixed "
                      f"slot arrays are E x M messages per rank, whatever the rank count), "
                      f"{(avail or 0) / 2**30:.1f} GiB available: use fewer --experts or --num-max, --grouped, "
                      "or --no-memory-check", file=sys.stderr)
            dist.destroy_process_group()
            return 2
    timer = make_timer(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        main_case = run(args, rank, world, device, timer)
    except (EpcommError, NotImplementedError) as err:  # e.g. a backend without LL mode: every rank raises alike
        if rank == 0:
            print(f"bench: {type(err).__name__}: {err}", file=sys.stderr)
        dist.destroy_process_group()
        return 3
    result = {
        "config": dict(vars(args)),
        "environment": {
            "epcomm": epcomm.__version__, "torch": torch.__version__, "world_size": world,
            "num_nodes": world // args.nvl_ranks, "nvl_ranks": args.nvl_ranks,
            "process_group": dist.get_backend(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(), "host": socket.gethostname(), "timer": timer.kind,
            "started_utc": started.isoformat(), "argv": sys.argv,
        },
        "baseline": "bare dist.all_to_all_single, equal splits, of the byte arrays the torch backend's LL exchange "
                    "moves (dispatch 4*E_loc + E_loc*M*(4 + payload) B per destination rank, combine E_loc*M*2H B), "
                    "pre-filled uint8 send buffer, receive buffer allocated per call",
        "accounting": {
            "traffic": "summed over ranks; rows = valid (token, expert) messages, payload_bytes = their payload, "
                       "meta_bytes = the rest of the fixed slot arrays (counts, headers, unused slots)",
            "kernel_bytes": "valid messages only: (16 + payload) B per (token, expert) dispatch, 2H B combine",
            "deepep_GBps": "(token, expert) pairs per rank x (16 + H + 4H/128 | 2H) B / median time",
            "x_bare": "median / median of the bare fixed-slot exchange measured in the same run",
            "x_bare_paired_median": "median over repetitions of (this op's time / the bare exchange's time in the same "
                                    "repetition); meaningful when the ops alternate (the default, not --grouped)",
        },
        "main": main_case,
    }
    if rank == 0:
        print_report(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"\nwrote {args.json}")
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
