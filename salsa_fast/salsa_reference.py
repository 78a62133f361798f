"""SaLSA, restated plainly: one loop over parameters, one formula per line.

This is the ground truth the fast optimizer (:class:`salsa_fast.SaLSA`) is tested against. It is
written to be read next to the algorithm as docs/salsa.md states it, not to be fast: per-parameter
tensors, a copy of every parameter per search, a host read wherever a number is needed.

Same arguments, defaults, closure contract and random seeding as :class:`salsa_fast.SaLSA`
(``backend``, ``process_group`` and ``grad_scaler`` do not apply). Same conventions:

* a parameter whose ``.grad`` is None gets a zero gradient (its moments still decay);
* the group ``lr`` multiplies the step size in that group's updates and its weight decay; the
  search's trial points and the criterion's norm use each ``lr`` relative to the largest one
  (all 1 when every ``lr`` is 0), so a factor common to all groups scales the update only;
* moments are fp32 (fp64 for fp64 parameters) and low-precision parameters are updated in fp32;
* a non-finite gradient-pass loss or gradient skips the step, changing nothing.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from .closure import call_closure, check_closure, draw_seed


class SaLSAReference(Optimizer):
    def __init__(
        self,
        params,
        init_step_size=1.0,
        c=0.5,
        momentum=(0.9, 0.999, 0.9),
        speed_up=True,
        use_mv=False,
        weight_decay=0.0,
        *,
        direction="adam",
        growth=1.1,
        decrease=0.8,
        eps=1e-8,
        max_backtracks=100,
        max_interval=10,
    ):
        super().__init__(params, dict(lr=1.0, weight_decay=weight_decay))
        self.c = c
        self.beta1, self.beta2, self.beta3 = momentum
        self.speed_up = speed_up
        self.use_mv = use_mv
        self.direction = direction
        self.growth = growth
        self.decrease = decrease
        self.eps = eps
        self.max_backtracks = max_backtracks
        self.max_interval = max_interval

        self.step_size = init_step_size  # eta
        self.k = 0  # steps taken
        self.h = 0.0  # smoothed loss decrease
        self.s = 0.0  # smoothed preconditioned gradient norm
        self.step_size_slow = 1e-8
        self.step_size_fast = 1e-8
        self.since_search = 100
        self.forwards = 0  # closure calls
        self.skipped = 0
        self.history = []  # per step: (searched, trials, step_size)

    def _trainable(self):
        """(parameter, its group) for every parameter that requires grad."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield p, group

    def step(self, closure=None):
        check_closure(closure)
        seed = draw_seed()

        def run(backwards):
            self.forwards += 1
            return call_closure(closure, seed, self._cuda_devices(), backwards)

        out, loss = run(backwards=True)
        loss = float(loss)

        # Gradients in the state dtype; None means "not used by this loss": zero.
        params, grads, groups = [], [], []
        for p, group in self._trainable():
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            g = torch.zeros_like(p, dtype=dtype) if p.grad is None else p.grad.detach().to(dtype)
            params.append(p)
            grads.append(g)
            groups.append(group)

        if not math.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
            self.skipped += 1
            self.history.append((False, 0, self.step_size, True))
            return out

        # Search-interval bookkeeping.
        self.k += 1
        rate = self.step_size_fast / self.step_size_slow
        if rate < 1:
            rate = 1 / rate
        interval = min(self.max_interval, 1 / ((rate - 1) + 1e-8))
        self.since_search += 1

        eta = self.step_size
        eta_try = eta * self.growth
        corr1 = 1 - self.beta1 ** max(1, self.k + 1)
        corr2 = 1 - self.beta2 ** max(1, self.k + 1)

        # Each group's multiplier: lr in the update; in the search, lr over the largest lr.
        lr_scale = max(group["lr"] for group in self.param_groups)
        update_lr = [group["lr"] for group in groups]
        search_lr = [group["lr"] / lr_scale if lr_scale > 0 else 1.0 for group in groups]

        # The Adam moments and directions; the parameters' values, in the state dtype.
        starts = []
        search_dirs, momentum_dirs = [], []
        for p, g in zip(params, grads):
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(g)
                if self.direction == "adam":
                    state["exp_avg_sq"] = torch.zeros_like(g)
            m = state["exp_avg"]
            m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
            m_hat = m / corr1
            if self.direction == "adam":
                v = state["exp_avg_sq"]
                v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                precond = 1 / ((v / corr2).sqrt() + self.eps)
            else:
                precond = 1.0
            momentum_dirs.append(m_hat * precond)
            search_dirs.append(m_hat * precond if self.use_mv else g * precond)
            starts.append(p.detach().to(g.dtype, copy=True))

        def move_to(eta_, dirs, lrs=update_lr):
            """Weight decay with the old step size, then a step of eta_ along dirs."""
            with torch.no_grad():
                for p, p0, d, lr, group in zip(params, starts, dirs, lrs, groups):
                    p.copy_(p0 * (1 - lr * group["weight_decay"] * eta) - lr * eta_ * d)

        searched = not self.speed_up or self.k < 10 or self.since_search >= interval
        trials = 0
        if not searched:
            move_to(eta_try, momentum_dirs)
        else:
            self.since_search = 0
            pp = sum(lr * float((g * d).sum(dtype=torch.float64)) for g, d, lr in zip(grads, search_dirs, search_lr))
            self.s = self.beta3 * self.s + (1 - self.beta3) * pp
            if abs(loss) >= 1e-8 and self.s >= 1e-8:
                while True:
                    move_to(eta_try, search_dirs, search_lr)
                    eta_at = eta_try
                    trial_loss = float(run(backwards=False)[1])
                    trials += 1
                    if math.isfinite(trial_loss):
                        if trial_loss == loss:
                            break
                        decrease = self.beta3 * self.h + (1 - self.beta3) * (loss - trial_loss)
                        if decrease >= eta_try * self.c * self.s:
                            self.h = decrease
                            break
                    eta_try *= self.decrease
                    if trials == self.max_backtracks:
                        break
                if search_lr != update_lr:  # the update: the point found, with the full lr
                    move_to(eta_at, search_dirs)
            else:
                move_to(eta_try, momentum_dirs)
                run(backwards=False)
            self.step_size = eta_try
            self.step_size_slow = self.step_size_slow * 0.99 + eta_try * (1 - 0.99)
            self.step_size_fast = self.step_size_fast * 0.9 + eta_try * (1 - 0.9)

        self.history.append((searched, trials, self.step_size, False))
        return out

    def _cuda_devices(self):
        return sorted({p.device.index or 0 for p, _ in self._trainable() if p.is_cuda})
