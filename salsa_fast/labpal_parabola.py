"""The parabola LABPAL fits to three losses on a line, and when rounding, not the loss, could
have decided it; shared by :class:`salsa_fast.LABPAL` (its reference twin restates them)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

H = 1.77e-4  # the authors' first sample position on the line (hard-coded in their implementation)
RESOLUTION = 4.0  # a fit is decided when its slope and curvature stand this many noise reaches from 0
GROWTH = 10.0  # a fit rounding could have decided is measured again with sample steps this much longer
IN_A_ROW = 3  # measurements abandoned (or fits rejected) in a row before LABPAL warns


def parabola_step(losses: tuple[float, float, float], h: float, mu: float, fit: str) -> tuple[float, float, float]:
    """``(a, b, s)`` from losses at positions ``0, h, mu`` on the line: curvature/2, slope at 0 and
    the step to the minimum ``-b / (2a)``.

    ``fit="reference"`` reproduces the reference: ``numpy.gradient`` applied twice (first-order
    at the edge, second-order inside), which for an exact parabola ``c + beta x + alpha x^2``
    gives ``b = beta + alpha h``, ``a = alpha / 2`` and so ``s = -beta/alpha - h``, about twice
    the true minimum (the default ``update_step_adaptation=1.8`` was tuned with it).
    ``fit="exact"`` interpolates the three points: ``s`` is the parabola's minimum.
    Both ``a`` and ``b`` are linear in the losses and blind to a constant added to all three
    (:func:`fit_line` judges them from the losses' differences, free of the float64 rounding a
    large loss brings into the reference's formula).
    """
    f0, f1, f2 = losses
    if fit == "exact":
        alpha = ((f2 - f0) / mu - (f1 - f0) / h) / (mu - h)
        beta = (f1 - f0) / h - alpha * h
        a, b = alpha, beta
    else:
        d1, d2 = h, mu - h  # numpy.gradient's interior weights for uneven spacing
        g0 = (f1 - f0) / d1
        g1 = -d2 / (d1 * (d1 + d2)) * f0 + (d2 - d1) / (d1 * d2) * f1 + d1 / (d2 * (d1 + d2)) * f2
        a, b = (g1 - g0) / d1 / 2, g0
    s = -b / (2 * a) if a != 0 else float("nan")
    return a, b, s


def loss_noise(
    losses: tuple[float, float, float],
    k_losses: tuple[float, float, float],
    h: float,
    mu: float,
    slope: float,
    eps: float,
) -> float:
    """How far rounding may move each loss of a measurement (``losses`` at ``0, h, mu``): the
    larger of the loss dtype's resolution (``eps`` times the largest loss) and the gradient
    batches' misfit at ``h``.

    ``k_losses`` are the mean losses at ``0, h, mu`` of the measurement's gradient batches,
    whose slope at 0 along the line is known exactly (``slope = -<d, D> / ||D||``). With the
    curvature their loss at ``mu`` then implies, a parabola predicts their loss at ``h`` up to
    the line's third-order terms (about ``mu h^2`` times its third derivative), so the misfit is
    what the loss's arithmetic did to it: a bf16 autocast forward, say, whose weights barely
    move at ``h``, while the loss is float32.
    """
    f0, f1, f2 = k_losses
    curvature = (f2 - f0 - mu * slope) / (mu * mu)
    misfit = abs(f1 - f0 - h * slope - curvature * h * h)
    floor = eps * max(abs(v) for v in losses)
    return max(floor, misfit) if math.isfinite(misfit) else floor


def verdict(a: float, b: float, h: float, mu: float, fit: str, noise: float) -> bool | None:
    """Accept (True: ``a > 0`` and ``b < 0``) or reject (False) a fit, or None when an error of
    ``noise`` in each loss could change that: ``a`` and ``b`` are linear in the losses, so such
    errors move them by at most ``noise`` times the sum of their coefficients' magnitudes; the
    verdict needs ``RESOLUTION`` times that. A non-finite fit is rejected (farther out is no cure)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    rows = [parabola_step(e, h, mu, fit) for e in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))]
    reach_a = RESOLUTION * noise * sum(abs(r[0]) for r in rows)
    reach_b = RESOLUTION * noise * sum(abs(r[1]) for r in rows)
    if a <= -reach_a or b >= reach_b:
        return False
    if a >= reach_a and b <= -reach_b:
        return True
    return None


def next_scale(scale: float, mu: float, max_step_size: float) -> float | None:
    """The next factor on both sample steps (``GROWTH`` times ``scale``), the second sample never
    beyond ``max_step_size``; None when there is no room left."""
    bigger = min(scale * GROWTH, max_step_size / mu)
    return bigger if bigger > scale else None


@dataclass
class LineFit:
    """A measurement's fit: ``a``, ``b`` and the step (see :func:`parabola_step`), at sample steps
    ``scale`` times the reference's, its :func:`verdict` there and the noise it was judged with."""

    a: float
    b: float
    step: float
    scale: float = 1.0
    decided: bool | None = True
    noise: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.a > 0 and self.b < 0


def fit_line(
    losses: tuple[float, float, float],
    k_losses: tuple[float, float, float],
    losses_at: Callable[[float], tuple[float, float]],
    *,
    mu: float,
    fit: str,
    max_step_size: float,
    slope: float,
    eps: float,
) -> LineFit:
    """The reference's fit of ``losses`` at ``0, H, mu`` (``k_losses``: the gradient batches'
    alone). If it rejects, it is fitted again with both sample steps ``GROWTH`` times longer
    while its :func:`verdict` is None and :func:`next_scale` has room (``losses_at(x)``: the
    measurement's mean loss at ``x`` and its gradient batches'; the losses at 0 are kept), the
    noise the largest :func:`loss_noise` seen at any scale so far. Each fit is the reference's
    formula on the losses (so an accepted reference fit is the reference's, to the last bit);
    the verdict weighs the same fit of their differences to the loss at 0, and a fit whose own
    float64 rounding decided it (the two disagree) is not decided either."""
    line = LineFit(*parabola_step(losses, H, mu, fit))
    if line.accepted:
        return line
    scale, noise = 1.0, 0.0
    while True:
        h, far = H * scale, mu * scale
        line.noise = noise = max(noise, loss_noise(losses, k_losses, h, far, slope, eps))
        a, b, _ = parabola_step((0.0, losses[1] - losses[0], losses[2] - losses[0]), h, far, fit)
        line.decided = verdict(a, b, h, far, fit, noise)
        if line.decided is not None and line.decided != line.accepted:
            line.decided = None
        scale = None if line.decided is not None else next_scale(scale, mu, max_step_size)
        if scale is None:
            return line
        (l1, l1k), (l2, l2k) = losses_at(H * scale), losses_at(mu * scale)
        losses, k_losses = (losses[0], l1, l2), (k_losses[0], l1k, l2k)
        line = LineFit(*parabola_step(losses, H * scale, mu * scale, fit), scale)


def rejection(line: LineFit, mu: float, max_step_size: float) -> str:
    """Why a fit was rejected, and the argument that changes it (for the warning)."""
    h, far = H * line.scale, mu * line.scale
    if line.decided is None:
        return (
            f"the losses differ by no more than their rounding (about {line.noise:.2g} each) even at sample steps "
            f"{h:.3g} and {far:.3g}: max_step_size={max_step_size} bounds how far out they may go (a float64 "
            "loss resolves finer)"
        )
    shape = "not convex" if line.a <= 0 else "not descending" if line.b >= 0 else "not finite"
    return (
        f"the loss along the line is {shape} at sample steps {h:.3g} and {far:.3g}: "
        f"sample_step={mu} sets where it is sampled"
    )


def in_a_row(what: str, why: str, measured: bool) -> str:
    """The warning for ``IN_A_ROW`` measurements abandoned (``what="abandoned"``) or rejected."""
    did = "abandoned" if what == "abandoned" else "rejected the parabola fit of"
    then = (
        "LABPAL trains on with the step last measured"
        if measured
        else ("nothing is measured yet, so LABPAL does not train until a measurement succeeds")
    )
    return f"LABPAL {did} {IN_A_ROW} measurements in a row ({then}): {why}."


def nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN if none is)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")
