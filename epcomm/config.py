"""``Config``: performance knobs of the kernel backends, with buffer-size hints.

The torch backend validates a ``Config`` and otherwise ignores it; the kernel
backends size their channels and ring buffers from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Config", "HINT_NUM_EXPERTS"]

# The expert count the buffer-size hints cover by default (DeepEP's hints take none): notify's
# per-expert counts need 8 bytes per expert of each rank's buffer, 8 KiB at this count.
HINT_NUM_EXPERTS = 1024


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

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, num_topk: int = 8, *,
                                 num_nvl_ranks: int | None = None, num_experts: int = HINT_NUM_EXPERTS) -> int:
        """Bytes of NVLink buffer each rank needs, from the group's TOTAL rank count (DeepEP's signature).

        ``Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(hidden_bytes, group.size()))``
        works as with DeepEP. The size is the kernels' exact workspace
        (:meth:`get_nvl_buffer_size_hint_for_node` of ``num_nvl_ranks`` ranks per node): like DeepEP's,
        it is dominated by one ring of ``num_max_nvl_chunked_recv_tokens`` rows per (channel, peer).

        Args:
            hidden_bytes: bytes of the largest row moved (see :meth:`get_nvl_buffer_size_hint_for_node`).
            num_ranks: ranks of the whole group (all nodes).
            num_topk: top-k of the routing (DeepEP's hint has no such argument; 8 covers DeepSeek-V3).
            num_nvl_ranks: ranks per node; default ``min(num_ranks, 8)`` (DeepEP's fixed 8), pass the
                Buffer's ``num_nvl_ranks`` when it differs.
            num_experts: most experts a dispatch routes to (DeepEP's hint has no such argument; the
                default covers up to 1024).
        """
        nvl, _ = _split_ranks(num_ranks, num_nvl_ranks)
        return self.get_nvl_buffer_size_hint_for_node(hidden_bytes, nvl, num_topk, -(-num_experts // num_ranks))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, num_topk: int = 8, *,
                                  num_nvl_ranks: int | None = None, max_nodes_per_token: int = 4,
                                  num_experts: int = HINT_NUM_EXPERTS) -> int:
        """Bytes of network buffer each rank needs, from the group's TOTAL rank count (DeepEP's signature).

        ``0`` when the group is one node. The size is the two-hop kernels' exact region
        (:meth:`get_rdma_buffer_size_hint_for_nodes`).

        Args:
            hidden_bytes: bytes of the largest dispatch row (``2 * hidden`` for bf16).
            num_ranks: ranks of the whole group; num_topk: top-k of the routing.
            num_nvl_ranks: ranks per node; default ``min(num_ranks, 8)``.
            max_nodes_per_token: the Buffer's node cap.
            num_experts: most experts a dispatch routes to (default: up to 1024).
        """
        nvl, nodes = _split_ranks(num_ranks, num_nvl_ranks)
        return self.get_rdma_buffer_size_hint_for_nodes(hidden_bytes, nodes, num_topk, nvl, max_nodes_per_token,
                                                        -(-num_experts // num_ranks))

    def get_nvl_buffer_size_hint_for_node(self, hidden_bytes: int, num_nvl_ranks: int, num_topk: int = 8,
                                          num_local_experts: int | None = None) -> int:
        """Exact bytes of NVLink buffer each rank needs for calls with this config, from the ranks PER NODE.

        ``Buffer(num_nvl_bytes=hint)`` takes every dispatch and combine whose rows fit in
        ``hidden_bytes`` and whose top-k is at most ``num_topk``; one byte less is rejected on every
        rank before anything moves, with the size to ask for. The kernel backends lay the buffer out
        as: control words (abort flag, barrier signals, per-channel counts, ring heads and tails),
        then one ring of ``num_max_nvl_chunked_recv_tokens`` slots per (channel, source rank), a slot
        being one row plus its source index, top-k ids and weights (csrc/kernels/workspace.cuh); and
        notify's per-expert counts, so a dispatch routing to at most ``num_local_experts`` experts per
        rank fits.

        Args:
            hidden_bytes: bytes of the largest row moved: ``2 * hidden`` for bf16 (this also covers an
                FP8 dispatch, ``hidden + 4 * hidden // 128`` bytes, followed by a bf16 combine),
                ``4 * hidden`` for float32.
            num_nvl_ranks: ranks per node.
            num_topk: top-k of the routing (metadata carried per token).
            num_local_experts: experts per rank (of the whole group); default: 1024 experts over the node.
        """
        from ._ext import load_extension  # the layout lives with the kernels

        if num_local_experts is None:
            num_local_experts = -(-HINT_NUM_EXPERTS // max(num_nvl_ranks, 1))
        if hidden_bytes < 1 or num_nvl_ranks < 1 or num_topk < 0 or num_local_experts < 0:
            raise ValueError(f"need hidden_bytes >= 1, num_nvl_ranks >= 1, num_topk >= 0, num_local_experts >= 0; got "
                             f"{hidden_bytes}, {num_nvl_ranks}, {num_topk}, {num_local_experts}")
        from .backends._kernel_paths import IntranodePath
        from .topology import Topology

        path = IntranodePath(load_extension("cpu"), Topology(num_nvl_ranks, 0, num_nvl_ranks))
        kernel = path.kernel_config(self)
        problem = path.config_problem(kernel)
        if problem:
            raise ValueError(f"{self} does not fit the intranode kernels with {num_nvl_ranks} ranks: {problem}")
        return path.region_bytes(path.spec(kernel, num_topk, hidden_bytes, num_local_experts))[0]

    def get_rdma_buffer_size_hint_for_nodes(self, hidden_bytes: int, num_nodes: int, num_topk: int = 8,
                                            num_nvl_ranks: int = 8, max_nodes_per_token: int = 4,
                                            num_local_experts: int | None = None) -> int:
        """Exact bytes of network-registered buffer each rank needs for the two-hop kernels, from the NODE
        count (0 on one node).

        ``Buffer(num_nvl_bytes=get_nvl_buffer_size_hint_for_node(...), num_rdma_bytes=hint)`` takes every
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
            num_local_experts: experts per rank; default: 1024 experts over all ranks.
        """
        from ._ext import load_extension

        if num_nodes <= 1:
            return 0
        if num_local_experts is None:
            num_local_experts = -(-HINT_NUM_EXPERTS // max(num_nodes * num_nvl_ranks, 1))
        if hidden_bytes < 2 or num_nvl_ranks < 1 or num_topk < 0 or num_local_experts < 0:
            raise ValueError(f"need hidden_bytes >= 2, num_nvl_ranks >= 1, num_topk >= 0, num_local_experts >= 0; "
                             f"got {hidden_bytes}, {num_nvl_ranks}, {num_topk}, {num_local_experts}")
        from .backends._kernel_paths import InternodePath
        from .topology import Topology

        topo = Topology(num_nodes * num_nvl_ranks, 0, num_nvl_ranks)
        path = InternodePath(load_extension("cpu"), topo, max_nodes_per_token)
        spec = path.spec(path.kernel_config(self), num_topk, hidden_bytes, hidden_bytes // 2, hidden_bytes,
                         num_local_experts)
        problem = path.ext.spec_problem(spec)
        if problem:
            raise ValueError(f"{self} does not fit the internode kernels with {num_nodes} x {num_nvl_ranks} ranks: "
                             f"{problem}")
        return path.region_bytes(spec)[1]

    @staticmethod
    def default(num_ranks: int) -> "Config":
        """A reasonable config for ``num_ranks`` ranks."""
        return Config(num_sms=20 if num_ranks <= 8 else 24)

    @staticmethod
    def tuned(op: str, num_ranks: int, num_sms: int = 20) -> "Config":
        """DeepEP's tuned normal-mode config for ``op`` (``"dispatch"`` or ``"combine"``) at ``num_ranks`` ranks.

        DeepEP tabulates 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144 and 160 ranks and refuses other
        counts; epcomm runs any count, so another count takes the entry of the next tabulated count
        up (the largest beyond 160, the 2-rank entry for 1 rank).
        """
        table = {"dispatch": _DISPATCH_TUNED, "combine": _COMBINE_TUNED}.get(op)
        if table is None:
            raise ValueError(f"op must be 'dispatch' or 'combine', got {op!r}")
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        key = next((r for r in sorted(table) if r >= num_ranks), max(table))
        return Config(num_sms, *table[key])


# DeepEP's published tuning (normal mode, by rank count): (NVL send chunk, NVL ring, RDMA send chunk, RDMA ring)
_DISPATCH_TUNED = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_TUNED = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _split_ranks(num_ranks: int, num_nvl_ranks: int | None) -> tuple[int, int]:
    """(ranks per node, nodes) of a group of ``num_ranks`` (DeepEP: 8 ranks per node at most)."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1 (the total number of ranks), got {num_ranks}")
    nvl = min(num_ranks, 8) if num_nvl_ranks is None else num_nvl_ranks
    if nvl < 1 or num_ranks % nvl:
        raise ValueError(f"num_nvl_ranks={nvl} must divide num_ranks={num_ranks} (ranks per node of the whole group)")
    return nvl, num_ranks // nvl
