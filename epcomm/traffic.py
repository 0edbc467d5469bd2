"""Exact byte accounting of what each operation moved, per link class.

The benchmark and the tests read these counters: bytes are stable where
timings are not. Counts are from this rank's point of view (what it sent);
sum them over ranks for totals.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .topology import LinkClass

__all__ = ["LinkTraffic", "TrafficStats"]


@dataclass
class LinkTraffic:
    """Rows and bytes sent over one link class."""

    rows: int = 0
    payload_bytes: int = 0  # token data (and FP8 scales)
    meta_bytes: int = 0  # routing metadata travelling with the rows

    @property
    def total_bytes(self) -> int:
        return self.payload_bytes + self.meta_bytes

    def add(self, rows: int, payload_bytes: int, meta_bytes: int) -> None:
        self.rows += rows
        self.payload_bytes += payload_bytes
        self.meta_bytes += meta_bytes


@dataclass
class TrafficStats:
    """``stats[op][link]`` -> :class:`LinkTraffic`, ``op`` in ``"dispatch"``, ``"combine"``, ...

    ``control_bytes`` counts the small count/agreement exchanges separately.
    ``round_trips[op]`` counts the host round trips each operation made: ``"collective"``
    (one per torch.distributed collective issued) and ``"kernel"`` (one per kernel launch the
    host waits for). Tests assert these exactly; they are the per-call fixed cost.
    """

    ops: dict[str, dict[LinkClass, LinkTraffic]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(LinkTraffic))
    )
    control_bytes: int = 0
    round_trips: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def count_round_trip(self, op: str, kind: str, n: int = 1) -> None:
        """``n`` more host round trips of ``kind`` (``"collective"`` or ``"kernel"``) for ``op``."""
        self.round_trips[op][kind] += n

    def record(self, op: str, link: LinkClass, rows: int, payload_bytes: int, meta_bytes: int) -> None:
        self.ops[op][link].add(rows, payload_bytes, meta_bytes)

    def get(self, op: str, link: LinkClass | str) -> LinkTraffic:
        """Traffic of ``op`` over ``link`` (zeros if none was recorded)."""
        link = LinkClass(link)
        if op in self.ops and link in self.ops[op]:
            return self.ops[op][link]
        return LinkTraffic()

    def reset(self) -> None:
        self.ops.clear()
        self.control_bytes = 0
        self.round_trips.clear()

    def as_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        return {
            op: {
                link.value: {"rows": t.rows, "payload_bytes": t.payload_bytes, "meta_bytes": t.meta_bytes}
                for link, t in links.items()
            }
            for op, links in self.ops.items()
        }
