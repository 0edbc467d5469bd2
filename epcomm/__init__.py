"""epcomm: expert-parallel dispatch/combine for Mixture-of-Experts models.

The API follows DeepEP's normal (high-throughput) mode, so existing MoE code
can switch: :class:`Buffer`, ``get_dispatch_layout``, ``dispatch`` (bf16 or FP8
tuples, cached mode via handles) and ``combine``.
"""

import torch

from . import eplb, fp8, graphs, routing
from . import moe, ops  # differentiable custom ops ("epcomm::*") and MoE layer helpers
from . import utils  # deep_ep.utils: EventOverlap, EventHandle
from .buffer import Buffer, FP8Tensor
from .config import Config
from .errors import (
    EpcommBackendUnavailable,
    EpcommCallRejected,
    EpcommError,
    EpcommInputError,
    EpcommPeerError,
    EpcommRecvOverflow,
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
    "EpcommCallRejected",
    "EpcommRecvOverflow",
    "ExpertPlacement",
    "LinkClass",
    "LinkTraffic",
    "Topology",
    "TrafficStats",
    "eplb",
    "fp8",
    "graphs",
    "moe",
    "ops",
    "routing",
    "topk_idx_t",
    "utils",
    "as_deep_ep",
]
topk_idx_t = torch.int64
"""dtype of ``topk_idx`` (DeepEP's ``deep_ep.topk_idx_t``)."""
__version__ = "0.1.0"


def as_deep_ep():
    """Make ``import deep_ep`` and ``from deep_ep.utils import EventOverlap`` give epcomm, so code written
    for DeepEP runs unchanged. Call it before that code imports ``deep_ep``; returns the epcomm module.

    Raises:
        RuntimeError: another ``deep_ep`` (the real one) is already imported in this process.
    """
    import sys

    this = sys.modules[__name__]
    present = sys.modules.get("deep_ep")
    if present is not None and present is not this:
        raise RuntimeError("a different deep_ep module is already imported in this process; call "
                           "epcomm.as_deep_ep() before anything imports deep_ep, or use `import epcomm as deep_ep`")
    sys.modules["deep_ep"] = this
    sys.modules["deep_ep.utils"] = utils
    return this

