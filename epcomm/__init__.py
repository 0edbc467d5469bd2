"""epcomm: expert-parallel dispatch/combine for Mixture-of-Experts models.

The API follows DeepEP's normal (high-throughput) mode, so existing MoE code
can switch: :class:`Buffer`, ``get_dispatch_layout``, ``dispatch`` (bf16 or FP8
tuples, cached mode via handles) and ``combine``.
"""

from . import eplb, fp8, routing
from . import moe, ops  # differentiable custom ops ("epcomm::*") and MoE layer helpers
from .buffer import Buffer, FP8Tensor
from .config import Config
from .errors import (
    EpcommBackendUnavailable,
    EpcommError,
    EpcommInputError,
    EpcommPeerError,
    EpcommTimeoutError,
)
from .event import EventOverlap
from .handle import DispatchHandle
from .placement import ExpertPlacement
from .topology import LinkClass, Topology
from .traffic import LinkTraffic, TrafficStats

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
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
]
__version__ = "0.1.0"
