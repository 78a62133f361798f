"""The CUDA path's bookkeeping, checked on the CPU: device-side skips that end exactly where host
skips end, launches that fail without leaving a trace, and the non-search step's operation count.

On CUDA a non-search step never syncs: the host does not learn that the device skipped a
non-finite step until the next search (see ``salsa_fast.step_state``). On CPU the optimizer
reads that count after every step; ``testing.defer_host_reads(opt)`` makes it wait as it
does on CUDA, and the Triton kernels run in the interpreter, so both paths can be compared here.
"""

import warnings

import pytest
import torch
from helpers import advance_until, assert_unchanged, batches, digits, make_closure, mlp, poisoned, snapshot
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from salsa_fast import SaLSA, SaLSAWarning, testing

pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")

if not hasattr(interpreter, "InterpretedFunction") or torch.cuda.is_available():
    pytest.skip("these tests drive Triton's interpreter on CPU tensors", allow_module_level=True)

BACKENDS = ["torch", "triton"]
# From step 58 on, about every other step of this run is a non-search step (the first 57 search);
# 63 and 65 are search steps (skipped on the host on both paths).
POISONED = {58: "grad", 60: "grad", 62: "loss", 63: "grad", 65: "loss", 66: "grad", 68: "grad", 72: "loss", 74: "grad"}


def _two_groups(model):
    first, *rest = list(model.parameters())
    return [{"params": [first]}, {"params": rest, "lr": 0.5, "weight_decay": 1e-3}]


def _run(backend, host_checks, steps=80, keep_backup=True):
    """Train with NaN injected at the POISONED steps; returns the optimizer, the parameters and
    the closure calls after every step, the steps at which a non-finite warning arrived, and
    how many searches were undone (for a non-finite search step, or one no longer due)."""
    model = mlp()
    opt = SaLSA(_two_groups(model), backend=backend, keep_backup=keep_backup)
    testing.defer_host_reads(opt, not host_checks)
    x, _ = digits()
    counter, params, calls, warned = [0], [], [], []
    torch.manual_seed(0)
    with testing.undone_searches(opt) as undone:
        for step, idx in enumerate(batches(len(x), steps)):
            _one_step(opt, model, step, idx, counter, params, calls, warned)
    return opt, params, calls, warned, len(undone)


def _one_step(opt, model, step, idx, counter, params, calls, warned) -> None:
    """One step of :func:`_run`, recording what it compares."""
    closure = make_closure(model, "digits", idx, torch.float32, counter)
    if step in POISONED:
        closure = poisoned(model, closure, POISONED[step])
    opt.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SaLSAWarning)
        opt.step(closure)
    warned += [step] * sum("non-finite" in str(w.message) for w in caught)
    params.append([p.detach().clone() for p in model.parameters()])
    calls.append(counter[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep_backup", [True, False])
def test_device_skips_end_where_host_skips_end(backend, keep_backup):
    """The same non-finite steps on the host path and on the deferred (CUDA) path: the same
    closure calls and parameters after every step, and the whole state_dict equal at the end;
    the device path learns of its skips at the next search, and a search that was due only
    because the host had counted skipped steps is undone and becomes a plain step."""
    host, host_params, host_calls, host_warned, host_undone = _run(backend, True, keep_backup=keep_backup)
    dev, dev_params, dev_calls, dev_warned, dev_undone = _run(backend, False, keep_backup=keep_backup)
    assert dev_calls == host_calls
    for step, (a, b) in enumerate(zip(host_params, dev_params)):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), step
    sd_host, sd_dev = host.state_dict(), dev.state_dict()
    assert sd_dev["param_groups"][0]["salsa"] == sd_host["param_groups"][0]["salsa"]
    assert sd_host["param_groups"][0]["salsa"]["skipped"] == len(POISONED)
    assert sd_dev["param_groups"] == sd_host["param_groups"]
    assert sd_dev["state"].keys() == sd_host["state"].keys()
    for i, entry in sd_host["state"].items():
        for key, value in entry.items():
            assert torch.equal(sd_dev["state"][i][key], value), (i, key)
    # the warning: at once on the host path, at the next search on the device path
    assert host_warned == [min(POISONED)]
    assert len(dev_warned) == 1 and dev_warned[0] > host_warned[0]
    assert dev_undone > host_undone  # the case of a search no longer due was met


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_skip_is_reported_by_the_next_sync(backend):
    """On the deferred path a skipped non-search step is not known at once (``last_step`` and
    ``stats`` cannot say), and ``state_dict()`` (a sync) counts it and warns; the host path says
    it all at once."""
    for host_checks in (True, False):
        model = mlp()
        opt = SaLSA(model.parameters(), backend=backend)
        testing.defer_host_reads(opt, not host_checks)
        x, _ = digits()
        counter = [0]
        plan = batches(len(x), 300)
        closures = [make_closure(model, "digits", batch, torch.float32, counter) for batch in plan]
        step = advance_until(opt, closures.__getitem__, False)
        before = testing.scalars(opt).steps
        opt.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SaLSAWarning)
            opt.step(poisoned(model, make_closure(model, "digits", plan[step], torch.float32, counter), "grad"))
        assert opt.last_step.skipped == host_checks
        assert bool(caught) == host_checks
        assert opt.stats["skipped_steps"] == int(host_checks)
        with warnings.catch_warnings(record=True) as at_sync:
            warnings.simplefilter("always", SaLSAWarning)
            scalars = opt.state_dict()["param_groups"][0]["salsa"]
        assert bool(at_sync) != host_checks  # the warning comes with the count
        assert scalars["skipped"] == 1 and scalars["steps"] == before
        assert opt.stats["skipped_steps"] == 1


# -- a launch that fails leaves no trace --------------------------------------------------------


class _FailingLaunch:
    """Make the ``fail_at``-th Triton launch after the gradient pass raise out-of-memory."""

    def __init__(self, monkeypatch, fail_at):
        self.fail_at, self.launches, self.armed = fail_at, 0, False
        run = interpreter.InterpretedFunction.run

        def failing_run(kernel, *args, **kwargs):
            if self.armed:
                self.launches += 1
                if self.launches == self.fail_at:
                    raise torch.OutOfMemoryError("injected: out of memory")
            return run(kernel, *args, **kwargs)

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", failing_run)

    def closure(self, inner):
        def closure(backwards=False):
            loss = inner(backwards)
            self.armed = self.armed or backwards
            return loss

        return closure


class _MixedMLP(nn.Module):
    """The digits MLP with a float64 output layer: two flat buckets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = nn.Linear(64, 33), nn.Linear(33, 10).double()

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)).double())


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("searching", [True, False], ids=["search", "plain"])
@pytest.mark.parametrize("keep_backup", [True, False])
@pytest.mark.parametrize("buckets", [1, 2])
def test_a_failed_launch_leaves_parameters_and_state_as_they_were(
    monkeypatch, fail_at, searching, keep_backup, buckets
):
    """The first or the second kernel launch after the gradient pass raises (out of memory in a
    partials buffer, a compile error on a fresh machine): the step raises it and leaves the
    parameters and the optimizer's state exactly as they were, and the next step trains on.
    (With two buckets, a float32 and a float64 one, the second launch of a search is the second
    bucket's first pass, after the first bucket's has written its trial point.)"""
    model = mlp() if buckets == 1 else _MixedMLP()
    opt = SaLSA(model.parameters(), backend="triton", keep_backup=keep_backup)
    testing.defer_host_reads(opt)  # the CUDA path
    assert len(testing.buckets(opt)) == buckets
    x, _ = digits()
    counter = [0]
    plan = batches(len(x), 300)
    step = advance_until(opt, lambda i: make_closure(model, "digits", plan[i], torch.float32, counter), searching)
    snap = snapshot(model, opt)
    failing = _FailingLaunch(monkeypatch, fail_at)
    opt.zero_grad()
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        opt.step(failing.closure(make_closure(model, "digits", plan[step], torch.float32, counter)))
    assert failing.launches == fail_at
    assert_unchanged(model, opt, snap, ignore=("forwards", "backwards"))  # (the gradient pass ran)
    monkeypatch.undo()
    opt.zero_grad()
    loss = opt.step(make_closure(model, "digits", plan[step + 1], torch.float32, counter))
    assert torch.isfinite(loss) and testing.scalars(opt).steps == snap[2]["steps"] + 1


# -- the non-search step's own work -------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    """Count the tensor operations (aten ops, host-side scalar tensors included) and the Triton
    launches of the optimizer's own work: the closure's and the launches' own are left out."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.ops, self.launches, self.paused = [], 0, False
        run = interpreter.InterpretedFunction.run

        def counted_run(kernel, *args, **kwargs):
            self.launches += 1
            self.paused = True  # (the interpreter copies its arguments with torch ops)
            try:
                return run(kernel, *args, **kwargs)
            finally:
                self.paused = False

        monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted_run)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # (torch's Optimizer.step wrapper opens a record_function range, for every optimizer)
        if not self.paused and func.namespace != "profiler":
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def closure(self, inner):
        def closure(backwards=False):
            self.paused = True
            try:
                return inner(backwards)
            finally:
                self.paused = False

        return closure


@pytest.mark.parametrize("groups", [1, 2])
def test_non_search_step_stays_within_its_operation_budget(monkeypatch, groups):
    """Outside the closure, a non-search step on the CUDA path (the Triton backend, deferred
    skips) makes at most 2 kernel launches per flat buffer (the probe and the update) and at
    most 6 + 2 per param group other tensor operations, whatever the number of parameters."""
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])  # 12 parameters
    params = list(model.parameters())
    param_groups = [{"params": params}] if groups == 1 else [{"params": params[:4]}, {"params": params[4:], "lr": 0.3}]
    opt = SaLSA(param_groups, backend="triton")
    testing.defer_host_reads(opt)
    x = torch.randn(32, 16)

    def closure(backwards=False):
        loss = model(x).square().mean()
        if backwards:
            loss.backward()
        return loss

    advance_until(opt, lambda i: closure, False)
    opt.zero_grad()
    with _CountOps(monkeypatch) as counter:
        opt.step(counter.closure(closure))
    assert not opt.last_step.searched
    assert counter.launches <= 2 * len(testing.buckets(opt)), counter.launches
    assert len(counter.ops) <= 6 + 2 * groups, "\n".join(counter.ops)
