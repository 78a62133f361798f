"""The torch backend's compiled CPU search passes (salsa_fast/backends/cpu_compiled.py), forced
on for small models: the decisions of the reference twin, the eager passes' parameters to
rounding, a search undone exactly, and the eager passes if compiling fails."""

import shutil

import pytest
import torch
from helpers import max_abs_diff, mlp, train

import salsa_fast.backends.cpu_compiled as cpu_compiled
from salsa_fast import SaLSA, SaLSAWarning
from salsa_fast.salsa_reference import SaLSAReference

pytestmark = pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="no C++ compiler")

CASES = {
    "default": {},
    "use_mv": dict(use_mv=True),
    "decay": dict(weight_decay=0.05, c=0.3, growth=1.3, decrease=0.5),
}


@pytest.fixture
def compiled(monkeypatch):
    """The compiled passes at every size, counted."""
    monkeypatch.setenv("SALSA_FAST_CPU_COMPILE", "1")
    calls = {}
    run = cpu_compiled.run

    def counted(fn, *args):
        calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
        return run(fn, *args)

    monkeypatch.setattr(cpu_compiled, "run", counted)
    return calls


def _run(dtype, steps, reference=False, **options):
    model = mlp(dtype)
    opt = (SaLSAReference if reference else SaLSA)(model.parameters(), **options)
    return model, train(model, opt, steps, dtype=dtype)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,steps,atol", [(torch.float64, 60, 1e-7), (torch.float32, 40, 1e-4)])
def test_the_reference_twins_decisions(compiled, case, dtype, steps, atol):
    """As strict as tests/test_reference_equivalence.py, with every search compiled."""
    model, run = _run(dtype, steps, **CASES[case])
    assert compiled["first_pass"] == run.opt.stats["searches"] > 10 and compiled["commit"] == compiled["first_pass"]
    assert compiled.get("trial", 0) > 0
    twin, twin_run = _run(dtype, steps, reference=True, **CASES[case])
    assert run.calls == twin_run.calls
    assert max_abs_diff(model, twin) <= atol


def test_the_eager_passes_parameters_to_rounding(compiled, monkeypatch):
    model, run = _run(torch.float64, 60)
    monkeypatch.setenv("SALSA_FAST_CPU_COMPILE", "0")
    eager, eager_run = _run(torch.float64, 60)
    assert run.calls == eager_run.calls and run.opt.stats == pytest.approx(eager_run.opt.stats, rel=1e-12)
    assert max_abs_diff(model, eager) <= 1e-12


def test_bf16_parameters_read_and_written_in_bf16_with_fp32_math(compiled, monkeypatch):
    """(LABPAL warns about bf16 parameters, SaLSA does not: its trials move them by whole ulps.)"""
    model, run = _run(torch.bfloat16, 20)
    assert compiled["first_pass"] >= 10
    monkeypatch.setenv("SALSA_FAST_CPU_COMPILE", "0")
    eager, eager_run = _run(torch.bfloat16, 20)
    assert run.calls == eager_run.calls
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert max_abs_diff(model, eager) <= 2**-7  # (a few bf16 ulps of the largest weights)


def test_a_closure_that_raises_in_a_trial_leaves_everything_as_it_was(compiled):
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters(), init_step_size=50.0)  # (the first trials fail: the closure is called again)
    train(model, opt, 3, dtype=torch.float64)
    before = (
        [p.detach().clone() for p in model.parameters()],
        {k: v.clone() for k, v in opt.state[next(model.parameters())].items()},
    )
    x = torch.randn(8, 64, dtype=torch.float64)
    calls = [0]

    def closure(backwards=False):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("the data loader broke")
        loss = model(x).square().mean()
        if backwards:
            loss.backward()
        return loss

    opt.zero_grad()
    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(closure)
    assert compiled["first_pass"] >= 1
    assert all(torch.equal(p, q) for p, q in zip(before[0], model.parameters()))
    assert all(torch.equal(v, opt.state[next(model.parameters())][k]) for k, v in before[1].items())


def test_a_failed_compile_warns_once_and_stays_eager(monkeypatch):
    monkeypatch.setenv("SALSA_FAST_CPU_COMPILE", "1")
    monkeypatch.setitem(cpu_compiled._state, "failed", False)

    def broken(fn, *args, **kwargs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(cpu_compiled, "_compiled", {})
    with pytest.warns(SaLSAWarning, match="no compiler today") as caught:
        model, run = _run(torch.float64, 30)
    assert len(caught) == 1 and cpu_compiled._state["failed"]
    monkeypatch.setenv("SALSA_FAST_CPU_COMPILE", "0")
    eager, eager_run = _run(torch.float64, 30)
    assert run.calls == eager_run.calls
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), eager.parameters()))
