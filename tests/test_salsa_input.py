"""What SaLSA is handed, answered as docs/salsa.md's "Bad input" paragraph says: closures of the
wrong shape, bad hyperparameters, non-finite losses and gradients, sparse gradients, several
dtypes, backends that cannot run. A clear exception naming the argument, or a documented
recovery; never a silent wrong result, never corrupted parameters. (What SaLSA and LABPAL
refuse alike, through their shared shell, is in test_shell.py.)"""

import math

import pytest
import torch
from helpers import assert_unchanged, digits, max_abs_diff, mlp, next_step_searches, snapshot, train
from torch import nn

from salsa_fast import SaLSA, SaLSAWarning, testing
from salsa_fast.salsa_reference import SaLSAReference


def _closure(model, backwards_hook=None, value_hook=None):
    x, y = digits()
    xb, yb = x[:64], y[:64]

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(model(xb), yb)
        if value_hook is not None:
            loss = value_hook(loss, backwards)
        if backwards:
            loss.backward()
            if backwards_hook is not None:
                backwards_hook()
        return loss

    return closure


# -- the closure ---------------------------------------------------------------------------------


def test_step_without_closure_shows_the_pattern():
    opt = SaLSA(mlp().parameters())
    with pytest.raises(TypeError, match=r"def closure\(backwards=False\)"):
        opt.step()


@pytest.mark.parametrize(
    "closure",
    [lambda: 0.0, lambda x, y: 0.0, lambda *, other=1: 0.0, "not callable"],
    ids=["no-args", "two-positional", "wrong-keyword", "not-callable"],
)
def test_closure_of_the_wrong_shape(closure):
    opt = SaLSA(mlp().parameters())
    with pytest.raises(TypeError, match="backwards"):
        opt.step(closure)


def test_closure_accepting_kwargs_is_fine():
    model = mlp()
    opt = SaLSA(model.parameters())
    inner = _closure(model)
    opt.step(lambda **kw: inner(**kw))


@pytest.mark.parametrize("returned", [None, "loss", (1.0,), True], ids=["None", "str", "tuple", "bool"])
def test_closure_returning_no_loss(returned):
    model = mlp()
    opt = SaLSA(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda backwards=False: returned)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_non_scalar_loss_in_the_gradient_pass():
    model = mlp()
    opt = SaLSA(model.parameters())
    x, y = digits()

    def closure(backwards=False):
        losses = nn.functional.cross_entropy(model(x[:8]), y[:8], reduction="none")
        if backwards:
            losses.mean().backward()
        return losses

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_non_scalar_loss_in_a_trial_restores_everything():
    model = mlp()
    opt = SaLSA(model.parameters())
    train(model, opt, 3)
    snap = snapshot(model, opt)
    x, y = digits()

    def closure(backwards=False):
        losses = nn.functional.cross_entropy(model(x[:8]), y[:8], reduction="none")
        if backwards:
            losses.mean().backward()
            return losses.mean()
        return losses

    opt.zero_grad()
    with pytest.raises(ValueError, match="scalar loss"):
        opt.step(closure)  # the first steps always search
    assert_unchanged(model, opt, snap, ignore=())


# -- hyperparameters -----------------------------------------------------------------------------

BAD = [
    ("init_step_size", 0.0),
    ("init_step_size", -1.0),
    ("init_step_size", float("nan")),
    ("c", 0.0),
    ("c", -0.5),
    ("momentum", (1.0, 0.999, 0.9)),
    ("momentum", (0.9, -0.1, 0.9)),
    ("momentum", (0.9, 0.999, 1.0)),
    ("momentum", (0.9, 0.999)),
    ("momentum", "abc"),
    ("eps", 0.0),
    ("eps", -1e-8),
    ("weight_decay", -0.1),
    ("growth", 1.0),
    ("growth", 0.5),
    ("growth", float("inf")),
    ("decrease", 0.0),
    ("decrease", 1.0),
    ("decrease", 1.5),
    ("max_backtracks", 0),
    ("max_backtracks", 2.5),
    ("max_backtracks", True),
    ("max_interval", 0),
    ("direction", "lion"),
    ("backend", "cuda"),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=name.split()[0]):
        SaLSA(mlp().parameters(), **{name: value})


@pytest.mark.parametrize("key,value", [("lr", -1.0), ("weight_decay", -0.5)])
def test_invalid_group_values(key, value):
    params = list(mlp().parameters())
    with pytest.raises(ValueError, match=key):
        SaLSA([{"params": params[:2]}, {"params": params[2:], key: value}])


def test_global_hyperparameters_cannot_differ_per_group():
    params = list(mlp().parameters())
    with pytest.raises(ValueError, match="only 'lr'"):
        SaLSA([{"params": params[:2]}, {"params": params[2:], "c": 0.1}])


def test_process_group_without_torch_distributed():
    with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
        SaLSA(mlp().parameters(), process_group=object())


def test_grad_scaler_must_be_a_grad_scaler():
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        SaLSA(mlp().parameters(), grad_scaler=object())


# -- non-finite values ---------------------------------------------------------------------------


@pytest.mark.parametrize("searching", [True, False], ids=["search-step", "plain-step"])
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_gradient_pass_skips_the_step(searching, where):
    model = mlp()
    opt = SaLSA(model.parameters())
    train(model, opt, 30)
    while next_step_searches(opt) != searching:
        train(model, opt, 1, start=30)
    snap = snapshot(model, opt)
    first = next(model.parameters())

    def poison_grad():
        first.grad[0, 0] = float("nan")

    if where == "loss":
        closure = _closure(model, value_hook=lambda loss, b: loss * float("inf"))
    else:
        closure = _closure(model, backwards_hook=poison_grad)
    opt.zero_grad()
    with pytest.warns(SaLSAWarning, match="non-finite"):
        opt.step(closure)
    assert_unchanged(model, opt, snap)
    assert opt.last_step.skipped and opt.stats["skipped_steps"] == 1

    # training goes on, and the warning is not repeated
    opt.zero_grad()
    opt.step(closure)
    assert opt.stats["skipped_steps"] == 2
    train(model, opt, 5, start=40)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.stats["skipped_steps"] == 2


def test_non_finite_trial_loss_is_a_failed_trial():
    """A NaN (or -inf: it would otherwise look like an infinite decrease) on a trial backtracks."""

    def run(cls):
        model = mlp(torch.float64)
        opt = cls(model.parameters())
        x, y = digits(torch.float64)
        calls = []
        for step in range(20):
            xb, yb = x[step * 32 : step * 32 + 32], y[step * 32 : step * 32 + 32]
            seen = [0]

            def closure(backwards=False, seen=seen, step=step, xb=xb, yb=yb):
                seen[0] += 1
                loss = nn.functional.cross_entropy(model(xb), yb)
                if backwards:
                    loss.backward()
                elif seen[0] == 2:  # the first trial of each search
                    return loss * (float("nan") if step % 2 else -float("inf"))
                return loss

            opt.zero_grad()
            opt.step(closure)
            calls.append(seen[0])
        return model, calls

    a, calls_a = run(SaLSA)
    b, calls_b = run(SaLSAReference)
    assert calls_a == calls_b
    assert min(c for c in calls_a if c > 1) >= 3  # every search needed at least a second trial
    assert max_abs_diff(a, b) <= 1e-9


# -- parameters and gradients --------------------------------------------------------------------


@pytest.mark.parametrize("when", ["first-step", "later-model-zero-grad"])
def test_sparse_gradients(when):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SaLSA(emb.parameters())
    tokens = torch.tensor([1, 2, 2, 7])

    def closure(backwards=False):
        loss = (emb(tokens) - 1).pow(2).sum()
        if backwards:
            loss.backward()
        return loss

    if when == "later-model-zero-grad":
        dense = nn.Embedding(10, 3)
        dense_opt = SaLSA(dense.parameters())
        emb, opt = dense, dense_opt
        opt.step(closure)  # dense gradients: fine, views attached
        emb.sparse = True
        emb.zero_grad()  # views dropped: the next gradient is autograd's own, sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(closure)
    assert torch.equal(emb.weight, before)


def test_frozen_parameters_are_ignored():
    model = mlp()
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt = SaLSA(model.parameters())
    train(model, opt, 12)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))
    assert model[0].weight.grad is None
    assert len(opt.state_dict()["state"]) == 2


def test_several_dtypes_one_buffer_each():
    model = nn.ModuleList([nn.Linear(64, 20), nn.Linear(20, 10).double(), nn.Linear(64, 10).bfloat16()])

    def forward(x):
        return model[1](torch.tanh(model[0](x)).double()).float() + model[2](x.bfloat16()).float()

    x, y = digits()
    opt = SaLSA(model.parameters())
    assert sorted(str(b.dtype) for b in testing.buckets(opt)) == ["torch.bfloat16", "torch.float32", "torch.float64"]

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(forward(x[:64]), y[:64])
        if backwards:
            loss.backward()
        return loss

    with torch.no_grad():
        first = closure().item()
    for _ in range(20):
        opt.zero_grad()
        opt.step(closure)
    with torch.no_grad():
        assert closure().item() < first
    assert model[1].weight.dtype == torch.float64 and model[2].weight.dtype == torch.bfloat16


def test_triton_backend_without_cuda_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: its kernels run on CUDA"):
        SaLSA(mlp().parameters(), backend="triton")


def test_auto_backend_falls_back_quietly(recwarn):
    model = mlp()
    opt = SaLSA(model.parameters(), backend="auto")
    train(model, opt, 3)
    assert not [w for w in recwarn if issubclass(w.category, SaLSAWarning)]


def test_step_inside_its_own_closure():
    model = mlp()
    opt = SaLSA(model.parameters())
    inner = _closure(model)

    def closure(backwards=False):
        if not backwards:
            opt.step(inner)
        return inner(backwards)

    with pytest.raises(RuntimeError, match="inside its own closure"):
        opt.step(closure)


def test_negative_loss_searches_and_warns_once():
    model = mlp()
    opt = SaLSA(model.parameters())
    closure = _closure(model, value_hook=lambda loss, b: loss - 10.0)
    with pytest.warns(SaLSAWarning, match="negative"):
        opt.step(closure)
    assert opt.last_step.searched and opt.last_step.trials >= 1
    assert math.isfinite(opt.step_size)
