"""A closure that raises during a search trial leaves the model at its pre-step values and the
optimizer state unchanged, so a caught error never leaves the model at an untried point."""

import copy

import pytest
import torch
from helpers import digits, mlp
from torch import nn

from salsa_fast import SaLSA


class Boom(Exception):
    pass


def _closure(model, xb, yb, fail_on_call=None, exc=None, counter=None):
    counter = counter if counter is not None else [0]

    def closure(backwards=False):
        counter[0] += 1
        if counter[0] == fail_on_call:
            raise exc
        loss = nn.functional.cross_entropy(model(xb), yb)
        if backwards:
            loss.backward()
        return loss

    return closure


def _state(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()), opt.last_step


def _assert_same_state(a, b):
    pa, sa, la = a
    pb, sb, lb = b
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))
    assert sa["param_groups"] == sb["param_groups"]  # (each holds the run's scalars)
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    assert la == lb


def _batches(dtype=torch.float64):
    x, y = digits(dtype)
    return [(x[i * 50 : i * 50 + 50], y[i * 50 : i * 50 + 50]) for i in range(30)]


@pytest.mark.parametrize(
    "exc,on_call",
    [
        (Boom("in the first trial"), 2),
        (KeyboardInterrupt(), 2),
        (torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"), 2),
    ],
    ids=["exception", "keyboard-interrupt", "out-of-memory"],
)
def test_failed_trial_restores_parameters_and_state(exc, on_call):
    batches = _batches()
    model = mlp(torch.float64)
    # weight decay: the pre-step values are the values before the decay too
    opt = SaLSA(model.parameters(), weight_decay=0.1, init_step_size=5.0)
    for xb, yb in batches[:3]:
        opt.zero_grad()
        opt.step(_closure(model, xb, yb))
    before = _state(model, opt)

    xb, yb = batches[3]
    opt.zero_grad()
    with pytest.raises(type(exc)) as raised:
        opt.step(_closure(model, xb, yb, fail_on_call=on_call, exc=exc))
    assert raised.value is exc  # the closure's own exception, not another of its type
    _assert_same_state(_state(model, opt), before)

    # Retrying the batch continues exactly as a run in which nothing went wrong.
    opt.zero_grad()
    opt.step(_closure(model, xb, yb))
    clean = mlp(torch.float64)
    clean_opt = SaLSA(clean.parameters(), weight_decay=0.1, init_step_size=5.0)
    for xb, yb in batches[:4]:
        clean_opt.zero_grad()
        clean_opt.step(_closure(clean, xb, yb))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clean.parameters()))
    assert opt.stats == clean_opt.stats


def test_failed_gradient_pass_changes_nothing():
    batches = _batches()
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters())
    for xb, yb in batches[:3]:
        opt.zero_grad()
        opt.step(_closure(model, xb, yb))
    before = _state(model, opt)
    with pytest.raises(Boom, match="in the gradient pass"):
        opt.step(_closure(model, *batches[3], fail_on_call=1, exc=Boom("in the gradient pass")))
    _assert_same_state(_state(model, opt), before)


def test_many_trials_then_failure():
    """A failure deep in a backtracking sequence still returns to the pre-step point."""
    batches = _batches()
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters(), init_step_size=1e4)  # forces long backtracking
    before = _state(model, opt)
    with pytest.raises(Boom, match="in the eleventh trial"):
        opt.step(_closure(model, *batches[0], fail_on_call=12, exc=Boom("in the eleventh trial")))
    _assert_same_state(_state(model, opt), before)
    opt.zero_grad()  # usable again
    opt.step(_closure(model, *batches[0]))
    assert opt.last_step.trials > 5
