"""DeepSeek-V3-shaped dispatch + combine on emulated nodes, checked and timed.

    mpiexec -n 8 python examples/dispatch_combine_demo.py          # 4 nodes x 2 ranks
    torchrun --nproc-per-node 8 examples/dispatch_combine_demo.py

Every rank routes its tokens with the node-limited gate (top-8 of 256 experts,
at most 4 nodes per token), dispatches them, runs stand-in experts, combines,
and checks both results against epcomm.reference; then times the exchange
with the flat and the two-hop algorithm and prints a table on rank 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import epcomm
from epcomm.launch import init_distributed
from epcomm.reference import RankInput, reference_combine, reference_dispatch


def make_inputs(rank: int, world: int, args) -> RankInput:
    g = torch.Generator().manual_seed(1234 + rank)
    logits = torch.randn(args.tokens, args.experts, generator=g)
    gate = epcomm.routing.node_limited_gate(
        logits, None, top_k=args.topk, num_nodes=world // args.nvl_ranks, max_nodes=args.max_nodes
    )
    x = torch.randn(args.tokens, args.hidden, generator=g).to(torch.bfloat16)
    return RankInput(x, gate.topk_idx, gate.topk_weights)


def expert(rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Stand-in expert of rank ``rank``: a per-rank scale, so combine's sum order matters."""
    return (rows.float() * (rank + 1) / 8).to(torch.bfloat16)


def run(buf: epcomm.Buffer, inp: RankInput, experts: int):
    layout = buf.get_dispatch_layout(inp.topk_idx, experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        inp.x, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx, topk_weights=inp.topk_weights,
    )
    combined, _, _ = buf.combine(expert(recv_x, buf.rank), handle)
    return recv_x, recv_idx, counts, handle, combined


def verify(rank: int, world: int, args, inputs: list[RankInput], recv_x, recv_idx, combined) -> None:
    ref = reference_dispatch(inputs, args.experts, rank)
    assert torch.equal(recv_x, ref.recv_x), f"rank {rank}: recv_x differs from the reference"
    assert torch.equal(recv_idx, ref.recv_topk_idx), f"rank {rank}: recv_topk_idx differs from the reference"
    # Combine: the rows of *this* rank's tokens that each rank d sends back are expert_d(x[t]).
    placement = epcomm.ExpertPlacement.uniform(args.experts, world)
    sources, outputs = [], []
    for d in range(world):
        hosted = placement.local_experts(d)
        tokens = [t for t, row in enumerate(inputs[rank].topk_idx.tolist()) if any(e in hosted for e in row)]
        sources.append([(rank, t) for t in tokens])
        outputs.append(expert(inputs[rank].x[tokens], d))
    want = reference_combine(sources, outputs, args.tokens, rank, args.nvl_ranks)
    assert torch.equal(combined, want), f"rank {rank}: combined_x differs from the reference"


def time_ops(buf: epcomm.Buffer, inp: RankInput, experts: int, reps: int) -> dict[str, float]:
    layout = buf.get_dispatch_layout(inp.topk_idx, experts)
    kwargs = dict(num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1], is_token_in_rank=layout[3],
                  num_tokens_per_expert=layout[2], topk_idx=inp.topk_idx, topk_weights=inp.topk_weights)
    times: dict[str, list[float]] = {"dispatch": [], "combine": []}
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, **kwargs)
        mid = time.perf_counter()
        buf.combine(recv_x, handle)
        end = time.perf_counter()
        times["dispatch"].append(mid - start)
        times["combine"].append(end - mid)
    return {op: statistics.median(v) for op, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=4)
    parser.add_argument("--nvl-ranks", type=int, default=2, help="ranks per emulated node")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank, world = init_distributed()
    inputs = [make_inputs(r, world, args) for r in range(world)]
    mine = inputs[rank]

    rows = []
    for algorithm in ("two_hop", "flat"):
        buf = epcomm.Buffer(None, num_nvl_ranks=args.nvl_ranks, max_nodes_per_token=args.max_nodes, algorithm=algorithm)
        recv_x, recv_idx, _, _, combined = run(buf, mine, args.experts)
        verify(rank, world, args, inputs, recv_x, recv_idx, combined)
        buf.reset_traffic()
        med = time_ops(buf, mine, args.experts, args.reps)
        traffic = torch.tensor(
            [[buf.traffic.get(op, link).payload_bytes for link in ("network", "nvlink", "self")]
             for op in ("dispatch", "combine")],
            dtype=torch.float64,
        ) / args.reps
        dist.all_reduce(traffic)  # bytes summed over ranks, per repetition
        slowest = torch.tensor([med["dispatch"], med["combine"]], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        rows.append((algorithm, slowest.tolist(), traffic.tolist()))
        del buf

    ok = torch.tensor([1.0])
    dist.all_reduce(ok)  # every rank reached here: all verifications passed
    if rank == 0:
        nodes = world // args.nvl_ranks
        print(f"epcomm {epcomm.__version__} demo: {world} ranks = {nodes} nodes x {args.nvl_ranks}, backend torch (gloo, CPU)")
        print(f"{args.tokens} tokens/rank, hidden {args.hidden} bf16, top-{args.topk} of {args.experts} experts, "
              f"<= {args.max_nodes} nodes/token (node-limited gate)")
        print(f"verified against epcomm.reference on all {int(ok.item())} ranks: dispatch bit-exact, combine bit-exact")
        print()
        print(f"{'algorithm':<9} {'op':<9} {'median ms':>10} {'network MB':>11} {'nvlink MB':>10} {'local MB':>9}")
        for algorithm, (t_dispatch, t_combine), traffic in rows:
            for op, t, (network, nvlink, own) in (("dispatch", t_dispatch, traffic[0]),
                                                  ("combine", t_combine, traffic[1])):
                print(f"{algorithm:<9} {op:<9} {t * 1e3:>10.1f} {network / 1e6:>11.1f} {nvlink / 1e6:>10.1f} "
                      f"{own / 1e6:>9.1f}")
        two_hop, flat = rows[0][2][0][0], rows[1][2][0][0]
        print(f"\ntwo-hop dispatch sends {two_hop / flat:.2f}x the network bytes of flat "
              f"(one copy per destination node instead of per destination rank)")
        print("times: slowest rank, median of", args.reps, "repetitions; bytes: token payload summed over ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
