"""Per-call host cost of epcomm's operations on tiny payloads, where the fixed cost is all there is.

    mpiexec -n 4 python bench/host_overhead.py --nvl-ranks 4 [--backends torch,sim] [--json out.json]
    mpiexec -n 4 python bench/host_overhead.py --nvl-ranks 2          # two nodes: the two-hop path

For each backend and operation (dispatch, cached dispatch, combine) on a payload small enough that
moving it costs nothing (``--tokens`` 16 x ``--hidden`` 256 by default), it reports the median time
per call (slowest rank, after a barrier) and the host round trips one call makes, counted by the
buffer itself (``buffer.traffic.round_trips``): collectives issued on the process group and kernel
launches the host waits for. The round trips are exact and stable; the times are this machine's.
Run it before and after a change to the Python/C++ seam and compare the two tables.

A backend name with ``+host-agreement`` (e.g. ``sim+host-agreement``) runs that backend with its
in-barrier call check switched off, so every call takes the host agreement as before the check
existed (kernels/call_check.cuh): the "before" of that change, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epcomm  # noqa: E402
from epcomm.launch import init_distributed  # noqa: E402

OPERATIONS = ("dispatch", "cached dispatch", "combine")


def _inputs(rank: int, world: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    gen = torch.Generator().manual_seed(1234 + rank)
    num_experts = args.experts_per_rank * world
    scores = torch.rand(args.tokens, num_experts, generator=gen)
    topk_idx = scores.topk(args.topk, dim=1).indices.to(torch.int64)
    weights = torch.rand(args.tokens, args.topk, generator=gen)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(torch.bfloat16)
    return x, topk_idx, weights, num_experts


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure(name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median seconds and round trips per call of each operation on backend ``name`` (``+host-agreement``:
    with the in-barrier call check off)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    backend, _, variant = name.partition("+")
    if variant not in ("", "host-agreement"):
        raise SystemExit(f"unknown variant {variant!r} of backend {backend!r} (known: host-agreement)")
    buffer = epcomm.Buffer(None, backend=backend, num_nvl_ranks=args.nvl_ranks, timeout_s=60.0)
    if variant:
        buffer._impl.agree_in_barrier = lambda call: False  # the protocol's default: the host agreement decides
    x, topk_idx, weights, num_experts = _inputs(rank, world, args)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    state: dict[str, object] = {}

    def dispatch() -> None:
        out = buffer.dispatch(x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                              num_tokens_per_expert=layout[2], is_token_in_rank=layout[3], topk_idx=topk_idx,
                              topk_weights=weights)
        state["recv_x"], state["handle"] = out[0], out[4]

    def cached() -> None:
        buffer.dispatch(x, handle=state["handle"])

    def combine() -> None:
        buffer.combine(state["recv_x"], state["handle"])

    calls = {"dispatch": dispatch, "cached dispatch": cached, "combine": combine}
    results: dict[str, dict[str, float]] = {}
    dispatch()  # the handle and rows the other operations need; also sizes the kernel buffers
    for op in OPERATIONS:
        for _ in range(args.warmup):
            calls[op]()
        buffer.reset_traffic()
        times = []
        for _ in range(args.reps):
            dist.barrier()
            start = time.perf_counter()
            calls[op]()
            times.append(_slowest(time.perf_counter() - start))
        trips = buffer.traffic.round_trips[op]
        times.sort()
        results[op] = {"median_ms": 1e3 * times[len(times) // 2],
                       "collectives": trips["collective"] / args.reps, "kernels": trips["kernel"] / args.reps}
    close = getattr(buffer, "destroy", None)
    if close is not None:
        close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch,sim,sim+host-agreement")
    parser.add_argument("--nvl-ranks", type=int, default=None, help="ranks per node (default: all ranks on one node)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--experts-per-rank", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rank, world = init_distributed("gloo")
    torch.set_num_threads(1)
    if args.nvl_ranks is None:
        args.nvl_ranks = world
    table = {backend: measure(backend, args) for backend in args.backends.split(",")}
    if rank == 0:
        nodes = world // args.nvl_ranks
        print(f"host cost per call: {world} ranks as {nodes} x {args.nvl_ranks}, {args.tokens} tokens x "
              f"hidden {args.hidden}, top-{args.topk}, median of {args.reps}")
        width = max(8, *(len(name) for name in table))
        print(f"{'backend':{width}} {'operation':16} {'median ms':>10} {'collectives':>12} {'kernels':>8}")
        for backend, ops in table.items():
            for op, r in ops.items():
                print(f"{backend:{width}} {op:16} {r['median_ms']:10.2f} {r['collectives']:12g} {r['kernels']:8g}")
        if args.json:
            with open(args.json, "w") as f:
                record = {**vars(args), "json": os.path.basename(args.json)}  # no machine paths in results
                json.dump({"world": world, "nvl_ranks": args.nvl_ranks, "args": record, "results": table}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
