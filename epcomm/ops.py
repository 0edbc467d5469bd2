"""Differentiable dispatch and combine, registered as ``torch.library`` custom ops.

Three ops in the ``epcomm`` namespace wrap :class:`~epcomm.Buffer`:

* ``epcomm::dispatch``: layout + dispatch; its backward is a combine of the
  gradients of ``recv_x`` and ``recv_topk_weights``.
* ``epcomm::combine``: its backward is a cached dispatch with the same handle.
* ``epcomm::cached_dispatch``: its backward is a combine.

Each has a fake implementation, so ``torch.compile(..., fullgraph=True)`` traces
a layer that uses them without graph breaks: the number of received rows is
data-dependent and becomes an unbacked SymInt in the fake ``dispatch``; the
other ops take the row counts they produce as SymInt arguments, so shapes stay
tied to the same symbol through forward and backward.

Handles. Custom ops only move tensors, so a dispatch returns its
:class:`~epcomm.DispatchHandle` as a *handle tensor*: an int64 ``[1]`` CPU tensor
holding an id into a per-process registry. The registry entry lives exactly as
long as the handle tensor's storage: the storage owns a small object whose
finalizer drops the entry, so the autograd graph (which saves the handle
tensor for backward) keeps the routing alive until the backward pass has run,
and nothing leaks after. Views of the handle tensor keep it alive; a
``clone()`` carries the id but not the lifetime. Buffers are named in the ops
by an int key (:func:`buffer_key`), a compile-time constant.

Use :func:`dispatch`, :func:`combine` and :func:`cached_dispatch` (or
:class:`epcomm.moe.ExpertParallel`), not the raw ``torch.ops.epcomm`` ops.
FP8 dispatch goes through the same op but is forward-only.
"""

from __future__ import annotations

import itertools
import weakref
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .buffer import Buffer
from .placement import ExpertPlacement
from .handle import DispatchHandle

__all__ = [
    "Dispatched",
    "buffer_key",
    "dispatch",
    "combine",
    "cached_dispatch",
    "lookup_handle",
    "num_live_handles",
]

_BUFFERS: "weakref.WeakValueDictionary[int, Buffer]" = weakref.WeakValueDictionary()
_HANDLES: dict[int, tuple[Buffer, DispatchHandle]] = {}
_handle_ids = itertools.count(1)


# ------------------------------------------------------------------ registries
def buffer_key(buffer: Buffer) -> int:
    """The int that names ``buffer`` inside the custom ops (registers it on first use).

    Call it once outside ``torch.compile`` (``ExpertParallel`` does so at
    construction); under tracing it only reads the key.
    """
    if not isinstance(buffer, Buffer):
        raise TypeError(f"expected an epcomm.Buffer, got {type(buffer).__name__}")
    key = buffer.id
    if not torch.compiler.is_compiling():
        _BUFFERS[key] = buffer
    return key


def _buffer(key: int) -> Buffer:
    buffer = _BUFFERS.get(key)
    if buffer is None:
        raise RuntimeError(
            f"epcomm buffer key {key} is not registered (or the Buffer was freed): call "
            "epcomm.ops.buffer_key(buffer) once outside torch.compile, or use epcomm.moe.ExpertParallel"
        )
    return buffer


class _HandleCell(bytearray):
    """The 8 bytes behind a handle tensor; dropping the last view frees the registry entry."""

    __slots__ = ("handle_id",)

    def __del__(self) -> None:
        handles = _HANDLES  # may be None at interpreter shutdown
        if handles is not None:
            handles.pop(self.handle_id, None)


def _new_handle_tensor(buffer: Buffer, handle: DispatchHandle) -> Tensor:
    handle_id = next(_handle_ids)
    cell = _HandleCell(handle_id.to_bytes(8, "little", signed=True))
    cell.handle_id = handle_id
    _HANDLES[handle_id] = (buffer, handle)
    return torch.frombuffer(cell, dtype=torch.int64)  # keeps `cell` alive as long as its storage


def lookup_handle(handle: Tensor) -> tuple[Buffer, DispatchHandle]:
    """The Buffer and :class:`~epcomm.DispatchHandle` behind a handle tensor from :func:`dispatch`."""
    if not isinstance(handle, Tensor) or handle.dtype != torch.int64 or handle.numel() != 1:
        raise TypeError(f"expected the int64 [1] handle tensor returned by epcomm.ops.dispatch, got {handle!r}")
    handle_id = int(handle.reshape(-1)[0])
    entry = _HANDLES.get(handle_id)
    if entry is None:
        raise RuntimeError(
            f"epcomm handle {handle_id} is no longer alive: keep the handle tensor returned by dispatch "
            "(not a clone of it) until its combine and backward pass have run"
        )
    return entry


def num_live_handles() -> int:
    """How many dispatch handles this process still holds (for leak checks)."""
    return len(_HANDLES)


# ------------------------------------------------------------------- the ops
@torch.library.custom_op(
    "epcomm::dispatch",
    mutates_args=(),
    # plain ints (not SymInt): the buffer key and expert counts are compile-time constants
    schema="(Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor topk_weights, int buffer_key, int num_experts, "
    "int expert_alignment) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _dispatch_op(
    x: Tensor,
    x_scales: Optional[Tensor],
    topk_idx: Tensor,
    topk_weights: Tensor,
    buffer_key: int,
    num_experts: int,
    expert_alignment: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    buffer = _buffer(buffer_key)
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x if x_scales is None else (x, x_scales),
        num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        expert_alignment=expert_alignment,
    )
    if x_scales is None:
        recv_scales = torch.empty(recv_x.size(0), 0, dtype=torch.float32, device=x.device)
    else:
        recv_x, recv_scales = recv_x
    counts_t = torch.tensor(counts, dtype=torch.int64, device=x.device)
    return recv_x, recv_scales, recv_idx, recv_w, counts_t, _new_handle_tensor(buffer, handle)


@_dispatch_op.register_fake
def _dispatch_fake(x, x_scales, topk_idx, topk_weights, buffer_key, num_experts, expert_alignment):
    try:
        num_local_experts = ExpertPlacement.uniform(num_experts, _buffer(buffer_key).group_size).num_local_experts
    except ValueError:
        # Do not raise here: a bad num_experts must fail in the real op, where Buffer agrees the error
        # across ranks; raising at trace time on one rank would leave its peers waiting.
        num_local_experts = 0
    num_recv = torch.library.get_ctx().new_dynamic_size()
    scale_cols = 0 if x_scales is None else x_scales.size(1)
    return (
        x.new_empty(num_recv, x.size(1)),
        x.new_empty(num_recv, scale_cols, dtype=torch.float32),
        topk_idx.new_empty(num_recv, topk_idx.size(1)),
        topk_weights.new_empty(num_recv, topk_weights.size(1)),
        topk_idx.new_empty(num_local_experts),
        torch.empty(1, dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("epcomm::combine", mutates_args=())
def _combine_op(x: Tensor, topk_weights: Optional[Tensor], handle: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    buffer, dispatch_handle = lookup_handle(handle)
    combined, combined_w, _ = buffer.combine(x, dispatch_handle, topk_weights=topk_weights)
    if combined_w is None:
        combined_w = torch.empty(combined.size(0), 0, dtype=torch.float32, device=x.device)
    return combined, combined_w


@_combine_op.register_fake
def _combine_fake(x, topk_weights, handle, num_tokens):
    weight_cols = 0 if topk_weights is None else topk_weights.size(1)
    return x.new_empty(num_tokens, x.size(1)), x.new_empty(num_tokens, weight_cols, dtype=torch.float32)


@torch.library.custom_op("epcomm::cached_dispatch", mutates_args=())
def _cached_dispatch_op(x: Tensor, handle: Tensor, num_recv: int) -> Tensor:
    buffer, dispatch_handle = lookup_handle(handle)
    return buffer.dispatch(x, handle=dispatch_handle)[0]


@_cached_dispatch_op.register_fake
def _cached_dispatch_fake(x, handle, num_recv):
    return x.new_empty(num_recv, x.size(1))


# ---------------------------------------------------------------- autograd
_FP8_NO_GRAD = (
    "epcomm: FP8 dispatch is forward-only (its rows are quantized, there is no gradient to send back); "
    "dispatch bf16/fp32 x when training, or run the FP8 dispatch under torch.no_grad() with "
    "topk_weights.detach()"
)


def _dispatch_setup(ctx, inputs, output) -> None:
    x, x_scales, _, _, _, _, _ = inputs
    ctx.fp8 = x_scales is not None
    ctx.num_tokens = x.size(0)
    ctx.save_for_backward(output[2], output[5])  # recv_topk_idx, handle


def _dispatch_backward(ctx, grad_recv_x, grad_scales, grad_idx, grad_recv_w, grad_counts, grad_handle):
    if ctx.fp8:
        raise RuntimeError(_FP8_NO_GRAD)
    recv_topk_idx, handle = ctx.saved_tensors
    grad_w = None
    if ctx.needs_input_grad[3]:
        if grad_recv_w is None:
            grad_recv_w = torch.zeros(recv_topk_idx.shape, dtype=torch.float32, device=recv_topk_idx.device)
        # recv_topk_weights is 0 where the expert is not local: those entries get no gradient here.
        grad_w = torch.where(recv_topk_idx >= 0, grad_recv_w, 0.0).contiguous()
    grad_x, grad_topk_w = torch.ops.epcomm.combine(grad_recv_x.contiguous(), grad_w, handle, ctx.num_tokens)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        None, None,
        grad_topk_w if grad_w is not None else None,
        None, None, None,
    )


def _combine_setup(ctx, inputs, output) -> None:
    x, topk_weights, handle, _ = inputs
    ctx.num_recv = x.size(0)
    ctx.has_weights = topk_weights is not None
    ctx.save_for_backward(handle)


def _combine_backward(ctx, grad_x, grad_w):
    (handle,) = ctx.saved_tensors
    grad_in = torch.ops.epcomm.cached_dispatch(grad_x.contiguous(), handle, ctx.num_recv)
    grad_in_w = None
    if ctx.has_weights and ctx.needs_input_grad[1]:
        grad_in_w = torch.ops.epcomm.cached_dispatch(grad_w.contiguous(), handle, ctx.num_recv)
    return grad_in, grad_in_w, None, None


def _cached_dispatch_setup(ctx, inputs, output) -> None:
    x, handle, _ = inputs
    ctx.num_tokens = x.size(0)
    ctx.save_for_backward(handle)


def _cached_dispatch_backward(ctx, grad_recv):
    (handle,) = ctx.saved_tensors
    return torch.ops.epcomm.combine(grad_recv.contiguous(), None, handle, ctx.num_tokens)[0], None, None


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)
_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)
_cached_dispatch_op.register_autograd(_cached_dispatch_backward, setup_context=_cached_dispatch_setup)

for _op in (torch.ops.epcomm.dispatch.default, torch.ops.epcomm.combine.default,
            torch.ops.epcomm.cached_dispatch.default):
    torch.fx.node.has_side_effect(_op)  # collectives: never dead-code eliminated on one rank only


# ------------------------------------------------------------ the wrappers
class Dispatched(NamedTuple):
    """What :func:`dispatch` returns (the tensor form of DeepEP's dispatch outputs).

    Attributes:
        recv_x: ``[num_recv, hidden]``, x's dtype (an FP8 pair ``(data, float32 scales [num_recv, hidden // 128])``
            for FP8 input): one row per (token, this rank) pair, by source rank then token.
        recv_topk_idx: ``[num_recv, num_topk]`` int64, local expert ids, ``-1`` for other ranks' experts.
        recv_topk_weights: ``[num_recv, num_topk]`` float32, ``0`` where recv_topk_idx is ``-1``.
        num_recv_tokens_per_expert: ``[num_local_experts]`` int64, rows per local expert rounded up
            to ``expert_alignment`` (``.tolist()`` is DeepEP's ``num_recv_tokens_per_expert_list``).
        handle: int64 ``[1]`` CPU handle tensor for :func:`combine` and :func:`cached_dispatch`.
    """

    recv_x: Union[Tensor, tuple[Tensor, Tensor]]
    recv_topk_idx: Tensor
    recv_topk_weights: Tensor
    num_recv_tokens_per_expert: Tensor
    handle: Tensor


def dispatch(
    buffer: Buffer,
    x: Union[Tensor, tuple[Tensor, Tensor]],
    topk_idx: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    expert_alignment: int = 1,
) -> Dispatched:
    """Differentiable :meth:`Buffer.get_dispatch_layout` + :meth:`Buffer.dispatch` (a collective).

    Args:
        buffer: the :class:`~epcomm.Buffer` (registered by :func:`buffer_key`).
        x: ``[num_tokens, hidden]`` bfloat16, float16 or float32, or an FP8 pair
            ``(float8_e4m3fn [num_tokens, hidden], float32 [num_tokens, hidden // 128])`` (forward only).
        topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, ``-1`` for none.
        topk_weights: ``[num_tokens, num_topk]`` float32 gate weights.
        num_experts: total experts, divisible by the world size.
        expert_alignment: round per-expert counts up to a multiple of this.
    Returns:
        :class:`Dispatched`. Gradients flow to ``x`` (from ``recv_x``) and ``topk_weights``
        (from ``recv_topk_weights``); the backward pass is a combine with the same handle.
    Raises:
        RuntimeError: FP8 ``x`` while autograd would need a gradient.
    """
    return _dispatch(buffer_key(buffer), x, topk_idx, topk_weights, num_experts, expert_alignment)


def _dispatch(
    key: int,
    x: Union[Tensor, tuple[Tensor, Tensor]],
    topk_idx: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    expert_alignment: int,
) -> Dispatched:
    """:func:`dispatch` on a registered buffer key (traceable: no registry writes)."""
    scales = None
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"an FP8 x must be a pair (data, scales), got a tuple of {len(x)}")
        x, scales = x
        if torch.is_grad_enabled() and (topk_weights.requires_grad or x.requires_grad or scales.requires_grad):
            raise RuntimeError(_FP8_NO_GRAD)
    recv_x, recv_scales, recv_idx, recv_w, counts, handle = torch.ops.epcomm.dispatch(
        x, scales, topk_idx, topk_weights, key, num_experts, expert_alignment
    )
    if scales is not None:
        recv_x = (recv_x, recv_scales)
    return Dispatched(recv_x, recv_idx, recv_w, counts, handle)


def combine(x: Tensor, handle: Tensor, num_tokens: int, topk_weights: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Differentiable :meth:`Buffer.combine` (a collective); its backward is a cached dispatch.

    Args:
        x: ``[num_recv, hidden]`` bfloat16, float16 or float32, rows in dispatch's order.
        handle: ``Dispatched.handle`` of that dispatch.
        num_tokens: tokens this rank dispatched (``x_dispatched.size(0)``; a SymInt under compile).
        topk_weights: ``[num_recv, num_topk]`` float32, summed the same way (optional).
    Returns:
        ``combined_x`` ``[num_tokens, hidden]`` x's dtype (per token, the fp32 sum of its rows, cast once),
        and ``combined_topk_weights`` ``[num_tokens, num_topk]`` float32 or ``None``.
    """
    combined, combined_w = torch.ops.epcomm.combine(x, topk_weights, handle, num_tokens)
    return combined, (combined_w if topk_weights is not None else None)


def cached_dispatch(x: Tensor, handle: Tensor, num_recv: int) -> Tensor:
    """Differentiable cached dispatch: ``x`` ``[num_tokens, hidden]`` -> ``[num_recv, hidden]``.

    ``num_recv`` is ``Dispatched.recv_x.size(0)`` of the dispatch that made ``handle``.
    The backward pass is a combine.
    """
    return torch.ops.epcomm.cached_dispatch(x, handle, num_recv)
