"""Helpers shared by the kernel families: launch constants, scalar passing, IEEE math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program: 8 per thread at 4 warps, enough for full-width loads
NUM_WARPS = 4


def grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def split(x: float) -> tuple[float, float]:
    """A host float as an (fp32 high, fp32 low) pair; ``high + low`` recovers ~48 bits."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(x - hi)


def moment_args(h) -> tuple[float, ...]:
    """The (high, low) pairs of SaLSA's moment constants, in the order the kernels take them:
    beta1, 1 - beta1, beta2, 1 - beta2, the two bias corrections, eps."""
    return (*split(h.beta1), *split(1 - h.beta1), *split(h.beta2), *split(1 - h.beta2),
            *split(h.corr1), *split(h.corr2), *split(h.eps))  # fmt: skip


@triton.jit
def scalar(hi, lo, ST: tl.constexpr):
    """Rebuild a host scalar in the math dtype ``ST`` from its (high, low) pair."""
    return tl.cast(hi, ST) + tl.cast(lo, ST)


@triton.jit
def div(a, b, ST: tl.constexpr):
    """IEEE-rounded division (Triton's fp32 ``/`` is approximate)."""
    if ST == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def sqrt(a, ST: tl.constexpr):
    """IEEE-rounded square root."""
    if ST == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.math.sqrt_rn(a)


@triton.jit
def rounded(x, DT: tl.constexpr):
    """``x`` rounded to the parameter dtype ``DT`` to nearest-even, as torch rounds. bf16 is
    rounded by hand: Triton's interpreter truncates fp32 -> bf16 (the GPU rounds), and one
    rounding rule everywhere keeps interpreter, GPU and torch backend in step."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits_rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits_rne = tl.where(x != x, (bits >> 16) | 0x40, bits_rne)  # a NaN stays a (quiet) NaN
        return bits_rne.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def offsets(n, BLOCK: tl.constexpr):
    """This program's int64 element offsets and their in-bounds mask."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return pid, offs, offs < n


@triton.jit
def load(ptrs, mask):
    """A load that is unmasked for a full chunk (``mask`` None: vectorizable) and zero-filled
    past the end of a partial one."""
    if mask is None:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def store(ptrs, value, mask):
    """The store that goes with :func:`load`."""
    if mask is None:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=mask)
