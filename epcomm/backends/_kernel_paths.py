"""The two kernel paths the kernel backends (``sim``, ``cuda``) drive, as argument lists and sizes.

* :class:`IntranodePath` (one node): ``intranode_notify`` / ``_dispatch`` / ``_combine`` over NVLink
  rings in each rank's NVL buffer (csrc/runtime/intranode_entries.hpp).
* :class:`InternodePath` (several nodes): the two-hop ``internode_*`` kernels: network rings in a
  symmetric RDMA region after the NVL region, forwarders, node partials (csrc/runtime/cpu_internode.cpp).

A :class:`Layout` fixes where every region lives; every rank uses the same one for a call. Its
``kernel`` part comes from the call's Config, its ``shape`` part from the call's tensors;
``covering`` grows the shape so that a dispatch's layout also holds its combine (no re-layout in
between, when it can be avoided).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._agree import X_KINDS
from ..config import Config
from ..topology import Topology

__all__ = ["Layout", "IntranodePath", "InternodePath", "ELEMENT_KINDS", "rdma_offset", "row_bytes"]

# combine's row element types: kernels/elements.cuh ElementKind (the same codes as the call signature's)
ELEMENT_KINDS = X_KINDS
_REGION_ALIGNMENT = 4096  # the RDMA region starts on a page


@dataclass(frozen=True)
class Layout:
    kernel: tuple[int, ...]  # the path's kernel config
    shape: tuple[int, ...]  # the path's workspace shape

    def covering(self, shape: tuple[int, ...]) -> "Layout":
        """This layout grown (element-wise) to hold rows of ``shape`` too."""
        return Layout(self.kernel, tuple(max(a, b) for a, b in zip(self.shape, shape)))


def rdma_offset(nvl_bytes: int) -> int:
    """Where the RDMA region starts in a rank's buffer: after the NVL region, on a page."""
    return -(-nvl_bytes // _REGION_ALIGNMENT) * _REGION_ALIGNMENT


def row_bytes(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes of an x row, bytes of a scales row) of a dispatch's tensors."""
    x = tensors["x"]
    scales = tensors.get("scales")
    return x.size(1) * x.element_size(), (scales.size(1) * scales.element_size() if scales is not None else 0)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


class IntranodePath:
    """One node: every rank's NVL buffer holds a ring per (channel, source rank)."""

    prefix = "intranode"
    timeout_share = 1.0  # the kernels' timeout, as a share of the Buffer's (every wait uses it once)
    # with no Config: (num_channels, nvl_chunk_send_tokens, nvl_ring_tokens); small, because every rank
    # simulates 2 x channels blocks of 32 x ranks threads on the host's cores
    default_kernel = (2, 6, 32)

    def __init__(self, ext, topo: Topology) -> None:
        self.ext, self.topo = ext, topo

    def kernel_config(self, config: Config | None) -> tuple[int, ...]:
        if config is None:
            return self.default_kernel
        return (config.num_channels, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens)

    def config_problem(self, kernel: tuple[int, ...]) -> str:
        return self.ext.validate_kernel_config(self.topo.world_size, *kernel)

    # shape: (num_local_experts (0: Python counts experts), num_topk, max_row_bytes)
    @staticmethod
    def dispatch_shape(tensors: dict[str, torch.Tensor], num_topk: int) -> tuple[int, ...]:
        """Room for this dispatch's rows, and for a bf16 combine of the same hidden."""
        hidden_bytes, scale_bytes = row_bytes(tensors)
        return (0, max(num_topk, 0), max(hidden_bytes + scale_bytes, 2 * tensors["x"].size(1)))

    @staticmethod
    def combine_shape(x: torch.Tensor) -> tuple[int, ...]:
        return (0, 0, x.size(1) * x.element_size())

    @staticmethod
    def num_topk(layout: Layout) -> int:
        return layout.shape[1]

    def region_bytes(self, layout: Layout) -> tuple[int, int]:
        """(NVL bytes, RDMA bytes) per rank."""
        return int(self.ext.intranode_workspace_bytes(self.topo.world_size, *layout.shape, *layout.kernel)), 0

    def comm_args(self, layout: Layout, epoch: int = 0, counters: torch.Tensor | None = None) -> list[int]:
        return [*layout.kernel, *layout.shape, epoch]

    def notify_args(self, layout, epoch, in_rank, num_tokens, outputs) -> list[int]:
        rank_prefix, channel_prefix, _ = outputs
        return [*self.comm_args(layout, epoch), 1, _ptr(in_rank), 0, num_tokens, 1, _ptr(rank_prefix),
                _ptr(channel_prefix), 0]

    def barrier_args(self, layout, epoch) -> list[int]:
        return [*self.comm_args(layout, epoch), 0, 0, 0, 0, 1, 0, 0, 0]

    def notify_outputs(self, num_channels: int, device) -> tuple:
        world = self.topo.world_size
        return (torch.zeros(world + 1, dtype=torch.int32, device=device),
                torch.zeros(world, num_channels + 1, dtype=torch.int32, device=device), None)

    def dispatch_args(self, layout, plan, counters, t, recv) -> list[int]:
        return [*self.comm_args(layout), _ptr(t["x"]), t["hidden_bytes"], _ptr(t["scales"]), t["scale_bytes"],
                _ptr(t["topk_idx"]), _ptr(t["topk_weights"]), t["num_topk"], t["num_experts"], plan.num_tokens,
                _ptr(plan.is_token_in_rank), _ptr(plan.recv_channel_prefix), _ptr(recv["x"]), _ptr(recv["scales"]),
                _ptr(recv["topk_idx"]), _ptr(recv["topk_weights"]), _ptr(recv["src_idx"])]

    def combine_args(self, layout, plan, counters, x, weights, num_topk, combined, combined_w) -> list[int]:
        return [*self.comm_args(layout), _ptr(x), ELEMENT_KINDS[x.dtype], _ptr(weights), x.size(1), num_topk,
                plan.num_tokens, _ptr(plan.is_token_in_rank), _ptr(plan.recv_channel_prefix), _ptr(combined),
                _ptr(combined_w)]


class InternodePath:
    """Several nodes: two-hop kernels over the NVL region and a symmetric RDMA region after it."""

    prefix = "internode"
    # waits for data get twice the kernels' timeout (a stuck credit return is then reported by the
    # starved producer, kernels/internode_common.cuh): half the Buffer's keeps every wait within it
    timeout_share = 0.5
    # with no Config: NVL (channels, chunk, ring) as intranode, then network (chunk, ring)
    default_kernel = (2, 6, 32, 4, 16)

    def __init__(self, ext, topo: Topology, max_nodes_per_token: int) -> None:
        self.ext, self.topo, self.max_nodes_per_token = ext, topo, min(max_nodes_per_token, topo.num_nodes)

    def kernel_config(self, config: Config | None) -> tuple[int, ...]:
        if config is None:
            return self.default_kernel
        return (config.num_channels, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
                config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens)

    def config_problem(self, kernel: tuple[int, ...]) -> str:
        try:
            self._regions((0, 4, 2, 4), kernel)
        except ValueError as err:
            return str(err)
        return ""

    # shape: (num_topk, dispatch row bytes, combine hidden (fp32 partials), combine row bytes)
    @staticmethod
    def dispatch_shape(tensors: dict[str, torch.Tensor], num_topk: int) -> tuple[int, ...]:
        hidden_bytes, scale_bytes = row_bytes(tensors)
        hidden = tensors["x"].size(1)
        return (max(num_topk, 0), hidden_bytes + scale_bytes, hidden, 2 * hidden)

    @staticmethod
    def combine_shape(x: torch.Tensor) -> tuple[int, ...]:
        return (0, 0, x.size(1), x.size(1) * x.element_size())

    @staticmethod
    def num_topk(layout: Layout) -> int:
        return layout.shape[0]

    def _regions(self, shape, kernel) -> tuple[int, int]:
        nvl, rdma = self.ext.internode_workspace_bytes(
            self.topo.world_size, self.topo.num_nvl_ranks, *shape, self.max_nodes_per_token, *kernel)
        return int(nvl), int(rdma)

    def region_bytes(self, layout: Layout) -> tuple[int, int]:
        """(NVL bytes, RDMA bytes) per rank; in the buffer the RDMA region starts at rdma_offset()."""
        return self._regions(layout.shape, layout.kernel)

    def comm_args(self, layout: Layout, epoch: int = 0, counters: torch.Tensor | None = None) -> list[int]:
        return [*layout.kernel, *layout.shape, self.max_nodes_per_token, self.topo.num_nvl_ranks,
                rdma_offset(self.region_bytes(layout)[0]), _ptr(counters), epoch]

    def notify_args(self, layout, epoch, in_rank, num_tokens, outputs, counters=None) -> list[int]:
        rank_prefix, channel_prefix, forward_prefix = outputs
        return [*self.comm_args(layout, epoch, counters), 1, _ptr(in_rank), num_tokens, _ptr(rank_prefix),
                _ptr(channel_prefix), _ptr(forward_prefix)]

    def barrier_args(self, layout, epoch) -> list[int]:
        return [*self.comm_args(layout, epoch), 0, 0, 0, 0, 0, 0]

    def notify_outputs(self, num_channels: int, device) -> tuple:
        world, nodes = self.topo.world_size, self.topo.num_nodes
        return (torch.zeros(world + 1, dtype=torch.int32, device=device),
                torch.zeros(world, num_channels + 1, dtype=torch.int32, device=device),
                torch.zeros(nodes, num_channels + 1, dtype=torch.int32, device=device))

    def dispatch_args(self, layout, plan, counters, t, recv) -> list[int]:
        return [*self.comm_args(layout, 0, counters), _ptr(t["x"]), t["hidden_bytes"], _ptr(t["scales"]),
                t["scale_bytes"], _ptr(t["topk_idx"]), _ptr(t["topk_weights"]), t["num_topk"], t["num_experts"],
                plan.num_tokens, _ptr(plan.is_token_in_rank), _ptr(plan.recv_channel_prefix),
                _ptr(plan.forward_channel_prefix), _ptr(recv["x"]), _ptr(recv["scales"]), _ptr(recv["topk_idx"]),
                _ptr(recv["topk_weights"]), _ptr(recv["src_idx"]), _ptr(plan.forward_peer_masks)]

    def combine_args(self, layout, plan, counters, x, weights, num_topk, combined, combined_w) -> list[int]:
        return [*self.comm_args(layout, 0, counters), _ptr(x), ELEMENT_KINDS[x.dtype], _ptr(weights), x.size(1),
                num_topk, plan.num_tokens, _ptr(plan.is_token_in_rank), _ptr(plan.recv_channel_prefix),
                _ptr(plan.forward_channel_prefix), _ptr(plan.forward_peer_masks), _ptr(combined), _ptr(combined_w)]

    def record_bytes(self, num_topk: int) -> int:
        """Bytes of the source record a dispatch row carries over the network (RdmaWorkspace)."""
        return -(-(8 + 12 * num_topk) // 8) * 8
