"""epcomm: expert-parallel dispatch/combine for Mixture-of-Experts models.

The API follows DeepEP's normal (high-throughput) mode, so existing MoE code
can switch: :class:`Buffer`, ``get_dispatch_layout``, ``dispatch`` (bf16 or FP8
tuples, cached mode via handles) and ``combine``.
"""

import torch

from . import eplb, fp8, routing
from . import moe, ops  # differentiable custom ops ("epcomm::*") and MoE layer helpers
from . import utils  # deep_ep.utils: EventOverlap, EventHandle
from .buffer import Buffer, FP8Tensor
from .config import Config
from .errors import (
    EpcommBackendUnavailable,
    EpcommError,
    EpcommInputError,
    EpcommPeerError,
    EpcommTimeoutError,
)
from .event import EventHandle, EventOverlap
from .handle import DispatchHandle
from .placement import ExpertPlacement
from .topology import LinkClass, Topology
from .traffic import LinkTraffic, TrafficStats

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EventHandle",
    "EventOverlap",
    "FP8Tensor",
    "EpcommError",
    "EpcommInputError",
    "EpcommTimeoutError",
    "EpcommPeerError",
    "EpcommBackendUnavailable",
    "ExpertPlacement",
    "LinkClass",
    "LinkTraffic",
    "Topology",
    "TrafficStats",
    "eplb",
    "fp8",
    "moe",
    "ops",
    "routing",
    "topk_idx_t",
    "utils",
]
topk_idx_t = torch.int64
"""dtype of ``topk_idx`` (DeepEP's ``deep_ep.topk_idx_t``)."""
__version__ = "0.1.0"
