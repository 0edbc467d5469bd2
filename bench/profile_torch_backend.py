"""Where the torch backend's time goes: cProfile of every rank during dispatch/combine.

    mpiexec -n 8 python bench/profile_torch_backend.py --nvl-ranks 2 --tokens 4096 --hidden 7168 --reps 2

Profiles each operation separately on every rank (barrier before each call,
so waiting for a slow peer shows up inside the collective that waited), and
prints, per operation, the functions with the most own time (mean over ranks,
seconds per call) next to the operation's wall time. The bare
all_to_all_single of the same rows is timed the same way for reference.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import epcomm  # noqa: E402
from epcomm.launch import init_distributed  # noqa: E402

from _routing import add_routing_args, global_topk_idx, routing_params  # noqa: E402
from cluster_model import traffic_matrices  # noqa: E402


def _label(func: tuple) -> str:
    filename, line, name = func
    if filename == "~":
        return name.replace("<method '", "").replace("' of 'torch._C.TensorBase' objects>", " (Tensor)") \
            .replace("<built-in method ", "").replace(" of type object", "")
    short = filename.split("/epcomm/")[-1] if "/epcomm/" in filename else os.path.basename(filename)
    return f"{short}:{line}({name})"


def profile_op(fn, reps: int) -> tuple[float, dict]:
    prof = cProfile.Profile()
    wall = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        prof.enable()
        fn()
        prof.disable()
        wall.append(time.perf_counter() - start)
        gc.collect()
    stats = pstats.Stats(prof, stream=io.StringIO())
    own = {_label(f): (tt / reps, ct / reps) for f, (cc, nc, tt, ct, callers) in stats.stats.items()}
    return sorted(wall)[len(wall) // 2], own


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nvl-ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--algorithms", default="flat,two_hop")
    add_routing_args(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    rank, world = init_distributed()
    topk_all = global_topk_idx(args.routing, world=world, nvl=args.nvl_ranks, tokens=args.tokens,
                               experts=args.experts, topk=args.topk, **routing_params(args))
    tm = traffic_matrices(topk_all, args.experts, args.nvl_ranks)
    topk_idx = topk_all[rank].contiguous()
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    weights = torch.rand(args.tokens, args.topk)
    results = {}

    rb = 2 * args.hidden
    send = x.view(torch.uint8).reshape(-1).repeat(-(-int(tm.count[rank].sum()) * rb // x.numel() // 2))[
        : int(tm.count[rank].sum()) * rb].view(-1, rb)
    send_counts, recv_counts = tm.count[rank].tolist(), tm.count[:, rank].tolist()

    def bare():
        out = torch.empty(sum(recv_counts), rb, dtype=torch.uint8)
        dist.all_to_all_single(out, send, recv_counts, send_counts)

    bare()
    results["bare all_to_all_single (flat rows)"] = profile_op(bare, args.reps)
    del send
    for algo in args.algorithms.split(","):
        buf = epcomm.Buffer(None, num_nvl_ranks=args.nvl_ranks, algorithm=algo, timeout_s=900)
        lay = buf.get_dispatch_layout(topk_idx, args.experts)
        kw = dict(num_tokens_per_rank=lay[0], num_tokens_per_rdma_rank=lay[1], is_token_in_rank=lay[3],
                  num_tokens_per_expert=lay[2], topk_idx=topk_idx, topk_weights=weights)
        out = buf.dispatch(x, **kw)
        handle, y = out[4], out[0]
        del out
        results[f"{algo} dispatch"] = profile_op(lambda: buf.dispatch(x, **kw), args.reps)
        results[f"{algo} cached dispatch"] = profile_op(lambda: buf.dispatch(x, handle=handle), args.reps)
        results[f"{algo} combine"] = profile_op(lambda: buf.combine(y, handle), args.reps)
        del buf, handle, y, lay, kw
        gc.collect()

    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        for name in results:
            walls = [g[name][0] for g in gathered]
            print(f"\n== {name}: wall median {sum(walls) / world * 1e3:.0f} ms (mean over ranks), "
                  f"slowest rank {max(walls) * 1e3:.0f} ms")
            funcs: dict[str, list[float]] = {}
            for g in gathered:
                for f, (tt, ct) in g[name][1].items():
                    funcs.setdefault(f, [0.0, 0.0])
                    funcs[f][0] += tt / world
                    funcs[f][1] += ct / world
            total = sum(v[0] for v in funcs.values())
            print(f"   {'own ms':>8} {'share':>6}  function (mean over ranks, per call)")
            for f, (tt, ct) in sorted(funcs.items(), key=lambda kv: -kv[1][0])[: args.top]:
                print(f"   {tt * 1e3:8.1f} {100 * tt / total:5.1f}%  {f}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
