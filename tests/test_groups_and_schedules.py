"""Param groups (per-group lr multiplier and weight decay), LR schedulers, diagnostics."""

import math

import pytest
import torch
from helpers import max_abs_diff, mlp, train

from salsa_fast import SaLSA, StepInfo, testing
from salsa_fast.salsa_reference import SaLSAReference


def _groups(model, lr=(1.0, 0.3), wd=(0.0, 0.05)):
    layers = list(model.parameters())
    return [
        {"params": layers[:2], "lr": lr[0], "weight_decay": wd[0]},
        {"params": layers[2:], "lr": lr[1], "weight_decay": wd[1]},
    ]


# use_mv is chaotic here after ~100 steps (last-bit differences reach 1e-6 by step 120 while the
# decisions stay identical), so it is compared over 80.
@pytest.mark.parametrize(
    "options,steps", [({}, 120), (dict(use_mv=True), 80), (dict(direction="sgd", init_step_size=0.1), 120)], ids=str
)
def test_groups_match_the_reference(options, steps):
    a, b = mlp(torch.float64), mlp(torch.float64)
    ra = train(a, SaLSA(_groups(a), **options), steps, dtype=torch.float64)
    rb = train(b, SaLSAReference(_groups(b), **options), steps, dtype=torch.float64)
    assert ra.calls == rb.calls
    assert max_abs_diff(a, b) <= 1e-7


def test_unit_multipliers_reproduce_a_single_group():
    a, b = mlp(torch.float64), mlp(torch.float64)
    ra = train(a, SaLSA(_groups(a, lr=(1.0, 1.0), wd=(0.0, 0.0))), 60, dtype=torch.float64)
    rb = train(b, SaLSA(b.parameters()), 60, dtype=torch.float64)
    assert ra.calls == rb.calls
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_zero_lr_group_does_not_move():
    model = mlp()
    opt = SaLSA(_groups(model, lr=(0.0, 1.0), wd=(0.1, 0.0)))
    frozen = [p.detach().clone() for p in list(model.parameters())[:2]]
    train(model, opt, 20)
    assert all(torch.equal(p, q) for p, q in zip(list(model.parameters())[:2], frozen))


def _warmup_cosine(total=120, warmup=10):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return factor


def _train_with_schedule(cls, model, steps=120):
    opt = cls(_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps))
    lrs = []
    run = None
    for start in range(steps):
        run = train(model, opt, 1, dtype=torch.float64, start=start, rng_seed=None)
        lrs.append([g["lr"] for g in opt.param_groups])
        sched.step()
    return opt, lrs, run


def test_warmup_cosine_schedule_composes_with_the_search():
    a, b = mlp(torch.float64), mlp(torch.float64)
    torch.manual_seed(0)
    oa, lrs_a, _ = _train_with_schedule(SaLSA, a)
    torch.manual_seed(0)
    ob, lrs_b, _ = _train_with_schedule(SaLSAReference, b)
    assert lrs_a == lrs_b
    assert lrs_a[0] == pytest.approx([0.1, 0.03])  # warm-up multiplies the initial lr per group
    assert lrs_a[-1][0] < 0.01  # cosine decays to ~0
    assert max_abs_diff(a, b) <= 1e-7
    assert oa.stats["forwards"] == ob.forwards
    # The search still decides the step size; the schedule only scales it per group.
    assert oa.step_size == pytest.approx(ob.step_size, rel=1e-9)


def _first_step(factor, keep_backup=True, groups=True):
    """One step of SaLSA on a float64 digits MLP with every group's lr multiplied by ``factor``
    (a LambdaLR): ``(step size, each parameter's move, stats)``."""
    model = mlp(torch.float64)
    start = [p.detach().clone() for p in model.parameters()]
    opt = SaLSA(_groups(model) if groups else model.parameters(), keep_backup=keep_backup)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: factor)
    train(model, opt, 1, dtype=torch.float64)
    return opt.step_size, [p.detach() - q for p, q in zip(model.parameters(), start)], opt.stats, model


@pytest.mark.parametrize("keep_backup", [True, False])
def test_a_factor_common_to_every_group_scales_the_update_and_not_the_step_size(keep_backup):
    """A scheduler's factor on two groups (lr 1 and 0.3, weight decay on the second): the search
    finds the step size it finds without it, with the same trials, and the parameters move 0.1
    times as far. (Before, the factor entered the trials and the criterion, and the search found
    ``lr * step_size`` again: the update came out 1.16x, not 0.1x, the unscheduled one.)"""
    eta, moves, stats, model = _first_step(1.0, keep_backup)
    eta_s, moves_s, stats_s, _ = _first_step(0.1, keep_backup)
    assert eta_s == eta and stats_s["trials"] == stats["trials"] >= 2
    assert stats_s["effective_step_size"] == 0.1 * eta
    # Each point rounds once per op to the parameters' scale (a few ops per write; without a
    # backup a few writes: the trials, back to p0, out to the update): 16 ulps of max |p|.
    for m, m_s, p in zip(moves, moves_s, model.parameters()):
        torch.testing.assert_close(m_s, 0.1 * m, rtol=0, atol=16 * 2**-52 * p.abs().max().item())


def test_every_lr_zero_moves_nothing_and_searches_as_with_lr_one():
    """Warm-up from 0: the step's update is zero, the moments move and the search finds the step
    size of an unscheduled run (with all lr 0 the search weighs every group alike)."""
    eta, _, _, _ = _first_step(1.0, groups=False)
    eta_0, moves_0, stats_0, _ = _first_step(0.0, groups=False)
    assert eta_0 == eta and stats_0["effective_step_size"] == 0.0
    assert all(torch.count_nonzero(m) == 0 for m in moves_0)


def test_diagnostics():
    model = mlp()
    opt = SaLSA(model.parameters())
    assert opt.last_step == StepInfo(step_size=1.0)
    assert all(g["step_size"] == 1.0 for g in opt.param_groups)
    train(model, opt, 1)
    info = opt.last_step
    assert info.searched and info.trials >= 1 and not info.skipped
    assert info.step_size == opt.step_size == opt.param_groups[0]["step_size"]
    stats = opt.stats
    assert stats["forwards"] == 1 + info.trials and stats["backwards"] == 1 and stats["searches"] == 1
    assert set(stats) == {
        "step_size",
        "effective_step_size",
        "search_interval",
        "searched",
        "trials",
        "steps",
        "forwards",
        "backwards",
        "searches",
        "total_trials",
        "skipped_steps",
    }
    assert stats["effective_step_size"] == stats["step_size"]  # (lr 1)
    train(model, opt, 60, start=1)
    assert 0 < opt.search_interval <= 10
    assert opt.stats["searches"] < 61  # not every step searched
    assert opt.stats["steps"] == 61


def test_one_cycle_with_cycled_momentum_moves_beta1_like_the_reference():
    """OneCycleLR's default ``cycle_momentum=True`` cycles every group's ``betas[0]``; SaLSA's
    beta1 follows it, and the bias correction uses the current beta1 (as torch's Adam does).
    The reference twin, given the same lr and beta1 before every step, takes the same steps."""
    steps = 60
    a, b = mlp(torch.float64), mlp(torch.float64)
    opt = SaLSA(a.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=steps)
    ref = SaLSAReference(b.parameters())
    schedule = []
    for start in range(steps):
        lr, betas = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
        schedule.append((lr, betas[0]))
        train(a, opt, 1, dtype=torch.float64, start=start, rng_seed=start)
        assert opt.betas[:2] == tuple(betas)
        sched.step()
    for start, (lr, beta1) in enumerate(schedule):
        ref.param_groups[0]["lr"], ref.beta1 = lr, beta1
        train(b, ref, 1, dtype=torch.float64, start=start, rng_seed=start)
    assert len({beta1 for _, beta1 in schedule}) > 30  # beta1 really moved (0.95 -> 0.85 -> 0.95)
    assert opt.stats["forwards"] == ref.forwards
    assert max_abs_diff(a, b) <= 1e-7


def test_cyclic_lr_with_cycled_momentum_runs_and_checkpoints_the_betas():
    model = mlp(torch.float64)
    opt = SaLSA(_groups(model))
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=5)  # cycle_momentum=True
    for start in range(12):
        train(model, opt, 1, dtype=torch.float64, start=start, rng_seed=start)
        sched.step()
    assert opt.param_groups[0]["betas"] == opt.param_groups[1]["betas"]
    assert opt.param_groups[0]["betas"][0] != 0.9
    sd = opt.state_dict()
    other = SaLSA(_groups(mlp(torch.float64)))
    other.load_state_dict(sd)
    # (the scheduler moved the groups' betas after the last step: both take them at the next)
    assert other.betas[:2] == tuple(opt.param_groups[0]["betas"]) != opt.betas[:2]


def test_labpal_momentum_follows_the_groups_between_measurements():
    from salsa_fast import LABPAL

    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), measure_batches=3, reuse_steps=6, warmup_updates=4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=40)
    seen = []
    for start in range(40):
        group_momentum = opt.param_groups[0]["momentum"]
        mid_measurement = opt.measuring and len(testing.measurement(opt)) > 0
        before = opt.momentum
        run = train(model, opt, 1, dtype=torch.float64, start=start, rng_seed=start)
        # a new value takes effect at once, except inside a measurement, whose line must not change
        assert opt.momentum == (before if mid_measurement else group_momentum)
        seen.append(opt.momentum)
        sched.step()
    assert len(set(seen)) > 20 and math.isfinite(run.losses[-1])
    assert opt.stats["measurements"] >= 3
