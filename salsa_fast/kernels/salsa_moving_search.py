"""The search without a backup (``SaLSA(keep_backup=False)``): a norm pass, then moves.

No parameter-sized buffer is kept. The norm pass only reads; once the search is decided (one
sync, as always), the parameters move from point to point along the direction, which every
move recomputes from g and the would-be moments as the other search passes do:

mode 0, first    ``p = p * (1 - decay) - s * d``     (from the step's starting point p0)
mode 1, move     ``p = p - s * d``                   (s = lr * (eta_new - eta_old): the next trial)
mode 2, restore  ``p = (p + s * d) / (1 - decay)``   (s = lr * eta of the current point: back to p0)

Each move rounds once per element, so after t moves a point is within about t ulps of the
point computed from a saved copy (the default mode).

bytes per fp32 parameter (Adam; use_mv or the momentum direction add 4 for m; SGD drops v's 4):
norm     reads g, v (m); one partial of sum(g * direction) per program       8 B
move     reads p, g, v (m); writes p                                      16 B
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import table
from ._common import (BLOCK, NUM_WARPS, direction, div, grid, load, moment_args, moment_constants, offsets, on_device,
                      rounded, scalar, split, store)  # fmt: skip
from .reduce import finish, partials_buffer


@triton.jit
def _norm_kernel(
    g_ptr, m_ptr, v_ptr, partial_ptr, pow1_ptr, pow2_ptr, n,
    b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
    ADAM: tl.constexpr, USE_MV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, offs, mask = offsets(n, BLOCK)
    mc = moment_constants(b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo, pow1_ptr,
                          pow2_ptr, ST)  # fmt: skip
    g = load(g_ptr + offs, mask).to(ST)
    d, _, _ = direction(g, m_ptr + offs, v_ptr + offs, mask, mc, ST, USE_MV, ADAM)
    tl.store(partial_ptr + pid, tl.sum(g * d, axis=0))


@triton.jit
def _chunk_move(p_ptrs, g_ptrs, m_ptrs, v_ptrs, mask, s, keep, mc, ST: tl.constexpr, MODE: tl.constexpr,
                MOMENTUM: tl.constexpr, ADAM: tl.constexpr):  # fmt: skip
    p = load(p_ptrs, mask).to(ST)
    g = load(g_ptrs, mask).to(ST)
    d, _, _ = direction(g, m_ptrs, v_ptrs, mask, mc, ST, MOMENTUM, ADAM)
    if MODE == 0:  # (keep = 1 - decay; times or over 1 is exact)
        p = p * keep - s * d
    elif MODE == 1:
        p = p - s * d
    else:
        p = div(p + s * d, keep, ST)
    store(p_ptrs, rounded(p, p_ptrs.dtype.element_ty), mask)


@triton.jit
def _move_kernel(
    p_base, rows_ptr, g_ptr, m_ptr, v_ptr, pow1_ptr, pow2_ptr,
    s_hi, s_lo, keep_hi, keep_lo, b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
    MODE: tl.constexpr, MOMENTUM: tl.constexpr, ADAM: tl.constexpr,
    P_ALIGN: tl.constexpr, F_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, p_offs, f_offs, n = table.chunk(rows_ptr, P_ALIGN, F_ALIGN, BLOCK)
    s, keep = scalar(s_hi, s_lo, ST), scalar(keep_hi, keep_lo, ST)
    mc = moment_constants(b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo, pow1_ptr,
                          pow2_ptr, ST)  # fmt: skip
    p, g, m, v = p_base + p_offs, g_ptr + f_offs, m_ptr + f_offs, v_ptr + f_offs
    if n >= BLOCK:
        _chunk_move(p, g, m, v, None, s, keep, mc, ST, MODE, MOMENTUM, ADAM)
    else:
        _chunk_move(p, g, m, v, tl.arange(0, BLOCK) < n, s, keep, mc, ST, MODE, MOMENTUM, ADAM)


def norm(b, *, h):
    """sum(g * direction) over the bucket (0-dim fp64), reading g, v (m) and writing nothing."""
    n = b.numel
    adam = h.direction == "adam"
    partials = partials_buffer(b.work, grid(n)[0], b.state_dtype, b.device, "norm_partials")
    if n:
        with on_device(b.grad):
            _norm_kernel[grid(n)](
                b.grad, b.exp_avg, b.exp_avg_sq if adam else b.exp_avg, partials, h.state.pow1, h.state.pow2, n,
                *moment_args(h),
                ADAM=adam, USE_MV=h.use_mv, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
    return finish(partials)


def move(b, *, mode: int, momentum: bool, s: float, decay: float, h) -> None:
    """One move of the parameters along the search (or, ``momentum``, the momentum) direction;
    with ``use_mv`` the search direction is the momentum direction."""
    adam = h.direction == "adam"
    table.launch(
        _move_kernel, b, b.grad, b.exp_avg, b.exp_avg_sq if adam else b.exp_avg, h.state.pow1, h.state.pow2,
        *split(s), *split(1 - decay), *moment_args(h),
        writes=True, MODE=mode, MOMENTUM=momentum or h.use_mv, ADAM=adam, num_warps=NUM_WARPS,
    )  # fmt: skip
