"""Exceptions raised by epcomm.

Every error that one rank detects inside a collective operation is raised on
*every* rank of the buffer's group, with a message that names the rank(s) and
the problem, so that no rank is left waiting for a peer that gave up.
"""

from __future__ import annotations

import re

__all__ = [
    "EpcommCallRejected",
    "EpcommRecvOverflow",
    "EpcommError",
    "EpcommInputError",
    "EpcommTimeoutError",
    "EpcommPeerError",
    "EpcommBackendUnavailable",
]


class EpcommError(RuntimeError):
    """Base class of all epcomm errors."""


class EpcommInputError(EpcommError, ValueError):
    """Invalid or inconsistent arguments, detected before any data moved.

    Raised on every rank when any rank's inputs are invalid or the ranks
    disagree (different ``num_experts``, hidden size, dtype, handle, ...).
    ``problems`` maps each offending rank to its message.
    """

    def __init__(self, op: str, problems: dict[int, str], world_size: int) -> None:
        self.op = op
        self.problems = dict(problems)
        lines = [f"  rank {r}: {msg}" for r, msg in sorted(self.problems.items())]
        super().__init__(
            f"epcomm {op} rejected its inputs on {len(self.problems)} of {world_size} "
            f"ranks (nothing was sent):\n" + "\n".join(lines)
        )


class EpcommTimeoutError(EpcommError, TimeoutError):
    """A peer did not arrive at a stage of a collective within the buffer's timeout."""


class EpcommPeerError(EpcommError):
    """A peer failed (crashed, closed its connection) during a collective."""


class EpcommBackendUnavailable(EpcommError):
    """The requested backend cannot run on this machine (say, no GPU for ``"cuda"``)."""


class EpcommRecvOverflow(EpcommError):
    """A dispatch counted on the device (``num_worst_tokens`` under ``epcomm.low_latency.host_sync_free`` or a
    graph capture) received more rows on this rank than ``num_worst_tokens``: its kernel wrote none past them
    and raised the abort flag, as no host saw the count. Raised on the ranks that overflowed (by the dispatch
    on the CPU backends, at the rank's next call on GPUs); the other ranks' kernels stop with ``peer_aborted``.
    A failure: the Buffer is done on every rank (create a new one); pass a larger ``num_worst_tokens``.

    :attr:`capacity` is ``num_worst_tokens``, :attr:`received` the rows that arrived.
    """

    _REPORT = re.compile(r"recv_overflow: rank=(-?\d+) .*expected=(-?\d+) observed=(-?\d+)")

    def __init__(self, message: str) -> None:
        super().__init__(message)
        found = self._REPORT.search(message)
        self.rank = int(found.group(1)) if found else -1
        self.capacity = int(found.group(2)) if found else -1
        self.received = int(found.group(3)) if found else -1
        self.args = (f"{message}\n  rank {self.rank} received {self.received} rows into num_worst_tokens="
                     f"{self.capacity}: none past it written; pass num_worst_tokens >= {self.received}",)


class EpcommCallRejected(EpcommError):
    """A call made without a host wait (``epcomm.low_latency.host_sync_free``) that the ranks did not all make
    alike: its data kernel saw the call check's "no" on the device and moved nothing, on every rank.

    Raised by the kernel's report (the message is the runtime's: ``... call_rejected: rank=R role=call_gate
    channel=-1 peer=P expected=0 observed=F``); :attr:`rank` is ``P``, the first rank whose call differed, and
    :attr:`reason` says how (``F``: its call-check flags, +256 when its call itself differs, -1 none this
    epoch). The buffers stay usable; the call's outputs were never written.
    """

    _REPORT = re.compile(r"call_rejected: .*peer=(-?\d+) expected=-?\d+ observed=(-?\d+)")

    def __init__(self, message: str) -> None:
        super().__init__(message)
        found = self._REPORT.search(message)
        self.rank = int(found.group(1)) if found else -1
        flags = int(found.group(2)) if found else -1
        if flags < 0:
            self.reason = "made no call check at this point (another operation, or none)"
        elif flags & 1:  # (a refusing rank's digest differs too: its signature lacks what it refused)
            self.reason = "refused its inputs (its own error names the problem)"
        elif flags & 2:
            self.reason = "needed other buffers than the current layout"
        elif flags & 256:
            self.reason = "made another call (operation, handle, shapes, dtypes or config differ)"
        else:
            self.reason = f"differed (call-check flags {flags})"
        self.args = (f"{message}\n  rank {self.rank} {self.reason}; nothing moved on any rank",)
