"""SaLSA's decisions on host numbers: the smoothed Armijo backtracking and the search interval.

Nothing here touches a tensor; :class:`salsa_fast.SaLSA` feeds it the losses it reads and moves
the parameters where it says.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MIN_LOSS = 1e-8  # below this |loss| (or smoothed norm) the criterion is meaningless
SLOW, FAST = 0.99, 0.9  # smoothing of the two step-size averages behind the search interval


def backtrack(
    trial_loss: Callable[[], float],
    write_point: Callable[[float], None],
    *,
    loss: float,
    eta: float,
    norm_avg: float,
    decrease_avg: float,
    beta3: float,
    c: float,
    decrease: float,
    max_backtracks: int,
) -> tuple[float, bool, int, float]:
    """Backtrack from step size ``eta`` (whose point is already written) until the smoothed
    Armijo criterion holds: ``beta3 * h + (1 - beta3) * (loss - trial) >= eta * c * norm_avg``.

    ``trial_loss()`` evaluates the point written last; ``write_point(eta)`` writes the next one.
    A non-finite trial loss is a failed trial; a trial loss equal to ``loss`` is accepted as it
    is, leaving ``h`` alone. After ``max_backtracks`` trials the parameters stay at the last
    trial. Returns ``(eta, accepted, trials, h)``: the step size reached (shrunk once more
    when no trial was accepted, as the published package does) and the new smoothed decrease.
    """
    trials = 0
    while True:
        trial = trial_loss()
        trials += 1
        if math.isfinite(trial):
            if trial == loss:  # no change at all: accept, leave h as it is
                return eta, True, trials, decrease_avg
            smoothed = beta3 * decrease_avg + (1 - beta3) * (loss - trial)
            if smoothed >= eta * c * norm_avg:
                return eta, True, trials, smoothed
        eta *= decrease
        if trials == max_backtracks:
            return eta, False, trials, decrease_avg
        write_point(eta)


def search_interval(step_size_slow: float, step_size_fast: float, max_interval: float) -> float:
    """Steps between searches implied by how fast the step size moves: the ratio of its fast
    to its slow average (or its inverse, whichever is >= 1), at most ``max_interval``."""
    rate = step_size_fast / step_size_slow
    if rate < 1:
        rate = 1 / rate
    return min(max_interval, 1 / ((rate - 1) + 1e-8))


def split_lr(lrs: list[float]) -> tuple[float, list[float]]:
    """The groups' ``lr`` as ``(scale, relative)``: the largest, and each over it (all 1 when
    every ``lr`` is 0). The search steps and weighs each group by its relative multiplier; the
    update is ``lr`` times the step size found. So a factor common to every group (a scheduler's)
    scales the update and leaves the search, and the step size it finds, as without it."""
    scale = max(lrs)
    return scale, [lr / scale if scale > 0 else 1.0 for lr in lrs]
