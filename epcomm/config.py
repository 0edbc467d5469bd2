"""``Config``: performance knobs of the kernel backends, with buffer-size hints.

The torch backend validates a ``Config`` and otherwise ignores it; the kernel
backends size their channels and ring buffers from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Config"]

# Per-token metadata carried beside the data in the kernels' ring buffers:
# source token index (int32), top-k expert ids (int64) and weights (float32).
_SOURCE_META_BYTES = 4


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
        ext = load_extension("cpu")
        kernel = (self.num_channels, self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens)
        problem = ext.validate_kernel_config(num_nvl_ranks, *kernel)
        if problem:
            raise ValueError(f"{self} does not fit the intranode kernels with {num_nvl_ranks} ranks: {problem}")
        return int(ext.intranode_workspace_bytes(num_nvl_ranks, 0, num_topk, hidden_bytes, *kernel))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_nodes: int, num_topk: int = 8) -> int:
        """Bytes of network-registered buffer one rank needs (send and receive rings per node)."""
        if num_nodes <= 1:
            return 0
        token_bytes = hidden_bytes + _SOURCE_META_BYTES + 8 + num_topk * (8 + 4)  # + source record
        rings = 2 * self.num_channels * num_nodes * self.num_max_rdma_chunked_recv_tokens * token_bytes
        return _round_up(rings + self.num_channels * num_nodes * 4 * 8, 128)

    @staticmethod
    def default(num_ranks: int) -> "Config":
        """A reasonable config for ``num_ranks`` ranks."""
        return Config(num_sms=20 if num_ranks <= 8 else 24)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
