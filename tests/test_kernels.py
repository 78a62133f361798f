"""The Triton kernels, pass by pass and end to end, against the torch backend.

Without a GPU they run in Triton's interpreter on CPU tensors (see conftest.py); with one, on
CUDA. Sizes are small and odd (never a multiple of the block), with several parameters per flat
buffer, so every kernel crosses block boundaries and masks a tail.
"""

import copy

import pytest
import torch
from conftest import DEVICE, DTYPES, SHAPES
from helpers import assert_sums_close, close_buckets, digits, fill_regions, max_abs_diff, mlp, param_values, train
from torch import nn

from salsa_fast import SaLSA, testing
from salsa_fast.backends import Hyper, torch_ops
from salsa_fast.flat import FlatBucket
from salsa_fast.salsa_line import MovingLine, Point
from salsa_fast.salsa_scalars import Writes
from salsa_fast.step_state import StepState

triton_ops = pytest.importorskip("salsa_fast.backends.triton_ops", reason="Triton is not installed")
from salsa_fast.kernels import salsa_plain_step, salsa_search  # noqa: E402
from salsa_fast.kernels.table import param_table  # noqa: E402


def _bucket(dtype, direction="adam", seed=0, keep_backup=True):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in SHAPES]
    b = FlatBucket(params, 0, keep_second_moment=direction == "adam", adams_memory=not keep_backup)
    fill_regions(b, b.grad, torch.randn(b.numel, generator=g).to(DEVICE))
    fill_regions(b, b.exp_avg, torch.randn(b.numel, generator=g).to(DEVICE) * 0.1)
    if b.exp_avg_sq is not None:
        fill_regions(b, b.exp_avg_sq, torch.rand(b.numel, generator=g).to(DEVICE) * 0.01)
    return b


def _hyper(direction="adam", use_mv=False, k=7):
    b1, b2 = 0.9, 0.999
    return Hyper(b1, b2, 1e-8, direction, use_mv, StepState.at(DEVICE, b1, b2, bias_step=k + 1))


def _pair(dtype, direction="adam", keep_backup=True):
    a = _bucket(dtype, direction, keep_backup=keep_backup)
    return a, copy.deepcopy(a)


def _products(b) -> torch.Tensor:
    """``g * d`` of the torch backend's bucket ``b`` (which keeps its direction)."""
    return b.grad.double() * b.scratch["direction"].double()


VARIANTS = [("adam", False), ("adam", True), ("sgd", False), ("sgd", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_step_on_a_lean_bucket(dtype):
    """keep_backup=False packs regions without padding: the table kernels drop the flat-offset
    alignment hint and stay right."""
    a, b = _pair(dtype, keep_backup=False)
    assert param_table(a).f_align == 1 and a.numel == sum(p.numel() for p in a.params)
    h = _hyper()
    triton_ops.plain_step(a, lr_step=0.03, decay=0.01, hyper=h)
    torch_ops.plain_step(b, lr_step=0.03, decay=0.01, hyper=h)
    close_buckets(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction,use_mv", VARIANTS)
@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_plain_step(dtype, direction, use_mv, decay):
    a, b = _pair(dtype, direction)
    h = _hyper(direction, use_mv)
    triton_ops.plain_step(a, lr_step=0.03, decay=decay, hyper=h)
    torch_ops.plain_step(b, lr_step=0.03, decay=decay, hyper=h)
    close_buckets(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", [triton_ops, torch_ops], ids=["triton", "torch"])
def test_plain_step_skips_on_the_device_flag(dtype, backend):
    """A set flag leaves parameters and moments as they were and, with ``count_skip``, counts the
    skip in the step state (once); a clear flag steps, counting nothing."""
    a, b = _pair(dtype)
    h = _hyper()
    h.state.flag.fill_(1)
    backend.plain_step(a, lr_step=0.03, decay=0.01, hyper=h, count_skip=True)
    backend.plain_step(a, lr_step=0.03, decay=0.01, hyper=h, count_skip=False)
    assert torch.equal(param_values(a), param_values(b))
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert float(h.state.read_skipped()) == 1.0
    h.state.flag.zero_()
    backend.plain_step(a, lr_step=0.03, decay=0.01, hyper=h, count_skip=True)
    torch_ops.plain_step(b, lr_step=0.03, decay=0.01, hyper=h)
    close_buckets(a, b, dtype)
    assert float(h.state.read_skipped()) == 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction,use_mv", VARIANTS)
def test_search_passes(dtype, direction, use_mv):
    """First pass (backup, first trial, norm), two further trials, the fallback point, the
    commit: each against the torch backend."""
    a, b = _pair(dtype, direction)
    h = _hyper(direction, use_mv)
    pre = param_values(a)
    pp_a = triton_ops.backup_begin(a, lr_step=0.5, decay=0.02, hyper=h)
    pp_b = torch_ops.backup_begin(b, lr_step=0.5, decay=0.02, hyper=h)
    assert torch.equal(a.backup, pre)
    assert_sums_close(pp_a, pp_b, _products(b), b.state_dtype)
    close_buckets(a, b, dtype)
    for lr in (0.4, 1e-3):
        triton_ops.backup_trial(a, lr_step=lr, decay=0.02, hyper=h)
        torch_ops.backup_trial(b, lr_step=lr, decay=0.02, hyper=h)
        close_buckets(a, b, dtype)
    triton_ops.backup_momentum_point(a, lr_step=0.2, decay=0.02, hyper=h)
    torch_ops.backup_momentum_point(b, lr_step=0.2, decay=0.02, hyper=h)
    close_buckets(a, b, dtype)
    m_before = a.exp_avg.clone()
    triton_ops.search_commit(a, hyper=h)
    torch_ops.search_commit(b, hyper=h)
    assert not torch.equal(a.exp_avg, m_before)
    close_buckets(a, b, dtype)
    assert not a.search_active


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction,use_mv", VARIANTS)
def test_lean_search_passes(dtype, direction, use_mv):
    """keep_backup=False: the norm pass writes nothing; the first move and two further trials,
    the restore and the momentum point, each against the torch backend; the restore comes back
    to the start within a few ulps of the largest point visited (one rounding per move). The
    buckets are lean ones: packed without padding, so flat offsets are not 16-element aligned."""
    a, b = _pair(dtype, direction, keep_backup=False)
    assert param_table(a).f_align < 16
    h = _hyper(direction, use_mv)
    pre = param_values(a)
    line_a, line_b = MovingLine(triton_ops, [a], [h]), MovingLine(torch_ops, [b], [h])
    (pp_a,), (pp_b,) = line_a.begin(_point(0.5)), line_b.begin(_point(0.5))
    assert torch.equal(param_values(a), pre) and torch.equal(param_values(b), pre)
    assert_sums_close(pp_a, pp_b, _products(b), b.state_dtype)
    visited = 0.0
    for lr in (0.5, 0.4, 1e-3):
        line_a.to(_point(lr))
        line_b.to(_point(lr))
        close_buckets(a, b, dtype)
        visited = max(visited, float(param_values(a).abs().max()))
    for line, bucket in ((line_a, a), (line_b, b)):
        line.back()
        assert line.places == [None]
        torch.testing.assert_close(param_values(bucket), pre, rtol=0, atol=8 * torch.finfo(dtype).eps * visited)
    for line, bucket in ((line_a, a), (line_b, b)):
        line.begin(_point(0.2))
        line.to(_point(0.2, momentum=True))
        line.commit()
        assert line.places == [None] and bucket.backup is None
    close_buckets(a, b, dtype)


def _point(lr_step: float, decay: float = 0.02, momentum: bool = False) -> Point:
    """A point of a one-bucket line: ``p0 * (1 - decay) - lr_step * d``."""
    return Point(lr_step, Writes([1.0], [decay]), momentum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_search_abort_restores_exactly(dtype):
    a, _ = _pair(dtype)
    before = {k: getattr(a, k).clone() for k in ("exp_avg", "exp_avg_sq")}
    before_p = [p.detach().clone() for p in a.params]
    h = _hyper()
    triton_ops.backup_begin(a, lr_step=0.5, decay=0.02, hyper=h)
    triton_ops.backup_trial(a, lr_step=0.1, decay=0.02, hyper=h)
    a.abort_search()
    for k, v in before.items():
        assert torch.equal(getattr(a, k), v)
    assert all(torch.equal(p, q) for p, q in zip(a.params, before_p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [triton_ops, torch_ops], ids=["triton", "torch"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (the interpreter's numpy)
def test_probe_raises_the_flag_for_non_finite_values(dtype, backend):
    """The probe sets the step's flag for a NaN or an infinity anywhere in the gradient buffer
    or in the loss, never for finite values (fp16: not for finite values whose sum overflows),
    and never lowers a flag that is already set."""
    a, _ = _pair(dtype)
    h = _hyper()

    def flagged(loss=None):
        h.state.flag.zero_()
        backend.probe(a, h, loss)
        return float(h.state.flag)

    assert flagged() == 0.0 and flagged(torch.tensor(3.0, device=DEVICE)) == 0.0
    if dtype == torch.float16:
        a.grad[:100] = 60000.0
        assert flagged() == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert flagged(torch.tensor(bad, dtype=torch.float64, device=DEVICE)) == 1.0
        a.grad[1234] = bad
        assert flagged() == 1.0
        a.grad[1234] = 0.0
    a.grad[-1] = float("nan")  # the last element of the masked tail
    assert flagged() == 1.0
    a.grad[-1] = 0.0
    h.state.flag.fill_(1)
    backend.probe(a, h)
    assert float(h.state.flag) == 1.0


def test_empty_bucket():
    p = nn.Parameter(torch.zeros(0, device=DEVICE))
    b = FlatBucket([p], 0, keep_second_moment=True)
    h = _hyper()
    triton_ops.plain_step(b, lr_step=0.1, decay=0.0, hyper=h)
    assert float(triton_ops.backup_begin(b, lr_step=0.1, decay=0.0, hyper=h)) == 0.0
    triton_ops.search_commit(b, hyper=h)


# -- the parameter table ---------------------------------------------------------------------------
# Sizes around the chunk (1024 elements): empty, smaller, exactly one, just over, several chunks.
TABLE_SIZES = [0, 3000, 1, 1024, (5, 0), 2049, (17, 61), (), 1023, 4100]


def table_params(dtype, special, seed=1):
    """Parameters of odd sizes; ``special`` adds one the kernels cannot take the plain way:
    "channels_last" (dense, permuted: addressed directly), "misaligned" (a view 1 element into
    its storage: the unhinted variant), "strided" (not one dense run: staged)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    tensors = [randn(s if isinstance(s, tuple) else (s,)) for s in TABLE_SIZES]
    if special == "channels_last":
        tensors.insert(3, randn(8, 3, 5, 5).to(memory_format=torch.channels_last))
    elif special == "misaligned":
        tensors.insert(3, randn(1301)[1:])
    elif special == "strided":
        tensors.insert(3, randn(40, 60)[:, ::2])
    return [nn.Parameter(t) for t in tensors]


def _table_pair(dtype, special, direction="adam"):
    g = torch.Generator().manual_seed(0)
    a = FlatBucket(table_params(dtype, special), 0, keep_second_moment=direction == "adam")
    fill_regions(a, a.grad, torch.randn(a.numel, generator=g).to(DEVICE))
    fill_regions(a, a.exp_avg, torch.randn(a.numel, generator=g).to(DEVICE) * 0.1)
    if a.exp_avg_sq is not None:
        fill_regions(a, a.exp_avg_sq, torch.rand(a.numel, generator=g).to(DEVICE) * 0.01)
    b = FlatBucket(table_params(dtype, special), 0, keep_second_moment=direction == "adam")
    for name in ("grad", "exp_avg", "exp_avg_sq"):
        if getattr(a, name) is not None:
            getattr(b, name).copy_(getattr(a, name))
    return a, b


@pytest.mark.parametrize("special", [None, "channels_last", "misaligned", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_table_kernels_reach_every_parameter(dtype, special):
    """Every table kernel over many odd-sized parameters (empty ones among them), one launch per
    pass, against the torch backend; the special parameter keeps its own layout and storage."""

    a, b = _table_pair(dtype, special)
    table = param_table(a)
    assert table.chunks == sum(-(-p.numel() // 1024) for p in a.params)
    aligned = max(1, 16 // a.params[0].element_size())
    assert table.p_align == (1 if special == "misaligned" else aligned)
    assert len(table.staged) == (special == "strided")
    strides = [p.stride() for p in a.params]
    h = _hyper()
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        ops.plain_step(bucket, lr_step=0.03, decay=0.01, hyper=h)
    close_buckets(a, b, dtype)
    pre = param_values(a)
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        pp = ops.backup_begin(bucket, lr_step=0.5, decay=0.02, hyper=h)
        bucket.scratch["pp"] = pp
    assert torch.equal(a.backup, pre)
    assert_sums_close(a.scratch.pop("pp"), b.scratch.pop("pp"), _products(b), b.state_dtype)
    close_buckets(a, b, dtype)
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        ops.backup_trial(bucket, lr_step=0.1, decay=0.02, hyper=h)
    close_buckets(a, b, dtype)
    a.abort_search()
    assert torch.equal(param_values(a), pre)
    for ops, bucket in ((triton_ops, a), (torch_ops, b)):
        ops.labpal_update(bucket, bucket.grad, count=1, momentum=0.5, scale=0.3, coef=None, ok=None)
    b.abort_search()
    assert [p.stride() for p in a.params] == strides


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lean_table_rows_of_several_blocks(dtype):
    """A lean bucket (keep_backup=False) keeps its table off the device, rows of up to 16 blocks
    each (a 2-D grid; programs past a parameter's end do nothing): the plain step, the lean norm
    and moves, and LABPAL's update reach every element as the torch backend does."""
    g = torch.Generator().manual_seed(3)
    sizes = [112 * 1024, 16 * 1024 + 1, 3]  # rows: 7 full, 1 full + 1 of one element, 1 short

    def bucket():
        params = [
            nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)) for n in sizes
        ]
        return FlatBucket(params, 0, keep_second_moment=True, adams_memory=True)

    a, b = bucket(), bucket()
    fill_regions(a, a.grad, torch.randn(a.numel, generator=g).to(DEVICE))
    fill_regions(a, a.exp_avg_sq, torch.rand(a.numel, generator=g).to(DEVICE) * 0.01)
    b.grad.copy_(a.grad)
    b.exp_avg_sq.copy_(a.exp_avg_sq)
    table = param_table(a)
    assert table.sub == 16 and table.device_rows is None
    assert table.chunks == sum(-(-n // (16 * 1024)) for n in sizes)
    h = _hyper()
    for ops, bk in ((triton_ops, a), (torch_ops, b)):
        ops.plain_step(bk, lr_step=0.03, decay=0.01, hyper=h)
    close_buckets(a, b, dtype)
    lines = [MovingLine(triton_ops, [a], [h]), MovingLine(torch_ops, [b], [h])]
    pp = [float(line.begin(_point(0.2, 0.01))[0]) for line in lines]
    assert_sums_close(*pp, _products(b), b.state_dtype)
    for line in lines:
        line.to(_point(0.2, 0.01))
        line.to(_point(0.1, 0.01))
    close_buckets(a, b, dtype)
    for ops, bk in ((triton_ops, a), (torch_ops, b)):
        ops.labpal_update(bk, bk.grad, count=1, momentum=0.5, scale=0.3, coef=None, ok=None)
    close_buckets(a, b, dtype)


# -- end to end -----------------------------------------------------------------------------------


def _groups(model):
    params = list(model.parameters())
    return [{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:], "lr": 0.7}]


@pytest.mark.parametrize(
    "dtype,steps,options",
    [
        (torch.float64, 40, {}),
        (torch.float64, 40, dict(use_mv=True)),
        (torch.float64, 30, dict(direction="sgd", init_step_size=0.1)),
        (torch.float32, 30, {}),
        (torch.float32, 30, dict(speed_up=False, momentum=(0.9, 0.999, 0.0))),
        (torch.bfloat16, 6, {}),
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_triton_backend_matches_torch_backend(dtype, steps, options, monkeypatch):
    """Digits MLPs with odd layer sizes and two param groups (one with weight decay): the same
    closure calls, parameters within the dtype's tolerance, and Triton kernels launched on
    every step."""
    launches = {"plain": 0, "search": 0, "commit": 0}

    def count(kernel, key):
        run = kernel.run

        def counted(*args, **kwargs):
            launches[key] += 1
            return run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)

    count(salsa_plain_step._plain_step_kernel, "plain")
    count(salsa_search._search_point_kernel, "search")
    count(salsa_search._commit_kernel, "commit")

    a, b = mlp(dtype).to(DEVICE), mlp(dtype).to(DEVICE)
    opt_a = SaLSA(_groups(a), backend="triton", **options)
    opt_b = SaLSA(_groups(b), backend="torch", **options)
    assert testing.backend(opt_a) is triton_ops
    ra = train(a, opt_a, steps, dtype=dtype)
    rb = train(b, opt_b, steps, dtype=dtype)
    assert ra.calls == rb.calls
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.05}[dtype]
    assert max_abs_diff(a, b) <= tol
    stats = opt_a.stats
    buckets = len(testing.buckets(opt_a))
    assert buckets == 2
    non_search = stats["steps"] - stats["searches"]
    assert launches["plain"] == buckets * non_search
    assert launches["search"] == buckets * (stats["total_trials"] + 0)  # first pass + further trials
    assert launches["commit"] == buckets * stats["searches"]


def test_mixed_dtypes_get_one_launch_each():
    model = nn.ModuleList([nn.Linear(64, 20), nn.Linear(20, 10).double()]).to(DEVICE)
    opt = SaLSA(model.parameters(), backend="triton")
    x, y = (t.to(DEVICE) for t in digits())

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(model[1](torch.tanh(model[0](x[:64])).double()).float(), y[:64])
        if backwards:
            loss.backward()
        return loss

    with torch.no_grad():
        first = closure().item()
    for _ in range(12):
        opt.zero_grad()
        opt.step(closure)
    assert len(testing.buckets(opt)) == 2
    with torch.no_grad():
        assert closure().item() < first
