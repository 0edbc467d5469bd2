"""Local argument checks. Each raises :class:`Invalid` with a message naming the argument.

Buffer runs them before any data moves and shares the verdict with every
rank (see ``_agree``), so the messages must say what is wrong and what to do.
"""

from __future__ import annotations

import torch

__all__ = ["Invalid", "check_tensor", "describe", "device_of", "problem_text"]

_FLOAT8 = torch.float8_e4m3fn


class Invalid(Exception):
    """This rank's inputs are invalid; the message is shown to every rank."""


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {list(t.shape)} and dtype {t.dtype} on {t.device}"
    return f"{type(t).__name__}"


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: tuple[torch.dtype, ...],
    ndim: int,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a contiguous tensor of the given dtype, rank and shape."""
    if not isinstance(t, torch.Tensor):
        raise Invalid(f"{name} must be a torch.Tensor, got {describe(t)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise Invalid(f"{name} must have dtype {names}, got {t.dtype}")
    if t.dim() != ndim:
        raise Invalid(f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                expected = ["*" if s is None else s for s in shape]
                raise Invalid(f"{name} must have shape {expected}, got {list(t.shape)} (dimension {axis})")
    if not t.is_contiguous():
        raise Invalid(f"{name} must be contiguous; call .contiguous() first")
    if device is not None and t.device != device:
        raise Invalid(f"{name} is on {t.device} but x is on {device}; keep all inputs on one device")
    return t


def check_topk_idx(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every entry in ``[-1, num_experts)``."""
    if topk_idx.numel() == 0:
        return
    low, high = int(topk_idx.min()), int(topk_idx.max())
    if low < -1 or high >= num_experts:
        bad = ((topk_idx < -1) | (topk_idx >= num_experts)).nonzero()[0].tolist()
        raise Invalid(
            f"topk_idx values must lie in [-1, {num_experts}) (-1 = no expert); "
            f"found {topk_idx[bad[0], bad[1]].item()} at token {bad[0]}, slot {bad[1]} "
            f"(min {low}, max {high})"
        )


def check_hidden_for_fp8(hidden: int) -> None:
    if hidden % 128:
        raise Invalid(
            f"FP8 dispatch needs hidden % 128 == 0 (one float32 scale per 128 values), got hidden={hidden}"
        )


def is_fp8_pair(x: object) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], torch.Tensor) and x[0].dtype == _FLOAT8


def problem_text(err: Exception, plain: tuple[type[Exception], ...] = (Invalid,)) -> str:
    """What a rank reports to its peers when its checks raised ``err``: the message alone for the
    kinds in ``plain`` (the checks' own), else prefixed with the exception's type."""
    if isinstance(err, plain) and not isinstance(err, RuntimeError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def device_of(x: object) -> torch.device:
    """The device of ``x`` (a tensor or an FP8 tuple); CPU for anything else (a bad argument)."""
    t = x[0] if isinstance(x, tuple) and x and isinstance(x[0], torch.Tensor) else x
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
