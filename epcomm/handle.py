"""``DispatchHandle``: what a dispatch remembers for cached dispatch and combine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DispatchHandle"]


@dataclass(frozen=True, eq=False)
class DispatchHandle:
    """The routing of one dispatch call, reused by ``dispatch(x, handle=...)`` and ``combine``.

    Treat it as opaque; the public fields are there for inspection.

    Attributes:
        is_token_in_rank: ``[num_tokens, world_size]`` bool, the routing of this rank's tokens.
        num_recv_tokens_per_rank: ``[world_size]`` int64, rows this rank received from each rank.
        num_tokens: tokens this rank dispatched.
        num_recv_tokens: rows this rank received.
        hidden: hidden size of the dispatched rows.
        layout_seq: which dispatch call of its buffer produced it (1, 2, ...).
    """

    is_token_in_rank: torch.Tensor
    num_recv_tokens_per_rank: torch.Tensor
    num_tokens: int
    num_recv_tokens: int
    hidden: int
    layout_seq: int
    buffer_id: int = field(repr=False)
    plan: Any = field(repr=False)  # backend-specific routing
