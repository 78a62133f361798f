"""The torch backend: SaLSA's passes as torch ops over a :class:`FlatBucket`.

It runs wherever torch runs and is the fallback on every device. Each function handles one
bucket; the optimizer calls it once per bucket. The optimizer's own buffers (gradients, moments,
backup) are flat, so their arithmetic is whole-buffer ops; the parameters keep their own
tensors and are read and written with ``torch._foreach_*`` ops over the parameter list against
views of those buffers (a new point is computed in a flat work buffer, then copied into the
parameters in one foreach copy). All math is in the bucket's state dtype (fp32, or fp64 for
fp64 parameters); low-precision parameters are widened, updated and rounded back.

Search steps never write ``exp_avg``/``exp_avg_sq`` before the search has finished: the first
pass computes the search direction from the *would-be* moments into a scratch buffer and the
moments are committed at the end. That keeps a failed step (non-finite loss or gradient, or a
closure that raises during a trial) exactly undoable: restore ``p`` from the backup
(:meth:`FlatBucket.abort_search`), drop the scratch, and no state has changed. The commit
recomputes the moments from the gradient buffer with the same ops, so they equal the ones the
direction was built from.

On CPU, large buckets run the search's passes as compiled loops instead
(:mod:`salsa_fast.backends.cpu_compiled`): the same arithmetic, each buffer moved once.

Non-search Adam steps use torch's fused AdamW kernel over the parameter list (one pass, 28
B/param for fp32; bf16/fp16 parameters go through an fp32 copy); the step's device-side non-finite flag
(``Hyper.state.flag``, raised by :func:`probe`) makes it skip a non-finite step without a host
sync, and it corrects with the device's step count.
"""

from __future__ import annotations

import torch

from ..flat import FlatBucket
from . import FIRST, RESTORE, Hyper, cpu_compiled

name = "torch"


def _buffer(b: FlatBucket, name: str) -> torch.Tensor:
    """A bucket-sized work buffer in the state dtype. On CPU it is kept between calls: a fresh
    allocation of that size pays a page fault per 4 KiB on every use (it is zeroed once, so the
    padding between parameters holds zeros, not garbage). Elsewhere the caching allocator makes
    a fresh one free, and nothing is held between steps; nor is anything with
    ``keep_backup=False``, which trades those page faults for memory."""
    if b.device.type != "cpu" or b.adams_memory:
        return torch.empty(b.numel, dtype=b.state_dtype, device=b.device)
    buf = b.workspace.get(name)
    if buf is None:
        buf = b.workspace[name] = torch.zeros(b.numel, dtype=b.state_dtype, device=b.device)
    return buf


def _params_in_state_dtype(b: FlatBucket) -> torch.Tensor:
    """The parameters' values gathered into the flat work buffer ``"p"`` (state dtype)."""
    return b.copy_params_to(_buffer(b, "p"))


def _in_state_dtype(b: FlatBucket, t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` itself when it already has the state dtype, else a widened copy in buffer ``name``."""
    return t if t.dtype == b.state_dtype else _buffer(b, name).copy_(t)


def _fused_ok(b: FlatBucket) -> bool:
    return b.exp_avg_sq is not None and b.device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adamw_")


# SaLSA's Adam arithmetic in eager ops, written once here: the moments (new ones, committed ones,
# the search direction's would-be ones) and the preconditioner. (cpu_compiled.py writes it as the
# pure expressions its compiled loops need, and kernels/_common.py in Triton.)


def _first_moment(b: FlatBucket, g: torch.Tensor, hyper: Hyper, out: torch.Tensor | None = None) -> torch.Tensor:
    """``beta1 * m + (1 - beta1) * g`` into ``out`` (a new tensor if None; ``b.exp_avg`` commits it)."""
    return torch.mul(b.exp_avg, hyper.beta1, out=out).add_(g, alpha=1 - hyper.beta1)


def _second_moment(b: FlatBucket, g: torch.Tensor, hyper: Hyper, out: torch.Tensor | None = None) -> torch.Tensor:
    """``beta2 * v + (1 - beta2) * g * g`` into ``out``, as :func:`_first_moment`."""
    return torch.mul(b.exp_avg_sq, hyper.beta2, out=out).addcmul_(g, g, value=1 - hyper.beta2)


def _denominator_(v: torch.Tensor, hyper: Hyper) -> torch.Tensor:
    """``sqrt(v / corr2) + eps``, in ``v``'s memory."""
    return v.div_(hyper.state.corr2).sqrt_().add_(hyper.eps)


def _new_moments(b: FlatBucket, g: torch.Tensor, hyper: Hyper) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's moments, out of place."""
    return _first_moment(b, g, hyper), None if b.exp_avg_sq is None else _second_moment(b, g, hyper)


def _commit_moments(b: FlatBucket, g: torch.Tensor, hyper: Hyper) -> None:
    """The step's moments, in place."""
    _first_moment(b, g, hyper, out=b.exp_avg)
    if b.exp_avg_sq is not None:
        _second_moment(b, g, hyper, out=b.exp_avg_sq)


def _momentum_direction(m: torch.Tensor, v: torch.Tensor | None, hyper: Hyper) -> torch.Tensor:
    """``mhat * precond`` (Adam) or ``mhat`` (SGD), in ``m``'s memory."""
    d = m.div_(hyper.state.corr1)
    if v is not None:
        d.div_(_denominator_(v, hyper))
    return d


def _write_point(b: FlatBucket, d: torch.Tensor, lr_step: float, decay: float) -> None:
    """``p = backup * (1 - decay) - lr_step * d``. Parameters in the state dtype are written in
    place with foreach ops (the same arithmetic as ``mul(backup, 1 - decay)`` then
    ``add_(d, alpha=-lr_step)``, and no work buffer); others are computed flat in the state dtype
    and rounded once on the way into the parameters."""
    if b.dtype == b.state_dtype:
        p = b.tensors()
        torch._foreach_copy_(p, b.views("backup"))
        if decay:
            torch._foreach_mul_(p, 1 - decay)
        torch._foreach_add_(p, b.views_of(d), alpha=-lr_step)
        return
    t = _buffer(b, "p").copy_(b.backup)
    if decay:
        t.mul_(1 - decay)
    t.add_(d, alpha=-lr_step)
    b.copy_params_from(t)


# -- non-search step --------------------------------------------------------------------------


@torch.no_grad()
def plain_step(b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper, count_skip: bool = False) -> None:
    """A non-search step: ``p = p*(1-decay) - lr_step * momentum_direction``, moments updated.

    Nothing changes where ``hyper.state.flag`` is set (a non-finite loss or gradient), decided on
    the device without a host sync; ``count_skip`` (once per device and step) then counts the
    skip in ``hyper.state``.
    """
    _plain_update(b, lr_step, decay, hyper)
    if count_skip:
        hyper.state.count_skip()


def _plain_update(b: FlatBucket, lr_step: float, decay: float, hyper: Hyper) -> None:
    if _fused_ok(b) and lr_step > 0:
        _fused_update(b, lr_step, decay, hyper)
    elif b.device.type == "cpu":  # reading the flag is free: in place, or nothing at all
        if not hyper.state.flag.item():
            _update_in_place(b, lr_step, decay, hyper)
    else:
        _update_unless_flagged(b, lr_step, decay, hyper)


def _fused_update(b: FlatBucket, lr_step: float, decay: float, hyper: Hyper) -> None:
    """torch's fused AdamW kernel, which skips where the step's flag is set."""
    # the device's step count, which the kernel corrects with (fp32 on CUDA, as torch's fused
    # Adam keeps it; the CPU kernel reads any float)
    step = hyper.state.bias_step if b.device.type == "cpu" else hyper.state.bias_step.float()
    # torch's AdamW decays by lr * weight_decay with the *new* step size; ours decays with the
    # old one, so hand it the ratio.
    kw = dict(
        lr=lr_step,
        beta1=hyper.beta1,
        beta2=hyper.beta2,
        weight_decay=decay / lr_step,
        eps=hyper.eps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=hyper.state.flag,
    )
    # straight into the parameters, one pass over the list (torch's fused kernel walks each
    # tensor's memory linearly, so a strided parameter takes the detour below)
    if b.dtype == b.state_dtype and b.dense:
        n = len(b.params)
        torch._fused_adamw_(
            b.tensors(), b.views("grad"), b.views("exp_avg"), b.views("exp_avg_sq"), [], [step] * n, **kw
        )
        return
    # The fused kernel wants one dtype throughout: low-precision parameters take a detour
    # through the state dtype (fp32 math, one rounding on the way back).
    p, g = _params_in_state_dtype(b), _in_state_dtype(b, b.grad, "g")
    torch._fused_adamw_([p], [g], [b.exp_avg], [b.exp_avg_sq], [], [step], **kw)
    b.copy_params_from(p)


def _update_in_place(b: FlatBucket, lr_step: float, decay: float, hyper: Hyper) -> None:
    """The step's update without the fused kernel, in place (the flag was read: not set)."""
    g = _in_state_dtype(b, b.grad, "g")
    p = _params_in_state_dtype(b)
    if decay:
        p.mul_(1 - decay)
    _commit_moments(b, g, hyper)
    m, v = b.exp_avg.clone(), None if b.exp_avg_sq is None else b.exp_avg_sq.clone()
    p.add_(_momentum_direction(m, v, hyper), alpha=-lr_step)
    b.copy_params_from(p)


def _update_unless_flagged(b: FlatBucket, lr_step: float, decay: float, hyper: Hyper) -> None:
    """The device-side skip without the fused kernel: computed out of place, then selected."""
    g = _in_state_dtype(b, b.grad, "g")
    p = _params_in_state_dtype(b)
    skip = hyper.state.flag.bool()
    m, v = _new_moments(b, g, hyper)
    new_p = p * (1 - decay) if decay else p.clone()
    new_p.add_(_momentum_direction(m.clone(), None if v is None else v.clone(), hyper), alpha=-lr_step)
    b.exp_avg.copy_(torch.where(skip, b.exp_avg, m))
    if v is not None:
        b.exp_avg_sq.copy_(torch.where(skip, b.exp_avg_sq, v))
    b.copy_params_from(torch.where(skip, p, new_p))


def probe(b: FlatBucket, hyper: Hyper, loss: torch.Tensor | None = None) -> None:
    """Raise ``hyper.state.flag`` if a gradient of the bucket (or ``loss``) is not finite, no sync.
    The probe is the gradient buffer's sum, reduced in its own dtype (torch accumulates in fp32;
    asking for an fp32 result is ~50x slower on CPU): non-finite iff an element is. fp16's range
    would overflow a sum of finite values: max minus min there."""
    g = b.grad
    if g.dtype == torch.float16 and g.numel():
        low, high = torch.aminmax(g)
        total = high.double() - low.double()
    else:
        total = g.sum().double()
    if loss is not None:
        total = total + loss.to(total.dtype) * 0  # NaN iff the loss is not finite
    torch.maximum(hyper.state.flag, (~torch.isfinite(total)).to(hyper.state.flag.dtype), out=hyper.state.flag)


# -- the search with a backup (keep_backup=True; salsa_fast.salsa_line.BackupLine) --------------


def _search_direction(b: FlatBucket, g: torch.Tensor, hyper: Hyper) -> torch.Tensor:
    """The search direction from the step's would-be moments, into the work buffer ``"direction"``
    (SGD without ``use_mv``: the gradient itself; zero_grad() is a no-op during a search)."""
    if hyper.direction == "adam":
        d = _denominator_(_second_moment(b, g, hyper, _buffer(b, "direction")), hyper)  # (in the direction's memory)
        if hyper.use_mv:
            m_hat = _first_moment(b, g, hyper, _buffer(b, "m_hat"))
            torch.div(m_hat.div_(hyper.state.corr1), d, out=d)
        else:
            torch.div(g, d, out=d)
        return d
    if hyper.use_mv:
        return _first_moment(b, g, hyper, _buffer(b, "direction")).div_(hyper.state.corr1)
    return g


@torch.no_grad()
def backup_begin(b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper) -> torch.Tensor:
    """First pass of a search: back up ``p``, build the search direction, write the first trial.

    Returns this bucket's unscaled ``sum(g * direction)`` as a 0-dim tensor (state dtype).
    Moments are not touched (see the module docstring).
    """
    if cpu_compiled.usable(b, hyper):
        pp = cpu_compiled.run(cpu_compiled.first_pass, *_compiled_args(b, hyper, lr_step, decay))
        if pp is not cpu_compiled.FAILED:
            b.backup_written()
            b.scratch["compiled"] = pp  # (the trials recompute the direction)
            return pp
    b.save_backup()
    g = _in_state_dtype(b, b.grad, "g")
    d = b.scratch["direction"] = _search_direction(b, g, hyper)
    pp = torch.dot(g, d)
    _write_point(b, d, lr_step, decay)
    return pp


def _compiled_args(b: FlatBucket, hyper: Hyper, lr_step: float, decay: float) -> tuple:
    """The arguments of ``cpu_compiled.first_pass`` and ``trial`` for bucket ``b``."""
    b.ensure_backup()
    gs = b.views("grad")
    ms = b.views("exp_avg") if hyper.use_mv else gs  # (not read without use_mv)
    k = cpu_compiled.numbers(b, hyper, lr_step, decay)
    return b.tensors(), b.views("backup"), gs, b.views("exp_avg_sq"), ms, k, hyper.eps, hyper.use_mv, bool(decay)


@torch.no_grad()
def backup_trial(b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper) -> None:
    """A further trial: ``p = backup*(1-decay) - lr_step * direction``."""
    if "compiled" in b.scratch:
        if cpu_compiled.run(cpu_compiled.trial, *_compiled_args(b, hyper, lr_step, decay)) is not cpu_compiled.FAILED:
            return
        del b.scratch["compiled"]  # (eager from here: the direction, stored this time)
        b.scratch["direction"] = _search_direction(b, _in_state_dtype(b, b.grad, "g"), hyper)
    _write_point(b, b.scratch["direction"], lr_step, decay)


@torch.no_grad()
def backup_momentum_point(b: FlatBucket, *, lr_step: float, decay: float, hyper: Hyper) -> None:
    """The no-search fallback inside a search step: step along the momentum direction."""
    m, v = _new_moments(b, _in_state_dtype(b, b.grad, "g"), hyper)
    _write_point(b, _momentum_direction(m, v, hyper), lr_step, decay)


@torch.no_grad()
def search_commit(b: FlatBucket, *, hyper: Hyper) -> None:
    """The search is over: commit the moments, drop the scratch (``p`` stays where it is).
    The eager ops allocate nothing (mixed-dtype in-place ops widen a low-precision gradient on
    the fly), so they cannot fail for want of memory after the search has been decided; the
    compiled loop needs a few scalars, and falls back to them if it cannot be compiled."""
    k = cpu_compiled.numbers(b, hyper) if cpu_compiled.usable(b, hyper) else None
    if k is None or cpu_compiled.run(cpu_compiled.commit, b.grad, b.exp_avg, b.exp_avg_sq, k) is cpu_compiled.FAILED:
        _commit_moments(b, b.grad, hyper)
    b.end_search()


# -- the search without a backup (keep_backup=False) -------------------------------------------
# The parameters move from point to point along the direction (salsa_fast.salsa_line.MovingLine
# decides the moves); the direction is computed once per search into a work buffer that is
# dropped with the scratch when the search ends.


@torch.no_grad()
def moving_begin(b: FlatBucket, *, hyper: Hyper) -> torch.Tensor:
    """``sum(g * direction)`` over the bucket; the parameters are not touched."""
    g = _in_state_dtype(b, b.grad, "g")
    b.scratch["direction"] = _search_direction(b, g, hyper)
    return torch.dot(g, b.scratch["direction"])


def _moving_direction(b: FlatBucket, momentum: bool, hyper: Hyper) -> torch.Tensor:
    if not momentum:
        return b.scratch["direction"]
    d = b.scratch.get("momentum")
    if d is None:  # (the fallback point: the search direction is no longer needed)
        b.scratch.pop("direction", None)
        m, v = _new_moments(b, _in_state_dtype(b, b.grad, "g"), hyper)
        d = b.scratch["momentum"] = _momentum_direction(m, v, hyper)
    return d


@torch.no_grad()
def moving_move(b: FlatBucket, *, mode: int, momentum: bool, s: float, decay: float, hyper: Hyper) -> None:
    """One move (``FIRST``, ``MOVE`` or ``RESTORE``) along the search or momentum direction."""
    d = _moving_direction(b, momentum, hyper)
    widened = None if b.dtype == b.state_dtype else b.copy_params_to(_buffer(b, "p"))
    p, d_views = (b.tensors(), b.views_of(d)) if widened is None else ([widened], [d])
    if mode == RESTORE:
        torch._foreach_add_(p, d_views, alpha=s)
        if decay:
            torch._foreach_div_(p, 1 - decay)
    else:
        if mode == FIRST and decay:
            torch._foreach_mul_(p, 1 - decay)
        torch._foreach_add_(p, d_views, alpha=-s)
    if widened is not None:
        b.copy_params_from(widened)


# -- LABPAL's passes ---------------------------------------------------------------------------
# LABPAL's direction is ``D = src / count + momentum * buf`` (``src``: the bucket's gradient, or
# the sum of ``count`` batches' gradients; ``buf``: ``exp_avg``, the momentum buffer). It is
# never stored: every pass rebuilds it from ``src`` and ``buf``.


def _labpal_direction(b: FlatBucket, src: torch.Tensor, count: int, momentum: float):
    d = src / count if count != 1 else _in_state_dtype(b, src, "labpal_d")
    return d, (torch.add(d, b.exp_avg, alpha=momentum) if momentum else d)


def labpal_sums(b: FlatBucket, src: torch.Tensor, *, count: int, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||D||^2, <d, D>)`` over the bucket as 0-dim fp64 device tensors (no sync)."""
    d, D = _labpal_direction(b, src, count, momentum)
    sq = torch.dot(D, D).double()
    return sq, (torch.dot(d, D).double() if momentum else sq)


@torch.no_grad()
def labpal_update(
    b: FlatBucket,
    src: torch.Tensor,
    *,
    count: int,
    momentum: float,
    scale: float,
    coef: torch.Tensor | None,
    ok: torch.Tensor | None,
    write_buffer: bool = True,
) -> None:
    """``p -= scale * coef * D`` (``coef``: a 0-dim device tensor, or 1); with momentum and
    ``write_buffer`` the buffer becomes ``D``. Where ``ok`` (a 0-dim device bool) is False
    nothing changes."""
    _, D = _labpal_direction(b, src, count, momentum)
    if ok is not None:  # zero both factors: a non-finite rate times a zeroed D is still NaN
        D = torch.where(ok, D, torch.zeros((), dtype=D.dtype, device=b.device))
        coef = None if coef is None else torch.where(ok, coef, torch.zeros((), dtype=coef.dtype, device=coef.device))
    widened = None if b.dtype == b.state_dtype else _params_in_state_dtype(b)
    p = b.tensors() if widened is None else b.views_of(widened)
    D_views = b.views_of(D)
    if coef is None:
        torch._foreach_add_(p, D_views, alpha=-scale)
    else:
        torch._foreach_addcmul_(p, D_views, [(coef * -scale).to(D.dtype)] * len(p))
    if widened is not None:
        b.copy_params_from(widened)
    if momentum and write_buffer:
        b.exp_avg.copy_(D if ok is None else torch.where(ok, D, b.exp_avg))


@torch.no_grad()
def labpal_point(
    b: FlatBucket,
    src: torch.Tensor,
    *,
    count: int,
    momentum: float,
    scale: float,
    save_backup: bool,
    write_buffer: bool,
) -> None:
    """``p = backup - scale * D``, a point on the measured line (``save_backup``: first
    ``backup = p``); ``write_buffer``: the momentum buffer becomes ``D`` (the measurement's
    closing update)."""
    backup = b.ensure_backup()
    if save_backup:
        torch._foreach_copy_(b.views("backup"), b.tensors())
    _, D = _labpal_direction(b, src, count, momentum)
    origin = backup if backup.dtype == b.state_dtype else backup.to(b.state_dtype)
    b.copy_params_from(torch.add(origin, D, alpha=-scale, out=_buffer(b, "labpal_point")))
    if write_buffer and momentum:
        b.exp_avg.copy_(D)
