"""Where SaLSA's line search puts the parameters: points on the line from the step's start
``p0``, one per bucket ``p0 * (1 - decay) - lr * eta * d`` (the bucket's group multiplier ``lr``
and weight-decay factor, one step size ``eta``), along the search direction ``d`` or, for the
fallback point, the momentum direction.

Whether a search keeps a copy of ``p0`` is chosen once, when the buckets are packed: a
:class:`BackupLine` writes every point from its backup; a :class:`MovingLine` (SaLSA's
``keep_backup=False``: Adam's memory) moves the parameters from point to point and back, one
rounding per element per move. SaLSA calls either the same way, and never asks which:

* :meth:`Line.begin` is the search's first pass: every bucket's ``sum(g * d)``;
* :meth:`Line.to` puts the parameters at a point (nothing to do where they are);
* :meth:`Line.back` returns them to ``p0``, the moments untouched (a failed or aborted step);
* :meth:`Line.commit` ends the search: the step's moments are written, the parameters stay.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backends import FIRST, MOVE, RESTORE
from .salsa_scalars import Writes

__all__ = ["Point", "Line", "BackupLine", "MovingLine"]


class Point(NamedTuple):
    """A point on the line: step size ``eta`` with each bucket's ``writes`` (multiplier, decay),
    along the search direction or (``momentum``) the momentum direction."""

    eta: float
    writes: Writes
    momentum: bool = False

    def bucket(self, i: int) -> tuple[bool, float, float]:
        """Bucket ``i``'s part: ``(momentum, lr * eta, decay)``."""
        return self.momentum, self.writes.lrs[i] * self.eta, self.writes.decays[i]


class Line:
    """The moves of a line search over the buckets (see the module docstring); ``hypers`` are
    the buckets' step constants, in bucket order."""

    def __init__(self, backend, buckets: list, hypers: list) -> None:
        self.backend, self.buckets, self.hypers = backend, buckets, hypers
        self.at: Point | None = None  # where the parameters are (None: at p0)

    def begin(self, first: Point) -> list[torch.Tensor]:
        """The first pass of a search: each bucket's ``sum(g * d)`` (0-dim, no sync). After it
        the parameters are at ``first`` or still at ``p0`` (see :attr:`at`)."""
        raise NotImplementedError

    def to(self, point: Point) -> None:
        """Put the parameters at ``point``."""
        if point != self.at:
            self._write(point)
            self.at = point

    def _write(self, point: Point) -> None:
        raise NotImplementedError

    def back(self) -> None:
        """Every bucket back to ``p0``, even if one of them fails to move (the first error is
        raised after); the search is over."""
        errors = []
        for i, b in enumerate(self.buckets):
            try:
                self._back(i)
            except BaseException as e:  # (keep restoring the others)
                errors.append(e)
            finally:
                b.end_search()
        self.at = None
        if errors:
            raise errors[0]

    def _back(self, i: int) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """The search is decided: each bucket's moments are written, in turn (a commit that
        raises leaves the buckets not yet committed to :meth:`back`); the parameters stay."""
        for i, (b, hyper) in enumerate(zip(self.buckets, self.hypers)):
            self.backend.search_commit(b, hyper=hyper)
            self._committed(i)
            b.end_search()
        self.at = None

    def _committed(self, i: int) -> None:
        """Bucket ``i`` is committed: :meth:`back` leaves it where it is."""


class BackupLine(Line):
    """Every point written from a backup of ``p0`` (the first pass writes it, and the first
    point, in one pass); back to ``p0`` is a copy."""

    def begin(self, first: Point) -> list[torch.Tensor]:
        sums = []
        for i, (b, hyper) in enumerate(zip(self.buckets, self.hypers)):
            _, lr_step, decay = first.bucket(i)
            sums.append(self.backend.backup_begin(b, lr_step=lr_step, decay=decay, hyper=hyper))
        self.at = first
        return sums

    def _write(self, point: Point) -> None:
        write = self.backend.backup_momentum_point if point.momentum else self.backend.backup_trial
        for i, (b, hyper) in enumerate(zip(self.buckets, self.hypers)):
            _, lr_step, decay = point.bucket(i)
            write(b, lr_step=lr_step, decay=decay, hyper=hyper)

    def _back(self, i: int) -> None:
        self.buckets[i].abort_search()  # (a copy, if the first pass got as far as the backup)


class MovingLine(Line):
    """No copy of ``p0``: the parameters move from point to point along the line, and back.
    From ``p0`` to a point is ``p = p0 * (1 - decay) - s * d``; along the line, ``p -= ds * d``;
    back, ``p = (p + s * d) / (1 - decay)``; to another line (direction or decay), back to ``p0``
    and out again. Each move rounds once per element. A bucket's place is noted only after its
    move succeeded, so a move that raises leaves it true for :meth:`back`."""

    def __init__(self, backend, buckets: list, hypers: list) -> None:
        super().__init__(backend, buckets, hypers)
        self.places: list[tuple[bool, float, float] | None] = [None] * len(buckets)  # each bucket's; None: p0

    def begin(self, first: Point) -> list[torch.Tensor]:
        return [self.backend.moving_begin(b, hyper=hyper) for b, hyper in zip(self.buckets, self.hypers)]

    def _write(self, point: Point) -> None:
        for i in range(len(self.buckets)):
            self._goto(i, point.bucket(i))

    def _goto(self, i: int, place: tuple[bool, float, float]) -> None:
        now, (momentum, s, decay) = self.places[i], place
        if now is not None and now != place and (now[0] != momentum or now[2] != decay):
            self._back(i)
            now = None
        if now is None:
            self._move(i, FIRST, momentum, s, decay)
        elif now != place:
            self._move(i, MOVE, momentum, s - now[1], 0.0)
        self.places[i] = place

    def _back(self, i: int) -> None:
        if self.places[i] is not None:
            momentum, s, decay = self.places[i]
            self._move(i, RESTORE, momentum, s, decay)
            self.places[i] = None

    def _committed(self, i: int) -> None:
        self.places[i] = None

    def _move(self, i: int, mode: int, momentum: bool, s: float, decay: float) -> None:
        b, hyper = self.buckets[i], self.hypers[i]
        self.backend.moving_move(b, mode=mode, momentum=momentum, s=s, decay=decay, hyper=hyper)
