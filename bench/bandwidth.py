"""epcomm dispatch/combine bandwidth, with honest byte accounting and baselines measured in the same run.

    mpiexec -n 8 python bench/bandwidth.py --backend torch --nvl-ranks 2 --tokens 4096 --hidden 7168 \
        --topk 8 --experts 256 --routing gate --json out.json --plot out.png
    torchrun --nproc-per-node 8 bench/bandwidth.py ...                  # same script

For each operation (layout, dispatch, cached dispatch, combine) of epcomm's
flat and two-hop algorithms, and for the baselines on the same routing and
data -- the transport ceiling (bare ``all_to_all_single`` of the same rows)
and the per-expert dispatcher (a token sent once per selected expert, as
Megatron-LM's alltoall dispatcher does) -- it reports:

* median, p10 and p90 time over warm repetitions; each repetition starts from
  a barrier and counts the slowest rank's time;
* bytes per link class (network / NVLink / local), summed over ranks, from
  ``buffer.traffic`` (the baselines count theirs the same way), checked
  against the exact bytes the routing implies (``bench/cluster_model.py``);
* bandwidth with DeepEP's accounting, per rank: network = (token, destination
  node) pairs including the own node x row bytes / time; NVLink = received
  rows x row bytes / time; and the fraction of the transport ceiling reached.

With ``--targets-table`` it also measures a bare count exchange (one all_gather of the agreement
header's size) and, at every ``--sweep`` token count x ``--sweep-hidden`` size, tabulates issue 14's
per-call targets: non-cached dispatch over count exchange + bare exchange, cached dispatch and combine
over the bare exchange, two-hop over the bare two-step exchange (``targets_table`` in the JSON).

Targets are printed as PASS/MISS lines (never asserted). Output: a table on
stdout, ``--json`` with every figure and the configuration, ``--plot`` a PNG of
bandwidth vs tokens per rank (sweeps ``--sweep`` token counts). On CPU "network"
and "NVLink" are the same loopback: the bytes are what a cluster would move,
the times are this machine's.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import socket
import sys
from fractions import Fraction

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import epcomm  # noqa: E402
from epcomm.backends import backend_class, resolve_backend  # noqa: E402
from epcomm.backends.torch_backend import release_scratch  # noqa: E402
from epcomm._agree import SIGNATURE_FIELDS  # noqa: E402
from epcomm.errors import EpcommError  # noqa: E402
from epcomm.fp8 import per_token_cast_to_fp8  # noqa: E402
from epcomm.topology import Topology  # noqa: E402

from _baselines import BareAllToAll, BareCountExchange, PerExpertDispatcher  # noqa: E402
from _report import print_report, print_targets_table, write_plot  # noqa: E402
from _routing import add_routing_args, global_topk_idx, routing_params  # noqa: E402
from _setup import start_bench  # noqa: E402
from _timing import kernel_only_seconds, make_timer, nvlink_ceiling  # noqa: E402
from cluster_model import LINKS, expected_traffic, fp8_row_bytes, traffic_matrices  # noqa: E402

TARGET_RATIO = 1.3  # epcomm op time / transport ceiling time
# Issue 14's per-call targets (--targets-table): column -> (epcomm op, the bare ops whose medians add up to
# its ceiling, the largest ratio that passes). Non-cached dispatch may cost a count exchange more than the
# bare exchange; cached dispatch and combine know their counts (the handle) and get none.
COUNT_EXCHANGE = "ceiling count exchange"
TARGET_COLUMNS = {
    "flat dispatch": ("flat dispatch", (COUNT_EXCHANGE, "ceiling dispatch"), 1.3),
    "flat cached": ("flat cached dispatch", ("ceiling dispatch",), 1.2),
    "flat combine": ("flat combine", ("ceiling combine",), 1.2),
    "2hop dispatch": ("two_hop dispatch", (COUNT_EXCHANGE, "ceiling two_hop dispatch"), 1.3),
    "2hop cached": ("two_hop cached dispatch", ("ceiling two_hop dispatch",), 1.3),
    "2hop combine": ("two_hop combine", ("ceiling two_hop combine",), 1.3),
}
SWEEP_OPS = ("flat dispatch", "flat combine", "two_hop dispatch", "two_hop combine",
             "ceiling dispatch", "ceiling combine", "per_expert dispatch", "per_expert combine")


# ----------------------------------------------------------------------------- helpers
def filled(nbytes: int, x: torch.Tensor) -> torch.Tensor:
    """``uint8 [nbytes]`` holding repeated bytes of ``x`` (real data, one memcpy pass)."""
    src = x.reshape(-1).view(torch.uint8)
    if nbytes <= src.numel():
        return src[:nbytes].clone()
    reps = -(-nbytes // src.numel())
    return src.repeat(reps)[:nbytes]


def rows_like(x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[num_rows, H]`` rows of ``x`` repeated (valid values, x's dtype)."""
    if x.size(0) == 0:
        return x.new_zeros((num_rows, x.size(1)))
    return x.index_select(0, torch.arange(num_rows, device=x.device) % x.size(0))


class Op:
    """A timed operation: ``fn(prepared)``; ``prepare()`` runs outside the timed region.

    ``first()``, when set, makes the op's first call itself (pass 1) and returns what only that
    call tells: ``(traffic record, verified or None)``; otherwise pass 1 is a plain call and the
    record comes from ``traffic()``.

    ``trips()``, when set, returns the host round trips (collectives, kernels) one call made, read
    right after pass 1.
    """

    def __init__(self, name, algorithm, op, fn, prepare=None, traffic=None, row_kind="dispatch", first=None,
                 trips=None):
        self.name, self.algorithm, self.op = name, algorithm, op
        self.fn, self.prepare, self.traffic = fn, prepare, traffic
        self.row_kind = row_kind  # which row bytes DeepEP's accounting uses: "dispatch" or "combine"
        self.first = first
        self.trips = trips


def epcomm_traffic(buf: epcomm.Buffer, op: str) -> dict:
    return {link: {"rows": (t := buf.traffic.get(op, link)).rows, "payload_bytes": t.payload_bytes,
                   "meta_bytes": t.meta_bytes} for link in LINKS}


def sum_over_ranks(records: list[dict | None], device) -> list[dict | None]:
    """All-reduce SUM of per-rank traffic records (same structure on every rank)."""
    fields = ("rows", "payload_bytes", "meta_bytes")
    vals = torch.zeros(len(records), len(LINKS), len(fields), dtype=torch.int64)
    for i, rec in enumerate(records):
        for j, link in enumerate(LINKS):
            for k, f in enumerate(fields):
                vals[i, j, k] = (rec or {}).get(link, {}).get(f, 0)
    vals = vals.to(device)
    dist.all_reduce(vals)
    vals = vals.cpu()
    return [None if rec is None else {link: {f: int(vals[i, j, k]) for k, f in enumerate(fields)}
                                       for j, link in enumerate(LINKS)} for i, rec in enumerate(records)]


def quantiles(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"p10_s": q[0], "median_s": q[1], "p90_s": q[2], "times_s": times}


# ----------------------------------------------------------------------------- one configuration
class Case:
    """The data of one configuration, shared by every group of ops (read-only)."""

    def __init__(self, args, rank: int, world: int, device: torch.device, tokens: int) -> None:
        self.args, self.rank, self.world, self.device = args, rank, world, device
        nvl, H, E, K = args.nvl_ranks, args.hidden, args.experts, args.topk
        self.topo = Topology(world, rank, nvl)
        topk_all = global_topk_idx(args.routing, world=world, nvl=nvl, tokens=tokens, experts=E, topk=K,
                                   **routing_params(args))
        self.tm = traffic_matrices(topk_all, E, nvl)
        # node partials cross the network in combine's row dtype (bf16) unless --node-partials float32; on
        # one node the torch backend keeps them float32 (they only go to the rank itself, and the final
        # cast makes a rounding there a no-op)
        partial_element_bytes = 4 if args.node_partials == "float32" or self.tm.nodes == 1 else 2
        self.rb_partial = partial_element_bytes * H
        self.expected = expected_traffic(self.tm, H, args.fp8, combine_partial_bytes=partial_element_bytes)
        self.topk_idx = topk_all[rank].contiguous().to(device)
        del topk_all
        g = torch.Generator().manual_seed(10_000 + rank)
        self.x = torch.randn(tokens, H, generator=g).to(torch.bfloat16).to(device)
        self.weights = torch.rand(tokens, K, generator=g).to(device)
        self.x_in = per_token_cast_to_fp8(self.x) if args.fp8 else self.x
        self.rb_dispatch = fp8_row_bytes(H) if args.fp8 else 2 * H
        self.rb_combine = 2 * H
        self.bf16_dispatch_payload = None  # (algorithm, bytes) of a bf16 dispatch, for the FP8 ratio


def epcomm_ops(c: Case, algo: str, with_layout: bool) -> list[Op]:
    """One epcomm Buffer's layout / dispatch / cached dispatch / combine."""
    args, E = c.args, c.args.experts
    buf = epcomm.Buffer(None, backend=args.backend, num_nvl_ranks=args.nvl_ranks, max_nodes_per_token=args.max_nodes,
                        algorithm=algo, timeout_s=args.timeout, combine_node_partials=args.node_partials)
    state: dict = {}
    kwargs = _kwargs_of(buf, c.topk_idx, E, c.weights)

    def first_dispatch():
        buf.reset_traffic()
        out = buf.dispatch(c.x_in, **kwargs)
        state["handle"] = out[4]
        state["dispatch trips"] = round_trips_of(buf, "dispatch")
        record, verified = epcomm_traffic(buf, "dispatch"), None
        if not args.fp8:  # combine(dispatch(x)) == x times the ranks each token reached, bit for bit
            comb = buf.combine(out[0], out[4])[0]
            verified = bool(torch.equal(comb, (c.x.float() * tm_ranks_per_token(c.topk_idx, E, c.world)).to(c.x.dtype)))
        elif algo == args.algorithms[-1]:  # the same routing in bf16, once, for the FP8 byte ratio
            buf.reset_traffic()
            buf.dispatch(c.x, **kwargs)
            bf = sum_over_ranks([epcomm_traffic(buf, "dispatch")], c.device)[0]
            c.bf16_dispatch_payload = (algo, sum(bf[link]["payload_bytes"] for link in LINKS))
        buf.reset_traffic()
        return record, verified

    num_recv = int(c.tm.count[:, c.rank].sum())
    ops = []
    if with_layout:
        ops.append(Op("layout", "epcomm", "layout", lambda _: buf.get_dispatch_layout(c.topk_idx, E)))
    # round trips of one call: pass 1 of each op follows first_dispatch's reset_traffic
    ops.append(Op(f"{algo} dispatch", algo, "dispatch", lambda _: buf.dispatch(c.x_in, **kwargs), first=first_dispatch,
                  trips=lambda: state["dispatch trips"]))
    ops.append(Op(f"{algo} cached dispatch", algo, "cached dispatch", lambda _: buf.dispatch(c.x_in, handle=state["handle"]),
                  traffic=lambda: epcomm_traffic(buf, "cached dispatch"),
                  trips=lambda: round_trips_of(buf, "cached dispatch")))
    ops.append(Op(f"{algo} combine", algo, "combine", lambda y: buf.combine(y, state["handle"]),
                  prepare=lambda: rows_like(c.x, num_recv), traffic=lambda: epcomm_traffic(buf, "combine"),
                  row_kind="combine", trips=lambda: round_trips_of(buf, "combine")))
    return ops


def round_trips_of(buf: epcomm.Buffer, op: str) -> dict:
    """Host round trips ``op`` made since the last ``reset_traffic`` (collectives issued, kernels waited for)."""
    trips = buf.traffic.round_trips.get(op, {})
    return {"collectives": int(trips.get("collective", 0)), "kernels": int(trips.get("kernel", 0))}


def count_exchange_words(world: int) -> int:
    """int64 entries of the agreement header ``epcomm._agree.agree`` all-gathers for a dispatch: the verdict,
    the call signature and ``2 * world`` counts (tokens per rank and per node, fixed length)."""
    return 1 + len(SIGNATURE_FIELDS) + 2 * world


def ceiling_ops(c: Case, count_exchange: bool = False) -> list[Op]:
    """Transport ceilings: the same rows, bare all_to_all_single from a pre-filled buffer.

    ``count_exchange``: also the bare count exchange (one all_gather of the agreement's header size),
    the ceiling of what non-cached dispatch adds before its rows can move.
    """
    tm, rank, H = c.tm, c.rank, c.args.hidden
    flat_fwd = (tm.count[rank].tolist(), tm.count[:, rank].tolist())
    ceilings = {
        "ceiling dispatch": ("ceiling", "dispatch", [(*flat_fwd, c.rb_dispatch)]),
        "ceiling combine": ("ceiling", "combine", [(flat_fwd[1], flat_fwd[0], c.rb_combine)]),
    }
    if "two_hop" in c.args.algorithms:
        h1 = (tm.hop1[rank].tolist(), tm.hop1[:, rank].tolist())
        h2 = (tm.hop2[rank].tolist(), tm.hop2[:, rank].tolist())
        ceilings["ceiling two_hop dispatch"] = ("ceiling_two_hop", "dispatch",
                                                [(*h1, c.rb_dispatch), (*h2, c.rb_dispatch)])
        ceilings["ceiling two_hop combine"] = ("ceiling_two_hop", "combine",
                                               [(h2[1], h2[0], c.rb_combine), (h1[1], h1[0], c.rb_partial)])
    ops = []
    for name, (algo, op, steps) in ceilings.items():
        a2a = BareAllToAll(c.topo, steps, reuse_output=c.args.ceiling_output == "reused")
        ops.append(Op(name, algo, op, lambda scratch, a=a2a: a.run(scratch),
                      prepare=lambda n=a2a.scratch_bytes: filled(n, c.x), traffic=lambda a=a2a: a.record, row_kind=op))
    if count_exchange:
        counts = BareCountExchange(count_exchange_words(c.world), c.device)
        ops.insert(0, Op(COUNT_EXCHANGE, "ceiling", "count exchange", lambda _: counts.run()))
    return ops


def _ceiling_bytes_per_rank(c: Case) -> int:
    """The largest bare-exchange buffer (send or receive) any rank holds: the same number on every rank,
    from the global traffic matrices."""
    def busiest(m: torch.Tensor) -> int:
        return int(max(m.sum(0).max(), m.sum(1).max())) if m.numel() else 0

    tm = c.tm
    most = busiest(tm.count) * max(c.rb_dispatch, c.rb_combine)
    if "two_hop" in c.args.algorithms:
        most = max(most, busiest(tm.hop1) * max(c.rb_dispatch, c.rb_partial),
                   busiest(tm.hop2) * max(c.rb_dispatch, c.rb_combine))
    return most


def per_expert_ops(c: Case) -> list[Op]:
    """The per-expert dispatcher (Megatron-style): a token sent once per selected expert."""
    pe = PerExpertDispatcher(c.topo, c.args.experts)
    state: dict = {}

    def first_dispatch():
        pe.reset_record()
        recv, state["state"] = pe.dispatch(c.x_in, c.topk_idx)
        record, verified = {k: dict(v) for k, v in pe.record["dispatch"].items()}, None
        if not c.args.fp8:
            comb = pe.combine(recv, state["state"])
            experts_per_token = (c.topk_idx >= 0).sum(1, keepdim=True).float()
            verified = bool(torch.equal(comb, (c.x.float() * experts_per_token).to(c.x.dtype)))
        pe.reset_record()
        return record, verified

    num_pairs = int(c.tm.expert_count[:, c.rank].sum())
    return [
        Op("per_expert dispatch", "per_expert", "dispatch", lambda _: pe.dispatch(c.x_in, c.topk_idx), first=first_dispatch),
        Op("per_expert combine", "per_expert", "combine", lambda y: pe.combine(y, state["state"]),
           prepare=lambda: rows_like(c.x, num_pairs), traffic=lambda: pe.record["combine"], row_kind="combine"),
    ]


def _reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: VmHWM restarts from the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def run_case(args, rank: int, world: int, device: torch.device, tokens: int, reps: int, warmup: int,
             only: tuple[str, ...] | None, timer, for_targets: bool = False) -> dict:
    """Every op of one configuration, measured group by group.

    A group (one epcomm algorithm, the transport ceilings, the per-expert baseline) is built,
    run once (bytes and a bit-exact check), warmed up and timed, then freed before the next one
    is built, so the peak memory is one group's, not the sum of all (``make bench``'s 4096
    tokens at 8 ranks fit a 24 GB machine this way). Within a group the ops alternate in every
    repetition.

    ``for_targets`` (``--targets-table``): also the bare count exchange; and where the bare
    exchanges' buffers are small (all ranks together at most ``--pair-limit-mib``), each epcomm
    group runs the bare ops it is compared with in the same repetitions ("paired"), so a ratio
    compares calls made moments apart, not minutes apart on a machine whose load drifts.
    """
    c = Case(args, rank, world, device, tokens)
    want = lambda name: only is None or name in only  # noqa: E731
    algos = args.algorithms
    paired = for_targets and world * _ceiling_bytes_per_rank(c) <= args.pair_limit_mib * 2**20
    if paired:
        bare = ceiling_ops(c, count_exchange=True)

        def home(o: Op) -> str:  # the epcomm group a bare op is measured with
            if o.algorithm == "ceiling_two_hop" and "two_hop" in algos:
                return "two_hop"
            return "flat" if "flat" in algos else algos[0]

        groups = [(algo, lambda a=algo, i=i: epcomm_ops(c, a, with_layout=i == 0) + [o for o in bare if home(o) == a])
                  for i, algo in enumerate(algos)]
    else:
        groups = [(algo, lambda a=algo, i=i: epcomm_ops(c, a, with_layout=i == 0)) for i, algo in enumerate(algos)]
        groups.append(("ceiling", lambda: ceiling_ops(c, count_exchange=for_targets)))
    if not args.no_baselines:
        groups.append(("per_expert", lambda: per_expert_ops(c)))

    def timed(o: Op) -> float:
        arg = o.prepare() if o.prepare else None
        t = timer(lambda: o.fn(arg))
        del arg
        return t

    measured: list[tuple[Op, dict | None, list[float]]] = []  # (op without its closures, record, times)
    verified, kernel_only, peak_rss, trips = {}, {}, {}, {}
    for group, build in groups:
        gc.collect()
        _reset_peak_rss()
        ops = [o for o in build() if want(o.name)]
        records = []
        for o in ops:  # pass 1 (also the first warm-up): bytes of one call, and the bit-exact check
            if o.first is not None:
                record, ok = o.first()
                if ok is not None:
                    verified[o.algorithm] = ok
            else:
                o.fn(o.prepare() if o.prepare else None)
                record = copy.deepcopy(o.traffic()) if o.traffic else None  # a snapshot: counters keep counting
            if o.trips is not None:
                trips[o.name] = o.trips()
            records.append(record)
            gc.collect()
        for _ in range(max(0, warmup - 1)):
            for o in ops:
                timed(o)
        times = torch.zeros(len(ops), reps, dtype=torch.float64)
        for i in range(reps):
            for j, o in enumerate(ops):
                times[j, i] = timed(o)
        if device.type == "cuda" and args.kernel_times:
            for o in ops:
                arg = o.prepare() if o.prepare else None
                kernel_only[o.name] = kernel_only_seconds(lambda: o.fn(arg), reps, device)
        for o, record, t in zip(ops, records, times.tolist()):
            measured.append((Op(o.name, o.algorithm, o.op, None, row_kind=o.row_kind), record, t))
        peak_rss[group] = _peak_rss_mib()
        del ops, records
        release_scratch()  # the torch backend's reusable temporaries: the next group sizes its own
        gc.collect()
    names = [o.name for o, _, _ in measured]
    times = torch.tensor([t for _, _, t in measured], dtype=torch.float64).view(len(measured), reps).to(device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # slowest rank per repetition
    times = times.cpu()
    records = sum_over_ranks([r for _, r, _ in measured], device)
    rss = torch.tensor([peak_rss[g] for g, _ in groups], dtype=torch.int64, device=device)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    memory = {"peak_rss_MiB_max_over_ranks": dict(zip([g for g, _ in groups], rss.tolist()))}

    # ---- figures
    tm, rb_dispatch, rb_combine, expected = c.tm, c.rb_dispatch, c.rb_combine, c.expected
    pairs = tm.pairs()
    result_ops = {}
    for j, (o, _, _) in enumerate(measured):
        q = quantiles(times[j].tolist())
        rb = rb_combine if o.row_kind == "combine" else rb_dispatch
        entry = {"algorithm": o.algorithm, "op": o.op, **q, "row_bytes": rb}
        rec = records[j]
        if rec is not None:
            entry["traffic"] = rec
            exp = _expected_for(expected, o, args.moves)
            if exp is not None:
                entry["expected"] = exp
                entry["bytes_match"] = all(rec[link]["rows"] == exp[link]["rows"]
                                           and rec[link]["payload_bytes"] == exp[link]["payload_bytes"] for link in LINKS)
            wire = sum(rec[link]["payload_bytes"] + rec[link].get("meta_bytes", 0) for link in ("network", "nvlink"))
            entry["wire_GBps_per_rank"] = wire / world / q["median_s"] / 1e9
        if o.name in trips:
            entry["round_trips_per_call"] = trips[o.name]
        if o.op not in ("layout", "count exchange"):
            entry["deepep_rdma_GBps"] = (pairs["token_node_pairs"] * rb / world / q["median_s"] / 1e9
                                         if tm.nodes > 1 else None)
            entry["deepep_nvl_GBps"] = pairs["token_rank_pairs"] * rb / world / q["median_s"] / 1e9
        if o.name in kernel_only:
            entry["kernel_only_s"] = kernel_only[o.name]
        result_ops[names[j]] = entry
    for name, entry in result_ops.items():
        op = "combine" if entry["op"] == "combine" else "dispatch"
        ceil = result_ops.get(f"ceiling {op}")
        if ceil is not None and not name.startswith("ceiling") and entry["op"] not in ("layout", "count exchange"):
            entry["x_ceiling"] = entry["median_s"] / ceil["median_s"]
            entry["fraction_of_ceiling"] = ceil["median_s"] / entry["median_s"]
        ceil2 = result_ops.get(f"ceiling two_hop {op}")
        if ceil2 is not None and entry["algorithm"] == "two_hop":
            entry["x_ceiling_two_hop"] = entry["median_s"] / ceil2["median_s"]
    return {
        "tokens": tokens, "reps": reps, "warmup": warmup, "ops": result_ops, "pairs": pairs,
        "hidden": args.hidden, "paired": paired,
        "verified": verified, "bf16_dispatch_payload": c.bf16_dispatch_payload, "memory": memory,
        "row_bytes": {"dispatch": rb_dispatch, "combine": rb_combine},
        "recv_rows_per_rank": {"min": int(tm.count.sum(0).min()), "max": int(tm.count.sum(0).max())},
    }


def _kwargs_of(buf, topk_idx, E, weights):
    layout = buf.get_dispatch_layout(topk_idx, E)
    return dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                num_tokens_per_expert=layout[2], topk_idx=topk_idx, topk_weights=weights)


def tm_ranks_per_token(topk_idx: torch.Tensor, E: int, world: int) -> torch.Tensor:
    from epcomm.layout import token_rank_mask
    return token_rank_mask(topk_idx, E, world).sum(1, keepdim=True).float()


def _expected_for(expected: dict, o: Op, moves: dict[str, str]) -> dict | None:
    """The routing's exact counts for ``o``: an epcomm op moves the rows of the algorithm its backend
    runs under that name (``moves``, from ``DispatchBackend.algorithms``), a ceiling those it mirrors."""
    algo = {"ceiling": "flat", "ceiling_two_hop": "two_hop", **moves}.get(o.algorithm, o.algorithm)
    return expected.get(algo, {}).get(o.op)


# ----------------------------------------------------------------------------- targets
def targets(args, main: dict) -> list[dict]:
    ops, H = main["ops"], args.hidden
    out = []

    def line(name, ok, value, detail):
        out.append({"name": name, "pass": bool(ok), "value": value, "detail": detail})

    for algo in args.algorithms:
        for op in ("dispatch", "combine"):
            e = ops.get(f"{algo} {op}")
            if e and "x_ceiling" in e:
                what = "same bytes" if algo == "flat" else "flat rows; two-hop moves more"
                line(f"{algo} {op} within {TARGET_RATIO}x of bare all_to_all_single ({what})",
                     e["x_ceiling"] <= TARGET_RATIO, e["x_ceiling"],
                     f"{e['median_s'] * 1e3:.1f} ms vs {ops[f'ceiling {op}']['median_s'] * 1e3:.1f} ms")
            if e and "x_ceiling_two_hop" in e:
                line(f"two_hop {op} within {TARGET_RATIO}x of bare two-step all_to_all (hop1 + hop2, same bytes)",
                     e["x_ceiling_two_hop"] <= TARGET_RATIO, e["x_ceiling_two_hop"],
                     f"{e['median_s'] * 1e3:.1f} ms vs {ops[f'ceiling two_hop {op}']['median_s'] * 1e3:.1f} ms")
    p = main["pairs"]
    rb = main["row_bytes"]["dispatch"]
    th = ops.get("two_hop dispatch")
    if th and "traffic" in th:
        got = th["traffic"]["network"]["payload_bytes"]
        want = p["token_remote_node_pairs"] * rb
        line("two-hop network bytes == (token, remote node) pairs x row bytes", got == want, got,
             f"{got} B measured, {p['token_remote_node_pairs']} pairs x {rb} B = {want} B")
        pe = ops.get("per_expert dispatch")
        if pe and "traffic" in pe and got:
            measured = Fraction(pe["traffic"]["network"]["payload_bytes"], got)
            implied = Fraction(p["token_expert_remote_node_pairs"], p["token_remote_node_pairs"])
            line("two-hop network bytes below per-expert baseline by the routing's factor",
                 measured == implied and measured > 1, float(measured),
                 f"per-expert/two-hop = {float(measured):.4f} measured, (token,expert)/(token,node) remote pairs "
                 f"= {float(implied):.4f} implied")
    if args.fp8 and main["bf16_dispatch_payload"]:
        algo, bf = main["bf16_dispatch_payload"]
        e = ops[f"{algo} dispatch"]["traffic"]
        fp8 = sum(e[link]["payload_bytes"] for link in LINKS)
        ratio = Fraction(fp8, bf) if bf else Fraction(0)
        want = Fraction(H + 4 * H // 128, 2 * H)
        line("FP8 dispatch bytes == (H + 4H/128)/(2H) of BF16", ratio == want, float(ratio),
             f"{fp8} / {bf} B = {ratio} (want {want} = {float(want):.6f})")
    checked = {name: e["bytes_match"] for name, e in ops.items() if "bytes_match" in e}
    line("every op's rows and payload bytes per link == the routing's exact counts", all(checked.values()),
         sum(checked.values()), ", ".join(n for n, ok in checked.items() if not ok) or f"{len(checked)} ops match")
    if main["verified"]:
        line("results verified (combine(dispatch(x)) == x x copies, bit-exact)", all(main["verified"].values()),
             sum(main["verified"].values()), json.dumps(main["verified"]))
    return out


def targets_row(case: dict) -> dict:
    """Issue 14's targets for one measured configuration: per column of :data:`TARGET_COLUMNS`, the epcomm
    op's median over the sum of its bare ops' medians (measured in the same run), and PASS/MISS."""
    ops = case["ops"]
    count_s = ops[COUNT_EXCHANGE]["median_s"] if COUNT_EXCHANGE in ops else None
    row = {"tokens": case["tokens"], "hidden": case["hidden"], "reps": case["reps"], "paired": case["paired"],
           "count_exchange_s": count_s, "columns": {}}
    for col, (name, bare, limit) in TARGET_COLUMNS.items():
        e = ops.get(name)
        if e is None or any(b not in ops for b in bare):
            continue
        ceiling_s = sum(ops[b]["median_s"] for b in bare)
        ratio = e["median_s"] / ceiling_s
        row["columns"][col] = {
            "ratio": ratio, "limit": limit, "pass": ratio <= limit, "median_s": e["median_s"],
            "ceiling_s": ceiling_s, "ceiling_parts_s": {b: ops[b]["median_s"] for b in bare},
            "round_trips_per_call": e.get("round_trips_per_call"),
        }
        if count_s is not None and COUNT_EXCHANGE not in bare:  # what is left beyond one agreement round
            row["columns"][col]["ratio_incl_count_exchange"] = e["median_s"] / (ceiling_s + count_s)
        if case["paired"]:  # repetition i of the op against repetition i of its bare ops (moments apart)
            per_rep = torch.tensor([t / sum(ops[b]["times_s"][i] for b in bare) for i, t in enumerate(e["times_s"])],
                                   dtype=torch.float64)
            row["columns"][col]["median_of_paired_ratios"] = float(per_rep.quantile(0.5))
    return row


def targets_table(cases: list[dict]) -> dict:
    return {
        "definition": {col: {"op": name, "ceiling": " + ".join(bare), "limit": limit}
                       for col, (name, bare, limit) in TARGET_COLUMNS.items()},
        "ratio": "median time of the epcomm op / sum of the medians of its bare ops, same run",
        "count_exchange_int64_words": None,  # set by main (depends on the world size)
        "rows": [targets_row(c) for c in sorted(cases, key=lambda c: (c["hidden"], c["tokens"]))],
    }


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch", choices=("torch", "sim", "cuda", "auto"))
    p.add_argument("--nvl-ranks", type=int, default=8, help="ranks per (emulated) node")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (combine stays BF16)")
    add_routing_args(p)
    p.add_argument("--algorithms", default="flat,two_hop", help="epcomm algorithms to run")
    p.add_argument("--node-partials", choices=("rows_dtype", "float32"), default="rows_dtype",
                   help="Buffer(combine_node_partials=...): two-hop combine's node partials on the network")
    p.add_argument("--no-baselines", action="store_true", help="skip the per-expert dispatcher")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=1, help="warm-up repetitions (the first also counts bytes)")
    p.add_argument("--sweep", default=None, help="comma-separated tokens per rank for the plot "
                   "(default with --plot: tokens/4, tokens/2 and tokens)")
    p.add_argument("--sweep-reps", type=int, default=2)
    p.add_argument("--targets-table", action="store_true",
                   help="issue 14's per-call targets: measure every op (plus a bare count exchange) at each "
                        "--sweep token count x --sweep-hidden, and print/write the table of ratios")
    p.add_argument("--sweep-hidden", default=None,
                   help="with --targets-table: comma-separated hidden sizes (default: --hidden)")
    p.add_argument("--pair-limit-mib", type=int, default=2048,
                   help="with --targets-table: time the bare ops in the same repetitions as epcomm's ops when "
                        "their buffers, summed over ranks, take at most this much (else in a group of their own)")
    p.add_argument("--ceiling-output", choices=("fresh", "reused"), default="fresh",
                   help="the bare exchanges receive into a new tensor per call (like epcomm's results, which "
                        "belong to the caller) or into one buffer reused across calls (the transport alone)")
    p.add_argument("--json", help="write every figure and the configuration here (rank 0)")
    p.add_argument("--plot", help="PNG of bandwidth vs tokens per rank (rank 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="epcomm Buffer timeout_s")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--kernel-times", action="store_true", help="GPU: also profile kernel-only times (CUPTI)")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 if a target line says MISS")
    args = p.parse_args(argv)
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    for a in args.algorithms:
        if a not in ("flat", "two_hop"):
            p.error(f"--algorithms: unknown algorithm {a!r}")
    return args


def run_targets(args, rank: int, world: int, device: torch.device, timer, main_case: dict) -> tuple[list[dict], dict]:
    """``--targets-table``: every op at each (--sweep tokens, --sweep-hidden) point; the main case counts as
    the point it is. Returns the sweep at --hidden (for the plot) and the table."""
    tokens = [int(t) for t in args.sweep.split(",")] if args.sweep else [args.tokens]
    hiddens = [int(h) for h in args.sweep_hidden.split(",")] if args.sweep_hidden else [args.hidden]
    cases = []
    for hidden in hiddens:
        for t in tokens:
            if (t, hidden) == (args.tokens, args.hidden):
                cases.append(main_case)
                continue
            start = datetime.datetime.now()
            point = copy.copy(args)
            point.hidden = hidden
            cases.append(run_case(point, rank, world, device, t, args.sweep_reps, args.warmup, None, timer,
                                  for_targets=True))
            if rank == 0:
                print(f"bench: targets point {t} x {hidden} took "
                      f"{(datetime.datetime.now() - start).total_seconds():.0f} s", file=sys.stderr, flush=True)
    if not any(c is main_case for c in cases):
        cases.append(main_case)
    sweep = sorted((c for c in cases if c["hidden"] == args.hidden), key=lambda c: c["tokens"])
    return sweep, targets_table(cases)


def _pick_algorithms(args, topo: Topology, rank: int) -> str | None:
    """Keep the algorithms the backend runs on this topology (saying which were left out); a problem, or None.

    Sets ``args.moves``: algorithm -> the algorithm whose rows the backend actually moves under that
    name, so the exact-bytes check expects what runs (the kernel backends run flat rows on one node).
    """
    accepted = backend_class(resolve_backend(args.backend)).algorithms(topo)
    skipped = [a for a in args.algorithms if a not in accepted]
    args.algorithms = [a for a in args.algorithms if a in accepted]
    where = f"on {topo.num_nodes} node(s) x {topo.num_nvl_ranks}"
    if not args.algorithms:
        return f"backend {args.backend!r} {where} runs only {sorted(accepted)}; --algorithms asked for {skipped}"
    if skipped and rank == 0:
        print(f"bench: backend {args.backend!r} {where} runs {sorted(accepted)}: skipping {skipped}", file=sys.stderr)
    args.moves = {a: accepted[a] for a in args.algorithms}
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    started = start_bench(args.backend, args.threads, args.nvl_ranks, args.experts,
                          lambda rank, world: _pick_algorithms(args, Topology(world, rank, args.nvl_ranks), rank))
    if started is None:
        return 2
    rank, world, device = started
    timer = make_timer(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        main_case = run_case(args, rank, world, device, args.tokens, args.reps, args.warmup, None, timer,
                             for_targets=args.targets_table)
        sweep, table = [], None
        if args.targets_table:
            sweep, table = run_targets(args, rank, world, device, timer, main_case)
        elif args.plot or args.sweep:
            counts = ([int(t) for t in args.sweep.split(",")] if args.sweep
                      else [max(1, args.tokens // 4), max(1, args.tokens // 2)])
            for t in counts:
                if t == args.tokens:
                    continue
                sweep.append(run_case(args, rank, world, device, t, args.sweep_reps, 1, SWEEP_OPS, timer))
            sweep.append(main_case)
            sweep.sort(key=lambda c: c["tokens"])
        gpu = nvlink_ceiling(args.nvl_ranks, device) if device.type == "cuda" else None
    except EpcommError as err:
        if rank == 0:
            print(f"bench: {type(err).__name__}: {err}", file=sys.stderr)
        return 3
    lines = targets(args, main_case)
    if table is not None:
        table["count_exchange_int64_words"] = count_exchange_words(world)
        for col, c in targets_row(main_case)["columns"].items():
            name, bare, _ = TARGET_COLUMNS[col]
            lines.append({"name": f"{name} within {c['limit']}x of {' + '.join(bare)} (issue 14)",
                          "pass": c["pass"], "value": c["ratio"],
                          "detail": f"{c['median_s'] * 1e3:.2f} ms vs {c['ceiling_s'] * 1e3:.2f} ms"})
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "environment": {
            "epcomm": epcomm.__version__, "torch": torch.__version__, "world_size": world,
            "num_nodes": world // args.nvl_ranks, "nvl_ranks": args.nvl_ranks,
            "process_group": dist.get_backend(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(), "host": socket.gethostname(), "timer": timer.kind,
            "started_utc": started.isoformat(), "argv": sys.argv,
        },
        "accounting": {
            "deepep_rdma_GBps": "(token, destination node) pairs incl. own node x row bytes / ranks / median time",
            "deepep_nvl_GBps": "received rows (token, destination rank pairs) x row bytes / ranks / median time",
            "wire_GBps_per_rank": "bytes this op put on NVLink + network (payload + metadata) / ranks / median time",
            "traffic": "rows and bytes sent per link class, summed over ranks",
            "x_ceiling": "median time / median time of the bare all_to_all_single of epcomm's flat rows",
        },
        "main": main_case, "targets": lines, "sweep": [
            {"tokens": c["tokens"], "reps": c["reps"],
             "ops": {n: {k: e.get(k) for k in ("median_s", "p10_s", "p90_s", "deepep_nvl_GBps", "deepep_rdma_GBps")}
                     for n, e in c["ops"].items()}} for c in sweep],
        "gpu": gpu,
    }
    if table is not None:
        result["targets_table"] = table
    if rank == 0:
        print_report(result)
        if table is not None:
            print()
            print_targets_table(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"\nwrote {args.json}")
        if args.plot:
            write_plot(result, args.plot)
            print(f"wrote {args.plot}")
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 1 if args.fail_on_miss and not all(t["pass"] for t in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
