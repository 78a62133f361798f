"""LABPAL's Triton kernels, pass by pass and end to end, against the torch backend.

Like tests/test_kernels.py: the interpreter on CPU tensors without a GPU, CUDA with one; small
odd sizes that cross block boundaries and mask a tail.
"""

import copy
import math
import warnings

import pytest
import torch
from conftest import DEVICE, DTYPES, SHAPES, TOL
from helpers import (
    assert_sums_close,
    cancellation_atol,
    close_state,
    fill_regions,
    max_abs_diff,
    mlp,
    param_values,
    train,
)
from torch import nn

from salsa_fast import LABPAL, SaLSAWarning, testing
from salsa_fast.backends import torch_ops
from salsa_fast.flat import FlatBucket

triton_ops = pytest.importorskip("salsa_fast.backends.triton_ops", reason="Triton is not installed")
from salsa_fast.kernels import labpal_passes  # noqa: E402

PASSES = [(1, 0.0), (3, 0.0), (1, 0.9), (3, 0.9)]  # (batches in the gradient sum, momentum)


def _pair(dtype, count, seed=0, keep_backup=True):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in SHAPES]
    b = FlatBucket(params, 0, keep_second_moment=False, adams_memory=not keep_backup)
    fill_regions(b, b.grad, torch.randn(b.numel, generator=g).to(DEVICE))
    fill_regions(b, b.exp_avg, torch.randn(b.numel, generator=g).to(DEVICE) * 0.1)
    b.workspace["acc"] = torch.zeros(b.numel, dtype=b.state_dtype, device=DEVICE)
    fill_regions(b, b.workspace["acc"], torch.randn(b.numel, generator=g).to(DEVICE) * count)
    return b, copy.deepcopy(b)


def _src(b, count):
    return b.workspace["acc"] if count != 1 else b.grad


def _close(a, b, dtype):
    """Equal to rounding, as SaLSA's passes (:func:`helpers.close_buckets`: a few ulps relative,
    and absolute ulps of the operands where an element cancels to near zero)."""
    operands = [param_values(a)] + ([a.backup] if a.backup is not None else [])
    atol = cancellation_atol(a.state_dtype, TOL[dtype], operands)
    torch.testing.assert_close(param_values(a), param_values(b), rtol=TOL[dtype]["rtol"], atol=atol)
    close_state(a, b, dtype, ("exp_avg",))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count,momentum", PASSES)
def test_direction_sums(dtype, count, momentum):
    a, b = _pair(dtype, count)
    sq_a, dot_a = triton_ops.labpal_sums(a, _src(a, count), count=count, momentum=momentum)
    sq_b, dot_b = torch_ops.labpal_sums(b, _src(b, count), count=count, momentum=momentum)
    assert sq_a.dtype == dot_a.dtype == torch.float64 and sq_a.dim() == 0
    d = _src(b, count).to(b.state_dtype) / count
    D = d + momentum * b.exp_avg
    assert_sums_close(sq_a, sq_b, D * D, b.state_dtype)
    assert_sums_close(dot_a, dot_b, d * D, b.state_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count,momentum", PASSES)
@pytest.mark.parametrize("device_rate", [False, True])
def test_update(dtype, count, momentum, device_rate):
    a, b = _pair(dtype, count)
    coef = torch.tensor(0.37, dtype=torch.float64, device=DEVICE) if device_rate else None
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        ops.labpal_update(bucket, _src(bucket, count), count=count, momentum=momentum, scale=0.6, coef=coef, ok=None)
    _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [1, 3])
def test_move_along_the_line_leaves_the_buffer(dtype, count):
    """LABPAL(keep_backup=False) moves with the update pass, ``write_buffer=False``: the momentum
    buffer stays, on a lean (packed) bucket as on any."""
    a, b = _pair(dtype, count, keep_backup=False)
    buf = a.exp_avg.clone()
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        ops.labpal_update(
            bucket, _src(bucket, count), count=count, momentum=0.9, scale=0.3, coef=None, ok=None, write_buffer=False
        )
        assert torch.equal(bucket.exp_avg, buf)
    _close(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ops", [triton_ops, torch_ops], ids=lambda m: m.name)
def test_update_skips_on_the_device_flag(dtype, ops):
    """A non-finite direction (and so a NaN rate: step / ||D||) changes nothing."""
    a, _ = _pair(dtype, 1)
    a.grad[5] = float("nan")
    before_p, before_m = param_values(a), a.exp_avg.clone()
    ok = torch.tensor(False, device=DEVICE)
    nan_rate = torch.tensor(float("nan"), dtype=torch.float64, device=DEVICE)
    for coef in (None, nan_rate):
        ops.labpal_update(a, a.grad, count=1, momentum=0.5, scale=1.0, coef=coef, ok=ok)
        assert torch.equal(param_values(a), before_p) and torch.equal(a.exp_avg, before_m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_update_with_a_true_flag_matches(dtype):
    a, b = _pair(dtype, 1)
    ok = torch.tensor(True, device=DEVICE)
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        ops.labpal_update(bucket, bucket.grad, count=1, momentum=0.5, scale=1.0, coef=None, ok=ok)
    _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count,momentum", PASSES)
def test_line_points(dtype, count, momentum):
    """The first point saves the backup in the same pass; later points start from it; the
    closing update writes the momentum buffer."""
    a, b = _pair(dtype, count)
    theta0 = param_values(a)
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        src = _src(bucket, count)
        ops.labpal_point(
            bucket, src, count=count, momentum=momentum, scale=1.77e-4, save_backup=True, write_buffer=False
        )
    assert torch.equal(a.backup, theta0) and torch.equal(b.backup, theta0)
    _close(a, b, dtype)
    for scale, write in ((0.01, False), (0.8, True)):
        for ops, bucket in ((triton_ops, a), (torch_ops, b)):
            src = _src(bucket, count)
            ops.labpal_point(
                bucket, src, count=count, momentum=momentum, scale=scale, save_backup=False, write_buffer=write
            )
        _close(a, b, dtype)
        assert torch.equal(a.backup, theta0)


# -- end to end -----------------------------------------------------------------------------------

BRISK = dict(training_set_size=1797, batch_size=64, reuse_steps=25, warmup_updates=15, max_step_size=0.2)


def _groups(model):
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}]


@pytest.mark.parametrize(
    "dtype,options",
    [
        (torch.float64, dict(mode="nsgd")),
        (torch.float64, dict(mode="sgd", momentum=0.5)),
        (torch.float64, dict(mode="nsgd", momentum=0.5, batch_size_schedule=((0, 1), (30, 40)))),  # accumulation 3
        (torch.float32, dict(mode="sgd")),
        (torch.bfloat16, dict(mode="nsgd", momentum=0.5)),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_triton_backend_matches_torch_backend(dtype, options, monkeypatch):
    """Digits MLPs with odd layer sizes and two param groups (``lr`` 1 and 0.5): the same
    closure calls and decisions, parameters within the dtype's tolerance, and every pass a
    Triton launch per flat buffer."""
    launches = {"sums": 0, "update": 0, "point": 0}
    for key in launches:
        kernel = getattr(labpal_passes, f"_{key}_kernel")
        run = kernel.run

        def counted(*args, _key=key, _run=run, **kwargs):
            launches[_key] += 1
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)

    calls = 70
    a, b = mlp(dtype).to(DEVICE), mlp(dtype).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SaLSAWarning)  # bf16: measured farther out (see below)
        opt_a = LABPAL(_groups(a), backend="triton", **BRISK, **options)
        opt_b = LABPAL(_groups(b), backend="torch", **BRISK, **options)
    assert testing.backend(opt_a) is triton_ops and testing.backend(opt_b) is torch_ops
    if dtype == torch.bfloat16:
        # bf16 cannot resolve the line's first sample (1.77e-4 in all, below its last bit), so
        # its measurements are fitted farther out (two more points a try, counted below); both
        # start from a step measured in fp32
        warm = mlp().to(DEVICE)
        warm_opt = LABPAL(_groups(warm), backend="torch", **BRISK, **options)
        train(warm, warm_opt, 12)
        opt_a.load_state_dict(warm_opt.state_dict())
        opt_b.load_state_dict(warm_opt.state_dict())
    before = dict(opt_a.stats)
    with testing.line_points(opt_a) as points:  # the points on the line opt_a evaluates
        ra = train(a, opt_a, calls, dtype=dtype)
    rb = train(b, opt_b, calls, dtype=dtype)
    assert ra.calls == rb.calls
    counters = [
        "calls",
        "updates",
        "measurements",
        "abandoned",
        "rejected",
        "rescaled",
        "accumulation",
        "forwards",
        "backwards",
    ]
    assert [opt_a.stats[c] for c in counters] == [opt_b.stats[c] for c in counters]
    assert opt_a.stats["measurements"] - before["measurements"] >= 2
    assert opt_a.step_size == pytest.approx(opt_b.step_size, rel=1e-6 if dtype == torch.float64 else 1e-2)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.05}[dtype]
    assert max_abs_diff(a, b) <= tol
    s = {key: opt_a.stats[key] - before[key] for key in ("updates", "measurements", "abandoned", "skipped_updates")}
    buckets = len(testing.buckets(opt_a))
    assert buckets == 2
    # Every finished measurement ends with an update (the one closing it): none is rejected
    # while no step exists (a fresh run accepts its first; bf16 starts from a measured step).
    assert opt_a.stats["rejected"] == before["rejected"] or math.isfinite(before["step_size"])
    closing = s["measurements"]
    training = s["updates"] - closing
    # two points a measurement, and two more for each try farther out (bf16 here)
    assert len(points) >= 2 * s["measurements"]
    assert (len(points) == 2 * s["measurements"]) == (opt_a.stats["rescaled"] == before["rescaled"])
    assert training > 0 and s["skipped_updates"] == 0  # (no non-finite direction here)
    # A measurement dropped after its direction check: with the schedule, the 16th update (the
    # warm-up's end, call 24) forces a measurement at call 25 (accumulation 1: its direction is
    # summed at once), which the entry at call 30 (accumulation 3) starts over.
    dropped = 1 if "batch_size_schedule" in options else 0
    per_bucket = {
        "update": training,  # one pass per training update
        "sums": training + s["measurements"] + s["abandoned"] + dropped,  # and one per direction check
        "point": len(points) + closing,  # the line's samples, the closing update
    }
    assert launches == {key: buckets * n for key, n in per_bucket.items()}  # one launch per bucket per pass


def test_backend_choice_on_cpu(monkeypatch):
    model = mlp()
    assert testing.backend(LABPAL(model.parameters(), backend="auto")) is torch_ops
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter
    with pytest.raises(RuntimeError, match="backend='triton' cannot run"):
        LABPAL(model.parameters(), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        LABPAL(model.parameters(), backend="cuda")
