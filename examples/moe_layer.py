"""A DeepSeek-V3-style MoE block trained across ranks, checked against a dense model.

    mpiexec -n 8 python examples/moe_layer.py                  # 4 nodes x 2 ranks
    torchrun --nproc-per-node 8 examples/moe_layer.py
    mpiexec -n 8 python examples/moe_layer.py --redundant-experts 8 --steps 8   # + live rebalancing

The block: a router with V3's node-limited gate (sigmoid affinities, at most
``--max-nodes`` nodes per token, aux-loss-free balancing bias updated with
``update_bias`` from the load summed over ranks), one shared SwiGLU expert
replicated on every rank, and ``--experts`` routed SwiGLU experts spread
evenly over the ranks. Tokens travel with ``epcomm.moe.ExpertParallel``
(differentiable dispatch/combine), are grouped per local expert with
``expert_alignment`` padding and run as grouped matmuls.

With ``--redundant-experts N`` the layer starts without replicas (expert ``e``
on rank ``e // (experts / ranks)``), counts the load of each logical expert with
an ``epcomm.eplb.LoadMonitor``, and at ``--rebalance-step`` (default: half way)
computes a placement with ``experts + N`` slots from the observed loads
(``Placement.rebalance``), moves the expert weights to it live
(``ExpertParallel.move_experts``: one dispatch) and routes every later step to
the replicas (``ExpertParallel.to_physical``). A replicated expert's slots get
the sum of the replicas' gradients, so they stay identical. Rank 0 then also
prints the per-rank load (pairs received, max over mean) and the layer's step
time (forward + backward + gradient sync, slowest rank, median) before and
after rebalancing.

Every step each rank also rebuilds the whole layer in one process (the initial
weights from the seed, later ones from the ranks' current weights) and runs it
densely on all ranks' tokens; outputs, loss and gradients must agree within
fp32 tolerance (with replicas: every replica of an expert must hold the same
weights). Rank 0 prints the loss, the expert-load balance and a verdict;
the exit code is 0 on PASS, 1 on FAIL, 2 if the backend is unavailable.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import epcomm
from epcomm.eplb import LoadMonitor, Placement, rank_loads
from epcomm.launch import parse_settings, run_example
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
    redundant_experts: int = 0  # extra expert slots in total, a multiple of the world size (0: no rebalancing)
    rebalance_step: int = -1  # the step that starts on the rebalanced placement (-1: steps // 2)


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
        mine = torch.tensor(comm.local_logical_experts)  # the logical expert of each local slot
        self.weights = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(w[mine] if name in ROUTED else w.clone()) for name, w in full.items()}
        )
        self.register_buffer("bias", torch.zeros(s.experts))
        self.num_nodes = comm.buffer.num_nodes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[tokens, hidden]`` -> output ``[tokens, hidden]``, the gate's logical ``topk_idx`` and
        the physical slots it was sent to (both ``[tokens, topk]`` int64)."""
        w = self.weights
        routing = gate(self.s, x, w["router"], self.bias, self.num_nodes)
        slots = self.comm.to_physical(routing.topk_idx)  # one replica per (token, expert); identity without
        got = self.comm.dispatch(x, slots, routing.topk_weights)
        groups = group_by_expert(got.recv_x, got.recv_topk_idx, got.recv_topk_weights,
                                 got.num_recv_tokens_per_expert.tolist(), self.comm.expert_alignment)
        h = F.silu(grouped_linear(groups.x, w["w1"], groups.counts)) * grouped_linear(groups.x, w["w3"], groups.counts)
        expert_out = grouped_linear(h, w["w2"], groups.counts)
        routed = self.comm.combine(ungroup_from_experts(expert_out, groups, got.recv_x.size(0)), got, x.size(0))
        shared = swiglu(x, w["shared_w1"], w["shared_w3"], w["shared_w2"])
        return shared + routed, routing.topk_idx, slots


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


def gather_params(block: MoEBlock, world: int) -> tuple[dict[str, Tensor], bool]:
    """The full model's current weights (routed experts all-gathered, the rest replicated), and whether
    every replica of each routed expert holds the same weights (the logical expert is its first replica)."""
    placement = block.comm.expert_placement
    full, same = {}, True
    for name, p in block.weights.items():
        if name in ROUTED:
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach().contiguous())
            slots = torch.cat(parts)  # [num_slots, ...]
            full[name] = slots[placement.log2phy[:, 0]]
            same = same and torch.equal(slots, full[name][placement.phy2log])
        else:
            full[name] = p.detach().clone()
    return full, same


def sync_replica_grads(block: MoEBlock) -> None:
    """Give every replica of a logical expert the sum of its replicas' gradients (they stay identical).

    A plain all_reduce of a ``[experts, ...]`` buffer keeps the example short; an engine would
    reduce only within each expert's replica set.
    """
    placement = block.comm.expert_placement
    if int(placement.logcnt.max()) == 1:
        return  # no replicas: each expert's gradient is already whole on its one rank
    mine = torch.tensor(block.comm.local_logical_experts)
    for name in ROUTED:
        p = block.weights[name]
        total = p.grad.new_zeros(placement.num_logical, *p.shape[1:]).index_add_(0, mine, p.grad)
        dist.all_reduce(total)
        p.grad = total[mine]


def rebalance(s: Settings, block: MoEBlock, monitor: LoadMonitor, world: int) -> tuple[Placement, Tensor]:
    """A placement with ``experts + redundant_experts`` slots from the loads seen so far, moved to live.

    Returns the placement and the loads it was computed from (logical, summed over ranks).
    """
    loads = monitor.summed()  # one all_reduce: the same loads, hence the same placement, on every rank
    nodes = block.num_nodes
    # With a real node limit the gate picks experts by node group, so the groups must stay whole on
    # nodes (hierarchical policy); without one (max_nodes >= nodes) replicas may go anywhere (global).
    groups = nodes if s.max_nodes < nodes else 1
    placement = Placement.rebalance(loads[None].double(), s.experts + s.redundant_experts, groups, nodes,
                                    world).layer(0)
    moved = block.comm.move_experts(placement, {name: block.weights[name].detach() for name in ROUTED})
    for name in ROUTED:
        # new Parameters, not `p.data = ...`: autograd caches a leaf's shape, and the slot count changed
        block.weights[name] = torch.nn.Parameter(moved.params[name])
    monitor.set_placement(placement)
    return placement, loads


def rel_err(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0


@dataclass
class StepLog:
    loss: float
    dense_loss: float
    balance: LoadStats
    max_rel_err: float
    rank_load: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # pairs per rank [world]
    step_s: float = 0.0  # the layer's forward + backward + gradient sync, slowest rank
    num_slots: int = 0  # physical expert slots the step ran with


def rebalance_step(s: Settings) -> int | None:
    """The first step on the rebalanced placement, or ``None`` without redundant experts."""
    if s.redundant_experts == 0:
        return None
    at = s.rebalance_step if s.rebalance_step >= 0 else s.steps // 2
    if not 0 < at < s.steps:
        raise ValueError(f"--rebalance-step must be in [1, steps={s.steps}) (loads are observed before it and "
                         f"the new placement runs from it), got {at}")
    return at


def run(rank: int, world: int, s: Settings) -> list[StepLog]:
    """Train ``s.steps`` steps on an initialised process group, checking each against the dense model."""
    if s.redundant_experts < 0 or s.redundant_experts % world:
        raise ValueError(f"--redundant-experts must be a multiple of the {world} ranks (each rank gets the same "
                         f"number of expert slots), got {s.redundant_experts}")
    switch = rebalance_step(s)
    buffer = epcomm.Buffer(None, backend=s.backend, num_nvl_ranks=s.nvl_ranks, max_nodes_per_token=s.max_nodes,
                           algorithm=s.algorithm)
    comm = ExpertParallel(buffer, s.experts, expert_alignment=s.alignment)
    seed_params = full_params(s)
    block = MoEBlock(s, comm, seed_params)
    monitor = LoadMonitor(s.experts, window=max(s.steps, 1))
    num_tokens = world * s.tokens
    logs = []
    for step in range(s.steps):
        if step == switch:
            rebalance(s, block, monitor, world)
        reference, replicas_agree = (seed_params, True) if step == 0 else gather_params(block, world)
        x, target = batch(s, step, rank)
        block.zero_grad()
        dist.barrier()  # time the layer alone: every rank starts together
        start = time.perf_counter()
        y, topk_idx, slots = block(x)
        loss = (y - target).square().sum() / (num_tokens * s.hidden)  # this rank's share of the global mean
        loss.backward()
        for name, p in block.weights.items():
            if name not in ROUTED:
                dist.all_reduce(p.grad)  # replicated weights: sum the ranks' shares (data parallel)
        sync_replica_grads(block)
        step_s = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        load = expert_load(topk_idx, s.experts)
        monitor.record(torch.bincount(topk_idx[topk_idx >= 0], minlength=s.experts))
        monitor.end_step()
        per_rank = rank_loads(slots, comm.expert_placement)  # pairs this rank sent to each rank
        dist.all_reduce(per_rank)

        # dense reference on identical weights
        dense = {k: v.clone().requires_grad_() for k, v in reference.items()}
        pairs = [batch(s, step, r) for r in range(world)]
        outs, idxs = dense_forward(s, dense, block.bias, [p[0] for p in pairs], buffer.num_nodes)
        dense_loss = sum((o - t).square().sum() for o, (_, t) in zip(outs, pairs)) / (num_tokens * s.hidden)
        dense_loss.backward()
        mine = torch.tensor(comm.local_logical_experts)
        errors = [rel_err(y.detach(), outs[rank].detach()), rel_err(global_loss, dense_loss.detach())]
        for name, p in block.weights.items():
            want = dense[name].grad[mine] if name in ROUTED else dense[name].grad
            errors.append(rel_err(p.grad, want))
        dense_load = torch.bincount(torch.cat(idxs).flatten(), minlength=s.experts)
        if not torch.equal(dense_load, load.tokens_per_expert) or not torch.equal(idxs[rank], topk_idx):
            errors.append(float("inf"))  # routing differs from the dense model
        if not replicas_agree or not torch.equal(comm.expert_placement.phy2log[slots.clamp_min(0)][slots >= 0],
                                                 topk_idx[topk_idx >= 0]):
            errors.append(float("inf"))  # replicas diverged, or a token went to a slot of another expert
        logs.append(StepLog(float(global_loss), float(dense_loss.detach()), load, max(errors), per_rank,
                            float(step_s), comm.num_slots))

        with torch.no_grad():  # SGD, and V3's bias update from the load summed over ranks
            for p in block.weights.values():
                p -= s.lr * p.grad
            block.bias.copy_(update_bias(block.bias, load.tokens_per_expert, s.bias_rate))
    return logs


@dataclass
class Phase:
    """One placement's steps: per-rank load (pairs received, summed over the steps) and step times."""

    name: str
    steps: range
    num_slots: int
    rank_max_over_mean: float
    step_ms: float  # median of the slowest rank's layer step over the phase's steps but its first


def phases(s: Settings, logs: list[StepLog]) -> list[Phase]:
    """Before and after rebalancing (one phase without redundant experts).

    A phase's first step is left out of its time when it has others: it pays one-off costs (the
    first dispatch of a shape, allocations after the move) that are not the placement's.
    """
    switch = rebalance_step(s)
    bounds = [range(0, len(logs))] if switch is None else [range(0, switch), range(switch, len(logs))]
    out = []
    for name, steps in zip(("before", "after"), bounds):
        load = torch.stack([logs[i].rank_load for i in steps]).sum(0).double()
        ratio = float(load.max() / load.mean()) if load.sum() > 0 else 1.0
        timed = steps[1:] if len(steps) > 1 else steps
        out.append(Phase(name, steps, logs[steps.start].num_slots, ratio,
                         1e3 * statistics.median(logs[i].step_s for i in timed)))
    return out


def parse(argv: list[str] | None = None) -> Settings:
    return parse_settings(Settings, argv, __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    s = parse(argv)
    started = run_example("moe_layer", lambda rank, world: run(rank, world, s))
    if started is None:
        return 2
    rank, world, logs = started
    worst = torch.tensor([max(log.max_rel_err for log in logs)], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    ok = bool(worst.item() <= s.rtol)
    if rank == 0:
        print(f"epcomm MoE layer: {world} ranks = {world // s.nvl_ranks} nodes x {s.nvl_ranks}, "
              f"{s.experts} routed experts ({s.experts // world}/rank) + 1 shared, top-{s.topk}, "
              f"<= {s.max_nodes} nodes/token, {s.tokens} tokens/rank, hidden {s.hidden}, fp32")
        print(f"{'step':>4} {'loss':>10} {'dense loss':>11} {'expert max/mean':>16} {'rank max/mean':>14} "
              f"{'slots':>6} {'step ms':>8} {'max rel err':>12}")
        for i, log in enumerate(logs):
            load = log.rank_load.double()
            rank_ratio = float(load.max() / load.mean()) if load.sum() > 0 else 1.0
            print(f"{i:>4} {log.loss:>10.6f} {log.dense_loss:>11.6f} {log.balance.max_over_mean:>16.2f} "
                  f"{rank_ratio:>14.2f} {log.num_slots:>6} {1e3 * log.step_s:>8.1f} {log.max_rel_err:>12.1e}")
        print("tokens per expert, first step:", logs[0].balance.tokens_per_expert.tolist())
        print("tokens per expert, last step: ", logs[-1].balance.tokens_per_expert.tolist())
        if s.redundant_experts:
            print(f"redundant experts: {s.experts} logical experts in {s.experts + s.redundant_experts} slots "
                  f"({(s.experts + s.redundant_experts) // world}/rank) from step {rebalance_step(s)}, placed by "
                  f"Placement.rebalance on the loads of the steps before, moved live by ExpertParallel.move_experts")
            print(f"{'phase':>6} {'steps':>6} {'slots':>6} {'rank load max/mean':>19} {'step ms (median, w/o 1st)':>26}")
            for ph in phases(s, logs):
                print(f"{ph.name:>6} {f'{ph.steps.start}-{ph.steps.stop - 1}':>6} {ph.num_slots:>6} "
                      f"{ph.rank_max_over_mean:>19.2f} {ph.step_ms:>26.1f}")
        print(f"{'PASS' if ok else 'FAIL'}: outputs, loss and gradients match the dense model on every rank and step "
              f"(worst relative error {worst.item():.1e}, tolerance {s.rtol:.0e})")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
