"""LABPAL: the flat optimizer against its reference twin, the parabola fit, the schedule, the
fixed reference defects, resume."""

import io
import math
import re

import numpy as np
import pytest
import torch
from helpers import digits, max_abs_diff, mlp, train
from torch import nn

from salsa_fast import LABPAL, SaLSAWarning, testing
from salsa_fast.labpal import H, parabola_step
from salsa_fast.labpal_reference import LABPALReference

DIGITS = dict(training_set_size=1797, batch_size=64)
# Frequent measurements and a moderate cap keep the dynamics tame enough that float64 runs of
# the two implementations stay together to the last bits over 300 calls (with the default cap,
# normalised steps of length 1.8 make the training chaotic and any rounding difference grows).
BRISK = dict(DIGITS, reuse_steps=60, warmup_updates=40, max_step_size=0.2)
CASES = {
    "nsgd": dict(mode="nsgd"),
    "sgd": dict(mode="sgd"),
    "nsgd_momentum": dict(mode="nsgd", momentum=0.5),
    "sgd_momentum": dict(mode="sgd", momentum=0.5),
    "sgd_uncapped": dict(mode="sgd", cap_sgd_updates=False),
    "batch_schedule": dict(mode="nsgd", batch_size_schedule=((0, 1), (150, 40))),  # accumulation becomes 3
    "exact_fit": dict(mode="nsgd", fit="exact"),
}


@pytest.mark.parametrize("case", CASES)
def test_same_decisions_and_parameters_as_the_reference_twin(case):
    options = {**BRISK, **CASES[case]}
    a, b = mlp(torch.float64), mlp(torch.float64)
    fast, ref = LABPAL(a.parameters(), **options), LABPALReference(b.parameters(), **options)
    ra = train(a, fast, 300, dtype=torch.float64)
    rb = train(b, ref, 300, dtype=torch.float64)
    assert ra.calls == rb.calls  # the same closure calls after every step call
    assert fast.stats["measurements"] >= 4
    assert fast.step_size == pytest.approx(ref.step_size, rel=1e-9)
    assert fast.learning_rate == pytest.approx(ref.lr, rel=1e-9)
    assert fast.stats["accumulation"] == ref.accumulation
    assert fast.stats["rescaled"] == ref.rescaled == 0  # float64 resolves these fits: the reference's points only
    assert max_abs_diff(a, b) <= 1e-9


@pytest.mark.parametrize("mode", ["nsgd", "sgd"])
def test_param_group_multipliers_match_the_twin(mode):
    """Group ``lr`` multipliers scale each group's updates; the measured line is the unscaled
    direction in both implementations."""

    def groups(model):
        params = list(model.parameters())
        return [{"params": params[:2], "lr": 0.5}, {"params": params[2:]}]

    a, b = mlp(torch.float64), mlp(torch.float64)
    options = {**BRISK, "mode": mode, "momentum": 0.5}
    fast, ref = LABPAL(groups(a), **options), LABPALReference(groups(b), **options)
    ra = train(a, fast, 200, dtype=torch.float64)
    rb = train(b, ref, 200, dtype=torch.float64)
    assert ra.calls == rb.calls and fast.stats["measurements"] >= 3
    assert fast.step_size == pytest.approx(ref.step_size, rel=1e-9)
    assert max_abs_diff(a, b) <= 1e-9


def test_closure_raising_during_the_line_evaluation_restores_theta0():
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS)
    train(model, opt, 9, dtype=torch.float64)  # nine of the first measurement's ten calls
    theta0 = [p.detach().clone() for p in model.parameters()]
    x, y = digits(torch.float64)
    calls = [0]

    def closure(backwards=False):
        calls[0] += 1
        if calls[0] == 3:  # its own batch, then at the first line point, then at the second: raise
            raise KeyboardInterrupt("at the second line point")
        return nn.functional.cross_entropy(model(x[:64]), y[:64])

    opt.zero_grad()
    with pytest.raises(KeyboardInterrupt, match="at the second line point"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta0))
    assert opt.measuring and opt.stats["measurements"] == 0
    run = train(model, opt, 10, dtype=torch.float64, start=10, rng_seed=None)  # measures afresh
    assert run.calls[-1] == 30 and opt.stats["measurements"] == 1 and not opt.measuring


def test_pass_failing_on_a_later_bucket_restores_theta0(monkeypatch):
    """Out of memory in the second flat buffer's first line point: the first buffer, already
    moved, goes back to theta0; the second, never moved, keeps its values."""
    from salsa_fast.backends import torch_ops

    model = mlp(torch.float64)
    params = list(model.parameters())
    opt = LABPAL([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], **DIGITS)
    train(model, opt, 9, dtype=torch.float64)
    theta0 = [p.detach().clone() for p in params]
    points, labpal_point = [0], torch_ops.labpal_point
    assert testing.backend(opt) is torch_ops

    def failing_point(b, src, **kwargs):
        points[0] += 1
        if points[0] == 2:
            raise torch.OutOfMemoryError("injected")
        labpal_point(b, src, **kwargs)

    monkeypatch.setattr(torch_ops, "labpal_point", failing_point)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        train(model, opt, 1, dtype=torch.float64, start=9, rng_seed=None)
    assert all(torch.equal(p, q) for p, q in zip(params, theta0))
    assert opt.measuring and opt.stats["measurements"] == 0


def _full_loss(model):
    x, y = digits()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("mode", ["nsgd", "sgd"])
def test_default_hyperparameters_train_digits(mode):
    """Batch 64, 1000 step calls: under half the initial full-batch loss at <= 1.3 closure calls
    per step."""
    model = mlp()
    initial = _full_loss(model)
    opt = LABPAL(model.parameters(), mode=mode, training_set_size=1797, batch_size=64)
    run = train(model, opt, 1000)
    assert _full_loss(model) < initial / 2
    assert run.calls[-1] / 1000 <= 1.3
    assert opt.stats["measurements"] == 2  # the first call, and once after the warm-up


def test_uncapped_sgd_updates_diverge_where_the_cap_trains():
    """Why ``cap_sgd_updates`` is on: the reference's SGD rule turns the step measured at
    initialisation (where gradients are smallest) into a learning rate that later, larger
    gradients cannot stand; the twin restating it diverges on this MLP too."""
    for impl in (LABPAL, LABPALReference):
        model = mlp(hidden=64)
        initial = _full_loss(model)
        train(model, impl(model.parameters(), mode="sgd", cap_sgd_updates=False, **DIGITS), 400)
        assert _full_loss(model) > 5 * initial


def test_capped_sgd_updates_are_no_longer_than_the_step():
    model = mlp(torch.float64, hidden=64)
    opt = LABPAL(model.parameters(), mode="sgd", **DIGITS, warmup_updates=20, reuse_steps=30)
    train(model, opt, 12, dtype=torch.float64)  # the first measurement is over
    capped = updates = 0
    for start in range(12, 150):
        measurements = opt.stats["measurements"]
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        train(model, opt, 1, dtype=torch.float64, start=start, rng_seed=None)
        if opt.measuring or opt.stats["measurements"] != measurements:
            continue  # a measurement call, not an SGD update
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        length = float((after - before).norm())
        grad = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
        assert length <= opt.step_size * (1 + 1e-9)
        assert length == pytest.approx(min(opt.learning_rate * grad, opt.step_size), rel=1e-9)
        capped += opt.learning_rate * grad > opt.step_size
        updates += 1
    assert 0 < capped < updates  # both regimes occurred


# -- the parabola fit --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta,c", [(2.0, -0.3, 1.0), (0.5, -1e-3, 3.0), (40.0, -2.0, 0.1)])
def test_fit_on_exact_parabolas(alpha, beta, c):
    mu = 0.01
    losses = tuple(c + beta * x + alpha * x * x for x in (0.0, H, mu))
    a, b, s = parabola_step(losses, H, mu, "exact")
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    assert s == pytest.approx(-beta / (2 * alpha), rel=1e-6)
    a, b, s = parabola_step(losses, H, mu, "reference")
    assert a == pytest.approx(alpha / 2, rel=1e-6)
    assert b == pytest.approx(beta + alpha * H, rel=1e-6)
    assert s == pytest.approx(-beta / alpha - H, rel=1e-6)  # about twice the minimum, as documented


def test_reference_fit_is_numpy_gradient_twice():
    rng = np.random.default_rng(0)
    x = np.array([0.0, H, 0.01])
    for _ in range(20):
        f = rng.normal(size=3)
        slopes = np.gradient(f, x)
        curvature = np.gradient(slopes, x)
        a, b, s = parabola_step(tuple(f), H, 0.01, "reference")
        assert a == pytest.approx(curvature[0] / 2, rel=1e-9) and b == pytest.approx(slopes[0], rel=1e-9)


# -- schedule, warm-up, step bookkeeping ---------------------------------------------------------


def test_schedule_entries_are_never_missed_with_accumulation():
    """The reference needs the call counter to equal an entry's call exactly and an empty
    accumulator; with an accumulation > 1 it can miss an entry (and every later one)."""
    model = mlp(torch.float64)
    nf = (128 / 64) * (1797 / 40000)  # 0.0899
    schedule = ((0, 1), (0, 30), (101, 60), (103, 120))  # accumulation: 1 -> 2 -> 5 -> 10
    opt = LABPAL(model.parameters(), **{**BRISK, "batch_size_schedule": schedule})
    train(model, opt, 101, dtype=torch.float64)
    assert opt.stats["accumulation"] == max(int(30 * nf), 1) == 2
    train(model, opt, 1, dtype=torch.float64, start=101, rng_seed=None)  # entry at call 101
    assert opt.stats["accumulation"] == max(int(60 * nf), 1) == 5 and opt.measuring
    train(model, opt, 2, dtype=torch.float64, start=102, rng_seed=None)  # 103 lands mid-measurement
    assert opt.stats["accumulation"] == max(int(120 * nf), 1) == 10


def test_warmup_measurement_and_reuse():
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **{**DIGITS, "warmup_updates": 30, "reuse_steps": 50, "max_step_size": 0.2})
    train(model, opt, 10, dtype=torch.float64)
    assert opt.stats["measurements"] == 1 and opt.stats["updates"] == 1  # the first call measured
    train(model, opt, 30, dtype=torch.float64, start=10, rng_seed=None)
    assert opt.stats["updates"] == 31 and not opt.measuring  # 30 warm-up updates + the first
    train(model, opt, 1, dtype=torch.float64, start=40, rng_seed=None)
    assert opt.measuring  # warm-up over: measure once
    train(model, opt, 9 + 50, dtype=torch.float64, start=41, rng_seed=None)
    assert opt.stats["measurements"] == 2 and opt.stats["updates"] == 32 + 50
    train(model, opt, 1, dtype=torch.float64, start=100, rng_seed=None)
    assert opt.measuring  # reuse_steps updates since the last measurement


def test_step_is_the_window_mean_after_warmup():
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **{**BRISK, "window": 3})
    train(model, opt, 300, dtype=torch.float64)
    history = testing.scalars(opt).history
    assert 1 <= len(history) <= 3
    assert opt.step_size == pytest.approx(sum(history) / len(history))


# -- the reference's defects, fixed --------------------------------------------------------------


def test_moves_follow_the_stored_direction_even_after_set_to_none():
    """Reference: with zero_grad(set_to_none=True) every line move skipped every parameter."""
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 10, dtype=torch.float64, zero_grad=model.zero_grad)
    assert opt.stats["measurements"] == 1 and opt.stats["rejected"] == 0
    assert math.isfinite(opt.step_size) and opt.step_size > 0
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_clipping_does_not_raise_the_cap():
    """Reference: clipping aliased the cap and scaled it in place, 1.8x more per clip."""
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **{**DIGITS, "max_step_size": 1e-4, "reuse_steps": 5, "warmup_updates": 0})
    train(model, opt, 120, dtype=torch.float64)
    assert opt.stats["measurements"] >= 5
    assert opt.step_size == pytest.approx(1e-4 * 1.8)


def test_first_measurement_abandoned_measures_again():
    """Reference: abandoning the first measurement left no step, and the next update crashed.
    (With no step in use only a direction that is not finite or does not descend is abandoned;
    one of any norm is measured: tests/test_labpal_measurement.py.)"""
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS)
    x, y = digits(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    for call in range(25):
        xb, yb = x[call * 64 : call * 64 + 64], y[call * 64 : call * 64 + 64]
        scale = float("inf") if call == 0 else 1.0  # a non-finite direction on the first call

        def closure(backwards=False, xb=xb, yb=yb, scale=scale):
            loss = nn.functional.cross_entropy(model(xb), yb) * scale
            if backwards:
                loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)
        if call == 0:
            assert opt.stats["abandoned"] == 1 and opt.measuring and opt.step_size is None
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.step_size is not None and opt.stats["measurements"] == 1 and not opt.measuring


def test_numpy_rng_is_left_alone_and_cpu_works():
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    model = mlp()
    train(model, LABPAL(model.parameters(), **DIGITS), 15)
    assert np.array_equal(np.random.get_state()[1], state)


def test_dropout_masks_repeat_at_every_point_of_the_line():
    model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, 10))
    masks = []
    model[1].register_forward_hook(lambda mod, inp, out: masks.append(out == 0))
    opt = LABPAL(model.parameters(), **DIGITS)
    train(model, opt, 10)  # one measurement: 10 calls, then 2 x 10 re-evaluations
    assert len(masks) == 30
    for i in range(10):
        assert torch.equal(masks[10 + i], masks[i]) and torch.equal(masks[20 + i], masks[i])


def test_preserve_buffers_keeps_batchnorm_out_of_the_extra_forwards():
    def run(preserve):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        opt = LABPAL(model.parameters(), **DIGITS)
        if preserve:
            opt.preserve_buffers(model)
        train(model, opt, 12)
        return int(model[1].num_batches_tracked)

    assert run(True) == 12  # one forward per step call
    assert run(False) == 32  # and 2 x 10 more from the measurement, as in the reference


def test_parameters_without_gradients():
    """Reference: parameters that never get a gradient crashed the direction code."""

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(64, 10), nn.Linear(64, 10)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = WithUnused()
    before = [p.detach().clone() for p in model.unused.parameters()]
    opt = LABPAL(model.parameters(), **DIGITS)
    train(model, opt, 30)
    assert opt.step_size is not None
    assert all(torch.equal(p, q) for p, q in zip(model.unused.parameters(), before))


def test_step_returns_the_loss_and_reports_the_step():
    model = mlp()
    opt = LABPAL(model.parameters(), **DIGITS)
    x, y = digits()

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        if backwards:
            loss.backward()
        return loss

    out = opt.step(closure)
    assert isinstance(out, torch.Tensor) and out.dim() == 0
    assert opt.step_size is None and opt.param_groups[0]["step_size"] is None  # nothing measured yet
    train(model, opt, 9, start=1)
    assert opt.param_groups[0]["step_size"] == opt.step_size > 0


def test_non_finite_gradient_skips_the_update():
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS, momentum=0.5)
    train(model, opt, 12, dtype=torch.float64)  # measured, then two updates
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    updates = opt.stats["updates"]
    x, y = digits(torch.float64)

    def poisoned(backwards=False):
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        if backwards:
            loss.backward()
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    opt.zero_grad()
    opt.step(poisoned)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    assert opt.stats["skipped_updates"] == 1 and opt.stats["updates"] == updates
    train(model, opt, 5, dtype=torch.float64, start=12, rng_seed=None)
    assert opt.stats["updates"] == updates + 5  # training goes on


def test_nan_losses_are_skipped_in_a_measurement():
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS)
    x, y = digits(torch.float64)
    for call in range(10):
        xb, yb = x[call * 64 : call * 64 + 64], y[call * 64 : call * 64 + 64]

        def closure(backwards=False, xb=xb, yb=yb, call=call):
            loss = nn.functional.cross_entropy(model(xb), yb)
            if backwards:
                loss.backward()
            return loss * float("nan") if call == 5 else loss  # one forward-only batch is NaN

        opt.zero_grad()
        opt.step(closure)
    assert opt.stats["measurements"] == 1 and opt.stats["rejected"] == 0
    assert math.isfinite(opt.step_size)


def test_lr_multiplier_scales_the_updates():
    a, b = mlp(torch.float64), mlp(torch.float64)
    opt_a = LABPAL(a.parameters(), **BRISK)
    opt_b = LABPAL([{"params": list(b.parameters()), "lr": 0.0}], **BRISK)
    train(a, opt_a, 30, dtype=torch.float64)
    frozen = [p.detach().clone() for p in b.parameters()]
    train(b, opt_b, 30, dtype=torch.float64)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), frozen))  # every update scaled to 0
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), frozen))


# -- state_dict ---------------------------------------------------------------------------------


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cut", [57, 130])  # measuring (calls 50-79) / training (mid-batch, accumulation 3)
def test_resume(cut):
    options = {**BRISK, "momentum": 0.5, "batch_size_schedule": ((0, 1), (50, 40))}
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **options)
    first = train(model, opt, cut, dtype=torch.float64)
    was_measuring = opt.measuring
    assert was_measuring == (cut == 57)
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    model = mlp(torch.float64, seed=9)
    model.load_state_dict(ckpt["model"])
    opt = LABPAL(model.parameters(), **options)
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    second = train(model, opt, 200 - cut, dtype=torch.float64, start=cut, rng_seed=None)

    # What the resumed run must equal: a run never stopped, or, for a checkpoint taken in the
    # middle of a measurement, one that starts that measurement over at the same call: a
    # schedule entry at the cut with the same multiplier (the accumulation stays 3) restarts it there, as
    # load_state_dict does (the parameters are still at the measurement's start).
    restart = ((cut, 40),) if was_measuring else ()
    full_model = mlp(torch.float64)
    full_opt = LABPAL(full_model.parameters(), **{**options, "batch_size_schedule": ((0, 1), (50, 40), *restart)})
    full = train(full_model, full_opt, 200, dtype=torch.float64)
    assert first.calls + [first.calls[-1] + c for c in second.calls] == full.calls  # after every step call
    assert opt.stats == full_opt.stats  # every counter, the step and the learning rate, exactly
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), full_model.parameters()))
    if was_measuring:  # the restarted measurement finished
        assert (
            opt.stats["measurements"] == ckpt["opt"]["param_groups"][0]["labpal"]["measurements"] + 1
            and not opt.measuring
        )


def test_a_checkpoint_with_the_names_before_step_size_and_accumulation_resumes_exactly():
    """Checkpoints written before the renames hold ``step`` (now ``step_size``) and ``k`` (now
    ``accumulation``) in every group's entry, and older ones no ``rescaled``: they load, and
    resume exactly."""
    options = {**BRISK, "momentum": 0.5, "batch_size_schedule": ((0, 1), (50, 40))}
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **options)
    train(model, opt, 130, dtype=torch.float64)
    assert not opt.measuring and opt.stats["accumulation"] == 3 and opt.step_size is not None
    sd = _roundtrip(opt.state_dict())
    then = {"step_size": "step", "accumulation": "k"}
    entries = [{then.get(k, k): v for k, v in g["labpal"].items() if k != "rescaled"} for g in sd["param_groups"]]
    assert all("step" in e and "k" in e and "step_size" not in e for e in entries)
    twin_model = mlp(torch.float64, seed=9)
    twin_model.load_state_dict(model.state_dict())
    twin = LABPAL(twin_model.parameters(), **options)
    twin.load_state_dict({**sd, "param_groups": [{**g, "labpal": e} for g, e in zip(sd["param_groups"], entries)]})
    lost = opt.stats["rescaled"]  # (not in the older checkpoint: counted from 0)
    assert twin.stats == {**opt.stats, "rescaled": 0} and twin.step_size == opt.step_size
    assert twin.state_dict()["param_groups"][0]["labpal"].keys() == sd["param_groups"][0]["labpal"].keys()
    train(model, opt, 160, dtype=torch.float64, start=130, rng_seed=5)  # (a measurement at 260)
    train(twin_model, twin, 160, dtype=torch.float64, start=130, rng_seed=5)
    assert opt.stats["measurements"] > sd["param_groups"][0]["labpal"]["measurements"]
    assert twin.stats == {**opt.stats, "rescaled": opt.stats["rescaled"] - lost}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


def test_bad_hyperparameters():
    params = list(mlp().parameters())
    for kwargs in (
        dict(mode="adam"),
        dict(momentum=1.0),
        dict(reuse_steps=0),
        dict(sample_step=1e-5),
        dict(fit="quadratic"),
        dict(batch_size_schedule=((0, -1),)),
        dict(batch_size=0),
        dict(cap_sgd_updates=1),
        dict(backend="cuda"),
    ):
        ((name, value),) = kwargs.items()
        with pytest.raises(ValueError, match=re.escape(f"invalid {name}={value!r}:")):  # names the argument
            LABPAL(params, **kwargs)
    with pytest.raises(ValueError, match="weight decay"):
        LABPAL([{"params": params, "weight_decay": 0.1}])
    with pytest.raises(TypeError, match="backwards"):
        LABPAL(params).step(lambda: 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_parameters_warn(dtype):
    """The line's first sample (1.77e-4 in all) is below bf16/fp16 resolution: measurements are
    fitted farther out (tests/test_labpal_measurement.py), and LABPAL says so."""
    with pytest.warns(SaLSAWarning, match="farther out.*fp32"):
        LABPAL(mlp(dtype).parameters(), **DIGITS)
