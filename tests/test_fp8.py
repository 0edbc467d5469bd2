"""Tests of epcomm.fp8 against an independent bit-level E4M3 reference (numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epcomm.fp8 import fp8_row_bytes, is_fp8_tuple, per_token_cast_back, per_token_cast_to_fp8

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------


def ref_round_e4m3(v: np.ndarray) -> np.ndarray:
    """Round float64 values with |v| <= 448 to the E4M3 grid, ties to even.

    E4M3: 3 mantissa bits, smallest normal exponent -6, so the spacing is
    2**(e-3) for |v| in [2**e, 2**(e+1)), e >= -6, and 2**-9 below 2**-6.
    """
    a = np.abs(v)
    _, ex = np.frexp(a)  # a = m * 2**ex, m in [0.5, 1)
    e = np.maximum(ex - 1, -6)
    quantum = np.ldexp(1.0, e - 3)
    return np.sign(v) * np.round(a / quantum) * quantum  # np.round: half to even


def ref_quantise(x: torch.Tensor, block: int, pow2: bool):
    """Per-block reference: float32 scale arithmetic in numpy, E4M3 rounding from the spec."""
    xf = x.float().numpy().astype(np.float32)
    n, h = xf.shape
    xb = xf.reshape(n, h // block, block)
    amax = np.abs(xb).max(axis=-1) if xb.size else np.zeros((n, h // block), np.float32)
    scale = np.maximum(amax, np.float32(1e-4)) / np.float32(448.0)  # float32 division
    if pow2:
        scale = np.array(
            [2.0 ** math.ceil(math.log2(float(s))) for s in scale.ravel()], dtype=np.float32
        ).reshape(scale.shape)
        # guard math.log2 rounding: the true smallest power of two >= s
        exact = np.maximum(amax, np.float32(1e-4)) / np.float32(448.0)
        scale = np.where(scale < exact, scale * 2, scale).astype(np.float32)
        scale = np.where(scale / 2 >= exact, scale / 2, scale).astype(np.float32)
    q = np.clip(xb / scale[..., None], -448.0, 448.0).astype(np.float64)  # float32 division
    return ref_round_e4m3(q).reshape(n, h), scale


@st.composite
def activations(draw, max_blocks: int = 4):
    """[N, H] activations with per-block magnitudes, zero blocks, outliers and tiny values."""
    n = draw(st.integers(0, 5))
    block = draw(st.sampled_from([128, 128, 32]))
    blocks = draw(st.integers(1, max_blocks))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, blocks, block, generator=gen)
    lo, hi = (-12, 6) if dtype == torch.float16 else (-30, 30)
    exps = torch.randint(lo, hi, (n, blocks, 1), generator=gen).float()
    x = x * torch.exp2(exps)
    kind = draw(st.sampled_from(["plain", "zeros", "outlier", "wide"]))
    if kind == "zeros" and n:
        x[:, 0] = 0.0
    elif kind == "outlier":
        x[..., 0] *= 1000.0 if dtype != torch.float16 else 30.0
    elif kind == "wide":  # huge dynamic range inside a block: exercises E4M3 subnormals
        x = x * torch.exp2(-torch.randint(0, 20, x.shape, generator=gen).float())
    return x.reshape(n, blocks * block).to(dtype), block


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------


@FAST
@given(case=activations(), pow2=st.booleans())
def test_quantisation_matches_bit_level_reference(case, pow2):
    x, block = case
    x_fp8, scales = per_token_cast_to_fp8(x, power_of_two_scales=pow2, block=block)
    ref_q, ref_s = ref_quantise(x, block, pow2)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (x.shape[0], x.shape[1] // block)
    assert scales.is_contiguous()
    np.testing.assert_array_equal(scales.numpy(), ref_s)
    np.testing.assert_array_equal(x_fp8.float().numpy().astype(np.float64), ref_q)


@FAST
@given(case=activations(), pow2=st.booleans())
def test_round_trip_error_bound_and_no_saturation(case, pow2):
    x, block = case
    x_fp8, scales = per_token_cast_to_fp8(x, power_of_two_scales=pow2, block=block)
    back = per_token_cast_back(x_fp8, scales, dtype=torch.float32)
    n, h = x.shape
    xf = x.float().reshape(n, h // block, block)
    err = (back.reshape(n, h // block, block) - xf).abs()
    s = scales.unsqueeze(-1)
    # element-wise: E4M3 relative 2**-4 (normal) / absolute 2**-10 * scale (subnormal)
    bound = 2.0**-4 * xf.abs() + 2.0**-10 * s
    assert bool((err <= bound * (1 + 2.0**-20)).all())
    # block-wise: relative to the block's (clamped) amax, at most 2**-3
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    assert bool((err <= 2.0**-3 * amax).all())
    q = x_fp8.float().reshape(n, h // block, block)
    assert not bool(torch.isnan(q).any())
    qmax = q.abs().amax(-1)
    real = xf.abs().amax(-1) >= 1e-4
    if pow2:
        # power-of-two scales never saturate: the block maximum lands in (224, 448]
        assert bool((qmax <= 448).all())
        assert bool((qmax[real] > 224 - 1e-3).all())
        assert bool(((xf / s).abs() <= 448).all())
    else:
        assert bool((qmax[real] == 448).all())  # the block maximum maps to +-448


@FAST
@given(case=activations())
def test_power_of_two_scales_are_powers_of_two(case):
    x, block = case
    _, scales = per_token_cast_to_fp8(x, power_of_two_scales=True, block=block)
    _, plain = per_token_cast_to_fp8(x, power_of_two_scales=False, block=block)
    mant, _ = torch.frexp(scales)
    assert bool((mant == 0.5).all())
    assert bool((scales >= plain).all()) and bool((scales < 2 * plain).all())


@FAST
@given(
    q=st.lists(st.sampled_from(sorted({float(v) for v in torch.arange(256, dtype=torch.uint8)
                                       .view(torch.float8_e4m3fn).float().tolist()
                                       if math.isfinite(v)})), min_size=127, max_size=127),
    k=st.integers(-20, 20),
    neg=st.booleans(),
    pow2=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_representable_values_round_trip_exactly(q, k, neg, pow2, dtype):
    # a block containing +-448 * 2**k gets scale exactly 2**k (in both modes), so
    # every value q * 2**k with q on the E4M3 grid must come back bit-exactly.
    vals = torch.tensor([(-448.0 if neg else 448.0)] + q, dtype=torch.float64) * 2.0**k
    x = vals.to(dtype).reshape(1, 128)
    assert torch.equal(x.double(), vals.reshape(1, 128))  # exactly representable in dtype
    x_fp8, scales = per_token_cast_to_fp8(x, power_of_two_scales=pow2)
    assert float(scales) == 2.0**k
    assert torch.equal(per_token_cast_back(x_fp8, scales, dtype=dtype), x)


def test_zero_blocks_and_empty_inputs():
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    x[1, 128:] = 1.0
    x_fp8, scales = per_token_cast_to_fp8(x)
    assert torch.equal(scales[0], torch.full((2,), np.float32(1e-4) / np.float32(448.0)))
    assert torch.equal(per_token_cast_back(x_fp8, scales), x)
    for n, h in [(0, 128), (0, 0), (4, 0)]:
        q, s = per_token_cast_to_fp8(torch.zeros(n, h))
        assert q.shape == (n, h) and s.shape == (n, h // 128)
        assert per_token_cast_back(q, s).shape == (n, h)


def test_input_dtypes_agree_and_output_dtype():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 384, generator=gen).to(torch.bfloat16)
    a = per_token_cast_to_fp8(x)
    b = per_token_cast_to_fp8(x.float())
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert per_token_cast_back(*a, dtype=dtype).dtype == dtype
    assert per_token_cast_back(*a).dtype == torch.bfloat16


def test_deterministic():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 512, generator=gen)
    a, b = per_token_cast_to_fp8(x), per_token_cast_to_fp8(x.clone())
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def test_fp8_row_bytes():
    assert fp8_row_bytes(7168) == 7168 + 4 * 56 == 7392
    assert fp8_row_bytes(128) == 132
    assert fp8_row_bytes(64, block=32) == 64 + 8
    q, s = per_token_cast_to_fp8(torch.zeros(1, 4096))
    assert fp8_row_bytes(4096) == q.element_size() * q.shape[1] + s.element_size() * s.shape[1]
    for bad, exc in [(0, ValueError), (100, ValueError), (-128, ValueError), (128.0, TypeError)]:
        with pytest.raises(exc, match="hidden"):
            fp8_row_bytes(bad)


def test_is_fp8_tuple():
    q, s = per_token_cast_to_fp8(torch.ones(2, 128))
    assert is_fp8_tuple((q, s))
    assert not is_fp8_tuple([q, s])
    assert not is_fp8_tuple((q, s, s))
    assert not is_fp8_tuple((q,))
    assert not is_fp8_tuple((q.float(), s))
    assert not is_fp8_tuple((q, s.double()))
    assert not is_fp8_tuple(torch.ones(2, 128, dtype=torch.bfloat16))
    assert not is_fp8_tuple(None)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: per_token_cast_to_fp8(torch.zeros(2, 100)), ValueError, ["100", "128", "divisible"]),
        (lambda: per_token_cast_to_fp8(torch.zeros(2, 128), block=0), ValueError, ["block", "0"]),
        (lambda: per_token_cast_to_fp8(torch.zeros(2, 128), block=12.5), TypeError, ["block", "12.5"]),
        (lambda: per_token_cast_to_fp8(torch.zeros(256)), ValueError, ["x", "2-D", "(256,)"]),
        (lambda: per_token_cast_to_fp8(torch.zeros(2, 128, dtype=torch.int32)), TypeError, ["x", "int32"]),
        (lambda: per_token_cast_to_fp8(torch.zeros(2, 128, dtype=torch.float64)), TypeError, ["x", "float64"]),
        (lambda: per_token_cast_to_fp8(np.zeros((2, 128))), TypeError, ["x", "ndarray"]),
        (lambda: per_token_cast_back(torch.zeros(2, 128), torch.ones(2, 1)), TypeError, ["x_fp8", "float32"]),
        (lambda: per_token_cast_back(torch.zeros(2, 128).to(torch.float8_e4m3fn), torch.ones(2, 1, dtype=torch.int32)),
         TypeError, ["scales", "int32"]),
        (lambda: per_token_cast_back(torch.zeros(2, 128).to(torch.float8_e4m3fn), torch.ones(3, 1)),
         ValueError, ["scales", "3", "2"]),
        (lambda: per_token_cast_back(torch.zeros(2, 128).to(torch.float8_e4m3fn), torch.ones(2, 3)),
         ValueError, ["128", "3"]),
        (lambda: per_token_cast_back(torch.zeros(2, 128).to(torch.float8_e4m3fn), torch.ones(2)),
         ValueError, ["2-D"]),
        (lambda: per_token_cast_back(torch.zeros(2, 128).to(torch.float8_e4m3fn), torch.ones(2, 1), dtype=torch.int8),
         TypeError, ["dtype", "int8"]),
    ],
)
def test_rejects_bad_inputs(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value)
