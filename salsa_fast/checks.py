"""The checks salsa_fast's optimizers make: of arguments (:func:`check` and its predicates), and
of the scalars a checkpoint holds, each a dataclass field that carries its own check
(:func:`count`, :func:`finite`, ...; :func:`checked_scalars` applies them)."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import field, fields
from typing import Any

import torch

__all__ = [
    "SaLSAWarning",
    "warn",
    "check",
    "is_real",
    "is_int",
    "positive",
    "count",
    "finite",
    "optional_positive",
    "flag",
    "positives",
    "checked_scalars",
]


class SaLSAWarning(UserWarning):
    """Warnings from salsa_fast's optimizers about the run (skipped steps, slow paths, assumptions)."""


_INSIDE = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def warn(message: str) -> None:
    """A :class:`SaLSAWarning` that names the line of the caller's own code (the first frame
    outside this package and torch: e.g. the training loop's ``optimizer.step(closure)``)."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, SaLSAWarning, stacklevel=level)


# -- argument checks -------------------------------------------------------------------------------


def check(ok: bool, name: str, value: Any, what: str) -> None:
    """``ValueError("invalid name=value: what")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: {what}")


def is_real(x: Any) -> bool:
    """A Python int or float (not a bool), not NaN."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def positive(x: Any) -> bool:
    """A finite real > 0."""
    return is_real(x) and 0 < x < math.inf


# -- checked scalars: the dataclass fields an algorithm saves in its state_dict entry ---------------


def _field(default, ok: Callable[[Any], bool], what: str):
    return field(default=default, metadata={"check": (ok, what)})


def count(default: int = 0, low: int = 0):
    """A counter: an int >= ``low``."""
    return _field(default, lambda x: is_int(x) and x >= low, f"must be an int >= {low}")


def finite(default: float, low: float = -math.inf, strict: bool = False):
    """A finite float, ``> low`` (``strict``) or ``>= low``."""
    if strict:
        return _field(default, lambda x: is_real(x) and low < x < math.inf, f"must be a finite number > {low}")
    return _field(default, lambda x: is_real(x) and low <= x < math.inf, f"must be a finite number >= {low}")


def optional_positive():
    """None, or a finite float > 0."""
    return _field(None, lambda x: x is None or positive(x), "must be None or a finite number > 0")


def flag(default: bool):
    return _field(default, lambda x: isinstance(x, bool), "must be a bool")


def positives():
    """A list of finite floats > 0."""
    return field(
        default_factory=list,
        metadata={
            "check": (
                lambda x: isinstance(x, (list, tuple)) and all(map(positive, x)),
                "must be a list of finite numbers > 0",
            )
        },
    )


def checked_scalars(cls, saved: Any, entry: str):
    """``cls(**saved)`` after every field's check; ``ValueError`` naming the first bad entry."""
    if not isinstance(saved, dict):
        raise ValueError(f"the state_dict's {entry!r} entry must be a dict, got {type(saved).__name__}")
    names = [f.name for f in fields(cls)]
    missing = sorted(set(names) - set(saved))
    if missing:
        raise ValueError(f"the state_dict's {entry!r} entry misses {missing}")
    for f in fields(cls):
        ok, what = f.metadata["check"]
        if not ok(saved[f.name]):
            raise ValueError(f"the state_dict's {entry!r} entry has {f.name}={saved[f.name]!r}: {what}")
    return cls(**{n: list(saved[n]) if isinstance(saved[n], tuple) else saved[n] for n in names})
