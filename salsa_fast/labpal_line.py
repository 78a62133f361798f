"""Where LABPAL's measurement puts the parameters: points on the line from the measurement's
start ``theta0`` along its direction ``D = d + momentum * buf`` (``d`` the mean gradient of its
gradient batches), ``theta0 - x * D / ||D||`` in every bucket alike (group ``lr`` multipliers
scale updates, not measurements), and the closing update ``theta0 - step * lr * D / ||D||``
(each bucket with its group's ``lr``), which also makes the momentum buffer ``D``.

Whether a measurement keeps a copy of ``theta0`` is chosen once, when the buckets are packed: a
:class:`BackupLine` writes every point from its backup (the first point saves it, in the same
pass); a :class:`MovingLine` (LABPAL's ``keep_backup=False``) moves the parameters from point
to point by the difference and back, one rounding per element per move. LABPAL calls either
the same way, and never asks which:

* :meth:`MeasuredLine.begin` starts a line from where the parameters are (nothing moves);
* :meth:`MeasuredLine.to` puts them at ``theta0 - x * D / ||D||``;
* :meth:`MeasuredLine.back` returns them to ``theta0``, the momentum buffer untouched;
* :meth:`MeasuredLine.close` ends the measurement with its update (the momentum buffer becomes ``D``).
"""

from __future__ import annotations

import torch

__all__ = ["BackupLine", "MeasuredLine", "MovingLine"]


class MeasuredLine:
    """The moves of a LABPAL measurement over the buckets (see the module docstring), each one
    pass of the backend per bucket."""

    def __init__(self, backend, buckets: list) -> None:
        self.backend, self.buckets = backend, buckets
        self.sources: list[torch.Tensor] = []  # each bucket's gradient sum, the direction's d times count
        self.count = 1  # gradient batches in the sums
        self.momentum = 0.0
        self.norm = 1.0  # ||D||

    def begin(self, sources: list[torch.Tensor], *, count: int, momentum: float, norm: float) -> None:
        """A line from where the parameters are now (``theta0``), along the direction built from
        each bucket's gradient sum over ``count`` batches and ``momentum``; ``norm`` is its
        ``||D||``. Nothing moves yet."""
        self.sources, self.count, self.momentum, self.norm = sources, count, momentum, norm

    def to(self, x: float) -> None:
        """Every bucket at ``theta0 - x * D / ||D||``."""
        raise NotImplementedError

    def back(self) -> None:
        """Every bucket back at ``theta0`` (the parameters' values before :meth:`to`); the line is over."""
        raise NotImplementedError

    def close(self, step: float, lrs: list[float]) -> None:
        """The measurement's closing update: each bucket at ``theta0 - step * lr * D / ||D||``
        (``lrs``: each bucket's group ``lr``), and the momentum buffer becomes ``D``; the line is over."""
        raise NotImplementedError

    def _point(self, i: int, scale: float, *, save_backup: bool = False, write_buffer: bool = False) -> None:
        """Bucket ``i`` at ``backup - scale * D`` (``save_backup``: the backup is first saved)."""
        b, src, along = self.buckets[i], self.sources[i], self._along()
        self.backend.labpal_point(b, src, **along, scale=scale, save_backup=save_backup, write_buffer=write_buffer)

    def _update(self, i: int, scale: float, *, write_buffer: bool = False) -> None:
        """Bucket ``i`` moved by ``p -= scale * D``."""
        b, src, along = self.buckets[i], self.sources[i], self._along()
        self.backend.labpal_update(b, src, **along, scale=scale, coef=None, ok=None, write_buffer=write_buffer)

    def _along(self) -> dict:
        """The backend's arguments that build ``D`` from a gradient sum."""
        return {"count": self.count, "momentum": self.momentum}


class BackupLine(MeasuredLine):
    """Every point written from a backup of ``theta0``, which the first point saves in the same
    pass; back to ``theta0`` is a copy of it (in the buckets that saved it)."""

    def __init__(self, backend, buckets: list) -> None:
        super().__init__(backend, buckets)
        self.saved = 0  # buckets whose backup holds theta0 (the first ones, in order)

    def begin(self, sources: list[torch.Tensor], *, count: int, momentum: float, norm: float) -> None:
        super().begin(sources, count=count, momentum=momentum, norm=norm)
        self.saved = 0

    def to(self, x: float) -> None:
        for i in range(len(self.buckets)):
            first = i >= self.saved  # (the bucket is still at theta0: save it on the way)
            self._point(i, x / self.norm, save_backup=first)
            self.saved += first

    def back(self) -> None:
        for b in self.buckets[: self.saved]:
            b.copy_params_from(b.backup)
        self.saved = 0

    def close(self, step: float, lrs: list[float]) -> None:
        for i, lr in enumerate(lrs):
            self._point(i, step / self.norm * lr, write_buffer=True)
        self.saved = 0


class MovingLine(MeasuredLine):
    """No copy of ``theta0``: each bucket moves along the line from where it is,
    ``p -= (s_new - s_old) * D``, and back (each move one rounding per element). A bucket's
    place is noted only after its move succeeded, so a move that raises leaves it true for
    :meth:`back`."""

    def __init__(self, backend, buckets: list) -> None:
        super().__init__(backend, buckets)
        self.at = [0.0] * len(buckets)  # each bucket at theta0 - at * D

    def begin(self, sources: list[torch.Tensor], *, count: int, momentum: float, norm: float) -> None:
        super().begin(sources, count=count, momentum=momentum, norm=norm)
        self.at = [0.0] * len(self.buckets)

    def to(self, x: float) -> None:
        for i in range(len(self.buckets)):
            self._move(i, x / self.norm)

    def back(self) -> None:
        for i, at in enumerate(self.at):
            if at:
                self._move(i, 0.0)

    def close(self, step: float, lrs: list[float]) -> None:
        for i, lr in enumerate(lrs):
            self._move(i, step / self.norm * lr, write_buffer=True)
        self.at = [0.0] * len(self.buckets)

    def _move(self, i: int, scale: float, write_buffer: bool = False) -> None:
        """Bucket ``i`` from ``theta0 - at * D`` to ``theta0 - scale * D``."""
        self._update(i, scale - self.at[i], write_buffer=write_buffer)
        self.at[i] = scale
