"""The two kernel paths the kernel backends (``sim``, ``cuda``) drive, as typed kernel calls.

* :class:`IntranodePath` (one node): ``intranode_notify`` / ``_dispatch`` / ``_combine`` over NVLink
  rings in each rank's NVL buffer (csrc/runtime/intranode_entries.hpp).
* :class:`InternodePath` (several nodes): the two-hop ``internode_*`` kernels: network rings in a
  symmetric RDMA region (sim: after the NVL region in each buffer; cuda: the NCCL GIN window, with
  ``rdma_offset`` bounding the NVL region only), forwarders, node partials (csrc/runtime/internode_entries.hpp).

A kernel call is ``runtime.run(spec, params, timeout_s)``. Both are structs of the extension whose
fields are the kernels' own (csrc/kernels/intranode.hpp, internode.hpp): the ``*Spec`` holds the
kernel config and the workspace shape every rank lays its buffers out with, the ``*Params`` the
kernel's arguments, set here by name (the extension rejects unknown and missing names). A path
builds both from tensors; every rank uses the same spec for a call. ``covering`` grows a spec so
that a dispatch's workspace also holds its combine (no re-layout in between, when it can be avoided).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

from .._agree import X_KINDS
from ..config import Config
from ..topology import Topology
from .base import ExpertCounts

__all__ = ["IntranodePath", "InternodePath", "NotifyOutputs", "ELEMENT_KINDS", "covering",
           "rdma_offset", "row_bytes"]

# combine's row element types: kernels/elements.cuh ElementKind (the same codes as the call signature's)
ELEMENT_KINDS = X_KINDS
_REGION_ALIGNMENT = 4096  # the RDMA region starts on a page


def rdma_offset(nvl_bytes: int) -> int:
    """Where the RDMA region starts in a rank's buffer: after the NVL region, on a page."""
    return -(-nvl_bytes // _REGION_ALIGNMENT) * _REGION_ALIGNMENT


def row_bytes(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes of an x row, bytes of a scales row) of a dispatch's tensors."""
    x = tensors["x"]
    scales = tensors.get("scales")
    return x.size(1) * x.element_size(), (scales.size(1) * scales.element_size() if scales is not None else 0)


def _fields(struct) -> dict:
    return {name: getattr(struct, name) for name in type(struct).FIELDS}


def covering(spec, other):
    """``spec`` with every int field of its workspace grown to ``other``'s (element-wise max)."""
    grown = {name: max(a, b) for (name, a), b in zip(_fields(spec.workspace).items(), _fields(other.workspace).values())}
    fields = _fields(spec)
    fields["workspace"] = type(spec.workspace)(**grown)
    if "nvl_max_row_bytes" in fields:
        fields["nvl_max_row_bytes"] = max(spec.nvl_max_row_bytes, other.nvl_max_row_bytes)
    return type(spec)(**fields)


def _data_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


class NotifyOutputs(NamedTuple):
    """What a notify with counts writes: ``rank_prefix`` int32 ``[R + 1]``, ``channel_prefix`` int32
    ``[R, C + 1]``, ``forward_prefix`` int32 ``[nodes, C + 1]`` (internode, else None) and
    ``expert_counts`` int32 ``[E / R]`` rows this rank receives per local expert, rounded up to the
    alignment (None: not asked)."""

    rank_prefix: torch.Tensor
    channel_prefix: torch.Tensor
    forward_prefix: torch.Tensor | None
    expert_counts: torch.Tensor | None = None


NO_CALL_CHECK = -1  # call_flags of a notify without a call check (kernels/call_check.cuh kNoCallCheck)
CALL_REFUSED, CALL_NEEDS_LAYOUT = 1, 2  # call_flags bits (kCallRefused, kCallNeedsLayout)


def _notify_fields(in_rank: torch.Tensor | None, num_tokens: int, outputs: NotifyOutputs | None,
                   call: tuple[int, int, torch.Tensor] | None, experts: ExpertCounts | None) -> dict:
    """The notify fields both paths share; ``in_rank=None``: no counts; ``call``: (digest, flags, agreed int32
    [1], or [3]: the verdict, then the first rank that differed and its flags, for a data kernel's gate);
    ``experts`` (with ``outputs.expert_counts``): per-expert counts too."""
    digest, flags, agreed = call if call is not None else (0, NO_CALL_CHECK, None)
    mismatch = agreed.data_ptr() + 4 if agreed is not None and agreed.numel() >= 3 else None
    rank_prefix, channel_prefix, _, expert_counts = outputs if outputs is not None else (None,) * 4
    sent, alignment = (experts.sent, experts.alignment) if experts is not None and expert_counts is not None else (None, 1)
    return dict(exchange_counts=in_rank is not None, is_token_in_rank=_data_ptr(in_rank),
                num_tokens_per_expert=_data_ptr(sent), num_tokens=num_tokens, expert_alignment=alignment,
                recv_rank_prefix=_data_ptr(rank_prefix), recv_channel_prefix_matrix=_data_ptr(channel_prefix),
                num_recv_tokens_per_expert=_data_ptr(expert_counts) if sent is not None else None,
                call_digest=digest, call_flags=flags, call_agreed=_data_ptr(agreed), call_mismatch=mismatch)


def _dispatch_fields(plan, t: dict, recv: dict, verdict: torch.Tensor | None = None) -> dict:
    """The dispatch fields both paths share, from the dispatch's inputs ``t`` and outputs ``recv``; ``verdict``:
    the gate (a notify's call check, [3] int32) or None."""
    return dict(x=_data_ptr(t["x"]), hidden_bytes=t["hidden_bytes"], x_scales=_data_ptr(t["scales"]),
                scale_bytes=t["scale_bytes"], topk_idx=_data_ptr(t["topk_idx"]),
                topk_weights=_data_ptr(t["topk_weights"]), num_topk=t["num_topk"], num_experts=t["num_experts"],
                num_tokens=plan.num_tokens, is_token_in_rank=_data_ptr(plan.is_token_in_rank),
                recv_channel_prefix_matrix=_data_ptr(plan.recv_channel_prefix), recv_x=_data_ptr(recv["x"]),
                recv_x_scales=_data_ptr(recv["scales"]), recv_topk_idx=_data_ptr(recv["topk_idx"]),
                recv_topk_weights=_data_ptr(recv["topk_weights"]), recv_src_idx=_data_ptr(recv["src_idx"]),
                call_verdict=_data_ptr(verdict))


def _combine_fields(plan, x: torch.Tensor, weights, num_topk: int, combined, combined_w,
                    verdict: torch.Tensor | None = None) -> dict:
    """The combine fields both paths share (``verdict``: as :func:`_dispatch_fields`)."""
    return dict(x=_data_ptr(x), element_kind=ELEMENT_KINDS[x.dtype], topk_weights=_data_ptr(weights),
                hidden=x.size(1), num_topk=num_topk, num_tokens=plan.num_tokens,
                is_token_in_rank=_data_ptr(plan.is_token_in_rank),
                recv_channel_prefix_matrix=_data_ptr(plan.recv_channel_prefix), combined_x=_data_ptr(combined),
                combined_topk_weights=_data_ptr(combined_w), call_verdict=_data_ptr(verdict))


class _KernelPath:
    """What both paths share: sizing, and the Params of notify, dispatch and combine from tensors.

    A path's kernels take ``<kind>Params`` structs of the extension; a subclass names them and adds
    its own fields (``_extra_*``)."""

    prefix: str
    timeout_share: float
    default_kernel: tuple[int, ...]
    notify_type: str
    dispatch_type: str
    combine_type: str
    # whether the path's kernels count on transport signals (network), which survive a re-layout on
    # some transports (GIN) and are then reset by a notify with reset_signals
    transport_signals = False

    def __init__(self, ext: ModuleType, topo: Topology) -> None:
        self.ext, self.topo = ext, topo

    @staticmethod
    def num_topk(spec) -> int:
        return spec.workspace.num_topk

    def along_handle(self, spec, config: Config | None):
        """The spec of a call along a dispatch's handle: the dispatch's ``spec`` (workspace and channels:
        received rows are placed per channel), with the chunk and ring sizes of ``config`` when given."""
        if config is None:
            return spec
        kernel = self.kernel_config(config, self.num_channels(spec))
        return self.with_kernel(spec, kernel)

    def spec_for_cached_dispatch(self, spec, tensors: dict[str, torch.Tensor]):
        """A dispatch's ``spec`` grown to hold a cached dispatch of ``tensors`` (its kernel config kept)."""
        return self.covering(spec, self.dispatch_spec(spec.config, tensors, 0))

    def spec_for_combine(self, spec, x: torch.Tensor):
        """A dispatch's ``spec`` grown to hold a combine of rows ``x`` (its kernel config and num_topk kept)."""
        return self.covering(spec, self.combine_spec(spec.config, x))

    def region_bytes(self, spec) -> tuple[int, int]:
        """(NVL bytes, RDMA bytes) per rank; in the buffer the RDMA region starts at rdma_offset()."""
        nvl, rdma = self.ext.workspace_bytes(spec)
        return int(nvl), int(rdma)

    def notify_outputs(self, num_channels: int, device, num_local_experts: int = 0,
                       host_zeros: Callable[[int], torch.Tensor] | None = None) -> NotifyOutputs:
        """Zeroed outputs of a notify with counts (``num_local_experts`` > 0: per-expert counts too). Those only
        the host reads (the rank prefix, the per-expert counts) come from ``host_zeros(n)`` when given (int32
        ``[n]`` the kernel can write and the host read without a copy: cuda's pinned memory)."""
        world = self.topo.world_size
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.int32, device=device)  # noqa: E731
        host = host_zeros or zeros
        return NotifyOutputs(host(world + 1), zeros(world, num_channels + 1), self._forward_prefix(num_channels, device),
                             host(num_local_experts) if num_local_experts else None)

    def _forward_prefix(self, num_channels: int, device) -> torch.Tensor | None:
        return None

    @staticmethod
    def num_local_experts(spec) -> int:
        """Experts per rank whose counts a notify in ``spec``'s layout exchanges (0: none)."""
        return spec.workspace.num_local_experts

    def notify_params(self, in_rank: torch.Tensor | None = None, num_tokens: int = 0,
                      outputs: NotifyOutputs | None = None, call: tuple[int, int, torch.Tensor] | None = None,
                      experts: ExpertCounts | None = None, reset_signals: bool = False):
        """A notify: with ``in_rank`` it exchanges the counts into ``outputs``, else it is a barrier; with
        ``experts`` (and ``outputs.expert_counts``) also the per-expert counts. With ``call = (digest, flags,
        agreed)`` it also checks that every rank runs the call ``digest`` and accepts it (flags 0), writing
        the verdict, the same on every rank, into ``agreed`` (kernels/call_check.cuh). ``reset_signals``
        (paths with :attr:`transport_signals`, at a re-layout): after its barrier it zeroes this rank's
        transport signals once the adds still due to them have landed."""
        fields = _notify_fields(in_rank, num_tokens, outputs, call, experts)
        forward_prefix = outputs.forward_prefix if outputs is not None else None
        if reset_signals and not self.transport_signals:
            raise ValueError(f"the {self.prefix} kernels have no transport signals to reset")
        return getattr(self.ext, self.notify_type)(**fields, **self._extra_notify(forward_prefix, reset_signals))

    def dispatch_params(self, plan, counters: torch.Tensor | None, t: dict, recv: dict,
                        verdict: torch.Tensor | None = None):
        return getattr(self.ext, self.dispatch_type)(**_dispatch_fields(plan, t, recv, verdict),
                                                     **self._extra(plan, counters), **self._extra_dispatch(plan))

    def combine_params(self, plan, counters: torch.Tensor | None, x, weights, num_topk: int, combined, combined_w,
                       node_partial_dtype: torch.dtype | None = None, verdict: torch.Tensor | None = None):
        fields = _combine_fields(plan, x, weights, num_topk, combined, combined_w, verdict)
        return getattr(self.ext, self.combine_type)(**fields, **self._extra(plan, counters),
                                                    **self._extra_combine(x, node_partial_dtype, plan))

    def _extra_notify(self, forward_prefix, reset_signals: bool) -> dict:
        return {}

    def _extra_combine(self, x: torch.Tensor, node_partial_dtype: torch.dtype | None, plan) -> dict:
        return {}

    def _extra_dispatch(self, plan) -> dict:
        return {}

    def _extra(self, plan, counters: torch.Tensor | None) -> dict:
        return {}


class IntranodePath(_KernelPath):
    """One node: every rank's NVL buffer holds a ring per (channel, source rank)."""

    prefix = "intranode"
    timeout_share = 1.0  # the kernels' timeout, as a share of the Buffer's (every wait uses it once)
    # with no Config: (num_channels, nvl_chunk_send_tokens, nvl_ring_tokens); small, because every rank
    # simulates 2 x channels blocks of 32 x ranks threads on the host's cores
    default_kernel = (2, 6, 32)
    notify_type, dispatch_type, combine_type = "NotifyParams", "IntranodeDispatchParams", "IntranodeCombineParams"

    def kernel_config(self, config: Config | None, num_channels: int | None = None):
        """The call's ``KernelConfig`` (the backend's default without a Config); ``num_channels``
        overrides the config's (calls along a handle keep its dispatch's channels)."""
        channels, chunk, ring = self.default_kernel if config is None else (
            config.num_channels, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens)
        channels = channels if num_channels is None else num_channels
        return self.ext.KernelConfig(num_channels=channels, nvl_chunk_send_tokens=chunk, nvl_ring_tokens=ring)

    def spec(self, kernel, num_topk: int, max_row_bytes: int, num_local_experts: int = 0):
        """The ``IntranodeSpec`` of rows up to ``max_row_bytes`` with ``num_topk`` ids each (and notify's
        per-expert counts of ``num_local_experts`` experts per rank)."""
        shape = self.ext.NvlWorkspaceShape(num_ranks=self.topo.world_size, num_local_experts=num_local_experts,
                                           num_topk=num_topk, max_row_bytes=max_row_bytes)
        return self.ext.IntranodeSpec(config=kernel, workspace=shape)

    def config_problem(self, kernel) -> str:
        return self.ext.spec_problem(self.spec(kernel, 0, 4))

    def dispatch_spec(self, kernel, tensors: dict[str, torch.Tensor], num_topk: int, num_local_experts: int = 0):
        """Room for this dispatch's rows, and for a bf16 combine of the same hidden."""
        hidden_bytes, scale_bytes = row_bytes(tensors)
        return self.spec(kernel, max(num_topk, 0), max(hidden_bytes + scale_bytes, 2 * tensors["x"].size(1)),
                         num_local_experts)

    def combine_spec(self, kernel, x: torch.Tensor):
        return self.spec(kernel, 0, x.size(1) * x.element_size())

    @staticmethod
    def covering(spec, other):
        return covering(spec, other)

    def with_kernel(self, spec, kernel):
        """``spec`` with another kernel config (the workspace re-laid out for it)."""
        return self.ext.IntranodeSpec(config=kernel, workspace=spec.workspace)

    # A plan counted on the device (SimPlan.recv_capacity >= 0): the rows its outputs hold, which the kernels
    # check instead of the host (csrc/kernels/intranode.hpp); -1 where the host read the count.
    def _extra_dispatch(self, plan) -> dict:
        return dict(recv_capacity=plan.recv_capacity)

    def _extra_combine(self, x: torch.Tensor, node_partial_dtype: torch.dtype | None, plan) -> dict:
        return dict(x_rows=plan.recv_capacity)

    @staticmethod
    def num_channels(spec) -> int:
        return spec.config.num_channels

    @staticmethod
    def describe(spec) -> str:
        """A short text of what sizes ``spec``'s workspace (for errors)."""
        return (f"{spec.config.num_channels} channels, rings of {spec.config.nvl_ring_tokens} rows of up to "
                f"{spec.workspace.max_row_bytes} B, top-{spec.workspace.num_topk}")


class InternodePath(_KernelPath):
    """Several nodes: two-hop kernels over the NVL region and a symmetric RDMA region after it."""

    prefix = "internode"
    # waits for data get twice the kernels' timeout (a stuck credit return is then reported by the
    # starved producer, kernels/internode_common.cuh): half the Buffer's keeps every wait within it
    timeout_share = 0.5
    # with no Config: NVL (channels, chunk, ring) as intranode, then network (chunk, ring)
    default_kernel = (2, 6, 32, 4, 16)
    notify_type, dispatch_type, combine_type = ("InternodeNotifyParams", "InternodeDispatchParams",
                                                "InternodeCombineParams")
    transport_signals = True

    def __init__(self, ext: ModuleType, topo: Topology, max_nodes_per_token: int,
                 node_partials: str = "rows_dtype") -> None:
        super().__init__(ext, topo)
        self.max_nodes_per_token = min(max_nodes_per_token, topo.num_nodes)
        self.node_partials = node_partials  # Buffer(combine_node_partials=...)

    def node_partial_dtype(self, x: torch.Tensor, asked: torch.dtype | None = None) -> torch.dtype:
        """The dtype a node partial of rows ``x`` crosses the network in (``asked``: the Buffer's choice)."""
        if asked is not None:
            return asked
        return x.dtype if self.node_partials == "rows_dtype" else torch.float32

    def _extra_combine(self, x: torch.Tensor, node_partial_dtype: torch.dtype | None, plan) -> dict:
        return dict(node_partial_kind=ELEMENT_KINDS[self.node_partial_dtype(x, node_partial_dtype)])

    def put_metadata(self, spec) -> tuple[int, int]:
        """(bytes of the source record a dispatch row carries over the network, where a combine slot's
        partial starts: after the fp32 weights, on 16 bytes) in ``spec``'s layout, from the kernels' own
        RdmaWorkspace."""
        metadata = self.ext.internode_put_metadata(spec)
        return int(metadata["record_bytes"]), int(metadata["combine_partial_offset"])

    def kernel_config(self, config: Config | None, num_channels: int | None = None):
        """The call's ``InternodeConfig`` (the backend's default without a Config); ``num_channels``
        overrides the config's (calls along a handle keep its dispatch's channels)."""
        channels, chunk, ring, rdma_chunk, rdma_ring = self.default_kernel if config is None else (
            config.num_channels, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
            config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens)
        channels = channels if num_channels is None else num_channels
        nvl = self.ext.KernelConfig(num_channels=channels, nvl_chunk_send_tokens=chunk, nvl_ring_tokens=ring)
        return self.ext.InternodeConfig(nvl=nvl, rdma_chunk_tokens=rdma_chunk, rdma_ring_tokens=rdma_ring)

    def spec(self, kernel, num_topk: int, dispatch_row_bytes: int, hidden: int, nvl_max_row_bytes: int,
             num_local_experts: int = 0):
        """The ``InternodeSpec`` of dispatch rows up to ``dispatch_row_bytes``, combines of ``hidden`` (and
        notify's per-expert counts of ``num_local_experts`` experts per rank)."""
        topo = self.topo
        shape = self.ext.RdmaWorkspaceShape(
            num_nodes=topo.num_nodes, num_nvl_ranks=topo.num_nvl_ranks, num_local_experts=num_local_experts,
            num_topk=num_topk,
            max_row_bytes=dispatch_row_bytes, hidden=hidden, max_nodes_per_token=self.max_nodes_per_token)
        spec = self.ext.InternodeSpec(config=kernel, workspace=shape, nvl_max_row_bytes=nvl_max_row_bytes,
                                      rdma_offset=0)
        if not self.ext.spec_problem(spec):  # the RDMA region follows the NVL region, on a page
            spec.rdma_offset = rdma_offset(int(self.ext.workspace_bytes(spec)[0]))
        return spec

    def config_problem(self, kernel) -> str:
        return self.ext.spec_problem(self.spec(kernel, 0, 4, 2, 4))

    def dispatch_spec(self, kernel, tensors: dict[str, torch.Tensor], num_topk: int, num_local_experts: int = 0):
        """Room for this dispatch's rows, and for a bf16 combine of the same hidden."""
        hidden_bytes, scale_bytes = row_bytes(tensors)
        hidden = tensors["x"].size(1)
        return self.spec(kernel, max(num_topk, 0), hidden_bytes + scale_bytes, hidden,
                         max(hidden_bytes + scale_bytes, 2 * hidden), num_local_experts)

    def combine_spec(self, kernel, x: torch.Tensor):
        return self.spec(kernel, 0, 0, x.size(1), x.size(1) * x.element_size())

    def with_kernel(self, spec, kernel):
        """``spec`` with another kernel config (the workspace re-laid out for it)."""
        ws = spec.workspace
        return self.spec(kernel, ws.num_topk, ws.max_row_bytes, ws.hidden, spec.nvl_max_row_bytes, ws.num_local_experts)

    def covering(self, spec, other):
        grown = covering(spec, other)
        ws = grown.workspace
        return self.spec(grown.config, ws.num_topk, ws.max_row_bytes, ws.hidden, grown.nvl_max_row_bytes,
                         ws.num_local_experts)  # moves rdma_offset with the NVL region

    @staticmethod
    def num_channels(spec) -> int:
        return spec.config.nvl.num_channels

    @staticmethod
    def describe(spec) -> str:
        """A short text of what sizes ``spec``'s workspaces (for errors)."""
        return (f"{spec.config.nvl.num_channels} channels, NVL rings of {spec.config.nvl.nvl_ring_tokens} and network "
                f"rings of {spec.config.rdma_ring_tokens} rows, dispatch rows of up to {spec.workspace.max_row_bytes} B, "
                f"hidden {spec.workspace.hidden}, top-{spec.workspace.num_topk}")

    def _forward_prefix(self, num_channels: int, device) -> torch.Tensor:
        return torch.zeros(self.topo.num_nodes, num_channels + 1, dtype=torch.int32, device=device)

    def _extra_notify(self, forward_prefix, reset_signals: bool) -> dict:
        return dict(forward_channel_prefix_matrix=_data_ptr(forward_prefix), reset_signals=reset_signals)

    def _extra(self, plan, counters: torch.Tensor | None) -> dict:
        return dict(forward_channel_prefix_matrix=_data_ptr(plan.forward_channel_prefix),
                    forward_peer_masks=_data_ptr(plan.forward_peer_masks), byte_counters=_data_ptr(counters))

