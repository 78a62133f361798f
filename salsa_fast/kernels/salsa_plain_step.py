"""SaLSA's non-search step in one pass: weight decay, moments, bias correction, preconditioning.

Reads p, g, m, v and writes p, m, v: 28 bytes per fp32 parameter, the same as
``torch.optim.Adam(fused=True)``. One launch per bucket walks the parameter table
(:mod:`salsa_fast.kernels.table`). The step's flag (set by :mod:`salsa_fast.kernels.probe`)
skips the whole update on the device; the bias corrections come from the device too, so a
skipped step needs no host knowledge to leave the next ones exact (see ``salsa_fast.step_state``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import table
from ._common import (
    NUM_WARPS,
    adam_constants,
    direction,
    load,
    moment_constants,
    rounded,
    run_chunk,
    scalar,
    split,
    store,
)


@triton.jit
def _chunk_step(mask, p_ptrs, g_ptrs, m_ptrs, v_ptrs, lr, keep, mc, ST: tl.constexpr, ADAM: tl.constexpr):
    p = load(p_ptrs, mask).to(ST)
    g = load(g_ptrs, mask).to(ST)
    p = p * keep  # (keep = 1 - decay; times 1 is exact, and a branch would double the variants)
    d, m, v = direction(g, m_ptrs, v_ptrs, mask, mc, ST, True, ADAM)
    if ADAM:
        store(v_ptrs, v, mask)
    store(m_ptrs, m, mask)
    store(p_ptrs, rounded(p - lr * d, p_ptrs.dtype.element_ty), mask)


@triton.jit(do_not_specialize=["count_skip"])  # (0 or 1: one compiled variant for both)
def _plain_step_kernel(
    p_base,
    rows_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    flag_ptr,
    pow1_ptr,
    pow2_ptr,
    minus_skipped_ptr,
    count_skip,
    lr,
    keep,
    adam,
    ADAM: tl.constexpr,
    P_ALIGN: tl.constexpr,
    F_ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``lr``, ``keep`` (1 - decay): (high, low) pairs; ``adam``: :func:`._common.adam_constants`."""
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, p_offs, f_offs, n = table.chunk(rows_ptr, P_ALIGN, F_ALIGN, BLOCK)
    if tl.load(flag_ptr) == 0:
        mc = moment_constants(adam, pow1_ptr, pow2_ptr, ST)
        p, g, m, v = p_base + p_offs, g_ptr + f_offs, m_ptr + f_offs, v_ptr + f_offs
        run_chunk(_chunk_step, n, BLOCK, (p, g, m, v, scalar(lr, ST), scalar(keep, ST), mc, ST, ADAM))
    elif count_skip != 0 and pid == 0:
        # (no program of this launch reads the count: the corrections were made before)
        tl.store(minus_skipped_ptr, tl.load(minus_skipped_ptr) - 1)


def plain_step(b, *, lr_step: float, decay: float, hyper, count_skip: bool = False) -> None:
    """``p = p*(1-decay) - lr_step * momentum_direction``, moments updated, for one bucket,
    unless ``hyper.state.flag`` is set (``count_skip``: then count the skip in ``hyper.state``)."""
    adam = hyper.direction == "adam"
    state = hyper.state
    if count_skip and table.param_table(b).chunks == 0:  # (nothing to launch: count it here)
        state.count_skip()
    moments = (b.exp_avg, b.exp_avg_sq if adam else b.exp_avg)
    table.launch(
        _plain_step_kernel,
        b,
        b.grad,
        *moments,
        state.flag,
        state.pow1,
        state.pow2,
        state.minus_skipped,
        int(count_skip),
        split(lr_step),
        split(1 - decay),
        adam_constants(hyper),
        writes=True,
        ADAM=adam,
        num_warps=NUM_WARPS,
    )
