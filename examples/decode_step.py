"""Decode steps of an MoE layer with epcomm's low-latency mode, checked against a dense model.

    mpiexec -n 8 python examples/decode_step.py                 # 8 ranks, 4 nodes x 2
    torchrun --nproc-per-node 8 examples/decode_step.py

Each step every rank holds a small batch of tokens (a different count per rank and step, up to
``--max-tokens``), routes them top-k over the experts, and runs the layer as an inference engine
does with DeepEP's LL mode:

* two micro-batches per step (two-batch overlap): dispatch of batch B is issued with
  ``return_recv_hook=True`` while batch A's experts compute, then B's hook receives;
* FP8 dispatch (the cast happens in the communication), experts read the valid rows of each local
  expert (``recv_count``) from the fixed-shape ``[E_loc, R * M, H]`` buffers;
* combine applies the routing weights; the expert outputs are written straight into the zero-copy
  combine buffer for batch A.

Every rank also computes the whole layer densely from every rank's tokens (the same FP8 rounding of
the inputs) and compares; rank 0 prints the per-step time and PASS/FAIL (exit code 0/1; 2 if the
backend is unavailable).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import epcomm
from epcomm.fp8 import per_token_cast_back, per_token_cast_to_fp8
from epcomm.launch import init_distributed


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--nvl-ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16, help="num_max_dispatch_tokens_per_rank (per micro-batch)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts-per-rank", type=int, default=2)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Experts:
    """Every expert's SwiGLU weights (all ranks build all of them from the seed: the dense check needs them)."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(num_experts, hidden, ffn, generator=g) / hidden**0.5
        self.w3 = torch.randn(num_experts, hidden, ffn, generator=g) / hidden**0.5
        self.w2 = torch.randn(num_experts, ffn, hidden, generator=g) / ffn**0.5

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w1[e]) * (x @ self.w3[e])) @ self.w2[e]


def batch(args, rank: int, step: int, micro: int, num_experts: int):
    """x bf16 [N, H], topk_idx [N, K], weights [N, K] of one rank's micro-batch (any rank can make any)."""
    g = torch.Generator().manual_seed(args.seed * 100003 + step * 1009 + micro * 101 + rank)
    n = int(torch.randint(0, args.max_tokens + 1, (1,), generator=g))
    x = torch.randn(n, args.hidden, generator=g).bfloat16()
    scores = torch.rand(n, num_experts, generator=g)
    weights, topk = scores.topk(args.topk, dim=1)
    return x, topk, (weights / weights.sum(1, keepdim=True)).float()


def run_local_experts(experts: Experts, rank: int, recv_x, recv_count, out: torch.Tensor) -> None:
    """out[j, :count] = expert (rank * E_loc + j) applied to the valid dequantized rows of local expert j."""
    data, scales = recv_x
    for j in range(out.size(0)):
        c = int(recv_count[j])
        rows = per_token_cast_back(data[j, :c], scales[j, :c].contiguous(), dtype=torch.float32)
        out[j, :c] = experts(rank * out.size(0) + j, rows).bfloat16()


def dense(args, experts: Experts, world: int, step: int, micro: int, rank: int, num_experts: int) -> torch.Tensor:
    x, topk, weights = batch(args, rank, step, micro, num_experts)
    q, s = per_token_cast_to_fp8(x)
    rows = per_token_cast_back(q, s, dtype=torch.float32)
    out = torch.zeros(x.size(0), args.hidden)
    for n in range(x.size(0)):
        for k in range(args.topk):
            e = int(topk[n, k])
            out[n] += weights[n, k] * experts(e, rows[n : n + 1])[0].bfloat16().float()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rank, world = init_distributed()
    num_experts = world * args.experts_per_rank
    try:
        buf = epcomm.Buffer(dist.group.WORLD, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(
            args.max_tokens, args.hidden, world, num_experts), True, backend=args.backend, num_nvl_ranks=args.nvl_ranks)
    except epcomm.EpcommBackendUnavailable as err:
        print(f"rank {rank}: {err}", file=sys.stderr)
        return 2
    experts = Experts(num_experts, args.hidden, args.ffn, args.seed)
    worst = 0.0
    times = []
    for step in range(args.steps):
        a = batch(args, rank, step, 0, num_experts)
        b = batch(args, rank, step, 1, num_experts)
        dist.barrier()
        start = time.perf_counter()
        # micro-batch A: dispatch and receive
        recv_a, count_a, handle_a, _, _ = buf.low_latency_dispatch(a[0], a[1], args.max_tokens, num_experts)
        # micro-batch B: send only; its receive happens after A's experts ran (two-batch overlap)
        recv_b, count_b, handle_b, _, hook_b = buf.low_latency_dispatch(
            b[0], b[1], args.max_tokens, num_experts, return_recv_hook=True)
        out_a = buf.get_next_low_latency_combine_buffer(handle_a)  # zero copy: experts write the send buffer
        run_local_experts(experts, rank, recv_a, count_a, out_a)
        hook_b()
        combined_a, _, hook_a = buf.low_latency_combine(out_a, a[1], a[2], handle_a, zero_copy=True,
                                                        return_recv_hook=True)
        out_b = torch.empty_like(out_a)
        run_local_experts(experts, rank, recv_b, count_b, out_b)
        hook_a()
        combined_b, _, _ = buf.low_latency_combine(out_b, b[1], b[2], handle_b)
        times.append(time.perf_counter() - start)
        for micro, got in ((0, combined_a), (1, combined_b)):
            want = dense(args, experts, world, step, micro, rank, num_experts)
            if got.numel():
                worst = max(worst, float(((got.float() - want).abs() / (want.abs() + 1)).max()))
    worst_all = torch.tensor([worst])
    dist.all_reduce(worst_all, op=dist.ReduceOp.MAX)
    ok = float(worst_all) < 2e-2  # bf16 expert outputs and one bf16 rounding of the sum
    if rank == 0:
        steps_ms = ", ".join(f"{t * 1e3:.1f}" for t in times)
        print(f"decode steps on {world} ranks ({args.backend}, {num_experts} experts, top-{args.topk}, hidden "
              f"{args.hidden}, up to {args.max_tokens} tokens per micro-batch): ms per step [{steps_ms}]")
        print(f"largest relative difference to the dense model: {float(worst_all):.2e} -> {'PASS' if ok else 'FAIL'}")
    buf.destroy() if hasattr(buf, "destroy") else None
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
