"""Helpers for writing an expert-parallel MoE layer on top of :mod:`epcomm.ops`.

* :class:`ExpertParallel`: one layer's communication (a Buffer, the expert
  placement, the alignment); differentiable and torch.compile-traceable
  ``dispatch`` / ``combine``; redundant experts through an
  :class:`epcomm.eplb.Placement`, and :meth:`ExpertParallel.move_experts` to
  change the placement live, moving expert weights and optimizer state with one
  dispatch (:func:`plan_expert_moves` says which replica feeds which new slot).
* :func:`group_by_expert` / :func:`ungroup_from_experts`: turn the received
  rows (one per token, with up to ``num_topk`` local experts each) into
  contiguous per-expert groups padded to ``expert_alignment`` for a grouped
  GEMM, and back: weighted by the gate, rows with several local experts summed.
  :func:`grouped_linear` is a plain per-expert loop to run on those groups.
* :func:`expert_load` and :class:`LoadStats`: tokens per expert summed over
  ranks (an ``all_reduce``), for :func:`epcomm.routing.update_bias` and logging.

The grouping helpers take the host-side counts (``num_recv_tokens_per_expert_list``),
as a grouped-GEMM launch does; they run eagerly. Under ``torch.compile`` either
let them break the graph there or compute experts without grouping.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .buffer import Buffer
from .eplb import Placement, check_placement_agrees, logical_to_physical
from .errors import EpcommInputError
from .placement import ExpertPlacement

__all__ = [
    "ExpertParallel",
    "MovedExperts",
    "plan_expert_moves",
    "ExpertGroups",
    "group_by_expert",
    "ungroup_from_experts",
    "grouped_linear",
    "expert_load",
    "LoadStats",
]


class ExpertParallel:
    """The communication of one MoE layer: dispatch to the experts' ranks and combine back.

    Experts live in *physical slots* spread evenly over the ranks, ``S =
    num_local_experts`` per rank: slot ``p`` is on rank ``p // S`` as local slot
    ``p % S`` (:attr:`placement`, :meth:`ExpertPlacement.uniform
    <epcomm.placement.ExpertPlacement.uniform>` over :attr:`num_slots` slots).
    Which *logical* expert each slot holds is :attr:`expert_placement`, an
    :class:`epcomm.eplb.Placement`: by default :meth:`Placement.contiguous
    <epcomm.eplb.Placement.contiguous>` (slot ``e`` holds expert ``e``, no
    replicas: expert ``e`` on rank ``e // (num_experts / world_size)``, epcomm's
    behaviour without a placement); with redundant experts
    (``placement.num_physical > num_experts``) a hot expert has several slots,
    each holding the same weights.

    :meth:`dispatch` takes *physical* slot ids (map the gate's logical ids first
    with :meth:`to_physical` or :func:`epcomm.eplb.logical_to_physical`); the
    received ``recv_topk_idx`` are local slot ids in ``[0, num_local_experts)``.
    :meth:`move_experts` changes the placement in place, moving the experts'
    weights (and optimizer state) to their new slots.

    Construction is collective (two small ``all_gather`` calls check that every rank's
    arguments fit and that every rank has the same placement: a rank routing with
    another placement would silently send tokens to slots holding other experts);
    construct it on every rank of the group, outside ``torch.compile``. Its dispatch
    and combine trace without graph breaks.

    Args:
        buffer: the :class:`~epcomm.Buffer` of the expert-parallel group.
        num_experts: logical routed experts in total; without ``placement``, divisible by
            the group size.
        expert_alignment: pad each local slot's row count to a multiple of this.
        placement: a single-layer :class:`epcomm.eplb.Placement` over ``num_experts`` logical
            experts and ``buffer.group_size`` GPUs (rank ``r`` is GPU ``r``); ``None``: contiguous.
    Raises:
        EpcommInputError: (a ``ValueError``) on every rank, if on any rank ``num_experts`` is not a
            positive multiple of the group size (no placement), ``expert_alignment < 1``, or
            ``placement`` does not fit (layered, other sizes), or if the ranks' placements differ.
    """

    def __init__(self, buffer: Buffer, num_experts: int, expert_alignment: int = 1,
                 placement: Placement | None = None) -> None:
        self.buffer = buffer
        self.rank = buffer.rank
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self._key = ops.buffer_key(buffer)
        problem = None
        if placement is None:
            try:
                ExpertPlacement.uniform(num_experts, buffer.group_size)  # epcomm's usual check and message
                placement = Placement.contiguous(num_experts, buffer.group_size)
            except (TypeError, ValueError) as err:
                problem = str(err)
        else:
            problem = _placement_problem(placement, num_experts, buffer.group_size)
        if problem is None and (isinstance(expert_alignment, bool) or not isinstance(expert_alignment, int)
                                or expert_alignment < 1):
            problem = f"expert_alignment must be an int >= 1, got {expert_alignment!r}"
        # a local error raised here would leave the other ranks waiting in the agreement below: agree it
        _agree(buffer, "ExpertParallel", problem, b"")
        check_placement_agrees(placement, buffer.group)
        self._set_placement(placement)

    def _set_placement(self, placement: Placement) -> None:
        self.expert_placement = placement
        self.num_slots = placement.num_physical
        self.placement = ExpertPlacement.uniform(self.num_slots, self.buffer.group_size)
        self.num_local_experts = self.placement.num_local_experts

    @property
    def local_experts(self) -> range:
        """Global physical slot ids on this rank (without replicas: the logical experts it hosts)."""
        return self.placement.local_experts(self.rank)

    @property
    def local_logical_experts(self) -> list[int]:
        """The logical expert held by each local slot, by local slot id."""
        return [int(e) for e in self.expert_placement.phy2log[self.local_experts.start:self.local_experts.stop]]

    def to_physical(self, topk_idx: Tensor, policy: str = "local", expert_counts: Tensor | None = None) -> Tensor:
        """Map the gate's logical expert ids ``[num_tokens, num_topk]`` int64 (``-1`` kept) to slot ids.

        :func:`epcomm.eplb.logical_to_physical` with this rank, the buffer's ranks per node and node
        cap, and :attr:`expert_placement` (``policy="dynamic"`` needs ``expert_counts`` from
        :func:`epcomm.eplb.gather_expert_counts`). Returns int64 ``[num_tokens, num_topk]`` slot ids.
        """
        return logical_to_physical(topk_idx, self.expert_placement, self.rank,
                                   num_nvl_ranks=self.buffer.topology.num_nvl_ranks, policy=policy,
                                   max_nodes_per_token=self.buffer.max_nodes_per_token, expert_counts=expert_counts)

    def dispatch(self, x: Tensor | tuple[Tensor, Tensor], topk_idx: Tensor, topk_weights: Tensor) -> ops.Dispatched:
        """Differentiable dispatch; see :func:`epcomm.ops.dispatch` for shapes.

        ``topk_idx`` holds physical slot ids in ``[-1, num_slots)``.
        """
        return ops._dispatch(self._key, x, topk_idx, topk_weights, self.num_slots, self.expert_alignment)

    def combine(self, y: Tensor, dispatched: ops.Dispatched, num_tokens: int) -> Tensor:
        """Differentiable combine of ``y`` ``[num_recv, hidden]`` -> ``[num_tokens, hidden]`` (y's dtype)."""
        return ops.combine(y, dispatched.handle, num_tokens)[0]

    def move_experts(
        self,
        new_placement: Placement,
        params: Mapping[str, Tensor],
        optimizer_state: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        max_row_bytes: int | None = None,
    ) -> MovedExperts:
        """Adopt ``new_placement``: move every slot's weights (and optimizer state) to its new owner.

        A collective: call it on every rank with the same ``new_placement``. Each new slot copies
        one old slot holding the same logical expert (:func:`plan_expert_moves`: on its own rank
        if possible, else on its own node, else the least used replica); copies within a rank are
        local, the rest travel in **one epcomm dispatch**. That dispatch treats each outgoing old
        slot as a *token*: its row is the slot's bytes (all tensors of ``params`` and
        ``optimizer_state``, packed, viewed as float32 words: dispatch only copies rows, so any
        dtype arrives bit for bit), its ``topk_idx`` the new slots it feeds (``num_experts`` =
        the new placement's slot count, whose uniform rule is the placement's slot -> GPU rule).
        Dispatch sends one row per (token, destination rank) and returns, per row, the receiving
        rank's local slot ids, exactly "copy this row into these slots". Going through epcomm's
        dispatch rather than a separate ``all_to_all`` keeps one transport (the kernel backends'
        buffers, two-hop across nodes so a slot crosses the network once per destination node,
        byte accounting, timeouts and the cross-rank input checks). A slot whose destinations
        span more than the buffer's ``max_nodes_per_token`` nodes is sent as several tokens.
        A slot's row is whole (a real expert's weights are tens of MB); ``max_row_bytes`` cuts
        each into pieces of at most that many bytes, sent as consecutive tokens of the same
        dispatch, for kernel backends whose buffers take smaller rows.

        Memory: a rank holds its old slots, the rows it sends (at most one per old slot and
        destination node group) and the rows it receives (at most one per new slot), never the
        other ranks' experts. The old tensors are not modified.

        Before anything moves, the ranks agree that every rank's input fits and that they pass
        the same per-slot tensor layout (one small ``all_gather``), then that they pass the same
        new placement (:func:`epcomm.eplb.check_placement_agrees`, one more).

        Args:
            new_placement: single-layer :class:`epcomm.eplb.Placement` over :attr:`num_experts`
                logical experts and ``buffer.group_size`` GPUs (it may have another slot count).
            params: name -> ``[num_local_experts, *shape]`` tensor of any dtype (this rank's slots,
                in local slot order), on the buffer's device; the same names, shapes and dtypes on
                every rank.
            optimizer_state: name -> state mapping for some of ``params`` (``{name: optimizer.state[p]}``
                for a torch optimizer). Tensors of exactly the parameter's shape are per-slot state
                (SGD's ``momentum_buffer``, Adam's ``exp_avg``, ``exp_avg_sq``) and move with it; other
                entries (Adam's scalar ``step``) are per-parameter and are kept as they are.
            max_row_bytes: ``None`` (one row per slot) or the largest row to dispatch, ``>= 4``;
                the same on every rank.
        Returns:
            :class:`MovedExperts`: ``params`` name -> ``[new num_local_experts, *shape]`` (same dtype,
            device) holding the new placement's slots of this rank, and the optimizer state in the
            same form (``None`` if none was given). Install them as new ``Parameter`` objects when
            the slot count changes (autograd caches a leaf's shape, so ``p.data = ...`` would fail
            in the next backward), and hand the optimizer the new parameters and their state
            (``param_groups``, ``optimizer.state[new_p] = moved.optimizer_state[name]``). This object
            routes with ``new_placement`` once the call returns.
        Raises:
            EpcommInputError: on every rank, before anything moved, if any rank's placement or
                tensors do not fit, or the ranks disagree on them.
        """
        old = self.expert_placement
        state = {} if optimizer_state is None else optimizer_state
        problem = _placement_problem(new_placement, self.num_experts, self.buffer.group_size)
        tensors: list[tuple[str, str | None, Tensor]] = []  # (param name, state key or None, tensor)
        if problem is None:
            problem, tensors = _slot_tensors(params, state, self.num_local_experts)
        if problem is None and max_row_bytes is not None and (
                isinstance(max_row_bytes, bool) or not isinstance(max_row_bytes, int) or max_row_bytes < 4):
            problem = f"max_row_bytes must be None or an int >= 4, got {max_row_bytes!r}"
        layout = repr(([(n, k, tuple(t.shape[1:]), str(t.dtype)) for n, k, t in tensors], max_row_bytes)).encode()
        _agree(self.buffer, "move_experts", problem, layout)  # every rank's input fits, same tensor layout
        check_placement_agrees(new_placement, self.buffer.group)  # the same new placement everywhere

        num_nvl = self.buffer.topology.num_nvl_ranks
        source = plan_expert_moves(old, new_placement, num_nvl)
        with torch.no_grad():
            moved = _move_slots(self.buffer, old, new_placement, source, [t for _, _, t in tensors], max_row_bytes)
        self._set_placement(new_placement)

        out_params = {name: moved[i] for i, (name, key, _) in enumerate(tensors) if key is None}
        out_state: dict[str, dict[str, Any]] | None = None
        if optimizer_state is not None:
            out_state = {name: dict(entries) for name, entries in optimizer_state.items()}
            for i, (name, key, _) in enumerate(tensors):
                if key is not None:
                    out_state[name][key] = moved[i]
        return MovedExperts(out_params, out_state)


class MovedExperts(NamedTuple):
    """What :meth:`ExpertParallel.move_experts` returns.

    Attributes:
        params: name -> ``[num_local_experts, *shape]`` tensors of the new placement's local slots.
        optimizer_state: name -> state mapping with the per-slot tensors moved, or ``None``.
    """

    params: dict[str, Tensor]
    optimizer_state: dict[str, dict[str, Any]] | None


def _placement_problem(placement: object, num_experts: int, world_size: int) -> str | None:
    """Why ``placement`` cannot be this layer's placement, or ``None``."""
    if not isinstance(placement, Placement):
        return f"placement must be an epcomm.eplb.Placement, got {type(placement).__name__}"
    if placement.layered:
        return (f"placement must be a single-layer Placement, got one with {placement.num_layers} layers; "
                "pass placement.layer(i) for layer i")
    if placement.num_logical != num_experts:
        return f"placement has {placement.num_logical} logical experts, the layer has num_experts={num_experts}"
    if placement.num_gpus != world_size:
        return f"placement is for num_gpus={placement.num_gpus}, the buffer's group has {world_size} ranks"
    return None


def _agree(buffer: Buffer, op: str, problem: str | None, layout: bytes) -> None:
    """Raise :class:`~epcomm.EpcommInputError` on every rank unless no rank has a ``problem`` and all
    ranks pass the same ``layout`` (a description of the tensors to move).

    One ``all_gather`` of ``[verdict, 4 words of the layout's sha256]`` (on epcomm's collectives, with
    the buffer's deadline and peer diagnosis); a second one carries the messages only when a rank failed.
    The placement itself is checked by :func:`epcomm.eplb.check_placement_agrees` after this: only
    once every rank knows that every rank got this far, so no rank waits in it alone.
    """
    comm = buffer._comm
    words = torch.zeros(5, dtype=torch.int64)
    words[0] = int(problem is not None)
    words[1:] = torch.frombuffer(bytearray(hashlib.sha256(layout).digest()), dtype=torch.int64)
    gathered = comm.all_gather(op, "agree", words.to(comm.device)).cpu()
    failed = gathered[:, 0].nonzero().flatten().tolist()
    problems: dict[int, str] = {}
    if failed:
        messages = comm.all_gather_bytes(op, "report errors", (problem or "").encode(), 480)
        problems = {r: messages[r].rstrip(b"\0").decode("utf-8", "replace") for r in failed}
    else:
        keys = [tuple(row) for row in gathered[:, 1:].tolist()]
        majority = Counter(keys).most_common(1)[0][0]
        agreeing = [r for r, k in enumerate(keys) if k == majority]
        for r, k in enumerate(keys):
            if k != majority:
                problems[r] = (f"the per-slot tensors (names, shapes past the slot dim, dtypes, optimizer state "
                               f"keys) differ from those of ranks {agreeing}: pass the same on every rank")
    if problems:
        raise EpcommInputError(op, problems, buffer.group_size)


def _slot_tensors(
    params: object, state: Mapping[str, Mapping[str, Any]], num_slots: int
) -> tuple[str | None, list[tuple[str, str | None, Tensor]]]:
    """The per-slot tensors to move, as ``(name, state key or None, tensor)``, params in sorted name order,
    each followed by its per-slot state; or why the input is bad (and ``[]``)."""
    if not isinstance(params, Mapping) or not params:
        return f"params must be a non-empty mapping name -> Tensor, got {type(params).__name__}", []
    out: list[tuple[str, str | None, Tensor]] = []
    device = None
    for name in sorted(params):  # sorted: the packing order must not depend on each rank's dict order
        t = params[name]
        if not isinstance(t, Tensor) or t.dim() < 1 or t.size(0) != num_slots:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            return (f"params[{name!r}] must be a [num_local_experts={num_slots}, ...] tensor (this rank's slots), "
                    f"got {shape}"), []
        if device is None:
            device = t.device
        if t.device != device:
            return f"params[{name!r}] is on {t.device}, params[{sorted(params)[0]!r}] on {device}: use one device", []
        out.append((name, None, t.detach()))
        entries = state.get(name, {})
        if not isinstance(entries, Mapping):
            return f"optimizer_state[{name!r}] must be a mapping (optimizer.state[p]), got {type(entries).__name__}", []
        for key in sorted(entries, key=str):
            v = entries[key]
            if isinstance(v, Tensor) and v.shape == t.shape:  # per-slot state; anything else is per-parameter
                if v.device != device:
                    return f"optimizer_state[{name!r}][{key!r}] is on {v.device}, params on {device}", []
                out.append((name, key, v.detach()))
    unknown = sorted(set(state) - set(params))
    if unknown:
        return f"optimizer_state has entries for {unknown}, which are not in params", []
    return None, out


def plan_expert_moves(old: Placement, new: Placement, num_nvl_ranks: int) -> Tensor:
    """Which old slot each new slot copies its weights from (deterministic: the same on every rank).

    New slots are taken in ascending order. A new slot on GPU ``g`` (node ``g // num_nvl_ranks``)
    holding logical expert ``e`` copies from one of ``e``'s old slots: the lowest on ``g`` itself
    (a local copy), else the least used so far on its own node (no network bytes), else the
    least used so far anywhere (spreading the sending over the replicas); ties go to the lowest slot.

    Args:
        old, new: single-layer placements over the same logical experts and GPUs.
        num_nvl_ranks: GPUs per node.
    Returns:
        ``[new.num_physical]`` int64 old slot ids.
    """
    if old.num_logical != new.num_logical or old.num_gpus != new.num_gpus:
        raise ValueError(f"placements differ in size: {old.num_logical} vs {new.num_logical} logical experts, "
                         f"{old.num_gpus} vs {new.num_gpus} GPUs")
    old_spg, new_spg = old.slots_per_gpu, new.slots_per_gpu
    replicas = [old.replicas_of(e) for e in range(old.num_logical)]
    used = [0] * old.num_physical
    source = []
    for q, e in enumerate(new.phy2log.tolist()):
        gpu = q // new_spg
        node = gpu // num_nvl_ranks
        same_gpu = [p for p in replicas[e] if p // old_spg == gpu]
        if same_gpu:
            source.append(same_gpu[0])
            continue
        same_node = [p for p in replicas[e] if p // old_spg // num_nvl_ranks == node]
        pick = min(same_node or replicas[e], key=lambda p: (used[p], p))
        used[pick] += 1
        source.append(pick)
    return torch.tensor(source, dtype=torch.int64)


def _move_tokens(
    old: Placement, new: Placement, source: Tensor, rank: int, num_nvl_ranks: int, max_nodes: int
) -> tuple[list[int], list[list[int]], int]:
    """This rank's outgoing tokens: ``(old local slot of each, its destination new slots, num_topk)``.

    A token carries one old slot to its remote destinations on at most ``max_nodes`` nodes
    (more nodes: several tokens). ``num_topk`` is the largest destination count over every
    rank's tokens (computed from the placements alone, so every rank gets the same value).
    """
    old_spg, new_spg = old.slots_per_gpu, new.slots_per_gpu
    remote: dict[int, list[int]] = {}  # old slot -> new slots on other GPUs, ascending
    for q, p in enumerate(source.tolist()):
        if q // new_spg != p // old_spg:
            remote.setdefault(p, []).append(q)
    num_topk = 0
    mine_src: list[int] = []
    mine_dst: list[list[int]] = []
    for p in sorted(remote):
        nodes = sorted({q // new_spg // num_nvl_ranks for q in remote[p]})
        for i in range(0, len(nodes), max_nodes):
            chunk = set(nodes[i:i + max_nodes])
            dst = [q for q in remote[p] if q // new_spg // num_nvl_ranks in chunk]
            num_topk = max(num_topk, len(dst))
            if p // old_spg == rank:
                mine_src.append(p - rank * old_spg)
                mine_dst.append(dst)
    return mine_src, mine_dst, num_topk


def _slot_bytes(t: Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _pack_rows(tensors: list[Tensor], rows: Tensor, width: int) -> Tensor:
    """``[len(rows), width]`` float32 whose row ``i`` is the bytes of slot ``rows[i]`` of every tensor.

    The words are raw bytes, not numbers: dispatch copies rows without arithmetic, so they arrive
    bit for bit whatever the tensors' dtypes (the tail of a row is zero padding to a 4-byte word).
    """
    packed = torch.zeros(rows.numel(), width * 4, dtype=torch.uint8, device=rows.device)
    start = 0
    for t in tensors:  # one tensor's rows at a time: the temporaries stay one tensor's outgoing slots
        nbytes = _slot_bytes(t)
        part = t.index_select(0, rows).reshape(rows.numel(), nbytes // t.element_size())
        packed[:, start:start + nbytes] = part.view(torch.uint8)
        start += nbytes
    return packed.view(torch.float32)


def _unpack_rows(rows: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`_pack_rows`: per tensor of ``like``, ``[num_rows, *slot shape]`` in its dtype."""
    raw = rows.contiguous().view(torch.uint8)
    out, start = [], 0
    for t in like:
        nbytes = _slot_bytes(t)
        piece = raw[:, start:start + nbytes].clone().view(t.dtype)  # clone: a fresh, aligned storage
        out.append(piece.view(rows.size(0), *t.shape[1:]))
        start += nbytes
    return out


def _move_slots(
    buffer: Buffer, old: Placement, new: Placement, source: Tensor, tensors: list[Tensor], max_row_bytes: int | None
) -> list[Tensor]:
    """Each tensor ``[old slots per GPU, ...]`` -> ``[new slots per GPU, ...]`` of this rank (one dispatch)."""
    rank, nvl = buffer.rank, buffer.topology.num_nvl_ranks
    old_spg, new_spg = old.slots_per_gpu, new.slots_per_gpu
    device = tensors[0].device
    out = [t.new_empty(new_spg, *t.shape[1:]) for t in tensors]
    filled = torch.zeros(new_spg, dtype=torch.bool)

    # local copies: new slots of this rank whose source is an old slot of this rank
    mine = range(rank * new_spg, (rank + 1) * new_spg)
    src = source[mine.start:mine.stop]
    local = (src // old_spg == rank).nonzero().flatten()
    if local.numel():
        idx = (src[local] - rank * old_spg).to(device)
        for o, t in zip(out, tensors):
            o[local.to(device)] = t.index_select(0, idx)
        filled[local] = True

    token_src, token_dst, num_topk = _move_tokens(old, new, source, rank, nvl, buffer.max_nodes_per_token)
    if num_topk:  # the same on every rank: all ranks dispatch, or none (nothing crosses ranks)
        words = (sum(_slot_bytes(t) for t in tensors) + 3) // 4  # a slot in 4-byte words
        pieces = 1 if max_row_bytes is None else max(1, -(-words // (max_row_bytes // 4)))
        piece_words = -(-words // pieces)
        x = _pack_rows(tensors, torch.tensor(token_src, dtype=torch.int64, device=device), pieces * piece_words)
        x = x.view(len(token_src) * pieces, piece_words)  # token t's pieces are tokens t*pieces ...
        topk_idx = torch.full((len(token_src), num_topk), -1, dtype=torch.int64, device=device)
        for i, dst in enumerate(token_dst):
            topk_idx[i, : len(dst)] = torch.tensor(dst, dtype=torch.int64)
        topk_idx = topk_idx.repeat_interleave(pieces, dim=0)
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, new.num_physical)
        recv_x, recv_idx, _, _, _, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx)
        del x
        # rows arrive by source rank, then token: a slot's pieces (same destinations) are consecutive
        recv_x = recv_x.view(-1, pieces * piece_words)
        recv_idx = recv_idx[::pieces]
        row, col = (recv_idx >= 0).nonzero(as_tuple=True)
        slots = recv_idx[row, col]
        for o, piece in zip(out, _unpack_rows(recv_x, tensors)):
            o[slots] = piece.index_select(0, row)
        filled[slots.cpu()] = True
    if not bool(filled.all()):  # a planning bug, not bad input: every rank computed the same plan
        raise RuntimeError(f"epcomm move_experts: rank {rank} got no weights for local slots "
                           f"{(~filled).nonzero().flatten().tolist()}; please report this")
    return out


# ---------------------------------------------------------------- grouping
class ExpertGroups(NamedTuple):
    """Received rows regrouped by local expert (see :func:`group_by_expert`).

    Attributes:
        x: ``[num_padded, hidden]`` recv_x's dtype: expert 0's rows, then expert 1's, ...; each
            group is followed by zero rows up to ``counts[e]`` rows.
        weights: ``[num_padded]`` float32, the gate weight of each (row, expert) pair, 0 on padding.
        counts: rows per local expert including padding (``num_recv_tokens_per_expert_list``).
        positions: ``[num_pairs]`` int64, where each (row, expert) pair sits in ``x``.
        rows: ``[num_pairs]`` int64, which received row each pair came from.
    """

    x: Tensor
    weights: Tensor
    counts: list[int]
    positions: Tensor
    rows: Tensor

    @property
    def row_idx(self) -> Tensor:
        """``[num_padded]`` int64: the received row of each grouped row, ``-1`` on padding."""
        out = torch.full((self.x.size(0),), -1, dtype=torch.int64, device=self.x.device)
        return out.index_copy(0, self.positions, self.rows)


def _exclusive_cumsum(values: Tensor) -> Tensor:
    return torch.cumsum(values, 0) - values


def group_by_expert(
    recv_x: Tensor,
    recv_topk_idx: Tensor,
    recv_topk_weights: Tensor,
    num_recv_tokens_per_expert_list: list[int],
    expert_alignment: int = 1,
) -> ExpertGroups:
    """Group received rows by local expert, padded for a grouped GEMM. Differentiable.

    A row routed to ``j`` local experts appears ``j`` times. Inside a group rows keep
    their received order. Equivalent loop::

        for e in range(num_local_experts):
            for r, k in pairs (row r, slot k) with recv_topk_idx[r, k] == e, r ascending:
                x.append(recv_x[r]); weights.append(recv_topk_weights[r, k])
            pad with zero rows (weight 0) up to num_recv_tokens_per_expert_list[e]

    Args:
        recv_x: ``[num_recv, hidden]`` from dispatch.
        recv_topk_idx: ``[num_recv, num_topk]`` int64 local expert ids, ``-1`` elsewhere.
        recv_topk_weights: ``[num_recv, num_topk]`` float32.
        num_recv_tokens_per_expert_list: one int per local expert, rounded up to ``expert_alignment``.
        expert_alignment: the alignment dispatch used (checked against the counts).
    Raises:
        ValueError: the counts do not match ``recv_topk_idx`` rounded up to ``expert_alignment``.
    """
    num_local = len(num_recv_tokens_per_expert_list)
    valid = recv_topk_idx >= 0
    rows, slots = valid.nonzero(as_tuple=True)  # row-major: rows ascending
    experts = recv_topk_idx[rows, slots]
    order = torch.sort(experts, stable=True).indices
    rows, slots, experts = rows[order], slots[order], experts[order]
    actual = torch.bincount(experts, minlength=num_local)
    aligned = (actual + expert_alignment - 1) // expert_alignment * expert_alignment
    if actual.numel() != num_local or aligned.tolist() != list(num_recv_tokens_per_expert_list):
        raise ValueError(
            f"num_recv_tokens_per_expert_list {list(num_recv_tokens_per_expert_list)} does not match recv_topk_idx "
            f"(rows per local expert {actual.tolist()}, aligned to {expert_alignment}); pass dispatch's outputs "
            "and the same expert_alignment"
        )
    counts = torch.tensor(num_recv_tokens_per_expert_list, dtype=torch.int64, device=recv_x.device)
    rank_in_group = torch.arange(rows.numel(), device=recv_x.device) - _exclusive_cumsum(actual)[experts]
    positions = _exclusive_cumsum(counts)[experts] + rank_in_group
    num_padded = int(counts.sum())
    x = recv_x.new_zeros(num_padded, recv_x.size(1)).index_copy(0, positions, recv_x.index_select(0, rows))
    pair_weights = recv_topk_weights[rows, slots]
    weights = pair_weights.new_zeros(num_padded).index_copy(0, positions, pair_weights)
    return ExpertGroups(x, weights, list(num_recv_tokens_per_expert_list), positions, rows)


def ungroup_from_experts(expert_out: Tensor, groups: ExpertGroups, num_recv: int, weighted: bool = True) -> Tensor:
    """Sum the expert outputs back into one row per received token. Differentiable.

    ``out[r] = sum over pairs (r, e) of weight(r, e) * expert_out[position(r, e)]``,
    accumulated in float32 and cast to expert_out's dtype once; padding rows are ignored.

    Args:
        expert_out: ``[num_padded, hidden_out]`` rows in :attr:`ExpertGroups.x`'s order.
        groups: from :func:`group_by_expert`.
        num_recv: rows dispatch received (``recv_x.size(0)``).
        weighted: multiply by the gate weights (``False``: plain sum).
    Returns:
        ``[num_recv, hidden_out]``, expert_out's dtype: ready for combine.
    """
    if expert_out.size(0) != groups.x.size(0):
        raise ValueError(f"expert_out has {expert_out.size(0)} rows but the groups have {groups.x.size(0)}")
    pairs = expert_out.index_select(0, groups.positions).float()
    if weighted:
        pairs = pairs * groups.weights.index_select(0, groups.positions).unsqueeze(1)
    out = pairs.new_zeros(num_recv, expert_out.size(1)).index_add(0, groups.rows, pairs)
    return out.to(expert_out.dtype)


def grouped_linear(x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
    """Per-expert matmul on grouped rows (a reference grouped GEMM).

    Args:
        x: ``[num_padded, in]`` grouped rows (:attr:`ExpertGroups.x`).
        weight: ``[num_local_experts, in, out]``.
        counts: rows per expert, ``sum(counts) == num_padded``.
    Returns:
        ``[num_padded, out]``: ``x[group e] @ weight[e]`` for each expert ``e``.
    """
    if weight.dim() != 3 or weight.size(0) != len(counts):
        raise ValueError(f"weight must be [num_local_experts={len(counts)}, in, out], got {list(weight.shape)}")
    parts = [chunk @ weight[e] for e, chunk in enumerate(torch.split(x, counts))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.size(2))


# -------------------------------------------------------------- load stats
class LoadStats(NamedTuple):
    """Expert load over all ranks of a step.

    Attributes:
        tokens_per_expert: ``[num_experts]`` int64, (token, expert) pairs per expert, summed over ranks.
        tokens_per_rank: ``[world_size]`` int64, the same summed over each rank's experts.
        max_over_mean: busiest expert's load over the mean expert load (1.0 is perfect balance).
        rank_max_over_mean: the same per rank (what the slowest rank's experts see).
    """

    tokens_per_expert: Tensor
    tokens_per_rank: Tensor
    max_over_mean: float
    rank_max_over_mean: float

    @classmethod
    def from_counts(cls, tokens_per_expert: Tensor, world_size: int) -> "LoadStats":
        """Statistics of ``tokens_per_expert`` ``[num_experts]`` (int64) over ``world_size`` ranks.

        Raises:
            ValueError: ``num_experts`` is not a positive multiple of ``world_size``.
        """
        placement = ExpertPlacement.uniform(tokens_per_expert.numel(), world_size)
        # sum each expert into its rank through the placement's table rather than assuming contiguous blocks
        ranks = placement.rank_table(tokens_per_expert.device).long()
        per_rank = tokens_per_expert.new_zeros(world_size).index_add_(0, ranks, tokens_per_expert)
        load, rank_load = tokens_per_expert.double(), per_rank.double()
        ratio = float(load.max() / load.mean()) if load.sum() > 0 else 1.0
        rank_ratio = float(rank_load.max() / rank_load.mean()) if rank_load.sum() > 0 else 1.0
        return cls(tokens_per_expert, per_rank, ratio, rank_ratio)


def expert_load(topk_idx: Tensor, num_experts: int, group: dist.ProcessGroup | None = None) -> LoadStats:
    """Tokens per expert over all ranks of ``group`` (a collective: one ``all_reduce``).

    Args:
        topk_idx: ``[num_tokens, num_topk]`` int64, this rank's routing (``-1`` ignored).
        num_experts: total experts, divisible by the group size.
        group: process group (``None``: the default group).
    Returns:
        :class:`LoadStats`, identical on every rank (feed ``tokens_per_expert`` to
        :func:`epcomm.routing.update_bias` so every rank keeps the same bias).
    Raises:
        ValueError: ``num_experts`` is not a positive multiple of the group size, or ``topk_idx``
            holds ids ``>= num_experts``.
    """
    world = dist.get_world_size(group)
    ExpertPlacement.uniform(num_experts, world)  # validates num_experts before the collective
    ids = topk_idx[topk_idx >= 0]
    counts = torch.bincount(ids.flatten(), minlength=num_experts).to(torch.int64)
    if counts.numel() != num_experts:
        raise ValueError(f"topk_idx holds expert ids >= num_experts ({num_experts})")
    dist.all_reduce(counts, group=group)  # on topk_idx's device (NCCL groups need CUDA tensors)
    return LoadStats.from_counts(counts.cpu(), world)
