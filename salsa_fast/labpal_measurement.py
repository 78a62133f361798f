"""A LABPAL measurement, call by call (a part of :class:`salsa_fast.LABPAL`, apart only to keep
each module short): its calls, the direction check at its last gradient batch (the one sync),
and at its last call the fit of the line and what it decides. The parameters move on the line
through :mod:`salsa_fast.labpal_line`; the fit is :mod:`salsa_fast.labpal_parabola`'s.

The phases, in order:

* :meth:`Measuring._measure`: one call of the measurement (the first ``accumulation`` with backward);
* :meth:`Measuring._check_direction`: after the last gradient batch, ``||D||`` and the slope,
  read in the measurement's one sync with the count of updates the device skipped (LABPAL's
  ``SkipLedger``); an untrusted or non-descending direction is abandoned (:meth:`Measuring._abandon`);
* :meth:`Measuring._finish_measurement` after the last call: :meth:`Measuring._fit_line` (the
  losses at points on the line), :meth:`Measuring._take_fit` (the step it gives), then
  :meth:`Measuring._close` (the update with the step in use) or, none yet, back to ``theta0``.
"""

from __future__ import annotations

import math

import torch

from .closure import draw_seed
from .labpal_parabola import IN_A_ROW, H, LineFit, fit_line, in_a_row, nanmean, rejection

__all__ = ["Measuring"]


class Measuring:
    """LABPAL's measurement (see the module docstring): the methods it measures its line with.
    They use LABPAL's buckets, backend, scalars and arguments, and its measurement state
    (``_measurement``, ``_loss_eps``, ``_line``, ``_line_norm``, ``_line_slope``, ``_in_a_row``)."""

    def _start_measurement(self) -> None:
        """The next call starts a measurement (a partly accumulated training batch is dropped)."""
        s = self._scalars
        s.measuring = True
        s.accumulated = 0
        self._measurement = []
        self._loss_eps = 0.0

    def _measure(self, closure):
        """One call of the measurement: its batch's loss at ``theta0`` (with backward for the
        first ``accumulation`` calls, whose gradients make the direction), kept with its closure
        and seed; then the direction check, or at the last call the fit. Returns the closure's output."""
        s = self._scalars
        i = len(self._measurement)
        if i < s.accumulation:
            out, loss, seed = self._gradient_call(closure)
        else:
            seed = draw_seed()
            out, loss = self._first_call(closure, seed, backwards=False)
            s.forwards += 1
        self._measurement.append((closure, seed, self._agreed(loss)))
        self._loss_eps = max(self._loss_eps, torch.finfo(loss.dtype).eps if loss.is_floating_point() else 0.0)
        if i + 1 == s.accumulation and not self._check_direction():
            self._abandon()
        elif i + 1 == self.measure_batches * s.accumulation:
            self._finish_measurement()
        return out

    def _check_direction(self) -> bool:
        """The measurement's one sync: ``||D||`` and ``<d, D>``, and with them the count of
        updates the device skipped that the host has not read (now counted). Whether the line
        is measured: a finite norm within ``trusted_norm`` (any norm while no step is in use:
        there is none to keep) and a descending slope ``-<d, D> / ||D||``."""
        s = self._scalars
        norm, dot = self._direction_sums(s.accumulation)
        unread = [self._ledger.read_skipped().to(norm.device)] if self._unread_skips else []
        norm_v, dot_v, *skipped = torch.stack([norm, dot, *unread]).tolist()
        if unread:
            self._count_device_skips(int(skipped[0]))
        slope = -dot_v / norm_v if norm_v > 0 else float("nan")
        low, high = self.trusted_norm
        trusted = low <= norm_v <= high or s.step_size is None
        if not (math.isfinite(norm_v) and trusted and slope < 0):
            if math.isfinite(norm_v) and not trusted:
                why = f"the direction norm {norm_v:.4g} is outside trusted_norm={self.trusted_norm}"
                self._count_in_a_row("abandoned", f"{why}: pass a range that holds your loss's norms")
            return False
        self._in_a_row["abandoned"] = 0
        self._line_norm, self._line_slope = norm_v, slope
        return True

    def _abandon(self) -> None:
        """Weights unchanged; train on with the step in use for another ``reuse_steps`` updates,
        or measure again if there is none yet (the reference crashed there; only a direction
        that does not descend, or is not finite, is abandoned then)."""
        s = self._scalars
        s.abandoned += 1
        self._start_measurement()
        s.measuring = s.step_size is None
        s.since_measurement = 0

    def _count_in_a_row(self, what: str, why: str) -> None:
        """One more measurement abandoned (or fit rejected) in a row; at ``IN_A_ROW``, warn once."""
        self._in_a_row[what] += 1
        if self._in_a_row[what] == IN_A_ROW:
            self._warn_once(what, in_a_row(what, why, self._scalars.step_size is not None))

    @torch.no_grad()
    def _finish_measurement(self) -> None:
        """The last call is in: the fit, then the closing update with the step in use, or, with
        none measured yet, back to ``theta0`` to measure again."""
        self._take_fit(self._fit_line())
        if self._scalars.step_size is None:
            self._line.back()
            self._start_measurement()
        else:
            self._close()

    def _fit_line(self) -> LineFit:
        """The losses at ``H`` and ``sample_step`` on the line (farther out where rounding could
        have decided the fit), fitted. A closure or a pass that raises sends the parameters back
        to ``theta0`` and the next call measures afresh."""
        s, mu = self._scalars, self.sample_step
        losses = [loss for _, _, loss in self._measurement]
        l0, l0k = nanmean(losses), nanmean(losses[: s.accumulation])
        sources = [self._source(b) for b in self._buckets]
        self._line.begin(sources, count=s.accumulation, momentum=self.momentum, norm=self._line_norm)
        try:
            (l1, l1k), (l2, l2k) = self._losses_at(H), self._losses_at(mu)
            return fit_line(
                (l0, l1, l2),
                (l0k, l1k, l2k),
                self._losses_at,
                mu=mu,
                fit=self.fit,
                max_step_size=self.max_step_size,
                slope=self._line_slope,
                eps=self._loss_eps,
            )
        except BaseException:
            self._line.back()
            self._start_measurement()
            raise

    def _losses_at(self, x: float) -> tuple[float, float]:
        """The mean loss of the stored closures at ``theta0 - x * D / ||D||``, and that of the
        first ``accumulation`` (the gradient batches); NaNs skipped."""
        s = self._scalars
        self._line.to(x)
        losses = []
        with self._replaying() as replay:
            for closure, seed, _ in self._measurement:
                _, loss = replay(closure, seed)
                s.forwards += 1
                losses.append(self._agreed(loss))
        return nanmean(losses), nanmean(losses[: s.accumulation])

    def _take_fit(self, line: LineFit) -> None:
        """Count the measurement; an accepted fit gives the step in use (during the warm-up the
        measured one, then the mean over ``window`` measurements), a rejected one is counted."""
        s = self._scalars
        s.measurements += 1
        s.rescaled += line.scale > 1
        if not line.accepted:
            s.rejected += 1
            self._count_in_a_row("rejected", rejection(line, self.sample_step, self.max_step_size))
            return
        self._in_a_row["rejected"] = 0
        step = max(min(line.step, self.max_step_size) * self.update_step_adaptation, self.eps)
        lr = max(step / max(self._line_norm, self.eps), self.eps)
        if not math.isfinite(step):
            return
        if s.updates < self.warmup_updates:
            s.step_size, s.lr = step, lr
        else:
            s.history = (s.history + [step])[-self.window :]
            s.lr_history = (s.lr_history + [lr])[-self.window :]
            s.step_size, s.lr = nanmean(s.history), nanmean(s.lr_history)

    def _close(self) -> None:
        """The measurement ends with an update of the step in use from ``theta0`` along the unit
        direction (each group times its ``lr``), in one pass; the momentum buffer becomes ``D``."""
        s = self._scalars
        self._line.close(s.step_size, [float(self.param_groups[b.group_index]["lr"]) for b in self._buckets])
        s.updates += 1
        s.since_measurement = 0
        s.measuring = False
        self._measurement = []
