"""What frameworks import from ``deep_ep.utils``, so ``import epcomm as deep_ep`` keeps working.

``sys.modules`` aliasing is left to the caller; ``from epcomm.utils import EventOverlap`` works as
``from deep_ep.utils import EventOverlap`` does.
"""

from __future__ import annotations

import torch.distributed as dist

from .event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]


def check_nvlink_connections(group: dist.ProcessGroup | None = None) -> None:
    """DeepEP checks that the GPUs of a node talk over NVLink; epcomm does not need it on any backend
    (its ``num_nvl_ranks`` says which ranks share a node), so this accepts every group."""
