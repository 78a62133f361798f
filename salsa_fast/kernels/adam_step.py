"""The non-search step in one pass: weight decay, moments, bias correction, preconditioning.

Reads p, g, m, v and writes p, m, v: 28 bytes per fp32 parameter, the same as
``torch.optim.Adam(fused=True)``. One launch per bucket walks the parameter table
(:mod:`salsa_fast.kernels.table`). A device flag skips the whole update without a host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import table
from ._common import NUM_WARPS, div, load, moment_args, rounded, scalar, split, sqrt, store


@triton.jit
def _chunk_step(p_ptrs, g_ptrs, m_ptrs, v_ptrs, mask, lr, keep, b1, omb1, b2, omb2, c1, c2, eps,
                ST: tl.constexpr, ADAM: tl.constexpr, DECAY: tl.constexpr):  # fmt: skip
    p = load(p_ptrs, mask).to(ST)
    g = load(g_ptrs, mask).to(ST)
    m = load(m_ptrs, mask)
    if DECAY:
        p = p * keep
    m = m * b1 + omb1 * g
    d = div(m, c1, ST)
    if ADAM:
        v = load(v_ptrs, mask)
        v = v * b2 + omb2 * g * g
        d = div(d, sqrt(div(v, c2, ST), ST) + eps, ST)
        store(v_ptrs, v, mask)
    store(m_ptrs, m, mask)
    store(p_ptrs, rounded(p - lr * d, p_ptrs.dtype.element_ty), mask)


@triton.jit
def _plain_step_kernel(
    p_base, rows_ptr, g_ptr, m_ptr, v_ptr, skip_ptr,
    lr_hi, lr_lo, keep_hi, keep_lo, b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo,
    c1_hi, c1_lo, c2_hi, c2_lo, eps_hi, eps_lo,
    ADAM: tl.constexpr, DECAY: tl.constexpr, HAS_SKIP: tl.constexpr, P_ALIGN: tl.constexpr, F_ALIGN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    ST: tl.constexpr = m_ptr.dtype.element_ty
    pid, p_offs, f_offs, n = table.chunk(rows_ptr, P_ALIGN, F_ALIGN, BLOCK)
    run = True
    if HAS_SKIP:
        run = tl.load(skip_ptr) == 0
    if run:
        lr, keep = scalar(lr_hi, lr_lo, ST), scalar(keep_hi, keep_lo, ST)
        b1, omb1 = scalar(b1_hi, b1_lo, ST), scalar(omb1_hi, omb1_lo, ST)
        b2, omb2 = scalar(b2_hi, b2_lo, ST), scalar(omb2_hi, omb2_lo, ST)
        c1, c2, eps = scalar(c1_hi, c1_lo, ST), scalar(c2_hi, c2_lo, ST), scalar(eps_hi, eps_lo, ST)
        p, g, m, v = p_base + p_offs, g_ptr + f_offs, m_ptr + f_offs, v_ptr + f_offs
        if n >= BLOCK:
            _chunk_step(p, g, m, v, None, lr, keep, b1, omb1, b2, omb2, c1, c2, eps, ST, ADAM, DECAY)
        else:
            mask = tl.arange(0, BLOCK) < n
            _chunk_step(p, g, m, v, mask, lr, keep, b1, omb1, b2, omb2, c1, c2, eps, ST, ADAM, DECAY)


def plain_step(b, *, lr_step: float, decay: float, h, found_inf=None) -> None:
    """``p = p*(1-decay) - lr_step * momentum_direction``, moments updated, for one bucket."""
    adam = h.direction == "adam"
    v = b.exp_avg_sq if adam else b.exp_avg
    skip = found_inf if found_inf is not None else b.exp_avg  # unused without HAS_SKIP
    table.launch(
        _plain_step_kernel, b, b.grad, b.exp_avg, v, skip,
        *split(lr_step), *split(1 - decay), *moment_args(h),
        writes=True, ADAM=adam, DECAY=decay != 0, HAS_SKIP=found_inf is not None, num_warps=NUM_WARPS,
    )  # fmt: skip
