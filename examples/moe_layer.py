"""A DeepSeek-V3-style MoE block trained across ranks, checked against a dense model.

    mpiexec -n 8 python examples/moe_layer.py                  # 4 nodes x 2 ranks
    torchrun --nproc-per-node 8 examples/moe_layer.py

The block: a router with V3's node-limited gate (sigmoid affinities, at most
``--max-nodes`` nodes per token, aux-loss-free balancing bias updated with
``update_bias`` from the load summed over ranks), one shared SwiGLU expert
replicated on every rank, and ``--experts`` routed SwiGLU experts spread
evenly over the ranks. Tokens travel with ``epcomm.moe.ExpertParallel``
(differentiable dispatch/combine), are grouped per local expert with
``expert_alignment`` padding and run as grouped matmuls.

Every step each rank also rebuilds the whole layer in one process (the initial
weights from the seed, later ones from the ranks' current weights) and runs it
densely on all ranks' tokens; outputs, loss and gradients must agree within
fp32 tolerance. Rank 0 prints the loss, the expert-load balance and a verdict;
the exit code is 0 on PASS, 1 on FAIL, 2 if the backend is unavailable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import epcomm
from epcomm.launch import init_distributed
from epcomm.moe import ExpertParallel, LoadStats, expert_load, group_by_expert, grouped_linear, ungroup_from_experts
from epcomm.routing import node_limited_gate, update_bias


@dataclass
class Settings:
    tokens: int = 64  # per rank
    hidden: int = 64
    ffn: int = 32  # routed expert intermediate size
    shared_ffn: int = 64
    experts: int = 32
    topk: int = 4
    max_nodes: int = 4
    group_top: int = 2
    scaling: float = 2.5  # routed_scaling_factor
    nvl_ranks: int = 2
    alignment: int = 4
    steps: int = 6
    lr: float = 0.5
    bias_rate: float = 0.02
    skew: float = 1.0  # router logit skew that makes some experts hot at the start
    algorithm: str = "auto"
    backend: str = "torch"
    seed: int = 0
    rtol: float = 2e-5


PARAM_SHAPES = {  # name -> shape in the full (dense) model
    "router": lambda s: (s.hidden, s.experts),
    "shared_w1": lambda s: (s.hidden, s.shared_ffn),
    "shared_w3": lambda s: (s.hidden, s.shared_ffn),
    "shared_w2": lambda s: (s.shared_ffn, s.hidden),
    "w1": lambda s: (s.experts, s.hidden, s.ffn),
    "w3": lambda s: (s.experts, s.hidden, s.ffn),
    "w2": lambda s: (s.experts, s.ffn, s.hidden),
}
ROUTED = ("w1", "w3", "w2")  # sharded over ranks by expert; the rest is replicated


def full_params(s: Settings) -> dict[str, Tensor]:
    """The whole layer's fp32 weights, identical on every rank (from the seed)."""
    g = torch.Generator().manual_seed(s.seed)
    return {name: torch.randn(*shape(s), generator=g) / shape(s)[-2] ** 0.5 for name, shape in PARAM_SHAPES.items()}


def router_skew(s: Settings) -> Tensor:
    """A fixed logit offset: experts of node 0 start hot, so the bias has something to balance."""
    skew = torch.zeros(s.experts)
    skew[: s.experts // 4] = s.skew
    return skew


def batch(s: Settings, step: int, rank: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[tokens, hidden]`` and regression targets of one rank at one step."""
    g = torch.Generator().manual_seed(1_000_003 * (s.seed + 1) + 7919 * step + rank)
    return torch.randn(s.tokens, s.hidden, generator=g), torch.randn(s.tokens, s.hidden, generator=g)


def swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def gate(s: Settings, x: Tensor, router: Tensor, bias: Tensor, num_nodes: int):
    scores = x @ router + router_skew(s)
    return node_limited_gate(scores, bias, top_k=s.topk, num_nodes=num_nodes, max_nodes=s.max_nodes,
                             group_top=s.group_top, routed_scaling_factor=s.scaling)


class MoEBlock(torch.nn.Module):
    """The expert-parallel layer: the code a user writes with epcomm."""

    def __init__(self, s: Settings, comm: ExpertParallel, full: dict[str, Tensor]) -> None:
        super().__init__()
        self.s, self.comm = s, comm
        mine = slice(comm.local_experts.start, comm.local_experts.stop)
        self.weights = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(w[mine].clone() if name in ROUTED else w.clone()) for name, w in full.items()}
        )
        self.register_buffer("bias", torch.zeros(s.experts))
        self.num_nodes = comm.buffer.num_nodes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``[tokens, hidden]`` -> output ``[tokens, hidden]`` and ``topk_idx`` ``[tokens, topk]``."""
        w = self.weights
        routing = gate(self.s, x, w["router"], self.bias, self.num_nodes)
        got = self.comm.dispatch(x, routing.topk_idx, routing.topk_weights)
        groups = group_by_expert(got.recv_x, got.recv_topk_idx, got.recv_topk_weights,
                                 got.num_recv_tokens_per_expert.tolist(), self.comm.expert_alignment)
        h = F.silu(grouped_linear(groups.x, w["w1"], groups.counts)) * grouped_linear(groups.x, w["w3"], groups.counts)
        expert_out = grouped_linear(h, w["w2"], groups.counts)
        routed = self.comm.combine(ungroup_from_experts(expert_out, groups, got.recv_x.size(0)), got, x.size(0))
        shared = swiglu(x, w["shared_w1"], w["shared_w3"], w["shared_w2"])
        return shared + routed, routing.topk_idx


def dense_forward(s: Settings, params: dict[str, Tensor], bias: Tensor, xs: list[Tensor], num_nodes: int):
    """The same layer in one process: per-token loops over the chosen experts, no communication."""
    outs, idxs = [], []
    for x in xs:  # gate per rank's batch: the same matmul shapes as the ranks, so the same routing bits
        routing = gate(s, x, params["router"], bias, num_nodes)
        routed = torch.zeros_like(x)
        for e in range(s.experts):
            token, slot = (routing.topk_idx == e).nonzero(as_tuple=True)
            y = swiglu(x[token], params["w1"][e], params["w3"][e], params["w2"][e])
            routed = routed.index_add(0, token, y * routing.topk_weights[token, slot, None])
        outs.append(swiglu(x, params["shared_w1"], params["shared_w3"], params["shared_w2"]) + routed)
        idxs.append(routing.topk_idx)
    return outs, idxs


def gather_params(block: MoEBlock, world: int) -> dict[str, Tensor]:
    """The full model's current weights: routed experts all-gathered, the rest replicated."""
    full = {}
    for name, p in block.weights.items():
        if name in ROUTED:
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach().contiguous())
            full[name] = torch.cat(parts)
        else:
            full[name] = p.detach().clone()
    return full


def rel_err(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0


@dataclass
class StepLog:
    loss: float
    dense_loss: float
    balance: LoadStats
    max_rel_err: float


def run(rank: int, world: int, s: Settings) -> list[StepLog]:
    """Train ``s.steps`` steps on an initialised process group, checking each against the dense model."""
    buffer = epcomm.Buffer(None, backend=s.backend, num_nvl_ranks=s.nvl_ranks, max_nodes_per_token=s.max_nodes,
                           algorithm=s.algorithm)
    comm = ExpertParallel(buffer, s.experts, expert_alignment=s.alignment)
    seed_params = full_params(s)
    block = MoEBlock(s, comm, seed_params)
    num_tokens = world * s.tokens
    logs = []
    for step in range(s.steps):
        reference = seed_params if step == 0 else gather_params(block, world)
        x, target = batch(s, step, rank)
        block.zero_grad()
        y, topk_idx = block(x)
        loss = (y - target).square().sum() / (num_tokens * s.hidden)  # this rank's share of the global mean
        loss.backward()
        for name, p in block.weights.items():
            if name not in ROUTED:
                dist.all_reduce(p.grad)  # replicated weights: sum the ranks' shares (data parallel)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        load = expert_load(topk_idx, s.experts)

        # dense reference on identical weights
        dense = {k: v.clone().requires_grad_() for k, v in reference.items()}
        pairs = [batch(s, step, r) for r in range(world)]
        outs, idxs = dense_forward(s, dense, block.bias, [p[0] for p in pairs], buffer.num_nodes)
        dense_loss = sum((o - t).square().sum() for o, (_, t) in zip(outs, pairs)) / (num_tokens * s.hidden)
        dense_loss.backward()
        mine = slice(comm.local_experts.start, comm.local_experts.stop)
        errors = [rel_err(y.detach(), outs[rank].detach()), rel_err(global_loss, dense_loss.detach())]
        for name, p in block.weights.items():
            want = dense[name].grad[mine] if name in ROUTED else dense[name].grad
            errors.append(rel_err(p.grad, want))
        dense_load = torch.bincount(torch.cat(idxs).flatten(), minlength=s.experts)
        if not torch.equal(dense_load, load.tokens_per_expert) or not torch.equal(idxs[rank], topk_idx):
            errors.append(float("inf"))  # routing differs from the dense model
        logs.append(StepLog(float(global_loss), float(dense_loss.detach()), load, max(errors)))

        with torch.no_grad():  # SGD, and V3's bias update from the load summed over ranks
            for p in block.weights.values():
                p -= s.lr * p.grad
            block.bias.copy_(update_bias(block.bias, load.tokens_per_expert, s.bias_rate))
    return logs


def parse(argv: list[str] | None = None) -> Settings:
    s = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(s).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value)
    return Settings(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    s = parse(argv)
    torch.set_num_threads(1)
    rank, world = init_distributed("gloo")
    try:
        logs = run(rank, world, s)
    except epcomm.EpcommBackendUnavailable as err:
        if rank == 0:
            print(f"moe_layer: {err}\nrerun with --backend torch (the backend this build ships)", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    worst = torch.tensor([max(log.max_rel_err for log in logs)], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ok = bool(worst.item() <= s.rtol)
    if rank == 0:
        print(f"epcomm MoE layer: {world} ranks = {world // s.nvl_ranks} nodes x {s.nvl_ranks}, "
              f"{s.experts} routed experts ({s.experts // world}/rank) + 1 shared, top-{s.topk}, "
              f"<= {s.max_nodes} nodes/token, {s.tokens} tokens/rank, hidden {s.hidden}, fp32")
        print(f"{'step':>4} {'loss':>10} {'dense loss':>11} {'expert max/mean':>16} {'rank max/mean':>14} {'max rel err':>12}")
        for i, log in enumerate(logs):
            print(f"{i:>4} {log.loss:>10.6f} {log.dense_loss:>11.6f} {log.balance.max_over_mean:>16.2f} "
                  f"{log.balance.rank_max_over_mean:>14.2f} {log.max_rel_err:>12.1e}")
        print("tokens per expert, first step:", logs[0].balance.tokens_per_expert.tolist())
        print("tokens per expert, last step: ", logs[-1].balance.tokens_per_expert.tolist())
        print(f"{'PASS' if ok else 'FAIL'}: outputs, loss and gradients match the dense model on every rank and step "
              f"(worst relative error {worst.item():.1e}, tolerance {s.rtol:.0e})")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
