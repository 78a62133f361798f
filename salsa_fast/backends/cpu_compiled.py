"""The torch backend's search passes on the CPU as one loop each, compiled by ``torch.compile``.

In eager torch a search's first pass is about ten passes over memory (the backup copy, the
direction's five elementwise ops, the dot product, the trial point's copy and add) and the
commit four; together they cost about six Adam steps at 1e7 parameters. Here each is one loop
that reads and writes every buffer once, as the Triton kernels do on a GPU (Inductor writes it
in C++, vectorised and spread over the cores):

* first pass: reads ``p, g, v`` (and ``m`` with ``use_mv``), writes the backup and the first
  trial point, returns ``sum(g * d)``; the direction ``d`` is not stored;
* trial: reads the backup, ``g, v`` (``m``), writes ``p``: the direction is recomputed, which
  costs less than writing and reading it back;
* commit: reads ``g, m, v``, writes ``m, v``.

The arithmetic is the eager path's, op for op, in the state dtype; the compiler may round
differently (fused multiply-adds, the sums' order), so results agree to rounding, not bit for
bit, and decisions agree as the reference-twin tests require. bf16/fp16 parameters are read
and written in their dtype, with the math in fp32. Used on CPU buckets of at least
``MIN_ELEMENTS`` parameters with the Adam direction, when a C++ compiler is present; if
compiling fails the torch backend warns once and stays eager. ``SALSA_FAST_CPU_COMPILE=0``
turns it off, ``=1`` uses it at every size (for tests).
"""

from __future__ import annotations

import inspect
import os
import shutil

import torch

# Below, the eager passes cost about a millisecond a search more than the compiled ones (1e6
# fp32 parameters), so the compile (seconds, once per process unless torch's disk cache has it)
# pays off only after some ten thousand searches; at 1e7 the difference is ~18 ms a search.
MIN_ELEMENTS = 1 << 20
_state = {"failed": False}


def usable(b, hyper) -> bool:
    """Whether bucket ``b``'s search runs compiled (see the module docstring)."""
    setting = os.environ.get("SALSA_FAST_CPU_COMPILE", "auto")
    if setting == "0" or _state["failed"] or b.device.type != "cpu" or hyper.direction != "adam":
        return False
    if not (setting == "1" or b.numel >= MIN_ELEMENTS):
        return False
    if "compiler" not in _state:
        _state["compiler"] = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
    return _state["compiler"]


FAILED = object()
_compiled = {}


def run(fn, *args):
    """``fn(*args)`` compiled, or ``FAILED`` (and eager from now on, warned once) if it cannot be."""
    try:
        compiled = _compiled.get(fn)
        if compiled is None:
            # (compiled on first use: importing torch's compiler stack costs seconds). A loop is
            # compiled per layout of the bucket's parameters and per option; allow many models
            # in one process (torch's default is 8 per function, then an error with fullgraph)
            limit = {"recompile_limit": 64} if "recompile_limit" in inspect.signature(torch.compile).parameters else {}
            compiled = _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False, **limit)
        return compiled(*args)
    except Exception as e:  # a compiler or Inductor failure: before the loop ran, nothing written
        _state["failed"] = True
        from ..checks import warn

        warn(
            f"salsa_fast: compiling the CPU search passes failed ({type(e).__name__}: {e}); "
            "using the eager torch ops from now on"
        )
        return FAILED


def numbers(b, hyper, lr_step: float = 0.0, decay: float = 0.0) -> torch.Tensor:
    """The per-step numbers as one state-dtype tensor (not Python floats, which would compile a
    new loop for every value): ``-lr_step, 1 - decay, beta1, 1 - beta1, beta2, 1 - beta2, corr1,
    corr2``, each rounded once from its double value, as the eager ops round their scalars."""
    host = torch.tensor(
        [-lr_step, 1 - decay, hyper.beta1, 1 - hyper.beta1, hyper.beta2, 1 - hyper.beta2], dtype=torch.float64
    )
    return torch.cat([host, torch.stack([hyper.state.corr1, hyper.state.corr2])]).to(b.state_dtype)


# SaLSA's Adam arithmetic as the pure expressions a compiled loop needs (scalars as tensor
# elements, no out= buffers): the eager ops' (torch_ops._first_moment and the rest) op for op.


def _first_moment(m, g, k):
    return m * k[2] + k[3] * g


def _second_moment(v, g, k):
    return v * k[4] + k[5] * g * g


def _direction(g, v, m, k, eps: float, use_mv: bool):
    """Adam's direction from the step's would-be moments, as ``torch_ops._search_direction``
    (a bf16/fp16 gradient widened to the state dtype first)."""
    g = g.to(k.dtype)
    denom = torch.sqrt(_second_moment(v, g, k) / k[7]) + eps
    if use_mv:
        return (_first_moment(m, g, k) / k[6]) / denom
    return g / denom


def _point(origin, d, k, decay: bool):
    """``origin * (1 - decay) - lr_step * d`` in the state dtype, as ``torch_ops._write_point``
    (rounded once, on the way into a bf16/fp16 parameter)."""
    origin = origin.to(k.dtype)
    return (origin * k[1] if decay else origin) + k[0] * d


def first_pass(ps, backups, gs, vs, ms, k, eps: float, use_mv: bool, decay: bool):
    """Back up ``p`` and write the first trial point; returns ``sum(g * d)``."""
    sums = []
    for p, backup, g, v, m in zip(ps, backups, gs, vs, ms):
        d = _direction(g, v, m, k, eps, use_mv)
        backup.copy_(p)
        p.copy_(_point(backup, d, k, decay))
        sums.append((g.to(k.dtype) * d).sum())
    return torch.stack(sums).sum()


def trial(ps, backups, gs, vs, ms, k, eps: float, use_mv: bool, decay: bool):
    for p, backup, g, v, m in zip(ps, backups, gs, vs, ms):
        p.copy_(_point(backup, _direction(g, v, m, k, eps, use_mv), k, decay))


def commit(g, m, v, k):
    """The moments, as ``torch_ops._commit_moments``."""
    g = g.to(k.dtype)
    m.copy_(_first_moment(m, g, k))
    v.copy_(_second_moment(v, g, k))
