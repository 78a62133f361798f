"""The closure contract shared by :class:`~salsa_fast.SaLSA` and its reference twin.

A SaLSA closure takes a ``backwards`` keyword: with ``backwards=True`` it runs the forward pass
and ``loss.backward()``; with ``backwards=False`` only the forward pass (the optimizer calls it
under ``torch.no_grad()`` for each line-search trial). It returns the scalar loss.

Every closure call of one ``step()`` runs under :func:`torch.random.fork_rng`, reseeded with one
seed drawn from torch's default generator at the start of the step: dropout masks and other
randomness are identical in the gradient pass and in every trial, and the caller's random
streams advance by exactly that one draw per step.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Callable, Iterator, Sequence

import torch

from .profiling import annotate

CLOSURE_PATTERN = """\
SaLSA needs a closure that accepts a `backwards` keyword and returns the loss:

    def closure(backwards=False):
        loss = loss_fn(model(inputs), targets)
        if backwards:
            loss.backward()
        return loss

    optimizer.zero_grad()
    loss = optimizer.step(closure)"""

_accepts_backwards_cache: dict[tuple, bool] = {}


def _signature_key(closure: Callable) -> tuple | None:
    func = getattr(closure, "__func__", closure)  # bound methods
    code = getattr(func, "__code__", None)
    if code is None:
        return None
    defaults = getattr(func, "__defaults__", None) or ()
    kwdefaults = getattr(func, "__kwdefaults__", None) or {}
    return (code, closure is not func, len(defaults), frozenset(kwdefaults))


def _accepts_backwards(closure: Callable) -> bool:
    key = _signature_key(closure)
    if key is not None and key in _accepts_backwards_cache:
        return _accepts_backwards_cache[key]
    try:
        inspect.signature(closure).bind(backwards=True)
        ok = True
    except TypeError:
        ok = False
    except ValueError:  # no signature available (some builtins): let the call decide
        ok = True
    if key is not None and len(_accepts_backwards_cache) < 256:
        _accepts_backwards_cache[key] = ok
    return ok


def check_closure(closure: object) -> Callable:
    """Return ``closure`` if it fits the contract, else raise ``TypeError`` showing the pattern."""
    if closure is None:
        raise TypeError("SaLSA.step() requires a closure.\n" + CLOSURE_PATTERN)
    if not callable(closure):
        raise TypeError(f"SaLSA.step() got a {type(closure).__name__}, not a callable.\n" + CLOSURE_PATTERN)
    if not _accepts_backwards(closure):
        raise TypeError(
            "SaLSA.step() got a closure that cannot be called as closure(backwards=True).\n" + CLOSURE_PATTERN
        )
    return closure


def loss_tensor(out: object) -> torch.Tensor:
    """The closure's result as a detached 0-dim tensor; ``TypeError``/``ValueError`` otherwise."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ValueError(
                "the closure must return a scalar loss, got a tensor of shape "
                f"{tuple(out.shape)} (reduce it, e.g. loss.mean())"
            )
        if out.is_complex() or not (out.is_floating_point() or out.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"the closure must return a real-valued loss, got dtype {out.dtype}")
        return out.detach() if out.dim() == 0 else out.detach().reshape(())
    if isinstance(out, numbers.Real) and not isinstance(out, bool):
        return torch.tensor(float(out), dtype=torch.float64)
    raise TypeError(f"the closure returned {type(out).__name__}, not the loss.\n" + CLOSURE_PATTERN)


_SEED = torch.empty((), dtype=torch.int64, device="cpu")  # (reused: one op less per step)


def draw_seed() -> int:
    """One draw from torch's default CPU generator: the seed for every closure call of a step."""
    return int(_SEED.random_())


@contextlib.contextmanager
def seeded(seed: int, cuda_devices: Sequence[int]) -> Iterator[None]:
    """Run the body with the CPU and the given CUDA generators seeded with ``seed``; restore after."""
    with torch.random.fork_rng(devices=list(cuda_devices)):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def call_closure(
    closure: Callable, seed: int, cuda_devices: Sequence[int], backwards: bool
) -> tuple[object, torch.Tensor]:
    """Call the closure under the step's seed; gradient pass with grad enabled, trials without.

    Returns what the closure returned and that loss as a detached 0-dim tensor.
    """
    phase = "salsa.gradient_pass" if backwards else "salsa.trial"
    with annotate(phase), seeded(seed, cuda_devices), torch.set_grad_enabled(backwards):
        out = closure(backwards=backwards)
    return out, loss_tensor(out)
