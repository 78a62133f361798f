"""Mixed precision: fp16 autocast with a GradScaler that SaLSA drives, and bf16 autocast."""

import pytest
import torch
from helpers import digits, make_closure, max_abs_diff, mlp, next_step_searches
from torch import nn

from salsa_fast import SaLSA
from salsa_fast.salsa_reference import SaLSAReference


def _fp16_closure(model, scaler, xb, yb, poison=False):
    def closure(backwards=False):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(xb), yb)
        if backwards:
            scaled = scaler.scale(loss)
            (scaled * float("inf") if poison else scaled).backward()
        return loss

    return closure


def _batches(step, size=64):
    x, y = digits()
    i = (step * size) % (len(x) - size)
    return x[i : i + size], y[i : i + size]


def _full_loss(model):
    x, y = digits()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("searching", [True, False], ids=["search-step", "plain-step"])
def test_fp16_overflow_skips_the_step_and_training_goes_on(searching):
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", growth_interval=1000)
    opt = SaLSA(model.parameters(), grad_scaler=scaler)
    initial = _full_loss(model)
    step = 0
    while step < 15 or next_step_searches(opt) != searching:
        opt.zero_grad()
        opt.step(_fp16_closure(model, scaler, *_batches(step)))
        step += 1
    before = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    scale = scaler.get_scale()

    opt.zero_grad()
    opt.step(_fp16_closure(model, scaler, *_batches(step), poison=True))  # every gradient overflows
    assert opt.last_step.skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(v, state[i][k]) for k, v in s.items())
    assert scaler.get_scale() == scale * 0.5  # backed off
    assert opt.stats["skipped_steps"] == 1

    for later in range(step + 1, step + 80):
        opt.zero_grad()
        opt.step(_fp16_closure(model, scaler, *_batches(later)))
    assert opt.stats["skipped_steps"] == 1
    assert _full_loss(model) < initial / 2


def test_scaler_is_updated_every_step():
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    opt = SaLSA(model.parameters(), grad_scaler=scaler)
    for step in range(9):
        opt.zero_grad()
        opt.step(_fp16_closure(model, scaler, *_batches(step)))
    assert scaler.get_scale() == 2.0**13  # grew once every 3 finite steps


def test_grads_are_unscaled_before_the_optimizer_uses_them():
    """With a scaler, a step sees the same gradient as without one (exactly, in fp32 autocast-free
    arithmetic with a power-of-two scale), so the decisions and parameters match."""

    def run(with_scaler):
        model = mlp()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10**6) if with_scaler else None
        opt = SaLSA(model.parameters(), grad_scaler=scaler)
        calls = []
        for step in range(20):
            xb, yb = _batches(step)

            def closure(backwards=False, xb=xb, yb=yb):
                loss = nn.functional.cross_entropy(model(xb), yb)
                if backwards:
                    (scaler.scale(loss) if with_scaler else loss).backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
            calls.append(opt.stats["forwards"])
        return model, calls

    a, calls_a = run(True)
    b, calls_b = run(False)
    assert calls_a == calls_b
    assert max_abs_diff(a, b) == 0.0


def test_closure_that_does_not_scale_is_told_so():
    model = mlp()
    opt = SaLSA(model.parameters(), grad_scaler=torch.amp.GradScaler("cpu"))
    closure = make_closure(model, "digits", torch.arange(64), torch.float32, [0])  # unscaled backward
    with pytest.raises(RuntimeError, match=r"scaler.scale\(loss\).backward\(\)"):
        opt.step(closure)


def test_disabled_scaler_is_ignored():
    model = mlp()
    opt = SaLSA(model.parameters(), grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    opt.step(make_closure(model, "digits", torch.arange(64), torch.float32, [0]))
    assert opt.stats["steps"] == 1


def _start_reference_where(ref, ref_model, opt, model) -> None:
    """Put the reference twin (and its model) where SaLSA (and its model) are: parameters,
    moments and every scalar of the run."""
    sd, scalars = opt.state_dict(), opt.stats
    entry = sd["param_groups"][0]["salsa"]
    with torch.no_grad():
        for i, (p, q) in enumerate(zip(ref_model.parameters(), model.parameters())):
            p.copy_(q)
            ref.state[p] = {k: v.clone() for k, v in sd["state"][i].items()}
    ref.step_size, ref.k, ref.since_search = entry["step_size"], scalars["steps"], entry["since_search"]
    ref.h, ref.s = entry["decrease_avg"], entry["norm_avg"]
    ref.step_size_slow, ref.step_size_fast = entry["step_size_slow"], entry["step_size_fast"]


def test_bf16_autocast_needs_nothing_special():
    """bf16 autocast in the closure: every step the same decision as the reference twin started
    where SaLSA is, and parameters equal to fp32 rounding; over 60 steps it learns.

    (Run side by side from the start, the two would agree only until a last-bit difference
    between them (they round in different orders) crosses a bf16 rounding boundary in the
    forward pass, at a step that depends on the CPU's kernels; so the twin starts every step
    from SaLSA's state. The forward passes are then the same computation, bit for bit, and the
    parameters differ by the update's few fp32 roundings: 1e-6 is 8 ulps of |p| <= 1.)"""
    model, ref_model = mlp(), mlp()
    opt, ref = SaLSA(model.parameters()), SaLSAReference(ref_model.parameters())
    for step in range(60):
        xb, yb = _batches(step)
        calls = {}
        _start_reference_where(ref, ref_model, opt, model)
        for o, net in ((opt, model), (ref, ref_model)):
            counter = calls[o] = [0]

            def closure(backwards=False, net=net, counter=counter, xb=xb, yb=yb):
                counter[0] += 1
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(net(xb), yb)
                if backwards:
                    loss.backward()
                return loss

            torch.manual_seed(step)
            o.zero_grad()
            o.step(closure)
        assert calls[opt] == calls[ref], f"step {step}"
        assert max_abs_diff(model, ref_model) <= 1e-6, f"step {step}"
    assert _full_loss(model) < _full_loss(mlp()) / 2
