"""SaLSA on the flat-buffer shell (:mod:`salsa_fast._flat_optimizer`): the step, the line
search and what the device decides on its own.

The per-element work (moments, directions, trial points, reductions) lives in the backends and
runs once per flat buffer; this file only makes decisions, on host floats. What it costs in host
syncs: none on a non-search step, one per search (the gradient-pass loss, the preconditioned
norm and the count of skips the device made, read together) and one per trial (its loss). A
non-search step with a non-finite loss or gradient is skipped on the device; what the host
counts of it waits for that next read (:mod:`salsa_fast.step_state`). On CPU tensors a "sync"
is free, so there the host reads the count after every step.

``salsa_fast/salsa_reference.py`` is the readable per-parameter statement of the same
algorithm; the tests hold this class to it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from . import backends
from ._flat_optimizer import FlatOptimizer
from .amp import ScalerLink
from .checks import SaLSAWarning, check, is_real
from .closure import draw_seed
from .distributed import agree_on_flag, agree_on_loss, agree_on_search, resolve_group
from .flat import FlatBucket
from .profiling import annotate
from .salsa_armijo import FAST, MIN_LOSS, SLOW, backtrack, search_interval, split_lr
from .salsa_line import BackupLine, MovingLine, Point
from .salsa_scalars import GLOBAL_KEYS, Found, Scalars, Step, StepInfo, Writes, check_arguments, checked_betas
from .step_state import DeviceSteps

__all__ = ["SaLSA", "StepInfo", "SaLSAWarning"]

_WARMUP_SEARCHES = 10  # steps 1..9 always search

_NONFINITE = (
    "non-finite loss or gradient: SaLSA skipped this step (parameters and state unchanged); "
    "`optimizer.stats['skipped_steps']` counts such steps (on CUDA, as of the next search)"
)
_NEGATIVE = (
    "the loss is negative: SaLSA's Armijo criterion assumes a loss bounded below (e.g. >= 0); "
    "the search goes on, but the step size may grow without bound"
)


class SaLSA(FlatOptimizer):
    r"""Stable Armijo Line Search Adaptation: Adam (or SGD) with no learning rate to tune.

    Every few steps a backtracking line search on the mini-batch loss finds the step size, with
    an Armijo criterion whose two sides are smoothed by an exponential moving average; between
    searches it takes Adam steps with the step size it found. Same algorithm, same defaults and
    the same decisions as the published ``salsa-optimizer`` package, on flat parameter buffers.

    Args:
        params: parameters or param-group dicts. Per group, ``lr`` (default 1.0) multiplies the
            found step size in that group's updates, and ``weight_decay`` overrides the default.
            The search steps each group by its ``lr`` relative to the largest one and weighs its
            share of the criterion's norm by it, so a factor common to every group (an LR
            scheduler's warm-up or decay) scales the updates and leaves the search, and the step
            size it finds, as they would be without it.
        init_step_size: the first step size tried (grown by ``growth`` before every step).
        c: the sufficient-decrease constant of the Armijo criterion.
        momentum: ``(beta1, beta2, beta3)``: Adam's betas and the smoothing of the criterion;
            ``beta3 = 0`` is the plain Armijo criterion. ``(beta1, beta2)`` is also every param
            group's ``betas``, alike in all groups, which schedulers with ``cycle_momentum``
            move (as for torch's Adam, the bias correction uses the current ``beta1``).
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
            move. Same decisions in float64; see docs/memory.md.
    """

    name = "SaLSA"
    entry = "salsa"
    Scalars = Scalars
    global_keys = GLOBAL_KEYS
    renamed_scalars = {"step": "steps"}  # (checkpoints of the previous release)
    per_group_hint = (
        "SaLSA finds one step size for all groups, so only 'lr' (a multiplier on the step size) and "
        "'weight_decay' may differ per group ('betas' may be set, alike in every group, for schedulers)"
    )
    group_numbers = ("lr", "weight_decay")
    shared_across_groups = ("betas",)
    shards = True

    def __init__(
        self,
        params: ParamsT,
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
        process_group: torch.distributed.ProcessGroup | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        keep_backup: bool = True,
    ):
        beta1, beta2, _ = self.betas = checked_betas(momentum)
        check_arguments(init_step_size, c, weight_decay, direction, growth, decrease, eps, max_backtracks, max_interval)
        resolve_group(process_group)  # a group without torch.distributed is a ValueError

        self.init_step_size = float(init_step_size)
        self.c = float(c)
        self.speed_up = bool(speed_up)
        self.use_mv = bool(use_mv)
        self.direction = direction
        self.keep_second_moment = direction == "adam"
        self.growth = float(growth)
        self.decrease = float(decrease)
        self.eps = float(eps)
        self.max_backtracks = max_backtracks
        self.max_interval = float(max_interval)
        self.process_group = process_group
        self.grad_scaler = grad_scaler
        self._scalars = Scalars(step_size=self.init_step_size)
        self._last = StepInfo(step_size=self.init_step_size)
        defaults = dict(lr=1.0, weight_decay=float(weight_decay), betas=(beta1, beta2))
        super().__init__(params, defaults, backend=backend, keep_backup=keep_backup)
        self._pack()

    def _transient(self) -> dict[str, Any]:
        return {
            **super()._transient(),
            "_steps": None,  # the numbers a step keeps on each device (salsa_fast.step_state)
            "_unread_skips": False,  # a non-search step ran since the host last read that count
            "_scaler": ScalerLink(self.grad_scaler, self) if self.grad_scaler is not None else None,
            "_hypers": [],
            "_line": None,  # where a search puts the parameters (salsa_fast.salsa_line)
            "_counts_skip": [],
        }

    # -- parameter groups and flat buffers (the shell is salsa_fast._flat_optimizer) ---------------

    def _check_group_values(self, group: dict[str, Any], where: str) -> None:
        super()._check_group_values(group, where)
        if "betas" in group:
            betas = group["betas"]
            ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_real(b) and 0 <= b < 1 for b in betas)
            check(ok, f"{where} 'betas'", betas, "must be (beta1, beta2), each in [0, 1)")

    def _init_group(self, group: dict[str, Any]) -> None:
        group["step_size"] = self._scalars.step_size

    def _state_buffers(self, b: FlatBucket) -> dict[str, torch.Tensor]:
        moments = {"exp_avg": b.exp_avg, "exp_avg_sq": b.exp_avg_sq}
        return {key: flat for key, flat in moments.items() if flat is not None}

    def _missing_state_hint(self, key: str) -> str:
        return f" (a checkpoint of direction={'sgd' if self.direction == 'adam' else 'adam'}?)"

    def _on_repack(self) -> None:
        """One :class:`StepState` per device, each bucket's :class:`Hyper`, and which bucket
        counts a device-side skip (the first of each device)."""
        buckets = self._buckets
        devices = dict.fromkeys(b.device for b in buckets)
        self._steps = DeviceSteps(devices, *self.betas[:2], old=self._steps)
        self._make_hypers()
        first_of_device = {b.device: b for b in reversed(buckets)}
        self._counts_skip = [first_of_device[b.device] is b for b in buckets]  # once per device

    def _make_hypers(self) -> None:
        """Each bucket's step constants, and the line its searches move on (which keeps a backup
        or moves the parameters, chosen here once)."""
        beta1, beta2 = self.betas[:2]
        self._steps.set_betas(beta1, beta2)
        hypers = {
            d: backends.Hyper(beta1, beta2, self.eps, self.direction, self.use_mv, state)
            for d, state in self._steps.states.items()
        }
        self._hypers = [hypers[b.device] for b in self._buckets]  # each bucket's, in bucket order
        line = BackupLine if self.keep_backup else MovingLine
        self._line = line(self._backend, self._buckets, self._hypers)

    def _on_shared(self, key: str, betas: tuple[float, float]) -> None:
        """Adam's betas follow the groups' ``betas`` (moved by schedulers that cycle momentum)."""
        self.betas = (float(betas[0]), float(betas[1]), self.betas[2])
        self._make_hypers()

    # -- diagnostics -------------------------------------------------------------------------------

    @property
    def step_size(self) -> float:
        """The step size the last search found (each group steps with ``lr`` times it)."""
        return self._scalars.step_size

    @property
    def search_interval(self) -> float:
        """Steps between searches implied by the two step-size averages (at most ``max_interval``)."""
        return search_interval(self._scalars.step_size_slow, self._scalars.step_size_fast, self.max_interval)

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
            "effective_step_size": self._last.lr_scale * s.step_size,
            "search_interval": self.search_interval,
            "searched": float(self._last.searched),
            "trials": float(self._last.trials),
            "steps": s.steps,
            "forwards": s.forwards,
            "backwards": s.backwards,
            "searches": s.searches,
            "total_trials": s.trials,
            "skipped_steps": s.skipped,
        }

    def _fold_pending_skips(self) -> None:
        """Count the non-search steps the device skipped since the host last looked (one sync,
        only if a step ran on the device path since then)."""
        if self._unread_skips:
            self._count_device_skips(int(self._steps.read_skipped().item()))

    def _count_device_skips(self, n: int, just_now: bool = False) -> None:
        """The device skipped ``n`` non-search steps the host counted as taken: take them back
        (the step count and the search interval leave skipped steps out, as on the host path)."""
        self._unread_skips = False
        if not n:
            return
        s = self._scalars
        s.skipped += n
        s.steps -= n
        s.since_search -= n
        self._steps.counted()
        if just_now:  # (CPU: read right after the step)
            self._last = StepInfo(skipped=True, step_size=s.step_size)
        if self._scaler is None or not self._scaler.enabled:  # overflow skips under a GradScaler are routine
            self._warn_once("nonfinite", _NONFINITE)

    # -- the step ----------------------------------------------------------------------------------

    @torch._disable_dynamo
    def step(self, closure=None):  # type: ignore[override]
        """One SaLSA step: the gradient pass, then an Adam step or a line search. Under
        ``torch.compile`` the step is one graph break and runs eagerly, closure calls too.

        Args:
            closure: called as ``closure(backwards=True)`` (forward and ``loss.backward()``) and
                ``closure(backwards=False)`` (forward only, for each trial); returns the loss.

        Returns:
            What the closure returned in the gradient pass.

        Raises:
            TypeError: no closure, or one that cannot be called with ``backwards``.
            ValueError: the closure's loss is not a scalar.
            RuntimeError: ``step`` called from inside its own closure.
        """
        if not self._begin_step(closure):
            return self._idle_step(closure)
        seed = draw_seed()
        out, loss = self._first_call(closure, seed)
        scaling = self._scaler is not None and self._scaler.enabled
        grads_bad = self._scaler.unscale(self._buckets) if scaling else None

        s = self._scalars
        number = s.steps + 1  # k (on CUDA: plus the skips the device made that the host has not read)
        # Adam's bias corrections count one ahead of the steps, as the published package does;
        # each device subtracts the skips it has not reported (see salsa_fast.step_state)
        self._steps.begin(float(max(1, number + 1)))
        lrs = [float(g["lr"]) for g in self.param_groups]
        lr_scale, relative = split_lr(lrs)
        st = Step(out, loss, seed, number, self._writes(lrs), self._writes(relative), lr_scale, grads_bad)
        try:
            if not self._searches(number, s.since_search + 1):
                with annotate("salsa.plain_step"):
                    result = self._plain_step(st)
            else:
                with annotate("salsa.search"):
                    result = self._search_step(closure, st)
        finally:
            self._steps.end()
        if scaling:
            self._scaler.update()
        return result

    def _writes(self, multipliers: list[float]) -> Writes:
        """Each bucket's multiplier of the step size, from its group's entry in ``multipliers``,
        and its weight-decay factor (with the step size before this step)."""
        groups, eta = self.param_groups, self._scalars.step_size
        lrs = [multipliers[b.group_index] for b in self._buckets]
        return Writes(
            lrs, [lr * float(groups[b.group_index]["weight_decay"]) * eta for b, lr in zip(self._buckets, lrs)]
        )

    def _searches(self, number: int, since: int) -> bool:
        """Whether step ``number``, ``since`` steps after the last search, runs a line search."""
        return not self.speed_up or number < _WARMUP_SEARCHES or since >= self.search_interval

    def _plain_step(self, st: Step):
        backend, s = self._backend, self._scalars
        self._raise_flags(st.loss, st.grads_bad)
        eta_try = s.step_size * self.growth
        for b, h, lr, decay, counts in zip(self._buckets, self._hypers, *st.update, self._counts_skip):
            backend.plain_step(b, lr_step=lr * eta_try, decay=decay, hyper=h, count_skip=counts)
        s.steps, s.since_search = st.number, s.since_search + 1
        s.forwards += 1
        s.backwards += 1
        self._finish(StepInfo(searched=False, step_size=s.step_size, lr_scale=st.lr_scale))
        self._unread_skips = True
        if self._host_checks:  # CPU: reading the count is free, so the host knows at once
            self._count_device_skips(int(self._steps.read_skipped()), just_now=True)
        return st.out

    def _raise_flags(self, loss, grads_bad) -> None:
        """Flag a non-finite loss or gradient on every device, without a sync (see
        :meth:`DeviceSteps.raise_flag`); each bucket's probe checks its gradients."""
        group = resolve_group(self.process_group)

        def probe(loss):  # (the first bucket, on the first state's device, checks the loss)
            for i, (b, h) in enumerate(zip(self._buckets, self._hypers)):
                self._backend.probe(b, h, loss if i == 0 else None)

        self._steps.raise_flag(loss, grads_bad, probe, lambda flag: agree_on_flag(group, flag))

    def _search_step(self, closure, st: Step):
        """A step that searches: the first pass and its one sync, then (unless the device skipped
        steps that make this one not due to search, or the loss or gradient is not finite) the
        search, the commit of the moments, the bookkeeping. Anything raising undoes the step."""
        s = self._scalars
        first = Point(s.step_size * self.growth, st.search)
        with self._replaying() as replay:
            try:
                loss_v, pp_v, skipped = self._first_pass(st, first)
                number = st.number - skipped
                # the device skipped steps the host counted: without them, is this step still due?
                demoted = skipped and not self._searches(number, s.since_search + 1)
                finite = math.isfinite(loss_v) and math.isfinite(pp_v)
                if demoted or not finite:
                    self._line.back()
                else:
                    found = self._search(closure, replay, st, first, loss_v, pp_v)
                    self._line.commit()  # (the moments last: a commit that raises is undone too)
            except BaseException:
                self._line.back()
                raise
        if demoted:
            return self._plain_step(st._replace(number=number))
        if not finite:
            return self._skip(st.out, warn=self._scaler is None or not self._scaler.enabled)
        self._book_search(number, found, st.lr_scale)
        return st.out

    def _first_pass(self, st: Step, first: Point) -> tuple[float, float, int]:
        """The line's first pass, then the search's one sync: the loss and the norm
        ``sum(g * d)`` (each group's share times its search multiplier), agreed over the ranks,
        and the count of skips the device made that the host had not read (now counted)."""
        dev = self._buckets[0].device
        sums = {sharded: torch.zeros((), dtype=torch.float64, device=dev) for sharded in (False, True)}
        for b, lr, pp in zip(self._buckets, st.search.lrs, self._line.begin(first)):
            sums[b.sharded] = sums[b.sharded] + lr * pp.to(dev, torch.float64)  # (shards: summed over ranks)
        agreed = agree_on_search(
            resolve_group(self.process_group), st.loss.to(dev, torch.float64), sums[False], sums[True]
        )
        skipped = self._steps.read_skipped().to(dev).reshape(1)
        loss_v, pp_v, skipped_v = torch.cat([agreed, skipped]).tolist()  # the one sync of the search
        self._count_device_skips(int(skipped_v))
        return loss_v, pp_v, int(skipped_v)

    def _search(self, closure, replay, st: Step, first: Point, loss_v: float, pp_v: float) -> Found:
        """Backtrack along the search direction from ``first`` (or, where the loss or the norm is
        too small for the criterion, take the point along the momentum direction); leave the
        parameters at the update: the point found, with every group's full ``lr``."""
        s, beta3 = self._scalars, self.betas[2]
        norm_avg = beta3 * s.norm_avg + (1 - beta3) * pp_v
        if abs(loss_v) < MIN_LOSS or norm_avg < MIN_LOSS:  # no criterion: the momentum direction
            self._line.to(Point(first.eta, st.update, momentum=True))
            replay(closure, st.seed)
            return Found(first.eta, False, 0, 2, norm_avg, s.decrease_avg)
        if loss_v < 0:
            self._warn_once("negative", _NEGATIVE)
        self._line.to(first)
        eta, accepted, trials, decrease_avg = backtrack(
            lambda: self._trial_loss(replay, closure, st.seed),
            lambda eta: self._line.to(Point(eta, st.search)),
            loss=loss_v,
            eta=first.eta,
            norm_avg=norm_avg,
            decrease_avg=s.decrease_avg,
            beta3=beta3,
            c=self.c,
            decrease=self.decrease,
            max_backtracks=self.max_backtracks,
        )
        # the update: the point the parameters are at, with the full lr (the same point unless a
        # factor common to every group's lr scales it)
        self._line.to(self._line.at._replace(writes=st.update))
        return Found(eta, accepted, trials, 1 + trials, norm_avg, decrease_avg)

    def _trial_loss(self, replay, closure, seed: int) -> float:
        """The loss at the point written last, agreed over the ranks: one sync per trial."""
        _, value = replay(closure, seed)
        group = resolve_group(self.process_group)
        if group is not None:
            value = agree_on_loss(group, value.to(self._buckets[0].device, torch.float64))
        return float(value)

    def _book_search(self, number: int, found: Found, lr_scale: float) -> None:
        s = self._scalars
        s.steps, s.since_search = number, 0
        s.norm_avg, s.decrease_avg = found.norm_avg, found.decrease_avg
        s.step_size = found.eta
        s.step_size_slow = s.step_size_slow * SLOW + found.eta * (1 - SLOW)
        s.step_size_fast = s.step_size_fast * FAST + found.eta * (1 - FAST)
        s.forwards += found.forwards
        s.backwards += 1
        s.searches += 1
        s.trials += found.trials
        self._finish(StepInfo(True, found.trials, found.accepted, False, found.eta, lr_scale))

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

    def _on_load(self) -> None:
        self._steps.counted()  # skips of the run being replaced: not ours
        self._unread_skips = False
        self._last = StepInfo(step_size=self._scalars.step_size)
