"""What a drop-in ``torch.optim.Optimizer`` must do that torch's own optimizer tests check, for
SaLSA and LABPAL alike: copies that step (deepcopy, pickle, ``torch.save`` of the optimizer),
state under keys that are not parameters, named parameters, and parameters that are all frozen
for now. (The port of torch's generic tests is ``tests/test_torch_generic.py``; these are the
cases it found broken, each pinned on its own.)"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import mlp, train

from salsa_fast import LABPAL, SaLSA, testing

OPTIMIZERS = {
    "SaLSA": lambda params, **kw: SaLSA(params, **kw),
    "SaLSA-keep_backup=False": lambda params, **kw: SaLSA(params, keep_backup=False, **kw),
    "LABPAL": lambda params, **kw: LABPAL(params, measure_batches=2, reuse_steps=5, warmup_updates=3, **kw),
}


@pytest.fixture(params=list(OPTIMIZERS))
def name(request):
    return request.param


def _groups(model):
    layers = list(model.parameters())
    return [{"params": layers[:2]}, {"params": layers[2:], "lr": 0.5}]


# -- copies --------------------------------------------------------------------------------------


def _saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": _saved_and_loaded,
}


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_steps_exactly_as_the_original(name, how):
    """The model and its optimizer copied together (so the copy's parameters are the copied
    model's), mid-run: both go on with the same closure calls and the same parameters, bit for
    bit, and the original is not touched by the copy's steps."""
    model = mlp(torch.float64)
    opt = OPTIMIZERS[name](_groups(model))
    train(model, opt, 10, dtype=torch.float64)
    copied_model, copied_opt = COPIES[how]((model, opt))
    assert copied_opt.param_groups[0]["params"][0] is copied_model[0].weight
    ahead = train(model, opt, 15, dtype=torch.float64, start=10)
    behind = train(copied_model, copied_opt, 15, dtype=torch.float64, start=10)
    assert ahead.calls == behind.calls
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), copied_model.parameters()))
    assert copied_opt.stats == opt.stats


def test_a_copy_keeps_every_public_attribute_and_drops_the_hooks_as_torch_does(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    opt.register_step_post_hook(lambda *args: None)
    train(model, opt, 2)
    copied = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(copied) if not k.startswith("_")}
    assert all(getattr(copied, k) == getattr(opt, k) for k in public - {"state", "param_groups"})
    assert len(copied._optimizer_step_post_hooks) == 0  # (torch's copies drop hooks too)
    reference = torch.optim.Adam(model.parameters())
    reference.register_step_post_hook(lambda *args: None)
    assert len(copy.deepcopy(reference)._optimizer_step_post_hooks) == 0


def test_a_labpal_copy_restarts_a_measurement_in_progress():
    """A measurement's closures belong to the original's model: like a resumed run, the copy
    measures again from its first call."""
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), measure_batches=4)
    train(model, opt, 2, dtype=torch.float64)
    assert opt.measuring and len(testing.measurement(opt)) == 2
    copied = copy.deepcopy(opt)
    assert copied.measuring and testing.measurement(copied) == [] and copied.stats["calls"] == 2


# -- state under keys that are not parameters ------------------------------------------------------


def test_state_under_other_keys_passes_through_state_dict_and_load(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 3)
    opt.state["global_step"] = 3
    sd = opt.state_dict()
    assert sd["state"]["global_step"] == 3 and set(sd["state"]) == {0, 1, 2, 3, "global_step"}
    other_model = mlp(seed=1)
    other = OPTIMIZERS[name](other_model.parameters())
    other.state["stale"] = 1  # replaced by the checkpoint's, as torch's load does
    other.load_state_dict(sd)
    assert other.state["global_step"] == 3 and "stale" not in other.state
    model[0].requires_grad_(False)  # a repack keeps it too
    train(model, opt, 2, start=3)
    assert opt.state["global_step"] == 3


# -- named parameters -------------------------------------------------------------------------------


def test_named_parameters_get_the_checks_plain_ones_get(name):
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="floating-point parameters"):
        OPTIMIZERS[name]([("w", complex_param)])
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="same parameter twice"):
        OPTIMIZERS[name]([("w", p), ("v", p)])
    with pytest.raises(RuntimeError, match="sparse parameters"):
        OPTIMIZERS[name]([("w", torch.zeros(3, 3).to_sparse().requires_grad_())])
    with pytest.raises(ValueError, match="with/without names"):  # (torch's own check)
        OPTIMIZERS[name]([("w", p), torch.zeros(2, requires_grad=True)])


def test_named_parameters_train_like_plain_ones_and_their_names_load_as_torch_loads_them(name):
    a, b = mlp(torch.float64), mlp(torch.float64)
    named = OPTIMIZERS[name](list(a.named_parameters()))
    plain = OPTIMIZERS[name](b.parameters())
    assert named.param_groups[0]["param_names"] == [n for n, _ in a.named_parameters()]
    assert train(a, named, 8, dtype=torch.float64).calls == train(b, plain, 8, dtype=torch.float64).calls
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    plain.load_state_dict(named.state_dict())  # the checkpoint's names replace none
    assert plain.param_groups[0]["param_names"] == named.param_groups[0]["param_names"]
    renamed = named.state_dict()
    del renamed["param_groups"][0]["param_names"]
    named.load_state_dict(renamed)  # a checkpoint without names leaves ours
    assert named.param_groups[0]["param_names"] == plain.param_groups[0]["param_names"]


# -- every parameter frozen (for now) --------------------------------------------------------------


def test_only_frozen_parameters_build_an_optimizer_whose_step_only_calls_the_closure(name):
    model = mlp().requires_grad_(False)
    opt = OPTIMIZERS[name](model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def closure(backwards=False):
        seen.append((backwards, torch.is_grad_enabled()))
        return model(torch.ones(2, 64)).sum()

    rng = torch.get_rng_state()
    loss = opt.step(closure)
    assert seen == [(False, False)]  # nothing to differentiate: no backward asked for
    assert torch.equal(loss, model(torch.ones(2, 64)).sum())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.state_dict()["state"] == {}
    assert not torch.equal(torch.get_rng_state(), rng)  # one seed drawn, as every step draws
    opt.zero_grad()
    model.requires_grad_(True)  # unfrozen: trains from here
    train(model, opt, 6)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_an_empty_parameter_list_is_still_refused(name):
    with pytest.raises(ValueError, match="empty parameter list"):
        OPTIMIZERS[name]([])
