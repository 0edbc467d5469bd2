"""Low-latency (LL) mode: DeepEP's ``low_latency_dispatch`` / ``low_latency_combine`` contract.

For decoding: a few dozen to a few hundred tokens per rank, outputs of fixed shape (so a decode step
can be captured in a CUDA graph), the FP8 cast done by the communication, a receive *hook* (the call
only sends; ``hook()`` receives, so the caller can compute in between) and a combine that applies the
routing weights.

Shapes (``R`` ranks, ``E`` experts, ``E_loc = E // R`` on each rank, rank ``r`` hosts experts
``[r * E_loc, (r + 1) * E_loc)``, ``M = num_max_dispatch_tokens_per_rank``, ``H`` hidden):

* dispatch: ``x`` bf16 ``[N, H]`` with ``N <= M``, ``topk_idx`` int64 ``[N, K]`` (``-1``: none; an
  expert at most once per row) -> ``recv_x`` ``[E_loc, R * M, H]`` (bf16, or an FP8 tuple),
  ``recv_count`` int32 ``[E_loc]``, a :class:`LowLatencyHandle`, an event and a hook.
* combine: ``x`` bf16 ``[E_loc, R * M, H]`` (expert outputs, row for row as dispatch delivered them)
  -> ``[N, H]`` bf16: ``sum_k topk_weights[n, k] * row(n, k)`` over the valid ``k`` ascending,
  accumulated in float32 from 0 and rounded once.

Order (order-strict determinism): inside local expert ``j``, source rank ``s``'s rows are the slice
``[begin, begin + count)`` (``layout_range[j, s] = begin << 32 | count``), slices by ascending source
rank tile ``[0, recv_count[j])``, and inside a slice rows follow the source's token index. Rows past
``recv_count[j]`` hold anything (NaN included) in every input and output and are never read.

Double buffering: an LL dispatch writes into one of two buffer slots (alternating), so the results
of the two latest LL dispatches are alive at once; the third dispatch reuses the first's slot and
overwrites its ``recv_x``. Combine, the hook and :meth:`Buffer.get_next_low_latency_combine_buffer`
refuse a handle whose slot was reused (a clear error, never silent corruption); tensors the caller
still holds from such a dispatch cannot be guarded and must not be read.

Checks: eagerly, every LL call validates its inputs (values included) and agrees with the other
ranks in one small collective, so bad input on one rank raises :class:`~epcomm.EpcommInputError` on
every rank before anything is sent. While a CUDA graph is being captured, or inside
:func:`host_sync_free`, a call reads no tensor value on the host and runs no agreement: it checks
only what the host knows (shapes, dtypes, flags) and raises on the rank that sees the problem.
Capture after an eager warm-up step so the full checks have run once on the same shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ._validate import Invalid, check_tensor, describe, device_of, problem_text
from .graphs import is_capturing

__all__ = [
    "LowLatencyLayout",
    "LowLatencyHandle",
    "LowLatencyDispatchCall",
    "LowLatencyCombineCall",
    "host_sync_free",
    "is_host_sync_free",
    "MAX_TOPK",
]

#: Largest top-k the LL path takes (DeepEP's kernels stop at 9; decoding models use up to 8).
MAX_TOPK = 16
_HEADER_BYTES = 16  # a message's header: the source token index, padded to one 16-byte vector
_REGION_ALIGN = 128  # every region of the kernels' LL workspace starts 128-byte aligned

_host_sync_free: contextvars.ContextVar[bool] = contextvars.ContextVar("epcomm_ll_host_sync_free", default=False)


@contextlib.contextmanager
def host_sync_free() -> Iterator[None]:
    """LL calls inside this block run as under CUDA graph capture: no host read of a tensor value and
    no agreement collective (only host-side checks of shapes, dtypes and flags, raised locally).

    Cached dispatch and combine on the kernel backends wait for nothing on the host either: their call
    check is judged on the device, where it gates the data kernel (``Buffer._agree_along_handle``); a
    rank whose call differs makes every rank raise, its peers when their kernel's report is read."""
    token = _host_sync_free.set(True)
    try:
        yield
    finally:
        _host_sync_free.reset(token)


def is_host_sync_free() -> bool:
    """Whether LL calls must not read tensors on the host now (inside :func:`host_sync_free`, or while
    a graph captures: the current CUDA stream, or a :class:`~epcomm.graphs.SimGraph`)."""
    return _host_sync_free.get() or is_capturing()


@dataclass(frozen=True)
class LowLatencyLayout:
    """The fixed shapes of LL calls and the exact bytes the kernel backends' LL workspace takes.

    A *message* is one (token, expert) row on the wire: a 16-byte header (the source token index)
    and the payload; its slot is sized for bf16 (FP8 messages use the first bytes of the same slots).
    The kernels' layout (``csrc/kernels/low_latency.hpp``, ``LowLatencyLayout``), mirrored here so the
    size hint needs no extension; ``tests/test_low_latency.py`` checks that both agree. Every region
    starts 128-byte aligned:

    * signals: uint64 ``[4E + 1]`` (dispatch ``[2][E_loc][R]``, combine ``[2][E]``, abort);
    * generations: uint64 ``[2][2]`` (each slot's dispatches and combines since the last clean);
    * two slots (double buffering), each: count staging int32 ``[E]``, counts int32 ``[E_loc, R]``,
      dispatch staging ``[M]`` messages (each token once, quantized), dispatch receive
      ``[E_loc, R, M]`` messages, combine send bf16 ``[E_loc, R * M, H]`` (the zero-copy buffer of
      :meth:`Buffer.get_next_low_latency_combine_buffer`), combine receive bf16 ``[E, M, H]``.
    """

    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_ranks: int
    num_experts: int

    def __post_init__(self) -> None:
        for name in ("num_max_dispatch_tokens_per_rank", "hidden", "num_ranks", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_experts % self.num_ranks:
            raise ValueError(f"num_experts={self.num_experts} must be a multiple of the {self.num_ranks} ranks")
        if self.hidden % 8:
            raise ValueError(f"hidden={self.hidden} must be a multiple of 8 (rows move as 16-byte vectors)")

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def recv_rows(self) -> int:
        """Rows per local expert in ``recv_x`` (``R * M``)."""
        return self.num_ranks * self.num_max_dispatch_tokens_per_rank

    def payload_bytes(self, use_fp8: bool) -> int:
        """A token's bytes on the wire without the header: bf16 ``2H``; FP8 ``H`` + float32 scales ``4 * H / 128``."""
        return self.hidden + 4 * (self.hidden // 128) if use_fp8 else 2 * self.hidden

    @property
    def message_bytes(self) -> int:
        """One message slot: header + bf16 payload (the largest), 16-byte aligned."""
        return _align(_HEADER_BYTES + self.payload_bytes(False), 16)

    @property
    def num_signals(self) -> int:
        """Transport signals of the layout: dispatch ``[2][E_loc][R]``, combine ``[2][E]``, abort."""
        return 4 * self.num_experts + 1

    @property
    def signals_bytes(self) -> int:
        return 8 * self.num_signals

    @property
    def generations_bytes(self) -> int:
        """uint64 ``[2 (slot)][dispatch, combine]``: the calls on each slot since the last clean, counted by
        the send kernels in each rank's own memory (so a replayed CUDA graph counts too)."""
        return 8 * 4

    def slot_regions(self) -> dict[str, int]:
        """Bytes of each region of one buffer slot, in layout order."""
        m, r, e, e_loc, h = (self.num_max_dispatch_tokens_per_rank, self.num_ranks, self.num_experts,
                             self.num_local_experts, self.hidden)
        return {
            "count_staging": 4 * e,
            "counts": 4 * e_loc * r,
            "dispatch_staging": m * self.message_bytes,
            "dispatch_recv": e_loc * r * m * self.message_bytes,
            "combine_send": e_loc * r * m * 2 * h,
            "combine_recv": e * m * 2 * h,
        }

    @property
    def slot_bytes(self) -> int:
        return sum(_align(v, _REGION_ALIGN) for v in self.slot_regions().values())

    @property
    def rdma_bytes(self) -> int:
        """Exact bytes of the LL workspace on each rank: the signals, the generations and two slots."""
        return (_align(self.signals_bytes, _REGION_ALIGN) + _align(self.generations_bytes, _REGION_ALIGN)
                + 2 * self.slot_bytes)


def _align(n: int, to: int = 16) -> int:
    return (n + to - 1) // to * to


class LowLatencyHandle(tuple):
    """What a LL dispatch hands to its combine. Indexable like DeepEP's handle tuple:

    ``handle[0]`` ``src_info`` int32 ``[E_loc, R * M]`` (each received row's token index on its source
    rank), ``handle[1]`` ``layout_range`` int64 ``[E_loc, R]`` (``begin << 32 | count`` per source
    rank), ``handle[2]`` ``num_max_dispatch_tokens_per_rank``, ``handle[3]`` ``hidden``,
    ``handle[4]`` ``num_experts``. The rest is epcomm's (attributes), not part of the tuple.
    """

    src_info: torch.Tensor
    layout_range: torch.Tensor

    def __new__(cls, src_info: torch.Tensor, layout_range: torch.Tensor, layout: LowLatencyLayout,
                **state: object) -> "LowLatencyHandle":
        self = super().__new__(cls, (src_info, layout_range, layout.num_max_dispatch_tokens_per_rank,
                                     layout.hidden, layout.num_experts))
        self.__dict__.update(state, layout=layout)
        return self

    @property
    def src_info(self) -> torch.Tensor:  # type: ignore[override]
        return self[0]

    @property
    def layout_range(self) -> torch.Tensor:  # type: ignore[override]
        return self[1]

    def __repr__(self) -> str:
        layout = self.__dict__["layout"]
        return (f"LowLatencyHandle(dispatch #{self.__dict__['seq']}, slot {self.__dict__['slot']}, "
                f"num_max={layout.num_max_dispatch_tokens_per_rank}, hidden={layout.hidden}, "
                f"num_experts={layout.num_experts})")

    def __reduce__(self):  # a handle names live buffers: it must not travel
        raise TypeError("a LowLatencyHandle cannot be pickled or copied to another process")


@dataclass
class LowLatencyDispatchCall:
    """One LL dispatch after validation (and agreement), as a backend receives it.

    Attributes:
        x: bf16 ``[N, H]``; topk_idx: int64 ``[N, K]``.
        layout: the call's shapes. slot: the buffer slot (0/1), alternating per dispatch.
        use_fp8, round_scale, use_ue8m0: DeepEP's flags.
        recv_stats: int32 ``[E_loc]`` to add received rows to, or None.
        wait_stats: int64 ``[R]`` to add receive wait time to, or None.
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    layout: LowLatencyLayout
    slot: int
    use_fp8: bool
    round_scale: bool
    use_ue8m0: bool
    recv_stats: torch.Tensor | None
    wait_stats: torch.Tensor | None


@dataclass
class LowLatencyDispatchResult:
    """What a backend's LL send phase returns; tensors are filled when ``receive`` has run."""

    recv_x: torch.Tensor  # [E_loc, R*M, H] bf16 or float8_e4m3fn
    recv_scales: torch.Tensor | None  # [E_loc, R*M, H/128] float32 or [E_loc, R*M, H/512] int32 (UE8M0), token-fastest
    recv_count: torch.Tensor  # [E_loc] int32
    src_info: torch.Tensor  # [E_loc, R*M] int32
    layout_range: torch.Tensor  # [E_loc, R] int64
    token_slots: torch.Tensor  # [N, K] int32: p of (n, k) (its position among this rank's tokens of that expert)
    receive: Callable[[], None]


@dataclass
class LowLatencyCombineCall:
    """One LL combine after validation: ``x`` bf16 ``[E_loc, R*M, H]``, the dispatch's ``topk_idx``
    and ``token_slots`` ``[N, K]``, ``topk_weights`` float32 ``[N, K]``, the dispatch's
    ``layout_range``, its ``slot``, and ``out`` bf16 ``[N, H]`` to write."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    token_slots: torch.Tensor
    layout_range: torch.Tensor
    layout: LowLatencyLayout
    slot: int
    out: torch.Tensor
    zero_copy: bool


@dataclass
class LowLatencyState:
    """A Buffer's LL bookkeeping, identical on every rank (LL calls are collective)."""

    dispatches: int = 0  # LL dispatches since construction
    needs_clean: bool = False  # a normal-mode call ran since the last clean (DeepEP's rule)
    cleans: int = 0  # clean_low_latency_buffer calls
    normal_calls: int = 0  # normal-mode calls (each ends the LL calls before it: their hooks are refused)
    pending: dict[int, str] = field(default_factory=dict)  # dispatch seq -> what it waits for ("hook")

    def slot_owner_ok(self, seq: int) -> bool:
        """Whether dispatch #seq's slot still holds its results (it is one of the two latest)."""
        return self.dispatches - 2 < seq <= self.dispatches


# ------------------------------------------------------------------ validation (raise Invalid)

def check_dispatch_inputs(x: object, topk_idx: object, num_max: object, num_experts: object, world_size: int,
                          use_fp8: bool, round_scale: bool, use_ue8m0: bool, async_finish: bool,
                          return_recv_hook: bool, recv_stats: object, wait_stats: object,
                          read_values: bool) -> LowLatencyLayout:
    """Local checks of a LL dispatch; values (expert ids) only with ``read_values``."""
    if async_finish and return_recv_hook:
        raise Invalid("async_finish=True and return_recv_hook=True exclude each other: with the hook, the "
                      "receive runs when you call hook(); pass one of them")
    for name, flag in (("use_fp8", use_fp8), ("round_scale", round_scale), ("use_ue8m0", use_ue8m0)):
        if not isinstance(flag, bool):
            raise Invalid(f"{name} must be a bool, got {flag!r}")
    if round_scale and not use_fp8:
        raise Invalid("round_scale=True needs use_fp8=True (it rounds the FP8 scales)")
    if use_ue8m0 and not round_scale:
        raise Invalid("use_ue8m0=True needs round_scale=True (UE8M0 stores power-of-two scales)")
    if isinstance(num_max, bool) or not isinstance(num_max, int) or num_max < 1:
        raise Invalid(f"num_max_dispatch_tokens_per_rank must be a positive int, got {num_max!r}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < world_size \
            or num_experts % world_size:
        raise Invalid(f"num_experts must be a positive multiple of the {world_size} ranks, got {num_experts!r}")
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2)
    num_tokens, hidden = x.shape
    if num_tokens > num_max:
        raise Invalid(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={num_max}")
    if use_fp8 and hidden % 128:
        raise Invalid(f"hidden={hidden} must be a multiple of 128 for FP8 (one scale per 128 values)")
    if use_ue8m0 and hidden % 512:
        raise Invalid(f"hidden={hidden} must be a multiple of 512 with use_ue8m0 (four scales per int32)")
    if hidden % 8 or hidden == 0:
        raise Invalid(f"hidden={hidden} must be a positive multiple of 8 (rows move as 16-byte vectors)")
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2, shape=(num_tokens, None), device=x.device)
    num_topk = topk_idx.size(1)
    if not 1 <= num_topk <= MAX_TOPK:
        raise Invalid(f"topk_idx has {num_topk} columns; the LL path takes 1..{MAX_TOPK}")
    layout = LowLatencyLayout(num_max, hidden, world_size, num_experts)
    if recv_stats is not None:
        check_tensor("cumulative_local_expert_recv_stats", recv_stats, dtypes=(torch.int32,), ndim=1,
                     shape=(layout.num_local_experts,), device=x.device)
    if wait_stats is not None:
        check_tensor("dispatch_wait_recv_cost_stats", wait_stats, dtypes=(torch.int64,), ndim=1,
                     shape=(world_size,), device=x.device)
    if read_values:
        check_expert_ids(topk_idx, num_experts)
    return layout


def check_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Expert ids in ``[-1, num_experts)``, no expert twice in a row (reads values: a host sync on GPU)."""
    if topk_idx.numel() == 0:
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        n, k = (int(v) for v in bad.nonzero()[0])
        raise Invalid(f"topk_idx[{n}, {k}] = {int(topk_idx[n, k])} is not an expert id in [-1, {num_experts})")
    ordered = topk_idx.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        n = int(repeated.nonzero()[0, 0])
        raise Invalid(f"token {n} names an expert twice in topk_idx ({topk_idx[n].tolist()}); each (token, expert) "
                      "pair is dispatched once, so an expert may appear at most once per row")


def check_combine_inputs(handle: object, x: object, topk_idx: object, topk_weights: object, out: object,
                         zero_copy: bool, use_logfmt: bool, async_finish: bool, return_recv_hook: bool,
                         buffer_id: int, state: LowLatencyState, zero_copy_buffer: Callable[[object], object],
                         read_values: bool) -> LowLatencyHandle:
    """Local checks of a LL combine; ``topk_idx`` against the dispatch's only with ``read_values``."""
    if async_finish and return_recv_hook:
        raise Invalid("async_finish=True and return_recv_hook=True exclude each other: with the hook, the "
                      "receive runs when you call hook(); pass one of them")
    if use_logfmt:
        raise Invalid("use_logfmt=True is not implemented by epcomm (combine sends bf16 rows); pass use_logfmt=False")
    handle = check_handle(handle, buffer_id, state)
    layout: LowLatencyLayout = handle.layout
    e_loc, rows, hidden = layout.num_local_experts, layout.recv_rows, layout.hidden
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=3, shape=(e_loc, rows, hidden))
    if zero_copy and x.data_ptr() != zero_copy_buffer(handle).data_ptr():
        raise Invalid("zero_copy=True takes as x the tensor get_next_low_latency_combine_buffer(handle) returned "
                      "(write the expert outputs into it); got another tensor")
    dispatched = handle.topk_idx
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), ndim=2, shape=tuple(dispatched.shape), device=x.device)
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2, shape=tuple(dispatched.shape),
                 device=x.device)
    if out is not None:
        check_tensor("out", out, dtypes=(torch.bfloat16,), ndim=2, shape=(dispatched.size(0), hidden), device=x.device)
    if read_values and not torch.equal(topk_idx, dispatched):
        raise Invalid("topk_idx differs from the one low_latency_dispatch was given for this handle; combine "
                      "returns rows along the dispatch's routing, so pass the same topk_idx")
    return handle


def check_handle(handle: object, buffer_id: int, state: LowLatencyState) -> LowLatencyHandle:
    if not isinstance(handle, LowLatencyHandle):
        raise Invalid(f"handle must be the LowLatencyHandle low_latency_dispatch returned, got {describe(handle)}")
    info = handle.__dict__
    if info["buffer_id"] != buffer_id:
        raise Invalid("handle was made by a different Buffer; use the Buffer that dispatched")
    seq = info["seq"]
    if not state.slot_owner_ok(seq):
        raise Invalid(
            f"handle of LL dispatch #{seq} is stale: dispatch #{seq + 2} reused its buffer slot (at most two LL "
            f"results are alive at once, double buffering); combine each dispatch before the next-but-one dispatch"
        )
    if info["cleans"] != state.cleans:
        raise Invalid(f"handle of LL dispatch #{seq} predates clean_low_latency_buffer(); dispatch again")
    if seq in state.pending:
        raise Invalid(f"LL dispatch #{seq} has not received yet: call its hook() before using its handle")
    return handle


# ------------------------------------------------------------------ the calls (Buffer delegates here)

_OPS = {"low_latency_dispatch": 4, "low_latency_combine": 5, "clean_low_latency_buffer": 6}


def _flags(**flags: bool) -> int:
    bits = {"use_fp8": 1, "round_scale": 2, "use_ue8m0": 4, "return_recv_hook": 8, "zero_copy": 16, "out": 32}
    return sum(bit for name, bit in bits.items() if flags.get(name))


class LowLatencyOps:
    """A Buffer's LL calls: validation, the cross-rank agreement, slots and hooks; the backend's LL
    engine moves the bytes. Every method but :meth:`size_hint` is collective."""

    def __init__(self, buffer: "object") -> None:
        self._buffer_ref = weakref.ref(buffer)  # no cycle: a dropped Buffer is freed at once
        self.state = LowLatencyState()
        self._engine = None

    @property
    def _buffer(self):
        buffer = self._buffer_ref()
        if buffer is None:
            raise RuntimeError("the Buffer of these low-latency calls no longer exists")
        return buffer

    # -- helpers
    def _engine_or_raise(self):
        if self._engine is None:
            self._engine = self._buffer._impl.low_latency()
        return self._engine

    def _agree(self, op: str, problem: str | None, device: torch.device, **signature: int) -> None:
        from ._agree import agree  # late: _agree imports _comm, which the tests may stub

        if is_host_sync_free():
            if problem is not None:
                from .errors import EpcommInputError

                raise EpcommInputError(op, {self._buffer.rank: problem + " (checked on this rank only: no "
                                            "agreement while capturing a graph)"}, self._buffer.group_size)
            return
        full = dict(operation=_OPS[op], **self._buffer._common_signature(), **signature)
        agree(self._buffer._comm, op, problem, full, None, device)

    def _precheck(self) -> None:
        if not getattr(self._buffer, "low_latency_mode", False):
            raise Invalid("low-latency calls need Buffer(..., low_latency_mode=True)")
        if self.state.needs_clean:
            raise Invalid("a normal-mode dispatch/combine ran on this Buffer since the last LL call: call "
                          "clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts) "
                          "first (as DeepEP requires)")
        self._engine_or_raise()

    def note_normal_call(self) -> None:
        """A normal-mode call ran: LL calls need a clean first (they share the buffer, as in DeepEP), and the
        hooks not yet called are refused (the re-layout settled their signals and zeroed the region they would
        read; ``SimLowLatency.settle_signals``)."""
        self.state.needs_clean = True
        self.state.normal_calls += 1
        self.state.pending.clear()

    # -- dispatch
    def dispatch(self, x, topk_idx, num_max, num_experts, recv_stats, wait_stats, use_fp8, round_scale,
                 use_ue8m0, async_finish, return_recv_hook):
        from .event import EventOverlap

        op = "low_latency_dispatch"
        problem, layout = None, None
        read_values = not is_host_sync_free()
        try:
            self._precheck()
            layout = check_dispatch_inputs(x, topk_idx, num_max, num_experts, self._buffer.group_size, use_fp8,
                                           round_scale, use_ue8m0, async_finish, return_recv_hook, recv_stats,
                                           wait_stats, read_values)
            self._engine.check_dispatch(layout, {"x": x, "topk_idx": topk_idx, "cumulative_local_expert_recv_stats":
                                                 recv_stats, "dispatch_wait_recv_cost_stats": wait_stats})
        except Exception as err:
            problem = problem_text(err, plain=(Invalid, ValueError))
        self._agree(op, problem, device_of(x), num_experts=_int_or(num_experts), num_max_dispatch_tokens=_int_or(num_max),
                    hidden=layout.hidden if layout else -1,
                    num_topk=topk_idx.size(1) if layout else -1,
                    low_latency_flags=_flags(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
                                             return_recv_hook=return_recv_hook))
        state = self.state
        seq = state.dispatches + 1
        slot = (seq - 1) % 2
        state.dispatches = seq
        call = LowLatencyDispatchCall(x, topk_idx, layout, slot, use_fp8, round_scale, use_ue8m0, recv_stats,
                                      wait_stats)
        result = self._engine.dispatch(call)
        handle = LowLatencyHandle(result.src_info, result.layout_range, layout, seq=seq, slot=slot,
                                  cleans=state.cleans, buffer_id=self._buffer.id,
                                  topk_idx=topk_idx.clone(), token_slots=result.token_slots)
        recv_x = result.recv_x if result.recv_scales is None else (result.recv_x, result.recv_scales)
        hook = self._hook(seq, seq, result.receive, op, f"LL dispatch #{seq}")
        if not return_recv_hook:
            hook()
            hook = None
        return recv_x, result.recv_count, handle, EventOverlap.capture(x.device), hook

    def _hook(self, pending_key: int, seq: int, receive: Callable[[], None], op: str, what: str) -> Callable[[], None]:
        """The receive half of the call ``what`` (of LL dispatch ``seq``'s slot), run once; pending under
        ``pending_key`` until then. Refused once dispatch ``seq + 2`` reused the slot its data lands in."""
        state = self.state
        state.pending[pending_key] = op
        done, normal_calls = False, state.normal_calls

        def hook() -> None:
            nonlocal done
            if done:
                return
            if state.normal_calls != normal_calls:
                raise RuntimeError(f"epcomm {op}: the hook of {what} came after a normal-mode call, which ends the LL "
                                   "calls before it (the kernel backends re-lay the shared buffer); call hooks before "
                                   "normal-mode calls")
            if not state.slot_owner_ok(seq):
                state.pending.pop(pending_key, None)
                raise RuntimeError(f"epcomm {op}: the hook of {what} came after dispatch #{seq + 2} reused its "
                                   "buffer slot; call each hook before the next-but-one dispatch")
            receive()
            done = True
            state.pending.pop(pending_key, None)

        return hook

    # -- combine
    def combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy, async_finish, return_recv_hook, out):
        from .event import EventOverlap

        op = "low_latency_combine"
        problem = None
        read_values = not is_host_sync_free()
        try:
            self._precheck()
            handle = check_combine_inputs(handle, x, topk_idx, topk_weights, out, zero_copy, use_logfmt, async_finish,
                                          return_recv_hook, self._buffer.id, self.state, self.combine_buffer,
                                          read_values)
            self._engine.check_combine(handle.layout, {"x": x, "topk_weights": topk_weights, "out": out})
        except Exception as err:
            problem = problem_text(err, plain=(Invalid, ValueError))
        ok = problem is None
        info = handle.__dict__ if ok else {}
        self._agree(op, problem, device_of(x), handle=info.get("seq", -1),
                    hidden=info["layout"].hidden if ok else -1,
                    low_latency_flags=_flags(zero_copy=zero_copy, return_recv_hook=return_recv_hook, out=out is not None))
        layout = info["layout"]
        if out is None:
            out = torch.empty((topk_idx.size(0), layout.hidden), dtype=torch.bfloat16, device=x.device)
        call = LowLatencyCombineCall(x, info["topk_idx"], topk_weights, info["token_slots"], handle.layout_range,
                                     layout, info["slot"], out, zero_copy)
        receive = self._engine.combine(call)
        seq = info["seq"]
        # combines are pending under the negative of their dispatch's number
        hook = self._hook(-seq, seq, receive, op, f"the combine of LL dispatch #{seq}")
        if not return_recv_hook:
            hook()
            return out, EventOverlap.capture(out.device), None
        return out, EventOverlap.capture(out.device), hook

    def combine_buffer(self, handle: object) -> torch.Tensor:
        """The bf16 ``[E_loc, R * M, H]`` zero-copy send buffer of ``handle``'s slot."""
        if not isinstance(handle, LowLatencyHandle):
            raise Invalid(f"handle must be the LowLatencyHandle low_latency_dispatch returned, got {describe(handle)}")
        if not self.state.slot_owner_ok(handle.__dict__["seq"]):
            check_handle(handle, self._buffer.id, self.state)  # raises the stale-handle message
        if self.state.needs_clean or handle.__dict__["cleans"] != self.state.cleans:
            raise Invalid("handle's buffer was reused by a normal-mode call or a clean since its dispatch; dispatch "
                          "again (after clean_low_latency_buffer) for a new combine buffer")
        info = handle.__dict__
        return self._engine_or_raise().combine_buffer(info["slot"], info["layout"])

    # -- clean
    def clean(self, num_max, hidden, num_experts) -> None:
        op = "clean_low_latency_buffer"
        problem = None
        try:
            if not getattr(self._buffer, "low_latency_mode", False):
                raise Invalid("clean_low_latency_buffer needs Buffer(..., low_latency_mode=True)")
            LowLatencyLayout(num_max, hidden, self._buffer.group_size, num_experts)
            if self.state.pending:
                raise Invalid(f"LL calls still wait for their hooks (dispatch #{sorted(self.state.pending)}); call "
                              "them before cleaning")
            self._engine_or_raise()
        except Exception as err:
            problem = problem_text(err, plain=(Invalid, ValueError))
        self._agree(op, problem, torch.device("cpu"), num_max_dispatch_tokens=_int_or(num_max), hidden=_int_or(hidden),
                    num_experts=_int_or(num_experts))
        self._engine.clean(LowLatencyLayout(num_max, hidden, self._buffer.group_size, num_experts))
        state = self.state
        state.needs_clean = False
        state.cleans += 1


def _int_or(value: object, default: int = -1) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
