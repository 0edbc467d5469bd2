"""Where each expert lives: the one definition of epcomm's expert -> rank rule.

Experts are split evenly and contiguously over the ranks of the expert-parallel
group: with ``L = num_experts // world_size`` experts per rank, expert ``e``
lives on rank ``e // L`` as local expert ``e % L``, so rank ``r`` hosts the
global experts ``[r * L, (r + 1) * L)``. This is the only placement epcomm
supports today; every Python path (layout, dispatch's expert localisation, the
MoE helpers, the reference) asks :class:`ExpertPlacement` rather than writing
the division itself.

The kernels (``csrc/kernels/placement.cuh``) compute the same uniform rule
arithmetically. :meth:`ExpertPlacement.rank_table` is the expert -> rank table
they would read instead for a non-uniform placement (for example redundant
experts replicated on several ranks, as in DeepSeek-V3's EPLB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validate import Invalid

__all__ = ["ExpertPlacement", "check_num_experts"]


def _num_experts_problem(num_experts: object, world_size: int) -> str | None:
    """Why ``num_experts`` cannot be split evenly over ``world_size`` ranks, or ``None`` if it can.

    The text is what every rank sees in an :class:`~epcomm.EpcommInputError`
    (``Buffer`` agrees it across ranks), so it names the argument, the value
    and the rule.
    """
    # bool is an int subclass; it is accepted as before (only ever reached by a caller's mistake)
    if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % world_size:
        return (
            f"num_experts must be a positive multiple of the world size {world_size} "
            f"(experts are split evenly over ranks), got {num_experts}"
        )
    return None


def _check_world_size(world_size: object) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def check_num_experts(num_experts: object, world_size: int) -> None:
    """Raise :class:`~epcomm._validate.Invalid` unless ``num_experts`` splits evenly over ``world_size`` ranks.

    For ``Buffer``'s argument checks, whose :class:`Invalid` messages are agreed
    across ranks before anything is sent. :meth:`ExpertPlacement.uniform` raises
    ``ValueError`` with the same text.

    Raises:
        Invalid: ``num_experts`` is not a positive int multiple of ``world_size``.
        ValueError: ``world_size`` is not a positive int (a programming error, not user input).
    """
    _check_world_size(world_size)
    problem = _num_experts_problem(num_experts, world_size)
    if problem is not None:
        raise Invalid(problem)


@dataclass(frozen=True)
class ExpertPlacement:
    """Which rank hosts each of ``num_experts`` experts, over ``world_size`` ranks.

    Build it with :meth:`uniform` (the default, and today the only rule):
    rank ``r`` hosts global experts ``[r * L, (r + 1) * L)`` with
    ``L = num_local_experts = num_experts // world_size``. Construction validates
    the arguments. Expert ids are ``int64`` tensors where ``-1`` means "no expert"
    (the ``topk_idx`` convention); no method synchronises with the device or
    checks that ids lie in ``[-1, num_experts)`` (``Buffer`` checks that first).

    Attributes:
        num_experts: routed experts in total, a positive multiple of ``world_size``.
        world_size: ranks in the expert-parallel group, ``>= 1``.
    """

    num_experts: int
    world_size: int

    def __post_init__(self) -> None:
        _check_world_size(self.world_size)
        problem = _num_experts_problem(self.num_experts, self.world_size)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def uniform(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Experts split evenly and contiguously over the ranks (expert ``e`` on rank ``e // L``).

        Raises:
            ValueError: ``world_size`` is not a positive int, or ``num_experts`` is not a
                positive multiple of it (the message names the argument and its value).
        """
        return cls(num_experts, world_size)

    @property
    def num_local_experts(self) -> int:
        """Experts per rank, ``L = num_experts // world_size``."""
        return self.num_experts // self.world_size

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {rank!r}")

    def local_experts(self, rank: int) -> range:
        """Global ids of the experts on ``rank``, ascending (local id ``i`` is ``local_experts(rank)[i]``).

        Raises:
            ValueError: ``rank`` outside ``[0, world_size)``.
        """
        self._check_rank(rank)
        first = rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def rank_of(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """Rank hosting each entry of ``topk_idx``; ``-1`` entries map to ``world_size``.

        ``world_size`` (not ``-1``) so that the result can index a ``world_size + 1``
        wide scatter whose last column collects the "no expert" entries.

        Args:
            topk_idx: ``[N, K]`` int64 expert ids in ``[-1, num_experts)`` (any shape works).
        Returns:
            ``[N, K]`` int64 (``topk_idx``'s dtype and device) rank ids in ``[0, world_size]``.
        """
        return torch.where(
            topk_idx >= 0,
            torch.div(topk_idx, self.num_local_experts, rounding_mode="floor"),
            torch.full_like(topk_idx, self.world_size),
        )

    def to_local(self, topk_idx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``rank``'s view of global expert ids: local ids for its experts, ``-1`` elsewhere.

        Args:
            topk_idx: ``[N, K]`` int64 global expert ids, ``-1`` for none (any shape works).
            rank: the rank whose experts count as local.
        Returns:
            ``(local_ids, mine)``: ``local_ids`` ``[N, K]`` int64 in ``[-1, num_local_experts)``,
            ``-1`` where the expert is not on ``rank`` (or is ``-1``); ``mine`` ``[N, K]`` bool,
            ``local_ids >= 0``.
        Raises:
            ValueError: ``rank`` outside ``[0, world_size)``.
        """
        experts = self.local_experts(rank)
        local = topk_idx - experts.start
        # -1 and other ranks' experts fall outside [0, L) once shifted (start >= 0), so one range check does
        mine = (local >= 0) & (local < self.num_local_experts)
        return torch.where(mine, local, torch.full_like(local, -1)), mine

    def to_global(self, local_ids: torch.Tensor, rank: int) -> torch.Tensor:
        """Inverse of :meth:`to_local`: ``rank``'s local expert ids back to global ids.

        Args:
            local_ids: ``[N, K]`` int64 in ``[-1, num_local_experts)``, ``-1`` for none (any shape works).
            rank: the rank the local ids belong to.
        Returns:
            ``[N, K]`` int64 (``local_ids``' dtype and device) global ids, ``-1`` kept as ``-1``.
        Raises:
            ValueError: ``rank`` outside ``[0, world_size)``.
        """
        first = self.local_experts(rank).start
        return torch.where(local_ids >= 0, local_ids + first, torch.full_like(local_ids, -1))

    def rank_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The expert -> rank table: ``table[e]`` is the rank hosting expert ``e``.

        The kernels do not read it yet: they compute the uniform rule from
        ``num_local_experts`` (``csrc/kernels/placement.cuh``). A non-uniform
        placement (redundant or rebalanced experts) would hand them this table.

        Returns:
            ``[num_experts]`` int32 on ``device`` (default CPU), non-decreasing, each
            rank appearing ``num_local_experts`` times.
        """
        experts = torch.arange(self.num_experts, dtype=torch.int32, device=device)
        return torch.div(experts, self.num_local_experts, rounding_mode="floor")
