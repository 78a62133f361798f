"""SaLSA: the optimizer. Closure handling, the line search, the search interval, state_dict.

The per-element work (moments, directions, trial points, reductions) lives in the backends and
runs once per flat buffer; this file only makes decisions, on host floats. What it costs in host
syncs: none on a non-search step, one per search (the gradient-pass loss, the preconditioned
norm and the count of skips the device made, read together) and one per trial (its loss). A
non-search step with a non-finite loss or gradient is skipped on the device; what the host
counts of it waits for that next read (:mod:`salsa_fast.step_state`). On CPU tensors a "sync"
is free, so there the host reads the count after every step.

``salsa_fast/reference.py`` is the readable per-parameter statement of the same algorithm; the
tests hold this class to it.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from . import backends
from .amp import ScalerLink
from .closure import call_closure, check_closure, draw_seed
from .distributed import agree_on_flag, agree_on_loss, agree_on_search, resolve_group
from .flat import FlatBucket, ShardBucket
from .profiling import annotate
from .step_state import StepState

__all__ = ["SaLSA", "SLS", "StepInfo", "SaLSAWarning"]

_requires_grad = operator.attrgetter("requires_grad")

# Keys that are properties of the whole search and cannot differ between param groups.
_GLOBAL_KEYS = frozenset(
    "init_step_size c momentum betas speed_up use_mv direction growth decrease eps "
    "max_backtracks max_interval backend process_group grad_scaler keep_backup".split()
)
_MIN_LOSS = 1e-8  # below this |loss| (or smoothed norm) the criterion is meaningless
_SLOW, _FAST = 0.99, 0.9  # smoothing of the two step-size averages behind the search interval
_WARMUP_SEARCHES = 10  # steps 1..9 always search


_NONFINITE = (
    "non-finite loss or gradient: SaLSA skipped this step (parameters and state unchanged); "
    "`optimizer.stats['skipped_steps']` counts such steps (on CUDA, as of the next search)"
)


class SaLSAWarning(UserWarning):
    """Warnings from SaLSA about the run (skipped steps, slow paths, assumptions)."""


@dataclass
class _Scalars:
    """Every global scalar of the algorithm and the run's counters (all host numbers)."""

    step_size: float  # eta: the step size the last search accepted
    step: int = 0  # k: steps taken (skipped steps excluded)
    decrease_avg: float = 0.0  # h: smoothed loss decrease
    norm_avg: float = 0.0  # s: smoothed preconditioned gradient norm
    step_size_slow: float = 1e-8
    step_size_fast: float = 1e-8
    since_search: int = 100
    forwards: int = 0  # closure calls
    backwards: int = 0  # closure calls with backwards=True
    searches: int = 0
    trials: int = 0
    skipped: int = 0  # non-finite steps skipped


@dataclass(frozen=True)
class StepInfo:
    """What the last ``step()`` did (``SaLSA.last_step``)."""

    searched: bool = False  # it ran a line search
    trials: int = 0  # closure calls without backward in this step
    accepted: bool = False  # a trial met the criterion (False on non-search steps)
    skipped: bool = False  # non-finite loss/gradient: nothing was changed
    step_size: float = float("nan")  # the step size after this step


def _check_hyper(name: str, ok: bool, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: {what}")


class SaLSA(Optimizer):
    r"""Stable Armijo Line Search Adaptation: Adam (or SGD) with no learning rate to tune.

    Every few steps a backtracking line search on the mini-batch loss finds the step size, with
    an Armijo criterion whose two sides are smoothed by an exponential moving average; between
    searches it takes Adam steps with the step size it found. Same algorithm, same defaults and
    the same decisions as the published ``salsa-optimizer`` package, on flat parameter buffers.

    Args:
        params: parameters or param-group dicts. Per group, ``lr`` (default 1.0) multiplies the
            found step size (so LR schedulers compose with the search) and ``weight_decay``
            overrides the default.
        init_step_size: the first step size tried (grown by ``growth`` before every step).
        c: the sufficient-decrease constant of the Armijo criterion.
        momentum: ``(beta1, beta2, beta3)``: Adam's betas and the smoothing of the criterion;
            ``beta3 = 0`` is the plain Armijo criterion.
        speed_up: search only every few steps (the interval adapts to how fast the step size
            changes); ``False`` searches every step.
        use_mv: trial steps along the bias-corrected momentum instead of the gradient.
        weight_decay: decoupled weight decay, ``p -= weight_decay * lr * step_size * p`` before
            every step.
        direction: ``"adam"`` (preconditioned) or ``"sgd"``.
        growth: the step size is multiplied by this before each step.
        decrease: backtracking factor after a failed trial.
        eps: Adam's epsilon.
        max_backtracks: most trials in one search.
        max_interval: most steps between two searches.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        process_group: the ranks that must take the same decisions (default: the world, when
            torch.distributed is initialised); see :mod:`salsa_fast.distributed`.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 training: the closure calls
            ``scaler.scale(loss).backward()`` and returns the unscaled loss; SaLSA unscales,
            skips overflowing steps and updates the scaler (see :mod:`salsa_fast.amp`).
        keep_backup: ``True`` keeps a copy of the parameters during a search and computes every
            trial point from it. ``False`` keeps no buffer beyond Adam's (gradients and the
            two moments): each trial is reached from the previous point and a failed or
            aborted search moves back the same way, exact to one rounding per element per
            move. Same decisions in float64; see the README's memory section.
    """

    def __init__(
        self,
        params,
        init_step_size: float = 1.0,
        c: float = 0.5,
        momentum: tuple[float, float, float] = (0.9, 0.999, 0.9),
        speed_up: bool = True,
        use_mv: bool = False,
        weight_decay: float = 0.0,
        *,
        direction: str = "adam",
        growth: float = 1.1,
        decrease: float = 0.8,
        eps: float = 1e-8,
        max_backtracks: int = 100,
        max_interval: float = 10,
        backend: str = "auto",
        process_group=None,
        grad_scaler=None,
        keep_backup: bool = True,
    ):
        _check_hyper("init_step_size", _is_real(init_step_size) and init_step_size > 0, init_step_size, "must be > 0")
        _check_hyper("c", _is_real(c) and c > 0, c, "must be > 0")
        try:
            beta1, beta2, beta3 = (float(b) for b in momentum)
        except (TypeError, ValueError):
            raise ValueError(f"invalid momentum={momentum!r}: must be three floats (beta1, beta2, beta3)") from None
        for i, beta in enumerate((beta1, beta2, beta3), 1):
            _check_hyper(f"momentum (beta{i})", 0.0 <= beta < 1.0, momentum, f"beta{i} must be in [0, 1)")
        _check_hyper("eps", _is_real(eps) and eps > 0, eps, "must be > 0")
        _check_hyper("weight_decay", _is_real(weight_decay) and weight_decay >= 0, weight_decay, "must be >= 0")
        _check_hyper("growth", _is_real(growth) and growth > 1 and math.isfinite(growth), growth, "must be > 1")
        _check_hyper("decrease", _is_real(decrease) and 0 < decrease < 1, decrease, "must be in (0, 1)")
        _check_hyper(
            "max_backtracks",
            isinstance(max_backtracks, int) and not isinstance(max_backtracks, bool) and max_backtracks >= 1,
            max_backtracks,
            "must be an int >= 1",
        )
        _check_hyper("max_interval", _is_real(max_interval) and max_interval > 0, max_interval, "must be > 0")
        _check_hyper("direction", direction in ("adam", "sgd"), direction, "must be 'adam' or 'sgd'")
        _check_hyper("backend", backend in backends.NAMES, backend, f"must be one of {backends.NAMES}")
        _check_hyper("keep_backup", isinstance(keep_backup, bool), keep_backup, "must be a bool")
        resolve_group(process_group)  # a group without torch.distributed is a ValueError

        self.init_step_size = float(init_step_size)
        self.c = float(c)
        self.betas = (beta1, beta2, beta3)
        self.speed_up = bool(speed_up)
        self.use_mv = bool(use_mv)
        self.direction = direction
        self.growth = float(growth)
        self.decrease = float(decrease)
        self.eps = float(eps)
        self.max_backtracks = max_backtracks
        self.max_interval = float(max_interval)
        self.backend_name = backend
        self.process_group = process_group
        self.keep_backup = keep_backup

        self._ready = False
        super().__init__(params, dict(lr=1.0, weight_decay=float(weight_decay)))
        self._scalars = _Scalars(step_size=self.init_step_size)
        self._last = StepInfo(step_size=self.init_step_size)
        self._warned: set[str] = set()
        self._in_search = False
        # The per-step numbers the kernels read on each device (salsa_fast.step_state); on CUDA
        # the count of skipped non-search steps waits there for the next search's one sync.
        self._step_states: dict[torch.device, StepState] = {}
        self._unread_skips = False  # a non-search step ran since the host last read that count
        self._scaler = ScalerLink(grad_scaler, self) if grad_scaler is not None else None
        self._preserved: list[nn.Module] = []
        self._repack()
        self._ready = True

    # ------------------------------------------------------------------------------------------
    # parameter groups and flat buffers

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        shared = sorted(_GLOBAL_KEYS.intersection(param_group))
        if shared:
            raise ValueError(
                f"param group sets {shared}: SaLSA finds one step size for all groups, so only 'lr' "
                "(a multiplier on the step size) and 'weight_decay' may differ per group"
            )
        params = param_group.get("params")
        if params is not None and not isinstance(params, (torch.Tensor, set)):  # (torch rejects sets)
            param_group = {**param_group, "params": list(params)}
            if len(set(map(id, param_group["params"]))) != len(param_group["params"]):
                # torch only warns; packed twice, one of its two views would go stale
                raise ValueError("a param group lists the same parameter twice")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("lr", "weight_decay"):
            value = group[key]
            _check_hyper(f"param group '{key}'", _is_real(value) and value >= 0, value, "must be >= 0")
        for p in group["params"]:
            if p.is_sparse or p.layout != torch.strided:
                raise RuntimeError("SaLSA does not support sparse parameters")
            if not p.is_floating_point():
                raise ValueError(f"SaLSA optimizes floating-point parameters, got one of dtype {p.dtype}")
        group["step_size"] = self._scalars.step_size if self._ready else self.init_step_size
        if self._ready:
            self._repack()

    def _repack(self) -> None:
        """(Re)build the flat buckets from the param groups, carrying per-parameter state over.

        Parameters that stop requiring grad leave the buffers; their moments are parked (and
        saved in state_dict) until they are unfrozen, as torch's optimizers keep them.
        """
        if self._ready:
            self._fold_pending_skips()  # (the counts live with the devices, which may change)
        # the state entries are views made at the last repack, with the layout the parameters had
        # then: they read each element right even after a parameter changed its strides
        old_state = dict(self.state)

        buckets: list[FlatBucket] = []
        for gi, group in enumerate(self.param_groups):
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.requires_grad:
                    kind = ShardBucket if hasattr(p, "_local_tensor") else FlatBucket  # DTensor: its shard
                    by_key.setdefault((kind, p.device, p.dtype), []).append(p)
            for (kind, _, _), plist in by_key.items():
                buckets.append(kind(plist, gi, keep_second_moment=self.direction == "adam", lean=not self.keep_backup))

        self.state.clear()
        with torch.no_grad():
            for b in buckets:
                m_views = b.views_of(b.exp_avg)
                v_views = b.views_of(b.exp_avg_sq) if b.exp_avg_sq is not None else [None] * len(b.params)
                for p, m, v in zip(b.params, m_views, v_views):
                    entry = {"exp_avg": m} if v is None else {"exp_avg": m, "exp_avg_sq": v}
                    for key, old in old_state.pop(p, {}).items():
                        entry[key].copy_(old)
                    self.state[p] = entry
        in_groups = {p for g in self.param_groups for p in g["params"]}
        self._parked = {
            p: {k: t.detach().clone() for k, t in entry.items()} for p, entry in old_state.items() if p in in_groups
        }
        self.state.update(self._parked)

        self._buckets = buckets
        self._all_params = [p for g in self.param_groups for p in g["params"]]
        self._requires_grad = list(map(_requires_grad, self._all_params))
        self._cuda_devices = sorted({b.device.index or 0 for b in buckets if b.device.type == "cuda"})
        self._host_checks = all(b.device.type == "cpu" for b in buckets)
        beta1, beta2, _ = self.betas
        self._step_states = {
            d: self._step_states.get(d) or StepState(d, beta1, beta2) for d in dict.fromkeys(b.device for b in buckets)
        }
        hypers = {
            d: backends.Hyper(beta1, beta2, self.eps, self.direction, self.use_mv, state)
            for d, state in self._step_states.items()
        }
        self._hypers = [hypers[b.device] for b in buckets]  # each bucket's, in bucket order
        self._first_state = self._hypers[0].state if buckets else None
        first_of_device = {}
        for b in buckets:
            first_of_device.setdefault(b.device, b)
        self._counts_skip = [first_of_device[b.device] is b for b in buckets]  # once per device
        devices = {b.device for b in buckets}
        self._backend = backends.resolve(self.backend_name, devices)
        if not buckets:
            raise ValueError("SaLSA got no parameters that require grad")

    def _check_layout(self) -> None:
        """Notice what changed behind our back since the last step and repair it."""
        if list(map(_requires_grad, self._all_params)) != self._requires_grad:
            self._repack()  # a parameter was frozen or unfrozen
            return
        for b in self._buckets:
            if b.moved():
                if b.relaid():
                    self._repack()  # model.to(device/dtype) after the optimizer was built
                    return
                b.rebind()  # p.data = ... (same shape, device, dtype): read it where it is now

    def _adopt_grads(self) -> None:
        for b in self._buckets:
            if not b.grads_intact():
                was_attached = b.grads_attached
                b.adopt_grads()
                if was_attached:
                    self._warn_once(
                        "grads",
                        "a parameter's .grad was replaced or set to None (e.g. by model.zero_grad()); "
                        "SaLSA copies it back into its flat gradient buffer, which costs an extra pass. "
                        "Call optimizer.zero_grad() instead to keep the fast path",
                    )

    def preserve_buffers(self, *modules: nn.Module) -> None:
        """Keep these modules' buffers as the gradient pass left them through the line search.

        A trial forward pass in train mode would update BatchNorm's running statistics (and any
        other buffer a forward pass writes) once per trial, as the published package's trials
        do. With the modules registered here, their buffers are snapshotted after the gradient
        pass and restored after every trial, so a step updates them exactly once."""
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(f"preserve_buffers takes nn.Modules, got {type(module).__name__}")
            if module not in self._preserved:
                self._preserved.append(module)

    def _buffers_to_preserve(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for module in self._preserved:
            for t in module.buffers():
                seen.setdefault(id(t), t)
        return list(seen.values())

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient with one memset per flat buffer.

        Gradients stay views into the optimizer's flat buffer (so ``set_to_none`` is ignored):
        autograd then accumulates into them in place. (Until the first step after the optimizer
        was built, gradients are autograd's own and are set to None.) Inside a closure called
        for a line-search trial this does nothing, so the search keeps the gradient it uses.
        """
        if self._in_search:
            return
        # First follow what changed since the last step: model.to(...) swaps the data of the
        # gradient tensors in place, so zeroing the old buffer would leave them stale.
        self._check_layout()
        for b in self._buckets:
            b.zero_grad()

    # ------------------------------------------------------------------------------------------
    # diagnostics

    @property
    def step_size(self) -> float:
        """The step size the last search found (each group steps with ``lr`` times it)."""
        return self._scalars.step_size

    @property
    def search_interval(self) -> float:
        """Steps between searches implied by the two step-size averages (at most ``max_interval``)."""
        s = self._scalars
        rate = s.step_size_fast / s.step_size_slow
        if rate < 1:
            rate = 1 / rate
        return min(self.max_interval, 1 / ((rate - 1) + 1e-8))

    @property
    def last_step(self) -> StepInfo:
        """What the last ``step()`` did."""
        return self._last

    @property
    def stats(self) -> dict[str, float]:
        """Numbers worth logging: step size, search interval, counters of the whole run.

        Reading it never syncs; on CUDA, ``skipped_steps`` counts device-side skips of
        non-search steps as of the last search (``state_dict()`` counts them all)."""
        s = self._scalars
        return {
            "step_size": s.step_size,
            "search_interval": self.search_interval,
            "searched": float(self._last.searched),
            "trials": float(self._last.trials),
            "steps": s.step,
            "forwards": s.forwards,
            "backwards": s.backwards,
            "searches": s.searches,
            "total_trials": s.trials,
            "skipped_steps": s.skipped,
        }

    def _fold_pending_skips(self) -> _Scalars:
        """Count the non-search steps the device skipped since the host last looked (one sync,
        only if a step ran on the device path since then)."""
        if self._unread_skips:
            self._count_device_skips(int(self._first_state.read_skipped().item()))
        return self._scalars

    def _count_device_skips(self, n: int, just_now: bool = False) -> None:
        """The device skipped ``n`` non-search steps the host counted as taken: take them back
        (the step count and the search interval leave skipped steps out, as on the host path)."""
        self._unread_skips = False
        if not n:
            return
        s = self._scalars
        s.skipped += n
        s.step -= n
        s.since_search -= n
        for state in self._step_states.values():
            state.counted()
        if just_now:  # (CPU: read right after the step)
            self._last = StepInfo(skipped=True, step_size=s.step_size)
        if self._scaler is None or not self._scaler.enabled:  # overflow skips under a GradScaler are routine
            self._warn_once("nonfinite", _NONFINITE)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, SaLSAWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # the step

    def step(self, closure=None):  # type: ignore[override]
        """One SaLSA step; returns the loss of the gradient pass (what the closure returned)."""
        check_closure(closure)
        if self._in_search:
            raise RuntimeError("SaLSA.step() was called from inside its own closure")
        self._check_layout()
        seed = draw_seed()
        devices = self._cuda_devices
        out, loss = call_closure(closure, seed, devices, backwards=True)
        self._adopt_grads()
        scaling = self._scaler is not None and self._scaler.enabled
        grads_bad = self._scaler.unscale(self._buckets) if scaling else None

        s = self._scalars
        k = s.step + 1  # (on CUDA: plus the skips the device made that the host has not read)
        since = s.since_search + 1
        # Adam's bias corrections count one ahead of the steps, as the published package does;
        # each device subtracts the skips it has not reported (see salsa_fast.step_state)
        for state in self._step_states.values():
            state.begin(float(max(1, k + 1)))
        eta = s.step_size
        # per bucket: its group's step-size multiplier and weight-decay factor (old step size)
        groups = self.param_groups
        lrs = [float(groups[b.group_index]["lr"]) for b in self._buckets]
        decays = [lr * float(groups[b.group_index]["weight_decay"]) * eta for b, lr in zip(self._buckets, lrs)]

        try:
            if not self._searches(k, since):
                with annotate("salsa.plain_step"):
                    result = self._plain_step(out, loss, k, since, lrs, decays, grads_bad)
            else:
                with annotate("salsa.search"):
                    result = self._search_step(closure, seed, out, loss, k, lrs, decays, grads_bad)
        finally:
            for state in self._step_states.values():
                state.end()
        if scaling:
            self._scaler.update()
        return result

    def _searches(self, k: int, since: int) -> bool:
        """Whether step ``k``, ``since`` steps after the last search, runs a line search."""
        return not self.speed_up or k < _WARMUP_SEARCHES or since >= self.search_interval

    def _plain_step(self, out, loss, k, since, lrs, decays, grads_bad):
        backend, s = self._backend, self._scalars
        self._raise_flags(loss, grads_bad)
        eta_try = s.step_size * self.growth
        for b, h, lr, decay, count in zip(self._buckets, self._hypers, lrs, decays, self._counts_skip):
            backend.plain_step(b, lr_step=lr * eta_try, decay=decay, h=h, count_skip=count)
        s.step, s.since_search = k, since
        s.forwards += 1
        s.backwards += 1
        self._finish(StepInfo(searched=False, step_size=s.step_size))
        self._unread_skips = True
        if self._host_checks:  # CPU: reading the count is free, so the host knows at once
            self._count_device_skips(int(self._first_state.read_skipped()), just_now=True)
        return out

    def _loss_on_host(self, loss) -> bool:
        """A CPU loss for parameters elsewhere: checked on the host, where reading it is free."""
        return loss.device.type == "cpu" and self._first_state.device.type != "cpu"

    def _raise_flags(self, loss, grads_bad) -> None:
        """Set every device's step flag when the loss or a gradient is not finite on any device
        or rank, without a sync. ``grads_bad`` is the GradScaler's finding (it checked every
        gradient), else each bucket's gradients are probed (the first bucket also checks the
        loss)."""
        first, states = self._first_state, self._step_states
        if self._loss_on_host(loss):  # (read for free; the flag still goes through the agreement)
            if not math.isfinite(loss):
                first.flag.fill_(1.0)
            loss = None
        elif loss.device != first.device:
            loss = loss.to(first.device, non_blocking=True)
        if grads_bad is None:  # (the first bucket, on the first state's device, checks the loss)
            for i, (b, h) in enumerate(zip(self._buckets, self._hypers)):
                self._backend.probe(b, h, loss if i == 0 else None)
        else:
            torch.maximum(first.flag, grads_bad.to(first.flag.dtype), out=first.flag)
            if loss is not None:
                torch.maximum(first.flag, (~torch.isfinite(loss)).to(first.flag.dtype), out=first.flag)
        if len(states) > 1:  # one verdict for all devices: gathered on the first, sent back
            torch.amax(torch.stack([st.flag.to(first.device) for st in states.values()]), out=first.flag)
        agree_on_flag(resolve_group(self.process_group), first.flag)
        for state in states.values():
            if state is not first:
                state.flag.copy_(first.flag, non_blocking=True)

    def _write_points(self, write, eta, lrs, decays) -> None:
        """Write every bucket's parameters with one backend pass (a trial or fallback point)."""
        for b, h, lr, decay in zip(self._buckets, self._hypers, lrs, decays):
            write(b, lr_step=lr * eta, decay=decay, h=h)

    def _search_step(self, closure, seed, out, loss, k, lrs, decays, grads_bad):
        backend, s = self._backend, self._scalars
        group = resolve_group(self.process_group)
        beta3 = self.betas[2]
        buckets = self._buckets
        devices = self._cuda_devices
        eta_try = s.step_size * self.growth
        forwards = 1
        trials = 0
        accepted = False
        demoted = False
        decrease_avg = s.decrease_avg
        buffers = self._buffers_to_preserve()
        saved = [t.clone() for t in buffers]

        def trial_closure():
            try:
                return call_closure(closure, seed, devices, backwards=False)
            finally:
                with torch.no_grad():
                    for t, v in zip(buffers, saved):
                        t.copy_(v)

        self._in_search = True
        try:
            dev = buckets[0].device
            pp_full = torch.zeros((), dtype=torch.float64, device=dev)  # norm of whole parameters
            pp_sharded = torch.zeros((), dtype=torch.float64, device=dev)  # of this rank's shards
            for b, h, lr, decay in zip(buckets, self._hypers, lrs, decays):
                if self.keep_backup:  # back up p, write the first trial point, sum(g * d)
                    pp_b = backend.search_begin(b, lr_step=lr * eta_try, decay=decay, h=h)
                else:  # only sum(g * d): the parameters move once the search is decided
                    pp_b = backend.lean_norm(b, h=h)
                pp_b = lr * pp_b.to(dev, torch.float64)
                if b.sharded:
                    pp_sharded = pp_sharded + pp_b
                else:
                    pp_full = pp_full + pp_b
            agreed = agree_on_search(group, loss.to(dev, torch.float64), pp_full, pp_sharded)
            skipped = self._first_state.read_skipped().to(dev).reshape(1)
            loss_v, pp_v, skipped_v = torch.cat([agreed, skipped]).tolist()  # the one sync of the search
            self._count_device_skips(int(skipped_v))
            if skipped_v:  # the device skipped steps since the last search: now the host knows
                k -= int(skipped_v)
                demoted = not self._searches(k, s.since_search + 1)
            if demoted:  # without those steps, this one is not due to search: undo, and step
                self._abort()
            elif not (math.isfinite(loss_v) and math.isfinite(pp_v)):
                self._abort()
                return self._skip(out, warn=self._scaler is None or not self._scaler.enabled)
            else:
                norm_avg = beta3 * s.norm_avg + (1 - beta3) * pp_v
                if abs(loss_v) >= _MIN_LOSS and norm_avg >= _MIN_LOSS:
                    if loss_v < 0:
                        self._warn_once(
                            "negative",
                            "the loss is negative: SaLSA's Armijo criterion assumes a loss bounded below "
                            "(e.g. >= 0); the search goes on, but the step size may grow without bound",
                        )
                    trial_point = backend.search_trial if self.keep_backup else backend.lean_trial
                    if not self.keep_backup:
                        self._write_points(trial_point, eta_try, lrs, decays)
                    while True:
                        _, trial_loss = trial_closure()
                        if group is not None:
                            trial_loss = agree_on_loss(group, trial_loss.to(dev, torch.float64))
                        trial_v = float(trial_loss)  # one sync per trial
                        trials += 1
                        if math.isfinite(trial_v):
                            if trial_v == loss_v:  # no change at all: accept, leave h as it is
                                accepted = True
                                break
                            decrease = beta3 * s.decrease_avg + (1 - beta3) * (loss_v - trial_v)
                            if decrease >= eta_try * self.c * norm_avg:
                                decrease_avg = decrease
                                accepted = True
                                break
                        eta_try *= self.decrease
                        if trials == self.max_backtracks:
                            break  # parameters stay at the last trial
                        self._write_points(trial_point, eta_try, lrs, decays)
                else:
                    # Loss or norm too small for the criterion: step along the momentum direction.
                    momentum_point = (
                        backend.search_momentum_point if self.keep_backup else backend.lean_momentum_point
                    )
                    self._write_points(momentum_point, eta_try, lrs, decays)
                    trial_closure()
                    forwards += 1
                # The moments last: a commit that fails leaves the step undone, as every other
                # failure does (with several buckets, only those not yet committed go back).
                for b, h in zip(buckets, self._hypers):
                    backend.search_commit(b, h=h)
        except BaseException:
            self._abort()
            raise
        finally:
            self._in_search = False
        if demoted:
            return self._plain_step(out, loss, k, s.since_search + 1, lrs, decays, grads_bad)

        s.step, s.since_search = k, 0
        s.norm_avg, s.decrease_avg = norm_avg, decrease_avg
        s.step_size = eta_try
        s.step_size_slow = s.step_size_slow * _SLOW + eta_try * (1 - _SLOW)
        s.step_size_fast = s.step_size_fast * _FAST + eta_try * (1 - _FAST)
        s.forwards += forwards + trials
        s.backwards += 1
        s.searches += 1
        s.trials += trials
        self._finish(StepInfo(searched=True, trials=trials, accepted=accepted, step_size=eta_try))
        return out

    def _abort(self) -> None:
        """Back to the step's starting point, the moments untouched (every bucket, even if one
        of them fails to move: the exception that follows is the first one)."""
        errors = []
        for b, h in zip(self._buckets, self._hypers):
            try:
                if self.keep_backup:
                    self._backend.search_abort(b)
                else:
                    self._backend.lean_restore(b, h=h)
            except BaseException as e:  # (keep restoring the others)
                errors.append(e)
        if errors:
            raise errors[0]

    def _skip(self, out, warn: bool = True):
        """Nothing changes; counted. (Overflow skips under a GradScaler are routine: no warning.)"""
        s = self._scalars
        s.skipped += 1
        s.forwards += 1
        s.backwards += 1
        if warn:
            self._warn_once("nonfinite", _NONFINITE)
        self._finish(StepInfo(skipped=True, step_size=s.step_size))
        return out

    def _finish(self, info: StepInfo) -> None:
        self._last = info
        for group in self.param_groups:
            group["step_size"] = info.step_size

    # ------------------------------------------------------------------------------------------
    # state_dict

    def state_dict(self) -> dict[str, Any]:
        """Torch's usual layout (per-index ``exp_avg``/``exp_avg_sq``, param groups) plus a
        ``"salsa"`` entry with every global scalar. Tensors in ``state`` are live views of the
        optimizer's buffers, as with torch's own optimizers; ``torch.save`` copies them."""
        sd = super().state_dict()
        sd["salsa"] = asdict(self._fold_pending_skips())
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; resuming continues exactly as if never stopped.

        Tensors may come from another device (a GPU checkpoint loads on CPU) and are cast to the
        optimizer's state dtype.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("state", "param_groups", "salsa"):
            if key not in state_dict:
                raise ValueError(f"not a SaLSA state_dict: it has no {key!r} entry")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        saved_scalars = state_dict["salsa"]
        names = {f.name for f in fields(_Scalars)}
        if not names.issubset(saved_scalars):
            raise ValueError(f"the state_dict's 'salsa' entry misses {sorted(names - set(saved_scalars))}")

        index_of = {}
        for g, sg in zip(self.param_groups, saved_groups):
            for p, i in zip(g["params"], sg["params"]):
                index_of[p] = i
        saved_state = state_dict["state"]
        copies = []  # (our tensor, saved tensor or None for zeros): all checked before any is made
        for p, entry in self.state.items():
            saved = saved_state.get(index_of[p])
            for key, target in entry.items():
                if saved is None:  # no state saved for it (e.g. it was frozen then)
                    copies.append((target, None))
                    continue
                value = saved.get(key)
                if value is None:
                    raise ValueError(
                        f"the state of parameter {index_of[p]} has no {key!r} (a checkpoint "
                        f"of direction={'sgd' if self.direction == 'adam' else 'adam'}?)"
                    )
                if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                    raise ValueError(
                        f"state {key!r} of parameter {index_of[p]} has shape "
                        f"{tuple(getattr(value, 'shape', ()))}, expected {tuple(target.shape)}"
                    )
                copies.append((target, value))
        with torch.no_grad():
            for target, value in copies:
                target.zero_() if value is None else target.copy_(value)

        for g, sg in zip(self.param_groups, saved_groups):
            for key, value in sg.items():
                if key not in ("params", "param_names"):
                    g[key] = value
        self._scalars = _Scalars(**{n: saved_scalars[n] for n in names})
        for state in self._step_states.values():  # skips of the run being replaced: not ours
            state.counted()
        self._unread_skips = False
        self._last = StepInfo(step_size=self._scalars.step_size)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


class SLS(SaLSA):
    """Plain Armijo line search every step (the paper's "SLS" baseline): SaLSA with ``beta3 = 0``
    and ``speed_up=False``. Takes SaLSA's arguments except ``momentum``/``speed_up``."""

    def __init__(self, params, init_step_size: float = 1.0, c: float = 0.5, betas: tuple[float, float] = (0.9, 0.999),
                 use_mv: bool = False, weight_decay: float = 0.0, **kwargs):  # fmt: skip
        for key in ("momentum", "speed_up"):
            if key in kwargs:
                raise TypeError(f"SLS fixes {key!r}; use SaLSA to choose it")
        super().__init__(params, init_step_size, c, (*betas, 0.0), False, use_mv, weight_decay, **kwargs)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)

