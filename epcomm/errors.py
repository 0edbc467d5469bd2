"""Exceptions raised by epcomm.

Every error that one rank detects inside a collective operation is raised on
*every* rank of the buffer's group, with a message that names the rank(s) and
the problem, so that no rank is left waiting for a peer that gave up.
"""

from __future__ import annotations

__all__ = [
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
