"""What a backend is: the operations :class:`~epcomm.Buffer` drives, and what it hands them.

``Buffer`` validates inputs, agrees with the other ranks (so bad input fails everywhere before
anything moves) and shapes the results; a backend only moves rows. Each backend module defines one
:class:`DispatchBackend` subclass and the registry (``epcomm.backends``) names it.

Tensors are passed as a dict of per-token ``[rows, width]`` tensors in this order, each optional
except ``x``: ``x`` (bf16/fp16/fp32, or FP8 e4m3 data), ``scales`` (float32, FP8 only),
``topk_idx`` (int64 global expert ids, ``-1`` none), ``topk_weights`` (float32). A backend's wire
format (how it packs these into rows) is its own business.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._comm import GroupComm
from .._streams import StreamScope
from ..config import Config
from ..placement import ExpertPlacement
from ..topology import Topology

__all__ = ["BackendOptions", "CallCheck", "DispatchBackend", "DispatchCall", "ExpertCounts"]


@dataclass(frozen=True)
class BackendOptions:
    """The Buffer's choices a backend is built with (each backend reads what applies to it)."""

    num_nvl_bytes: int = 0  # kernel backends: NVL buffer bytes per rank (0: sized at the first call)
    num_rdma_bytes: int = 0  # kernel backends: network buffer bytes per rank (0: sized at the first call)
    algorithm: str = "flat"  # "flat" or "two_hop"
    max_nodes_per_token: int = 4
    timeout_s: float = 30.0
    # two-hop combine: a node's partial sum crosses the network in the rows' dtype ("rows_dtype",
    # DeepEP's bytes) or in float32 ("float32", one rounding); see Buffer
    combine_node_partials: str = "rows_dtype"
    low_latency_mode: bool = False  # Buffer(low_latency_mode=True): LL calls may come


@dataclass(frozen=True)
class ExpertCounts:
    """A dispatch's tokens per expert, as the caller counted them.

    Attributes:
        sent: ``[num_experts]`` int32, contiguous: this rank's tokens that chose each expert
            (``get_dispatch_layout``'s ``num_tokens_per_expert``).
        alignment: each received per-expert count is rounded up to a multiple of this.
    """

    sent: torch.Tensor
    alignment: int

    def num_local(self, world_size: int) -> int:
        """Experts per rank (the uniform placement)."""
        return self.sent.numel() // world_size


@dataclass(frozen=True)
class DispatchCall:
    """One non-cached dispatch, after every rank agreed on it.

    Attributes:
        tensors: per-token tensors (see the module docs), ``[N, width]`` each.
        is_token_in_rank: ``[N, world_size]`` bool.
        counts: ``[world_size, world_size]`` int64, ``counts[s, d]``: tokens rank ``s`` sends rank ``d``
            (every rank's, from the agreement).
        node_counts: ``[world_size, num_nodes]`` int64, tokens rank ``s`` sends to node ``n``.
        placement: where the experts live (with ``topk_idx``), else None.
        config: the kernel backends' :class:`~epcomm.Config` (None: the backend's default).
        experts: the per-expert counts the caller gave (``num_tokens_per_expert``), else None.
    """

    tensors: dict[str, torch.Tensor]
    is_token_in_rank: torch.Tensor
    counts: torch.Tensor
    node_counts: torch.Tensor
    placement: ExpertPlacement | None
    config: Config | None
    experts: ExpertCounts | None = None


@dataclass(frozen=True)
class CallCheck:
    """One call, as :meth:`DispatchBackend.agree_in_barrier` sees it.

    Attributes:
        op: ``"dispatch"``, ``"cached dispatch"`` or ``"combine"``.
        digest: :func:`epcomm._agree.signature_digest` of the call's signature (equal on every rank
            exactly when the signatures are).
        refused: this rank's own checks failed; the fields below may then be unusable.
        tensors: the call's tensors by name (``x``, ``scales``, ``topk_idx``, ``topk_weights``).
        plan: the handle's plan (calls along a handle), else None.
        config: the call's :class:`~epcomm.Config`, or None.
        is_token_in_rank: ``[num_tokens, world_size]`` bool (dispatch), else None.
        num_topk: top-k ids per token travelling with a dispatch (0: none).
        experts: a dispatch's per-expert counts (``num_tokens_per_expert``), else None.
    """

    op: str
    digest: int
    refused: bool
    tensors: dict[str, torch.Tensor]
    plan: object = None
    config: Config | None = None
    is_token_in_rank: torch.Tensor | None = None
    num_topk: int = 0
    experts: ExpertCounts | None = None


class DispatchBackend(abc.ABC):
    """Moves the rows of dispatch and combine for one Buffer. All methods but the checks are collective.

    Class attributes:
        name: the registry name (``Buffer(backend=name)``).
        local_expert_ids: True when :meth:`dispatch` returns ``topk_idx`` already as this rank's local
            ids (``-1`` elsewhere, weights zeroed there), False when it returns global ids.
    """

    name: ClassVar[str]
    local_expert_ids: ClassVar[bool] = False

    def __init__(self, comm: GroupComm, topo: Topology, options: BackendOptions) -> None:
        self.comm, self.topo, self.options = comm, topo, options

    @classmethod
    def check_options(cls, topo: Topology, options: BackendOptions) -> None:
        """Raise (ValueError, or EpcommBackendUnavailable) for a topology or option this backend cannot run.

        Called before construction on every rank with the same arguments, so every rank decides alike.
        The default takes everything.
        """

    @classmethod
    def algorithms(cls, topo: Topology) -> dict[str, str]:
        """The algorithms this backend accepts on ``topo``, each mapped to the one whose rows it moves.

        A benchmark or test predicting exact traffic uses the value: e.g. the kernel backends run
        the intranode kernels on one node whichever name is passed, so their rows are flat's.
        The default accepts both and runs what is asked.
        """
        return {"flat": "flat", "two_hop": "two_hop"}

    @abc.abstractmethod
    def check_dispatch(self, tensors: dict[str, torch.Tensor], num_topk: int, plan: object = None,
                       config: Config | None = None, num_experts: int = 0) -> None:
        """Raise :class:`~epcomm._validate.Invalid` for inputs this backend cannot take (local, before agreement).

        ``plan``: the handle's plan for a cached dispatch, else None; ``num_experts``: length of the
        dispatch's ``num_tokens_per_expert`` (0: none given).
        """

    @abc.abstractmethod
    def check_combine(self, tensors: dict[str, torch.Tensor], plan: object, config: Config | None = None,
                      node_partial_dtype: torch.dtype | None = None) -> None:
        """As :meth:`check_dispatch`, for combine; ``node_partial_dtype``: what the two-hop path's node partials
        would cross the network in (None: the rows' dtype)."""

    def agree_in_barrier(self, call: CallCheck) -> bool:
        """Agree on ``call`` inside the backend's own barrier (the kernel backends' notify), before the
        host agreement. Collective on every rank, whatever its inputs; the Buffer calls it first in
        every normal-mode operation, so ranks calling different operations meet in it too.

        Returns:
            True: every rank runs this call and accepts it. A call along a handle (cached dispatch,
            combine) then needs no host agreement, and its :meth:`dispatch_cached` / :meth:`combine`
            skips its own barrier; a dispatch still runs the host agreement (it carries every rank's
            counts) and its :meth:`dispatch` reuses the counts this notify exchanged. False: the host
            agreement (``epcomm._agree.agree``) decides and names the ranks and the problem; the same
            verdict on every rank. The default returns False at once, without communicating.
        """
        return False

    # Whether :meth:`agree_on_device` exists (the kernel backends).
    judges_on_device = False

    def agree_on_device(self, call: CallCheck) -> str | None:
        """Under ``host_sync_free``, a call along a handle without any host wait: the backend issues the call
        check and its verdict gates the call's data kernel on the device. Returns None when this rank runs the
        call, else why it cannot (its peers then learn it from their kernels: ``EpcommCallRejected``).
        Only where :attr:`judges_on_device`."""
        raise NotImplementedError(f"the {self.name!r} backend agrees on the host")

    def agreed_expert_counts(self) -> list[int] | None:
        """Rows this rank receives per local expert (rounded up to ``experts.alignment``) in the dispatch
        whose :meth:`agree_in_barrier` just said "yes", when its barrier summed every rank's
        ``experts`` (the kernel backends' notify does); else None. Local, no communication."""
        return None

    def received_expert_counts(self, plan: object) -> list[int] | None:
        """The same counts for the dispatch that returned ``plan``, when this backend's :meth:`dispatch`
        counted them (kernel backends: its notify), else None. Local, no communication."""
        return None

    @abc.abstractmethod
    def dispatch(self, call: DispatchCall) -> tuple[dict[str, torch.Tensor], object]:
        """Send each token's row to every rank in ``call.is_token_in_rank``.

        Returns:
            per tensor name, ``[num_recv, width]`` rows ordered by source rank, then token
            (``topk_idx`` global or local ids, see :attr:`local_expert_ids`), and the plan that
            cached dispatch and combine reuse (kept in the handle).
        """

    @abc.abstractmethod
    def dispatch_cached(self, tensors: dict[str, torch.Tensor], plan: object,
                        config: Config | None = None) -> dict[str, torch.Tensor]:
        """Dispatch ``x`` (and ``scales``) along an earlier dispatch's routing."""

    @abc.abstractmethod
    def combine(self, tensors: dict[str, torch.Tensor], plan: object, config: Config | None = None,
                node_partial_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Return each received row (``x``, optional ``topk_weights``) to its source and sum per token.

        ``node_partial_dtype``: what each node's float32 partial of ``x`` is rounded to before the
        sum over nodes (float32: not rounded); None: x's dtype or float32, as the Buffer's
        ``combine_node_partials`` says. The Buffer passes the caller's dtype when it sends float32
        rows (combine with bias on the kernel backends), so every backend rounds alike.

        Returns:
            per tensor name, ``[num_tokens, width]`` sums: ``x`` in float32 or x's dtype (the caller
            casts once), ``topk_weights`` float32. They may live in the backend's scratch memory,
            valid until its next call.
        """

    def stream_scope(self, device: torch.device, async_finish: bool, op: str) -> StreamScope:
        """Where the data phase of ``op`` runs and the event it returns (``epcomm/_streams.py``). The default:
        the caller's stream (an ``async_finish`` on the CPU runs on the Buffer's worker instead)."""
        return StreamScope(device)

    def low_latency(self) -> object:
        """This backend's low-latency engine (``dispatch``, ``combine``, ``combine_buffer``, ``clean``;
        see ``torch_low_latency.TorchLowLatency``). Raises ``NotImplementedError`` saying why where it
        has none; the Buffer reports that on every rank."""
        raise NotImplementedError(f"the {self.name!r} backend has no low-latency mode yet; use Buffer(backend='torch')")

    def close(self, collective: bool = False) -> None:
        """Release buffers. Idempotent. ``collective``: every rank calls it together (``Buffer.destroy``), so
        a backend may meet its peers first (the kernel backends free nothing a peer still maps); otherwise
        (garbage collection) it must not wait for anyone."""
