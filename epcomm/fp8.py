"""Per-token 1x128 FP8 (E4M3) quantisation, the format FP8 dispatch carries.

A hidden-state row of ``H`` values is cut into ``H / 128`` blocks of 128
consecutive values.  Each block gets one float32 scale; the block's values
divided by the scale are stored as ``torch.float8_e4m3fn`` (4 exponent bits,
3 mantissa bits, largest finite value 448, no infinities).  The dispatch
payload is therefore the pair ``(x_fp8 [N, H] float8_e4m3fn, scales
[N, H/128] float32)``; the communication library only moves it, the caller
quantises before dispatch and de-quantises (or feeds an FP8 GEMM) after.

Scale choice: ``scale = max(amax, 1e-4) / 448`` where ``amax`` is the block's
largest absolute value (so the block's largest value maps to +/-448 and an
all-zero block gets a harmless tiny scale).  With ``power_of_two_scales`` the
scale is rounded *up* to a power of two (DeepSeek-V3 uses such scales for the
activations it communicates); rounding up keeps ``|x / scale| <= 448`` so
nothing saturates, and de-quantisation becomes an exact exponent shift.

Accuracy: E4M3 rounding (round-to-nearest-even) has a relative error of at
most ``2**-4`` for normal values and an absolute error of at most
``2**-10 * scale`` in the subnormal range, so every de-quantised value obeys
``|x - x_hat| <= 2**-4 * |x| + 2**-10 * scale`` (up to float32 rounding of
the division), which is below ``2**-3 * amax`` for every value of the block.
Values of the form ``q * scale`` with ``q`` representable in E4M3 round-trip
exactly.

Non-finite inputs are not checked (that would need a device sync): a block
containing ``inf`` or ``NaN`` comes back as ``NaN``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8_BLOCK",
    "AMAX_EPS",
    "per_token_cast_to_fp8",
    "per_token_cast_back",
    "fp8_row_bytes",
    "is_fp8_tuple",
]

#: Storage dtype of the quantised values.
FP8_DTYPE: torch.dtype = torch.float8_e4m3fn
#: Largest finite magnitude of ``float8_e4m3fn``.
FP8_MAX: float = 448.0
#: Number of consecutive values of a row that share one scale.
FP8_BLOCK: int = 128
#: Lower clamp of a block's amax, so all-zero blocks get a finite, non-zero scale.
AMAX_EPS: float = 1e-4

_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_block(block: object) -> int:
    """Return ``block`` if it is an int >= 1, else raise TypeError/ValueError."""
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block must be an int, got {type(block).__name__} ({block!r})")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return block


def _round_up_to_power_of_two(scale: Tensor) -> Tensor:
    """Smallest power of two ``>= scale`` for positive, finite float32 ``scale``.

    Exact: uses the binary exponent, no logarithms.

    Args:
        scale: ``float32 [...]`` positive values.

    Returns:
        ``float32 [...]`` powers of two, same shape.
    """
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale), exponent)


def per_token_cast_to_fp8(
    x: Tensor,
    *,
    power_of_two_scales: bool = False,
    block: int = FP8_BLOCK,
) -> tuple[Tensor, Tensor]:
    """Quantise each row of ``x`` to E4M3 with one float32 scale per block.

    For every row and every block of ``block`` consecutive values:
    ``scale = max(amax, 1e-4) / 448`` (rounded up to a power of two if
    ``power_of_two_scales``), ``x_fp8 = cast_e4m3(clamp(x / scale, -448,
    448))`` with round-to-nearest-even; the arithmetic is done in float32.

    Args:
        x: ``[N, H]`` tensor of dtype bfloat16, float16 or float32, any device.
            ``H`` must be a multiple of ``block``.
        power_of_two_scales: round each scale up to a power of two.
        block: values per scale (128 for the DeepEP / DeepSeek-V3 format).

    Returns:
        ``(x_fp8, scales)``: ``x_fp8`` is ``float8_e4m3fn [N, H]``, ``scales``
        is ``float32 [N, H / block]`` (contiguous, on ``x.device``);
        ``x ~= x_fp8.float() * scales.repeat_interleave(block, dim=1)``.

    Raises:
        TypeError: ``x`` is not a tensor, has an unsupported dtype, or
            ``block`` is not an int.
        ValueError: ``x`` is not 2-D, ``H`` is not divisible by ``block``, or
            ``block < 1``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    block = _check_block(block)
    num_tokens, hidden = x.shape
    if hidden % block != 0:
        raise ValueError(f"hidden size (x.shape[1]={hidden}) must be divisible by block={block}")
    num_blocks = hidden // block

    xb = x.float().reshape(num_tokens, num_blocks, block)
    amax = xb.abs().amax(dim=-1)  # reduces over `block` >= 1 values, fine for empty N or H
    scales = amax.clamp_min(AMAX_EPS) / FP8_MAX  # [N, H/block] fp32
    if power_of_two_scales:
        scales = _round_up_to_power_of_two(scales)
    q = (xb / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    x_fp8 = q.to(FP8_DTYPE).reshape(num_tokens, hidden)
    return x_fp8, scales.contiguous()


def per_token_cast_back(
    x_fp8: Tensor,
    scales: Tensor,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """De-quantise the output of :func:`per_token_cast_to_fp8`.

    The block size is inferred as ``H / scales.shape[1]``; the product
    ``x_fp8 * scale`` is formed in float32 and then cast to ``dtype``.

    Args:
        x_fp8: ``float8_e4m3fn [N, H]``.
        scales: ``[N, H / block]`` floating (normally float32) scales, on the
            same device; ``scales.shape[1]`` must divide ``H``.
        dtype: floating output dtype (default bfloat16).

    Returns:
        ``[N, H]`` tensor of dtype ``dtype`` on ``x_fp8.device``.

    Raises:
        TypeError: wrong tensor types or dtypes, or a non-floating ``dtype``.
        ValueError: shapes that do not fit together, or different devices.
    """
    if not isinstance(x_fp8, Tensor):
        raise TypeError(f"x_fp8 must be a torch.Tensor, got {type(x_fp8).__name__}")
    if not isinstance(scales, Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    if x_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"x_fp8 must be {FP8_DTYPE}, got {x_fp8.dtype}")
    if not scales.is_floating_point() or scales.dtype == FP8_DTYPE:
        raise TypeError(f"scales must be a float32 (or other wide floating) tensor, got {scales.dtype}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if x_fp8.dim() != 2 or scales.dim() != 2:
        raise ValueError(
            f"x_fp8 and scales must be 2-D, got shapes {tuple(x_fp8.shape)} and {tuple(scales.shape)}"
        )
    if x_fp8.device != scales.device:
        raise ValueError(f"x_fp8 is on {x_fp8.device} but scales are on {scales.device}")
    num_tokens, hidden = x_fp8.shape
    num_blocks = scales.shape[1]
    if scales.shape[0] != num_tokens:
        raise ValueError(
            f"scales has {scales.shape[0]} rows but x_fp8 has {num_tokens} "
            f"(shapes {tuple(scales.shape)} and {tuple(x_fp8.shape)})"
        )
    if num_blocks == 0:
        if hidden != 0:
            raise ValueError(f"scales has 0 columns but x_fp8 has hidden size {hidden}")
        return torch.empty(num_tokens, 0, dtype=dtype, device=x_fp8.device)
    if hidden % num_blocks != 0:
        raise ValueError(
            f"x_fp8 hidden size {hidden} is not a multiple of the {num_blocks} scale columns"
        )
    block = hidden // num_blocks
    out = x_fp8.float().reshape(num_tokens, num_blocks, block) * scales.float().unsqueeze(-1)
    return out.reshape(num_tokens, hidden).to(dtype)


def fp8_row_bytes(hidden: int, *, block: int = FP8_BLOCK) -> int:
    """Bytes of one FP8 row together with its float32 scales.

    Args:
        hidden: hidden size ``H``, a positive multiple of ``block``.
        block: values per scale (128).

    Returns:
        ``hidden + 4 * hidden / block`` (one byte per value, four per scale);
        7168 gives 7392.

    Raises:
        TypeError: ``hidden`` or ``block`` is not an int.
        ValueError: ``hidden < 1`` or not divisible by ``block``.
    """
    block = _check_block(block)
    if isinstance(hidden, bool) or not isinstance(hidden, int):
        raise TypeError(f"hidden must be an int, got {type(hidden).__name__} ({hidden!r})")
    if hidden < 1 or hidden % block != 0:
        raise ValueError(f"hidden must be a positive multiple of block={block}, got {hidden}")
    return hidden + 4 * (hidden // block)


def is_fp8_tuple(obj: object) -> bool:
    """Whether ``obj`` looks like an FP8 payload ``(x_fp8, scales)``.

    True for a ``tuple`` of exactly two tensors whose first is
    ``float8_e4m3fn`` and whose second is ``float32``.  Only the structure and
    dtypes are checked, not shapes (callers validate shapes with their own
    error messages).

    Args:
        obj: anything.

    Returns:
        ``True`` if ``obj`` is such a tuple, else ``False``.
    """
    return (
        isinstance(obj, tuple)
        and len(obj) == 2
        and isinstance(obj[0], Tensor)
        and isinstance(obj[1], Tensor)
        and obj[0].dtype == FP8_DTYPE
        and obj[1].dtype == torch.float32
    )
