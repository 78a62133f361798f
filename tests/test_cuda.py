"""CUDA-only behaviour (skipped without a GPU), SaLSA and LABPAL: host syncs, device-side
skipping of non-finite gradients, GPU checkpoints loading on CPU, CPU/GPU agreement."""

import io
import warnings

import pytest
import torch
from conftest import cuda
from helpers import advance_until, batches, digits, make_closure, max_abs_diff, mlp, poisoned, train
from torch import nn

from salsa_fast import LABPAL, SaLSA, SaLSAWarning, testing

pytestmark = cuda


def _cuda_closure(model, step, dtype=torch.float32):
    return make_closure(model, "digits", torch.arange(step * 32, step * 32 + 32), dtype, [0], device="cuda")


def _poisoned(model, step):
    """Batch ``step``'s closure, with a NaN written into the first gradient after backward."""
    return poisoned(model, _cuda_closure(model, step))


def _step_without_syncs(opt, closure):
    """One ``opt.step(closure)``; any host sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.zero_grad()
        opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _train_on_cuda(model, opt, steps, dtype):
    """``helpers.train`` with the batches on the GPU: closure calls after every step."""
    x, _ = digits(dtype)
    torch.manual_seed(0)  # as train() does: the same closure seeds
    calls, count = [], [0]
    for idx in batches(len(x), steps):
        opt.zero_grad()
        opt.step(make_closure(model, "digits", idx, dtype, count, device="cuda"))
        calls.append(count[0])
    return calls


def _up_to_a_non_search_step(backend="torch", keep_backup=True):
    """A CUDA model and optimizer whose next step will not search; and that step's index."""
    model = mlp().cuda()
    opt = SaLSA(model.parameters(), backend=backend, keep_backup=keep_backup)
    return model, opt, advance_until(opt, lambda i: _cuda_closure(model, i), False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("keep_backup", [True, False])  # False: the table is copied in per launch
def test_non_search_step_does_not_sync(backend, keep_backup):
    model, opt, step = _up_to_a_non_search_step(backend, keep_backup)
    _step_without_syncs(opt, _cuda_closure(model, step))
    assert not opt.last_step.searched


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("keep_backup", [True, False])
def test_search_step_syncs_once_plus_once_per_trial(backend, keep_backup):
    model = mlp().cuda()
    opt = SaLSA(model.parameters(), backend=backend, init_step_size=100.0, keep_backup=keep_backup)  # backtracks
    closure = _cuda_closure(model, 0)
    opt.step(closure)  # warm-up (kernel compilation, lazy allocations)
    opt.zero_grad()
    closure = _cuda_closure(model, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert opt.last_step.searched
    assert len(syncs) == 1 + opt.last_step.trials


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_gradient_is_skipped_on_the_device(backend):
    """Skipped without a sync; the host learns of it (count, step count, warning) at the next
    sync, here ``state_dict()``."""
    model, opt, step = _up_to_a_non_search_step(backend)
    before = [p.detach().clone() for p in model.parameters()]
    steps = testing.scalars(opt).steps
    opt.zero_grad()
    opt.step(_poisoned(model, step))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.last_step.skipped  # (not known yet)
    with pytest.warns(SaLSAWarning, match="non-finite"):
        scalars = opt.state_dict()["param_groups"][0]["salsa"]
    assert scalars["skipped"] == 1 and scalars["steps"] == steps


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_device_skips_match_the_cpu_in_float64(backend):
    """The same non-finite steps on CPU (known at once) and on CUDA (known at the next search):
    the same closure calls and, in float64, the same parameters and counters. (From step 56 on
    about every other step of this run is a non-search step; the first 56 all search.)"""
    runs = []
    for device in ("cpu", "cuda"):
        model = mlp(torch.float64).to(device)
        opt = SaLSA(model.parameters(), backend=backend if device == "cuda" else "torch")
        x, _ = digits(torch.float64)
        torch.manual_seed(0)
        count = [0]
        calls = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SaLSAWarning)
            for step, idx in enumerate(batches(len(x), 90)):
                closure = make_closure(model, "digits", idx, torch.float64, count, device=device)
                if step in (56, 58, 60, 61, 64, 66, 70, 72):
                    closure = poisoned(model, closure)
                opt.zero_grad()
                opt.step(closure)
                calls.append(count[0])
            scalars = opt.state_dict()["param_groups"][0]["salsa"]
        runs.append((model.cpu(), calls, scalars))
    (a, calls_a, sa), (b, calls_b, sb) = runs
    assert calls_a == calls_b
    assert max_abs_diff(a, b) <= 1e-9
    assert {k: v for k, v in sa.items() if not isinstance(v, float)} == {
        k: v for k, v in sb.items() if not isinstance(v, float)
    }
    assert sa["skipped"] == 8


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("keep_backup", [True, False])
def test_kernels_run_on_the_parameters_device_not_the_current_one(backend, keep_backup):
    """A model on cuda:1 while cuda:0 is current: every launch goes to cuda:1 (a launch on the
    wrong device would read foreign addresses), and the run equals one made with cuda:1 current."""
    results = []
    for current in (0, 1):
        with torch.cuda.device(current):
            model = mlp(torch.float64).to("cuda:1")
            opt = SaLSA(model.parameters(), backend=backend, keep_backup=keep_backup)
            x, _ = digits(torch.float64)
            torch.manual_seed(0)
            count = [0]
            for idx in batches(len(x), 30):
                opt.zero_grad()
                opt.step(make_closure(model, "digits", idx, torch.float64, count, device="cuda:1"))
            torch.cuda.synchronize(1)
            results.append(([p.detach().cpu() for p in model.parameters()], count[0]))
    (pa, ca), (pb, cb) = results
    assert ca == cb
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))


def test_gpu_checkpoint_loads_on_cpu():
    gpu_model = mlp().cuda()
    gpu_opt = SaLSA(gpu_model.parameters())
    for step in range(15):
        gpu_opt.zero_grad()
        gpu_opt.step(_cuda_closure(gpu_model, step))
    buf = io.BytesIO()
    torch.save({"model": gpu_model.state_dict(), "opt": gpu_opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    cpu_model = mlp()
    cpu_opt = SaLSA(cpu_model.parameters())
    cpu_model.load_state_dict(ckpt["model"])
    cpu_opt.load_state_dict(ckpt["opt"])
    assert cpu_opt.step_size == gpu_opt.step_size
    for i, s in cpu_opt.state_dict()["state"].items():
        for k, v in s.items():
            assert v.device.type == "cpu"
            assert torch.equal(v, gpu_opt.state_dict()["state"][i][k].cpu())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "options",
    [{}, dict(use_mv=True), dict(direction="sgd", init_step_size=0.1), dict(keep_backup=False, weight_decay=0.02)],
    ids=str,
)
def test_cuda_matches_cpu_in_float64(options, backend):
    a, b = mlp(torch.float64), mlp(torch.float64).cuda()
    ra = train(a, SaLSA(a.parameters(), **options), 60, dtype=torch.float64)
    calls = _train_on_cuda(b, SaLSA(b.parameters(), backend=backend, **options), 60, torch.float64)
    assert calls == ra.calls
    assert max_abs_diff(a, b.cpu()) <= 1e-9


def test_triton_kernels_index_past_2_to_the_31():
    """int64 offsets: a flat buffer of more than 2**31 elements (bf16 params, fp32 state)."""
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~30 GB of free GPU memory")
    from salsa_fast.backends import Hyper, triton_ops
    from salsa_fast.flat import FlatBucket
    from salsa_fast.step_state import StepState

    p = nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    b = FlatBucket([p], 0, keep_second_moment=True)
    b.grad.fill_(1.0)
    h = Hyper(0.9, 0.999, 1e-8, "adam", False, StepState.at("cuda", 0.9, 0.999, bias_step=2.0))
    triton_ops.plain_step(b, lr_step=0.5, decay=0.0, hyper=h)
    tail = p.detach()[-4099:].float()
    assert torch.all(tail < 0) and torch.allclose(tail, tail[0].expand_as(tail))
    assert float(b.exp_avg[-1]) == pytest.approx(0.1)


# -- LABPAL on CUDA -----------------------------------------------------------------------------

LABPAL_OPTIONS = dict(training_set_size=1797, batch_size=64, reuse_steps=30, warmup_updates=10, max_step_size=0.2)


def _labpal_after_first_measurement(backend, **options):
    model = mlp().cuda()
    opt = LABPAL(model.parameters(), backend=backend, **{**LABPAL_OPTIONS, **options})
    step = 0
    while opt.measuring or opt.step_size is None:
        opt.zero_grad()
        opt.step(_cuda_closure(model, step))
        step += 1
    opt.zero_grad()
    opt.step(_cuda_closure(model, step))  # one training update: every kernel is compiled
    assert not opt.measuring
    return model, opt, step + 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["nsgd", "sgd"])
def test_labpal_training_call_does_not_sync(backend, mode):
    model, opt, step = _labpal_after_first_measurement(backend, mode=mode, momentum=0.5)
    _step_without_syncs(opt, _cuda_closure(model, step))
    assert not opt.measuring


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_labpal_non_finite_gradient_is_skipped_on_the_device(backend):
    model, opt, step = _labpal_after_first_measurement(backend, momentum=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    opt.step(_poisoned(model, step))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum))
    assert opt.stats["skipped_updates"] == 0  # (stats never syncs: as of the host's last read)
    assert opt.state_dict()["param_groups"][0]["labpal"]["skipped"] == 1  # (a sync: read now)
    assert opt.stats["skipped_updates"] == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["nsgd", "sgd"])
def test_labpal_cuda_matches_cpu_in_float64(backend, mode):
    options = {**LABPAL_OPTIONS, "mode": mode, "momentum": 0.5}
    a, b = mlp(torch.float64), mlp(torch.float64).cuda()
    ra = train(a, LABPAL(a.parameters(), **options), 100, dtype=torch.float64)
    calls = _train_on_cuda(b, LABPAL(b.parameters(), backend=backend, **options), 100, torch.float64)
    assert calls == ra.calls
    assert max_abs_diff(a, b.cpu()) <= 1e-9
