"""ExpertParallel with an epcomm.eplb.Placement, and moving experts live (ExpertParallel.move_experts).

The multi-rank tests run a chain of placement changes on the torch and sim backends, one node of
4 ranks and 2 nodes x 2: after each move the moved parameters and optimizer state, and the next
step's output, must be bit-identical to a layer built with that placement from the start. A
placement (or tensor layout) that differs on one rank must raise on every rank, before anything moves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epcomm.eplb import Placement
from epcomm.moe import plan_expert_moves

NUM_EXPERTS, HIDDEN, FFN, TOPK = 8, 16, 8, 2


# ------------------------------------------------------------------ placements
def from_phy2log(phy2log: list[int], num_gpus: int, num_logical: int = NUM_EXPERTS) -> Placement:
    """A single-layer Placement from its slot -> logical table."""
    p2l = torch.tensor(phy2log, dtype=torch.int64)
    cnt = torch.bincount(p2l, minlength=num_logical)
    l2p = torch.full((num_logical, int(cnt.max())), -1, dtype=torch.int64)
    for e in range(num_logical):
        slots = (p2l == e).nonzero().flatten()
        l2p[e, : slots.numel()] = slots
    return Placement(p2l, l2p, cnt, num_gpus)


def skewed_loads(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, NUM_EXPERTS, generator=g) ** 4) * 1000 + 1


def placement_chain(world: int, nvl: int) -> list[Placement]:
    """Contiguous -> rebalanced (3 slots/GPU) -> rebalanced other loads (4 slots/GPU) -> expert 0 on every
    GPU, twice on GPU 0 (one received row fills two slots) -> contiguous."""
    nodes = world // nvl
    hot = [0] * world + list(range(NUM_EXPERTS))  # expert 0 everywhere: world + 1 replicas
    order = sorted(range(len(hot)), key=lambda i: (i % world, i))  # deal so each GPU gets one copy of 0
    fan_out = from_phy2log([hot[i] for i in order], world)
    return [
        Placement.contiguous(NUM_EXPERTS, world),
        Placement.rebalance(skewed_loads(1), 3 * world, 1, nodes, world).layer(0),
        Placement.rebalance(skewed_loads(2), 4 * world, 1, nodes, world).layer(0),
        fan_out,
        Placement.contiguous(NUM_EXPERTS, world),
    ]


# ------------------------------------------------------------------ model pieces
def logical_weights() -> dict[str, torch.Tensor]:
    """Every logical expert's tensors, including dtypes dispatch cannot carry as numbers."""
    g = torch.Generator().manual_seed(1234)
    return {
        "w1": torch.randn(NUM_EXPERTS, HIDDEN, FFN, generator=g),
        "w2": torch.randn(NUM_EXPERTS, FFN, HIDDEN, generator=g).to(torch.bfloat16),
        "scale": torch.randn(NUM_EXPERTS, generator=g).to(torch.float16),  # one element per slot
        "hits": torch.randint(0, 1 << 40, (NUM_EXPERTS, 3), generator=g),  # int64
        "mask": torch.rand(NUM_EXPERTS, 5, generator=g) > 0.5,  # bool, 5 bytes: rows need padding
    }


def logical_state(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, object]]:
    """Adam-like state: per-slot moments of w1 (w1's shape) and a per-parameter scalar step."""
    return {"w1": {"exp_avg": weights["w1"] * 0.5 - 1, "exp_avg_sq": weights["w1"].square(),
                   "step": torch.tensor(7.0)}}


def slots_of(full: dict[str, torch.Tensor], placement: Placement, rank: int) -> dict[str, torch.Tensor]:
    """This rank's slots of a placement, built from the logical tensors (a layer "built from the start")."""
    logical = placement.phy2log[placement.slots_of_gpu(rank).start:placement.slots_of_gpu(rank).stop]
    return {name: t.index_select(0, logical).clone() for name, t in full.items()}


def state_of(state: dict[str, dict[str, object]], placement: Placement, rank: int) -> dict[str, dict[str, object]]:
    out = {}
    for name, entries in state.items():
        tensors = {k: v for k, v in entries.items() if isinstance(v, torch.Tensor) and v.dim() == 3}
        out[name] = {**entries, **slots_of(tensors, placement, rank)}
    return out


def physical_routing(placement: Placement, rank: int, nvl: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, physical top-k (distinct slots on one node per token, some -1) and gate weights."""
    g = torch.Generator().manual_seed(100 * step + rank)
    tokens = 5 + 3 * rank
    spg = placement.slots_per_gpu
    node_slots = nvl * spg
    node = torch.randint(0, placement.num_gpus // nvl, (tokens,), generator=g)
    pick = torch.rand(tokens, node_slots, generator=g).argsort(dim=1)[:, :TOPK]
    idx = node[:, None] * node_slots + pick
    idx[torch.rand(tokens, TOPK, generator=g) < 0.2] = -1
    x = torch.randn(tokens, HIDDEN, generator=g)
    weights = torch.rand(tokens, TOPK, generator=g)
    return x, idx, weights


def expert_fn(x: torch.Tensor, p: dict[str, torch.Tensor], e: int) -> torch.Tensor:
    return (F.silu(x @ p["w1"][e]) @ p["w2"][e].float()) * p["scale"][e].float()


def layer_step(comm, params: dict[str, torch.Tensor], x, idx, weights) -> torch.Tensor:
    """One routed forward through dispatch / per-slot experts / combine."""
    from epcomm.moe import group_by_expert, ungroup_from_experts

    got = comm.dispatch(x, idx, weights)
    groups = group_by_expert(got.recv_x, got.recv_topk_idx, got.recv_topk_weights,
                             got.num_recv_tokens_per_expert.tolist(), comm.expert_alignment)
    parts = [expert_fn(chunk, params, e) for e, chunk in enumerate(torch.split(groups.x, groups.counts))]
    out = torch.cat(parts) if parts else groups.x.new_zeros(0, HIDDEN)
    return comm.combine(ungroup_from_experts(out, groups, got.recv_x.size(0)), got, x.size(0))


def dense_step(full: dict[str, torch.Tensor], placement: Placement, x, idx, weights) -> torch.Tensor:
    """The same step with the logical experts in one process (slot ids mapped back to logical)."""
    out = torch.zeros_like(x)
    logical = torch.where(idx >= 0, placement.phy2log[idx.clamp_min(0)], -1)
    for t in range(x.size(0)):
        for k in range(idx.size(1)):
            if logical[t, k] >= 0:
                out[t] += weights[t, k] * expert_fn(x[t:t + 1], full, int(logical[t, k]))[0]
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ------------------------------------------------------------------ rank functions
def move_chain(rank, world, backend, nvl, max_nodes, max_row_bytes=None):
    import epcomm
    from epcomm.moe import ExpertParallel

    buffer = epcomm.Buffer(None, backend=backend, num_nvl_ranks=nvl, max_nodes_per_token=max_nodes, timeout_s=60)
    chain = placement_chain(world, nvl)
    full = logical_weights()
    full_state = logical_state(full)
    comm = ExpertParallel(buffer, NUM_EXPERTS, placement=chain[0])
    params, state = slots_of(full, chain[0], rank), state_of(full_state, chain[0], rank)
    moved_rows = []
    for step, new in enumerate(chain[1:], start=1):
        moved = comm.move_experts(new, params, state, max_row_bytes=max_row_bytes)
        assert comm.expert_placement is new and comm.num_slots == new.num_physical
        assert comm.num_local_experts == new.slots_per_gpu
        want, want_state = slots_of(full, new, rank), state_of(full_state, new, rank)
        assert sorted(moved.params) == sorted(want)
        for name in want:
            assert same_bits(moved.params[name], want[name]), (step, name)
        for key in ("exp_avg", "exp_avg_sq"):
            assert same_bits(moved.optimizer_state["w1"][key], want_state["w1"][key]), (step, key)
        assert moved.optimizer_state["w1"]["step"] is state["w1"]["step"]  # per-parameter: kept as is
        # the next step: this layer vs one built with the new placement from the start
        fresh = ExpertParallel(buffer, NUM_EXPERTS, placement=new)
        x, idx, weights = physical_routing(new, rank, nvl, step)
        got = layer_step(comm, moved.params, x, idx, weights)
        ref = layer_step(fresh, want, x, idx, weights)
        assert same_bits(got, ref), step
        torch.testing.assert_close(got, dense_step(full, new, x, idx, weights), rtol=1e-5, atol=1e-5)
        params, state = moved.params, moved.optimizer_state
        moved_rows.append(new.num_physical)
    return moved_rows


def disagreeing_move(rank, world, backend, nvl, bad_rank, what):
    import epcomm
    from epcomm.moe import ExpertParallel

    buffer = epcomm.Buffer(None, backend=backend, num_nvl_ranks=nvl, timeout_s=60)
    chain = placement_chain(world, nvl)
    full = logical_weights()
    comm = ExpertParallel(buffer, NUM_EXPERTS)  # no placement: contiguous, equal to chain[0]
    params = slots_of(full, chain[0], rank)
    new = chain[1]
    if rank == bad_rank:
        if what == "placement":
            new = chain[2]
        elif what == "shape":
            params = {**params, "w1": params["w1"][:, :, :-1]}
        elif what == "slots":
            params = {**params, "w1": params["w1"][:1]}
        elif what == "layered":
            new = Placement.rebalance(skewed_loads(1), 3 * world, 1, world // nvl, world)
    try:
        comm.move_experts(new, params)
    except epcomm.EpcommInputError as err:
        raised = err
    else:
        raised = None
    # nothing moved and the layer still routes with the old placement; a good move still works after
    assert torch.equal(comm.expert_placement.phy2log, chain[0].phy2log) and comm.num_slots == NUM_EXPERTS
    moved = comm.move_experts(chain[1], slots_of(full, chain[0], rank))
    assert all(same_bits(moved.params[n], t) for n, t in slots_of(full, chain[1], rank).items())
    return None if raised is None else (type(raised).__name__, sorted(raised.problems), str(raised))


def disagreeing_construction(rank, world, bad_rank):
    import epcomm
    from epcomm.moe import ExpertParallel

    buffer = epcomm.Buffer(None, backend="torch", num_nvl_ranks=2, timeout_s=60)
    chain = placement_chain(world, 2)
    try:
        ExpertParallel(buffer, NUM_EXPERTS, placement=chain[2] if rank == bad_rank else chain[1])
    except epcomm.EpcommInputError as err:
        return sorted(err.problems)
    return None


def torch_optimizer_after_move(rank, world):
    """The intended use with torch.optim: install the moved tensors, then keep training."""
    import epcomm
    from epcomm.moe import ExpertParallel

    buffer = epcomm.Buffer(None, backend="torch", num_nvl_ranks=2, timeout_s=60)
    chain = placement_chain(world, 2)
    full = logical_weights()
    comm = ExpertParallel(buffer, NUM_EXPERTS, placement=chain[0])
    w1 = torch.nn.Parameter(slots_of(full, chain[0], rank)["w1"])
    opt = torch.optim.Adam([w1], lr=0.1)
    w1.square().sum().backward()
    opt.step()
    moved = comm.move_experts(chain[1], {"w1": w1}, {"w1": opt.state[w1]})
    # the slot count changed (2 -> 3): a new Parameter (autograd caches a leaf's shape), with the moved state
    new_w1 = torch.nn.Parameter(moved.params["w1"])
    opt.param_groups[0]["params"] = [new_w1]
    opt.state.pop(w1)
    opt.state[new_w1] = moved.optimizer_state["w1"]
    new_w1.square().sum().backward()
    opt.step()  # Adam accepts the moved moments (the parameter's shape) and the kept scalar step
    return tuple(new_w1.shape), float(opt.state[new_w1]["step"])


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("backend", ["torch", "sim"])
@pytest.mark.parametrize("nvl", [4, 2], ids=["1x4", "2x2"])
def test_move_experts_is_bit_identical_to_a_fresh_layer(pools, backend, nvl):
    rows = pools(4).run(move_chain, backend, nvl, 4)
    assert rows == [[12, 16, 12, 8]] * 4


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_move_experts_across_four_nodes(pools, backend):
    """4 nodes x 2 (the two-hop path; one expert per GPU before, up to 4 slots per GPU after)."""
    rows = pools(8).run(move_chain, backend, 2, 4)
    assert all(r == rows[0] for r in rows) and all(n > 0 for n in rows[0]), rows


def test_move_experts_splits_tokens_over_the_node_cap(pools):
    """2 nodes x 2 with max one node per token: a slot going to both nodes travels as two tokens."""
    pools(4).run(move_chain, "torch", 2, 1)


@pytest.mark.parametrize("backend", ["torch", "sim"])
def test_move_experts_in_pieces(pools, backend):
    """max_row_bytes=100: each slot (1.8 KB with its optimizer state) travels as 19 consecutive tokens."""
    pools(4).run(move_chain, backend, 2, 4, 100)


@pytest.mark.parametrize("backend,what", [("torch", "placement"), ("torch", "shape"), ("torch", "slots"),
                                          ("torch", "layered"), ("sim", "placement")])
def test_bad_input_on_one_rank_raises_on_every_rank(pools, backend, what):
    results = pools(4).run(disagreeing_move, backend, 2, 2, what)
    assert all(r is not None for r in results), results
    assert all(r[0] == "EpcommInputError" and r[1] == [2] for r in results), results
    assert len({r[2] for r in results}) == 1  # the same message everywhere
    assert "rank 2" in results[0][2]


def test_construction_with_disagreeing_placement_raises_on_every_rank(pools):
    assert pools(4).run(disagreeing_construction, 1) == [[1]] * 4


def test_torch_optimizer_state_moves_with_the_parameter(pools):
    results = pools(4).run(torch_optimizer_after_move)
    assert results == [((3, HIDDEN, FFN), 2.0)] * 4


# ------------------------------------------------------------------ the plan, no ranks
@pytest.mark.parametrize("nvl", [1, 2, 4])
def test_plan_copies_the_same_expert_preferring_rank_then_node(nvl):
    world = 4
    chain = placement_chain(world, nvl)
    for old, new in zip(chain, chain[1:]):
        source = plan_expert_moves(old, new, nvl)
        assert torch.equal(old.phy2log[source], new.phy2log)  # every slot copies its own expert
        for q, p in enumerate(source.tolist()):
            gpu, old_gpu = q // new.slots_per_gpu, p // old.slots_per_gpu
            e = int(new.phy2log[q])
            on_gpu = [s for s in old.replicas_of(e) if s // old.slots_per_gpu == gpu]
            on_node = [s for s in old.replicas_of(e) if s // old.slots_per_gpu // nvl == gpu // nvl]
            if on_gpu:
                assert old_gpu == gpu
            elif on_node:
                assert old_gpu // nvl == gpu // nvl


def test_plan_spreads_sending_over_replicas():
    """Two replicas of expert 0 (GPUs 0, 1), four new slots on GPUs 2, 3: each replica sends two."""
    old = from_phy2log([0, 1, 2, 0, 3, 4, 5, 6, 7, 1, 2, 3], 4, 8)
    new = from_phy2log([1, 2, 3, 4, 5, 6, 7, 1, 0, 0, 2, 3, 0, 0, 4, 5], 4, 8)
    source = plan_expert_moves(old, new, 1)
    assert sorted(source[new.phy2log == 0].tolist()) == [0, 0, 3, 3]
    assert torch.equal(old.phy2log[source], new.phy2log)


@pytest.mark.parametrize("max_nodes,want", [(2, [[3, 6, 9]]), (1, [[3], [6, 9]])])
def test_tokens_respect_the_node_cap(max_nodes, want):
    """Contiguous -> expert 0 on every GPU (2 nodes x 2): old slot 0 feeds slots on both nodes."""
    from epcomm.moe import _move_tokens

    chain = placement_chain(4, 2)
    old, new = chain[0], chain[3]
    source = plan_expert_moves(old, new, 2)
    src, dst, num_topk = _move_tokens(old, new, source, 0, 2, max_nodes)
    assert [d for s, d in zip(src, dst) if s == 0] == want
    assert num_topk == max(len(d) for d in want)
