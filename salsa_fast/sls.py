"""SLS: the plain Armijo line search every step, the paper's baseline, as SaLSA's special case."""

from __future__ import annotations

from .salsa import SaLSA

__all__ = ["SLS"]


class SLS(SaLSA):
    """Plain Armijo line search every step (the paper's "SLS" baseline): SaLSA with ``beta3 = 0``
    and ``speed_up=False``.

    Args:
        params: parameters or param-group dicts, as for :class:`SaLSA`.
        init_step_size: the first step size tried.
        c: the sufficient-decrease constant of the Armijo criterion.
        betas: Adam's ``(beta1, beta2)``; the criterion is not smoothed.
        use_mv: trial steps along the bias-corrected momentum instead of the gradient.
        weight_decay: decoupled weight decay, as for :class:`SaLSA`.
        **kwargs: SaLSA's keyword-only arguments (``direction``, ``growth``, ``backend``, ...).

    Raises:
        TypeError: ``momentum`` or ``speed_up`` is given (SLS fixes them; use SaLSA to choose).
        ValueError: an argument out of its range, as for :class:`SaLSA`.
    """

    def __init__(
        self,
        params,
        init_step_size: float = 1.0,
        c: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        use_mv: bool = False,
        weight_decay: float = 0.0,
        **kwargs,
    ):
        for key in ("momentum", "speed_up"):
            if key in kwargs:
                raise TypeError(f"SLS fixes {key!r}; use SaLSA to choose it")
        super().__init__(params, init_step_size, c, (*betas, 0.0), False, use_mv, weight_decay, **kwargs)
