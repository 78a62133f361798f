"""LABPAL's measured line on its flat buckets: the points on it, the losses of the stored
closures there, and what the fit decides (a part of :class:`salsa_fast.LABPAL`, apart only to
keep each module short; the fit itself is :mod:`salsa_fast.parabola`'s)."""

from __future__ import annotations

import math

import torch

from .parabola import H, IN_A_ROW, fit_line, in_a_row, nanmean, rejection

__all__ = ["LineMeasurement"]


class LineMeasurement:
    """The end of a LABPAL measurement: the methods :class:`salsa_fast.LABPAL` measures its line
    with (they use its buckets, backend, scalars and arguments)."""

    def _count_in_a_row(self, what: str, why: str) -> None:
        """One more measurement abandoned (or fit rejected) in a row; at ``IN_A_ROW``, warn once."""
        self._in_a_row[what] += 1
        if self._in_a_row[what] == IN_A_ROW:
            self._warn_once(what, in_a_row(what, why, self._scalars.step is not None))

    @torch.no_grad()
    def _finish_measurement(self) -> None:
        s = self._scalars
        norm, mu, k = self._line_norm, self.sample_step, s.k
        losses = [loss for _, _, loss in self._measurement]
        l0, l0k = nanmean(losses), nanmean(losses[:k])
        self._saved_buckets = 0  # buckets whose backup holds theta0 (the first point saves it)
        self._line_at = [0.0] * len(self._buckets)  # keep_backup=False: each bucket at theta0 - at * D
        try:
            (l1, l1k), (l2, l2k) = self._losses_at(H, norm, first=True), self._losses_at(mu, norm)
            line = fit_line((l0, l1, l2), (l0k, l1k, l2k), lambda x: self._losses_at(x, norm), mu=mu, fit=self.fit,
                            max_step_size=self.max_step_size, slope=self._line_slope, eps=self._loss_eps)  # fmt: skip
        except BaseException:  # a closure (or a pass) raised: back to theta0, measure again next call
            self._back_to_theta0()
            self._start_measurement()
            raise
        s.measurements += 1
        s.rescaled += line.scale > 1
        if not line.accepted:
            s.rejected += 1
            self._count_in_a_row("rejected", rejection(line, mu, self.max_step_size))
        else:
            self._in_a_row["rejected"] = 0
            step = max(min(line.step, self.max_step_size) * self.update_step_adaptation, self.eps)
            lr = max(step / max(norm, self.eps), self.eps)
            if math.isfinite(step):
                if s.updates < self.warmup_updates:
                    s.step, s.lr = step, lr
                else:
                    s.history = (s.history + [step])[-self.window :]
                    s.lr_history = (s.lr_history + [lr])[-self.window :]
                    s.step, s.lr = nanmean(s.history), nanmean(s.lr_history)
        if s.step is None:  # nothing accepted yet: back to theta0, measure again
            self._back_to_theta0()
            self._start_measurement()
            return
        # the measurement ends with a step of the averaged length from theta0 along the unit
        # direction, written in one pass (the momentum buffer becomes the direction)
        for i, b in enumerate(self._buckets):
            lr = float(self.param_groups[b.group_index]["lr"])
            if self.keep_backup:
                self._backend.labpal_point(b, self._source(b), count=s.k, momentum=self.momentum,
                                           scale=s.step / norm * lr, save_backup=False, write_buffer=True)  # fmt: skip
            else:
                self._move_on_line(i, s.step / norm * lr, write_buffer=True)
        s.updates += 1
        s.since_measurement = 0
        s.measuring = False
        self._measurement = []

    def _move_on_line(self, i: int, scale: float, write_buffer: bool = False) -> None:
        """keep_backup=False: bucket ``i`` to ``theta0 - scale * D`` from where it is on the line,
        one rounding per element (``write_buffer``: the momentum buffer becomes ``D``)."""
        b, s = self._buckets[i], self._scalars
        self._backend.labpal_update(b, self._source(b), count=s.k, momentum=self.momentum,
                                    scale=scale - self._line_at[i], coef=None, ok=None, write_buffer=write_buffer)  # fmt: skip
        self._line_at[i] = scale

    def _back_to_theta0(self) -> None:
        """The parameters back where the measurement started (without a backup: to a rounding
        per element per move)."""
        if self.keep_backup:
            for b in self._buckets[: self._saved_buckets]:
                b.copy_params_from(b.backup)
            return
        for i, at in enumerate(self._line_at):
            if at:
                self._move_on_line(i, 0.0)

    def _losses_at(self, x: float, norm: float, first: bool = False) -> tuple[float, float]:
        """Mean loss of the stored closures at ``theta0 - x * D / ||D||``, and of the first ``k``
        (the gradient batches; NaNs skipped). The
        line is the unscaled direction: group ``lr`` multipliers scale updates, not measurements.
        ``first``: the parameters are still at ``theta0``; save them as the backup on the way."""
        s = self._scalars
        for i, b in enumerate(self._buckets):
            if not self.keep_backup:
                self._move_on_line(i, x / norm)
                continue
            self._backend.labpal_point(b, self._source(b), count=s.k, momentum=self.momentum,
                                       scale=x / norm, save_backup=first, write_buffer=False)  # fmt: skip
            self._saved_buckets += first
        losses = []
        with self._replaying() as replay:
            for closure, seed, _ in self._measurement:
                _, loss = replay(closure, seed)
                s.forwards += 1
                losses.append(self._agreed(loss))
        return nanmean(losses), nanmean(losses[: s.k])
