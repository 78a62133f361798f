"""The reference twin's plain-Python numpy.gradient / numpy.nanmean against numpy itself (the
package does not depend on numpy; its tests do)."""

import contextlib
import math
import random

import numpy as np
import pytest

from salsa_fast.labpal_parabola import H, parabola_step
from salsa_fast.labpal_parabola import nanmean as flat_nanmean
from salsa_fast.labpal_reference import gradient, nanmean


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_gradient_is_numpy_gradient(n):
    rng = random.Random(n)
    for _ in range(50):
        x = sorted(rng.uniform(-1, 1) for _ in range(n))
        f = [rng.uniform(-5, 5) for _ in range(n)]
        expected = np.gradient(np.array(f), np.array(x))
        assert gradient(f, x) == pytest.approx(list(expected), rel=1e-12, abs=1e-12)


def test_gradient_twice_on_the_line_gives_the_reference_fit():
    for f in ([2.0, 1.9, 1.7], [0.5, 0.49999, 0.4]):
        x = [0.0, H, 0.01]
        slopes = gradient(f, x)
        curv = gradient(slopes, x)
        a, b, s = parabola_step(tuple(f), H, 0.01, "reference")
        assert (a, b) == pytest.approx((curv[0] / 2, slopes[0]), rel=1e-9)


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [1.0, math.nan, 3.0], [math.nan, math.nan], [0.1] * 9])
def test_nanmean_is_numpy_nanmean(values):
    with pytest.warns(RuntimeWarning) if all(map(math.isnan, values)) else contextlib.nullcontext():
        expected = float(np.nanmean(values))  # ("mean of empty slice" when all are NaN)
    for mean in (nanmean, flat_nanmean):
        got = mean(values)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-15)
