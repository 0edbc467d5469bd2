"""``Config``: performance knobs of the kernel backends, with buffer-size hints.

The torch backend validates a ``Config`` and otherwise ignores it; the kernel
backends size their channels and ring buffers from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Config"]



@dataclass(frozen=True)
class Config:
    """How a kernel backend spreads one dispatch/combine over the GPU.

    Attributes:
        num_sms: SMs used; channels = ``num_sms // 2`` (one sending, one receiving block each).
        num_max_nvl_chunked_send_tokens: tokens a sender warp moves before publishing its tail.
        num_max_nvl_chunked_recv_tokens: ring-buffer capacity in tokens per (channel, peer).
        num_max_rdma_chunked_send_tokens: like the NVLink value, for the network hop.
        num_max_rdma_chunked_recv_tokens: network receive-buffer capacity per (channel, node).
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        if self.num_sms < 2 or self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be an even number >= 2 (two blocks per channel), got {self.num_sms}")
        for name in ("nvl", "rdma"):
            send = getattr(self, f"num_max_{name}_chunked_send_tokens")
            recv = getattr(self, f"num_max_{name}_chunked_recv_tokens")
            if send < 1 or recv < 1:
                raise ValueError(f"Config: {name} chunk sizes must be >= 1, got send={send}, recv={recv}")
            if send > recv:
                raise ValueError(
                    f"Config: num_max_{name}_chunked_send_tokens={send} exceeds the ring capacity "
                    f"num_max_{name}_chunked_recv_tokens={recv}; a chunk must fit in the ring"
                )

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_nvl_ranks: int, num_topk: int = 8) -> int:
        """Exact bytes of NVLink buffer each rank needs for calls with this config.

        ``Buffer(num_nvl_bytes=hint)`` takes every dispatch and combine whose rows fit in
        ``hidden_bytes`` and whose top-k is at most ``num_topk``; one byte less is rejected on every
        rank before anything moves, with the size to ask for. The kernel backends lay the buffer out
        as: control words (abort flag, barrier signals, per-channel counts, ring heads and tails),
        then one ring of ``num_max_nvl_chunked_recv_tokens`` slots per (channel, source rank), a slot
        being one row plus its source index, top-k ids and weights (csrc/kernels/workspace.cuh).

        Args:
            hidden_bytes: bytes of the largest row moved: ``2 * hidden`` for bf16 (this also covers an
                FP8 dispatch, ``hidden + 4 * hidden // 128`` bytes, followed by a bf16 combine),
                ``4 * hidden`` for float32.
            num_nvl_ranks: ranks per node.
            num_topk: top-k of the routing (metadata carried per token).
        """
        from ._ext import load_extension  # the layout lives with the kernels

        if hidden_bytes < 1 or num_nvl_ranks < 1 or num_topk < 0:
            raise ValueError(f"need hidden_bytes >= 1, num_nvl_ranks >= 1, num_topk >= 0; got {hidden_bytes}, "
                             f"{num_nvl_ranks}, {num_topk}")
        from .backends._kernel_paths import IntranodePath
        from .topology import Topology

        path = IntranodePath(load_extension("cpu"), Topology(num_nvl_ranks, 0, num_nvl_ranks))
        kernel = path.kernel_config(self)
        problem = path.config_problem(kernel)
        if problem:
            raise ValueError(f"{self} does not fit the intranode kernels with {num_nvl_ranks} ranks: {problem}")
        return path.region_bytes(path.spec(kernel, num_topk, hidden_bytes))[0]

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_nodes: int, num_topk: int = 8,
                                  num_nvl_ranks: int = 8, max_nodes_per_token: int = 4) -> int:
        """Exact bytes of network-registered buffer each rank needs for the two-hop kernels (0 on one node).

        ``Buffer(num_nvl_bytes=get_nvl_buffer_size_hint(...), num_rdma_bytes=hint)`` takes every
        dispatch whose rows fit ``hidden_bytes`` and every bf16 combine of ``hidden_bytes // 2``
        elements; one byte less is refused on every rank with the size to ask for. The region holds
        the signals (barrier, ring heads and tails, abort), count messages, and per (channel, node) a
        send-staging and a receive ring of ``num_max_rdma_chunked_recv_tokens`` slots for dispatch
        rows (a source record plus the row) and for combine's fp32 node partials
        (csrc/kernels/rdma_workspace.cuh).

        Args:
            hidden_bytes: bytes of the largest dispatch row (``2 * hidden`` for bf16).
            num_nodes: nodes of the group; num_nvl_ranks: ranks per node.
            num_topk: top-k of the routing; max_nodes_per_token: the Buffer's node cap.
        """
        from ._ext import load_extension

        if num_nodes <= 1:
            return 0
        if hidden_bytes < 2 or num_nvl_ranks < 1 or num_topk < 0:
            raise ValueError(f"need hidden_bytes >= 2, num_nvl_ranks >= 1, num_topk >= 0; got {hidden_bytes}, "
                             f"{num_nvl_ranks}, {num_topk}")
        from .backends._kernel_paths import InternodePath
        from .topology import Topology

        topo = Topology(num_nodes * num_nvl_ranks, 0, num_nvl_ranks)
        path = InternodePath(load_extension("cpu"), topo, max_nodes_per_token)
        spec = path.spec(path.kernel_config(self), num_topk, hidden_bytes, hidden_bytes // 2, hidden_bytes)
        problem = path.ext.spec_problem(spec)
        if problem:
            raise ValueError(f"{self} does not fit the internode kernels with {num_nodes} x {num_nvl_ranks} ranks: "
                             f"{problem}")
        return path.region_bytes(spec)[1]

    @staticmethod
    def default(num_ranks: int) -> "Config":
        """A reasonable config for ``num_ranks`` ranks."""
        return Config(num_sms=20 if num_ranks <= 8 else 24)
