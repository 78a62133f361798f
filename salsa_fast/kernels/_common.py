"""Helpers shared by the kernel families: launch constants, scalar passing, full and partial
blocks, IEEE math, SaLSA's Adam arithmetic."""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program: 8 per thread at 4 warps, enough for full-width loads
NUM_WARPS = 4


def grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


_F32 = struct.Struct("f")


def split(x: float) -> tuple[float, float]:
    """A host float as an (fp32 high, fp32 low) pair; ``high + low`` recovers ~48 bits. (Rounded
    to fp32 through ``struct``: no tensor is built per kernel argument.)"""
    try:
        hi = _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # beyond fp32's range: the high part alone carries it, as inf
        hi = float("inf") if x > 0 else float("-inf")
    return hi, (x - hi if hi - hi == 0 else 0.0)


def adam_constants(hyper) -> tuple[tuple[float, float], ...]:
    """SaLSA's moment constants as one kernel argument: the (high, low) pairs of beta1, 1 - beta1,
    beta2, 1 - beta2 and eps, in that order (see :func:`moment_constants`). The bias corrections
    are read on the device, from ``hyper.state.pow1``/``pow2``."""
    b1, b2 = hyper.beta1, hyper.beta2
    return split(b1), split(1 - b1), split(b2), split(1 - b2), split(hyper.eps)


def on_device(t: torch.Tensor):
    """Launch under ``t``'s device: Triton launches on the *current* CUDA device, which need not
    be the one the buffers are on (a model on ``cuda:1``)."""
    if t.device.type != "cuda" or t.device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


@triton.jit
def scalar(pair, ST: tl.constexpr):
    """Rebuild a host scalar in the math dtype ``ST`` from its (high, low) pair (:func:`split`)."""
    return tl.cast(pair[0], ST) + tl.cast(pair[1], ST)


@triton.jit
def moment_constants(adam, pow1_ptr, pow2_ptr, ST: tl.constexpr):
    """The moment constants ``mc`` in the math dtype ``ST`` from :func:`adam_constants`: beta1,
    1 - beta1, beta2, 1 - beta2, the two bias corrections (``1 - beta ** step`` from the step's
    device state, in fp64) and eps."""
    b1, omb1, b2, omb2 = scalar(adam[0], ST), scalar(adam[1], ST), scalar(adam[2], ST), scalar(adam[3], ST)
    c1, c2 = (1.0 - tl.load(pow1_ptr)).to(ST), (1.0 - tl.load(pow2_ptr)).to(ST)
    return b1, omb1, b2, omb2, c1, c2, scalar(adam[4], ST)


@triton.jit
def div(a, b, ST: tl.constexpr):
    """IEEE-rounded division (Triton's fp32 ``/`` is approximate)."""
    if ST == tl.float64:  # noqa: SIM300 (a constexpr parameter, not a constant)
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def sqrt(a, ST: tl.constexpr):
    """IEEE-rounded square root."""
    if ST == tl.float64:  # noqa: SIM300 (a constexpr parameter, not a constant)
        return tl.sqrt(a)
    else:
        return tl.math.sqrt_rn(a)


@triton.jit
def rounded(x, DT: tl.constexpr):
    """``x`` rounded to the parameter dtype ``DT`` to nearest-even, as torch rounds. bf16 is
    rounded by hand: Triton's interpreter truncates fp32 -> bf16 (the GPU rounds), and one
    rounding rule everywhere keeps interpreter, GPU and torch backend in step."""
    if DT == tl.bfloat16:  # noqa: SIM300 (a constexpr parameter, not a constant)
        bits = x.to(tl.uint32, bitcast=True)
        bits_rne = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits_rne = tl.where(x != x, (bits >> 16) | 0x40, bits_rne)  # a NaN stays a (quiet) NaN
        return bits_rne.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def flat_block(n, BLOCK: tl.constexpr):
    """This program's block of a flat buffer of ``n`` elements: (program id, int64 element
    offsets, elements left from the block's start). Kernels that take ``n`` do not specialise on
    it (``do_not_specialize``): every block but the last runs unmasked (:func:`run_chunk`) and
    moves 128 bits at a time whatever ``n`` is, and one compiled variant serves every length."""
    pid = tl.program_id(0).to(tl.int64)
    start = pid * BLOCK
    return pid, start + tl.arange(0, BLOCK), n - start


@triton.jit
def run_chunk(chunk: tl.constexpr, left, BLOCK: tl.constexpr, args):
    """``chunk(mask, *args)`` over one block with ``left`` elements from its start: with ``mask``
    None (unmasked: the compiler emits 128-bit accesses) when the block is full, masked to its
    first ``left`` lanes otherwise (a tail; nothing at all where ``left <= 0``). Every kernel's
    chunk function takes the mask first and passes it to :func:`load` and :func:`store`. (The tail
    comes first: the other order made ptxas spill 16 bytes in one variant of the plain step.)"""
    if left < BLOCK:
        return chunk(tl.arange(0, BLOCK) < left, *args)
    else:
        return chunk(None, *args)


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


@triton.jit
def first_moment(m, g, b1, omb1):
    return m * b1 + omb1 * g


@triton.jit
def second_moment(v, g, b2, omb2):
    return v * b2 + omb2 * g * g


@triton.jit
def direction(g, m_ptrs, v_ptrs, mask, mc, ST: tl.constexpr, MOMENTUM: tl.constexpr, ADAM: tl.constexpr):
    """``(d, m, v)``: the step's moments from the stored ones (read, not written; ``g`` where not
    computed) and its direction, ``mhat`` (MOMENTUM) or ``g``, divided by ``sqrt(vhat) + eps`` (ADAM).
    The kernels' Adam arithmetic lives here alone (the commit uses the moment helpers above), so that
    the plain step and both searches' passes agree with each other and track the torch backend to the
    last bits: math in ``ST`` (fp32; fp64 for fp64 parameters) in torch's order of operations,
    ``mhat / (sqrt(v / corr2) + eps)`` with IEEE-rounded divisions, not reciprocals. It is necessarily
    a twin of the torch backend's (``backends/torch_ops.py``, eager ops on whole buffers) and of the
    compiled CPU loops' (``backends/cpu_compiled.py``): Triton code cannot call torch ops, nor the
    reverse."""
    b1, omb1, b2, omb2, c1, c2, eps = mc
    d, m, v = g, g, g
    if MOMENTUM:
        m = first_moment(load(m_ptrs, mask), g, b1, omb1)
        d = div(m, c1, ST)
    if ADAM:
        v = second_moment(load(v_ptrs, mask), g, b2, omb2)
        d = div(d, sqrt(div(v, c2, ST), ST) + eps, ST)
    return d, m, v
