"""Bookkeeping of the search without a backup (``SaLSA(keep_backup=False)``), for both backends.

The parameters leave the step's starting point ``p0`` for ``p0 * (1 - decay) - lr_step * d`` and
then move from trial to trial; ``bucket.lean_at`` remembers ``(momentum, lr_step, decay)`` of the
point they are at, so a further trial is one move ``p -= (lr_new - lr_old) * d`` and going back
is ``p = (p + lr_step * d) / (1 - decay)``. Each backend provides the move itself, as
``move(b, mode=..., momentum=..., s=..., decay=..., h=...)`` with one of the modes below, and
gets its three passes from :func:`passes`; the bookkeeping is updated only after a move
succeeded, so a move that raises leaves it true.
"""

from __future__ import annotations

FIRST, MOVE, RESTORE = 0, 1, 2  # p = p*(1-decay) - s*d;  p = p - s*d;  p = (p + s*d) / (1-decay)


def goto(move, b, *, momentum: bool, lr_step: float, decay: float, h) -> None:
    """Move the bucket's parameters to ``p0 * (1 - decay) - lr_step * d``: one move along the
    line they are on, or, to another line (direction or decay), back to ``p0`` and out again."""
    at = b.lean_at
    if at is not None and (at[0] != momentum or at[2] != decay):
        move(b, mode=RESTORE, momentum=at[0], s=at[1], decay=at[2], h=h)
        b.lean_at = at = None
    if at is None:
        move(b, mode=FIRST, momentum=momentum, s=lr_step, decay=decay, h=h)
    else:
        move(b, mode=MOVE, momentum=momentum, s=lr_step - at[1], decay=0.0, h=h)
    b.lean_at = (momentum, lr_step, decay)


def restore(move, b, *, h) -> None:
    """Back to ``p0`` (to a rounding per element per move made); drop the search's scratch."""
    at = b.lean_at
    if at is not None:
        momentum, lr_step, decay = at
        move(b, mode=RESTORE, momentum=momentum, s=lr_step, decay=decay, h=h)
    b.end_search()


def passes(move):
    """A backend's ``lean_trial``, ``lean_momentum_point`` and ``lean_restore`` over its move."""

    def trial(b, *, lr_step: float, decay: float, h) -> None:
        goto(move, b, momentum=False, lr_step=lr_step, decay=decay, h=h)

    def momentum_point(b, *, lr_step: float, decay: float, h) -> None:
        goto(move, b, momentum=True, lr_step=lr_step, decay=decay, h=h)

    def back(b, *, h) -> None:
        restore(move, b, h=h)

    return trial, momentum_point, back
