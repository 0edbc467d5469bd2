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
        """Bytes of NVLink buffer one rank needs: a ring per (channel, peer) plus counters.

        Args:
            hidden_bytes: bytes of one token row (``hidden * 2`` for bf16, ``hidden + hidden // 32`` for FP8).
            num_nvl_ranks: ranks per node.
            num_topk: top-k of the routing (metadata carried per token).
        """
        token_bytes = hidden_bytes + _SOURCE_META_BYTES + num_topk * (8 + 4)
        rings = self.num_channels * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens * token_bytes
        counters = self.num_channels * num_nvl_ranks * 4 * 8  # head, tail, start, end per ring
        prefix = num_nvl_ranks * num_nvl_ranks * 4 * (self.num_channels + 1)
        return _round_up(rings + counters + prefix, 128)

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
