"""The parabola LABPAL fits to three losses on a line, shared by :class:`salsa_fast.LABPAL` and
its reference twin."""

from __future__ import annotations

import math

H = 1.77e-4  # the authors' first sample position on the line (hard-coded in their implementation)


def parabola_step(losses: tuple[float, float, float], h: float, mu: float, fit: str) -> tuple[float, float, float]:
    """``(a, b, s)`` from losses at positions ``0, h, mu`` on the line: curvature/2, slope at 0 and
    the step to the minimum ``-b / (2a)``.

    ``fit="reference"`` reproduces the reference: ``numpy.gradient`` applied twice (first-order
    at the edge, second-order inside), which for an exact parabola ``c + beta x + alpha x^2``
    gives ``b = beta + alpha h``, ``a = alpha / 2`` and so ``s = -beta/alpha - h``, about twice
    the true minimum (the default ``update_step_adaptation=1.8`` was tuned with it).
    ``fit="exact"`` interpolates the three points: ``s`` is the parabola's minimum.
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


def nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN if none is)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")
