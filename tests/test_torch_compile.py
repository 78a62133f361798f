"""``torch.compile`` around a training step that defines the closure and calls ``step``: the
optimizer's step is one graph break (it and the closure calls it makes run eagerly), nothing of
the optimizer is traced or recompiled as the step size changes, and the parameters are those of
the eager run. A compiled model inside the closure stays compiled (the forward passes, the
trials' included)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from salsa_fast import LABPAL, SaLSA

OPTIMIZERS = {
    "SaLSA": lambda params: SaLSA(params),
    "SaLSA-keep_backup=False": lambda params: SaLSA(params, keep_backup=False),
    "LABPAL": lambda params: LABPAL(
        params, measure_batches=2, reuse_steps=5, warmup_updates=3, trusted_norm=(1e-3, 1e3)
    ),
}


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 5, generator=g), torch.randn(10, generator=g), torch.randn(5, generator=g)


def _train_step(opt, weight, bias, x):
    def closure(backwards=False):
        loss = (weight.mv(x) + bias).pow(2).sum()
        if backwards:
            loss.backward()
        return loss

    opt.zero_grad()
    return opt.step(closure)


def _run(name, step_fn, steps=30):
    w0, b0, x = _problem()
    weight, bias = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    opt = OPTIMIZERS[name]([weight, bias])
    sizes = set()
    for _ in range(steps):
        step_fn(opt, weight, bias, x)
        sizes.add(getattr(opt, "step_size", None))
    return weight, bias, sizes


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_compiled_training_step_equals_eager_without_recompiling(name):
    torch._dynamo.reset()
    counters.clear()
    eager = _run(name, _train_step)
    backend = CompileCounter()  # (records each graph dynamo compiles; runs it eagerly)
    compiled = _run(name, torch.compile(_train_step, backend=backend))
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    if name.startswith("SaLSA"):
        assert len(compiled[2]) > 10  # the step size really changed from step to step
    # the training step breaks around the optimizer once; nothing of it is compiled again and
    # again (before, dynamo traced into it and recompiled a pass per new step size)
    assert backend.frame_count <= 2
    assert sum(counters["recompiles"].values()) == 0
    assert any("step" in reason for reason in counters["graph_break"])


def test_a_compiled_model_inside_the_closure_stays_compiled():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    backend = CompileCounter()
    compiled = torch.compile(model, backend=backend)
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    for net, opt in ((compiled, SaLSA(model.parameters())), (twin, SaLSA(twin.parameters()))):
        for _ in range(12):

            def closure(backwards=False, net=net):
                loss = (net(x) - y).pow(2).mean()
                if backwards:
                    loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
    assert 1 <= backend.frame_count <= 2  # the gradient pass and the trials' no-grad forward
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
