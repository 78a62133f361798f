"""SaLSA's search without a backup (``SaLSA(keep_backup=False)``, ``salsa_line.MovingLine``): a
norm pass, then moves.

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
from ._common import (
    BLOCK,
    NUM_WARPS,
    adam_constants,
    direction,
    div,
    flat_block,
    grid,
    load,
    moment_constants,
    on_device,
    rounded,
    run_chunk,
    scalar,
    split,
    store,
)
from .reduce import finish, partials_buffer


@triton.jit
def _chunk_norm(mask, g_ptrs, m_ptrs, v_ptrs, mc, ST: tl.constexpr, USE_MV: tl.constexpr, ADAM: tl.constexpr):
    """The chunk's partial of sum(g * direction)."""
    g = load(g_ptrs, mask).to(ST)
    d, _, _ = direction(g, m_ptrs, v_ptrs, mask, mc, ST, USE_MV, ADAM)
    return tl.sum(g * d, axis=0)


@triton.jit(do_not_specialize=["n"])  # (see _common.flat_block)
def _norm_kernel(
    g_ptr,
    m_ptr,
    v_ptr,
    partial_ptr,
    pow1_ptr,
    pow2_ptr,
    n,
    adam,
    ADAM: tl.constexpr,
    USE_MV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``adam``: :func:`._common.adam_constants`."""
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, offs, left = flat_block(n, BLOCK)
    mc = moment_constants(adam, pow1_ptr, pow2_ptr, ST)
    g, m, v = g_ptr + offs, m_ptr + offs, v_ptr + offs
    tl.store(partial_ptr + pid, run_chunk(_chunk_norm, left, BLOCK, (g, m, v, mc, ST, USE_MV, ADAM)))


@triton.jit
def _chunk_move(
    mask,
    p_ptrs,
    g_ptrs,
    m_ptrs,
    v_ptrs,
    s,
    keep,
    mc,
    ST: tl.constexpr,
    MODE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    ADAM: tl.constexpr,
):
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
    p_base,
    rows_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    pow1_ptr,
    pow2_ptr,
    s,
    keep,
    adam,
    MODE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    ADAM: tl.constexpr,
    P_ALIGN: tl.constexpr,
    F_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``s``, ``keep`` (1 - decay): (high, low) pairs; ``adam``: :func:`._common.adam_constants`."""
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, p_offs, f_offs, n = table.chunk(rows_ptr, P_ALIGN, F_ALIGN, BLOCK)
    s, keep = scalar(s, ST), scalar(keep, ST)
    mc = moment_constants(adam, pow1_ptr, pow2_ptr, ST)
    p, g, m, v = p_base + p_offs, g_ptr + f_offs, m_ptr + f_offs, v_ptr + f_offs
    run_chunk(_chunk_move, n, BLOCK, (p, g, m, v, s, keep, mc, ST, MODE, MOMENTUM, ADAM))


def norm(b, *, hyper):
    """sum(g * direction) over the bucket (0-dim fp64), reading g, v (m) and writing nothing."""
    n = b.numel
    adam = hyper.direction == "adam"
    partials = partials_buffer(b.work, grid(n)[0], b.state_dtype, b.device, "norm_partials")
    if n:
        with on_device(b.grad):
            _norm_kernel[grid(n)](
                b.grad,
                b.exp_avg,
                b.exp_avg_sq if adam else b.exp_avg,
                partials,
                hyper.state.pow1,
                hyper.state.pow2,
                n,
                adam_constants(hyper),
                ADAM=adam,
                USE_MV=hyper.use_mv,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    return finish(partials)


def move(b, *, mode: int, momentum: bool, s: float, decay: float, hyper) -> None:
    """One move of the parameters along the search (or, ``momentum``, the momentum) direction;
    with ``use_mv`` the search direction is the momentum direction."""
    adam = hyper.direction == "adam"
    table.launch(
        _move_kernel,
        b,
        b.grad,
        b.exp_avg,
        b.exp_avg_sq if adam else b.exp_avg,
        hyper.state.pow1,
        hyper.state.pow2,
        split(s),
        split(1 - decay),
        adam_constants(hyper),
        writes=True,
        MODE=mode,
        MOMENTUM=momentum or hyper.use_mv,
        ADAM=adam,
        num_warps=NUM_WARPS,
    )
