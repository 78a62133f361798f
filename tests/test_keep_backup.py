"""``SaLSA(keep_backup=False)``: Adam's memory, the default's decisions.

Without a backup the parameters move from trial point to trial point and back, one rounding per
element per move, so in float64 the run takes the same closure calls as the default mode with
parameters equal to ~1e-13; nothing parameter-sized is kept between steps; a closure that raises
mid-search, or a non-finite gradient, leaves the parameters where the step found them.
"""

import pytest
import torch
from helpers import digits, make_closure, max_abs_diff, mlp, next_step_searches, step_with, train
from torch import nn

from salsa_fast import LABPAL, SaLSA, testing
from salsa_fast.profiling import live_storages

pytest.importorskip("salsa_fast.backends.triton_ops", reason="Triton is not installed")

OPTIONS = [
    {},
    dict(use_mv=True),
    dict(direction="sgd", init_step_size=0.1),
    dict(weight_decay=0.02, speed_up=False),
]


def _groups(model):
    params = list(model.parameters())
    return [{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:], "lr": 0.7}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_same_decisions_as_the_default_in_float64(options):
    # use_mv on this MLP is chaotic from about step 80 (see helpers.max_abs_diff): compared before
    steps = 80 if options.get("use_mv") else 150
    a, b = mlp(torch.float64), mlp(torch.float64)
    ra = train(a, SaLSA(a.parameters(), **options), steps, dtype=torch.float64)
    rb = train(b, SaLSA(b.parameters(), keep_backup=False, **options), steps, dtype=torch.float64)
    assert ra.calls == rb.calls
    assert max_abs_diff(a, b) <= 1e-9


@pytest.mark.parametrize("options", [{}, dict(use_mv=True, weight_decay=0.02)], ids=["default", "use_mv,decay"])
def test_triton_backend_same_decisions_with_groups(options):
    a, b = mlp(torch.float64), mlp(torch.float64)
    ra = train(a, SaLSA(_groups(a), backend="triton", **options), 40, dtype=torch.float64)
    rb = train(b, SaLSA(_groups(b), backend="triton", keep_backup=False, **options), 40, dtype=torch.float64)
    assert ra.calls == rb.calls
    assert max_abs_diff(a, b) <= 1e-9


def test_momentum_fallback_point_when_the_loss_is_tiny():
    """|loss| < 1e-8: no criterion, one step along the momentum direction, then one closure call."""

    def run(keep_backup):
        model = mlp(torch.float64)
        opt = SaLSA(model.parameters(), keep_backup=keep_backup)
        x, y = digits(torch.float64)
        calls = [0]

        def closure(backwards=False):
            calls[0] += 1
            loss = nn.functional.cross_entropy(model(x[:64]), y[:64]) * 1e-9
            if backwards:
                loss.backward()
            return loss

        for _ in range(5):
            opt.zero_grad()
            opt.step(closure)
        return model, calls[0]

    (a, ca), (b, cb) = run(True), run(False)
    assert ca == cb == 10
    assert max_abs_diff(a, b) <= 1e-15


# -- memory ------------------------------------------------------------------------------------


def live_bytes(make_opt, steps=12) -> tuple[int, int]:
    """Bytes of tensors alive between steps (new since before the model was built: parameters,
    gradients, everything the optimizer keeps), and the parameters' own bytes."""
    digits()  # (loaded once per process: not part of the measurement)
    before = live_storages()
    model = mlp(hidden=200)
    opt = make_opt(model.parameters())
    plan = torch.randint(0, 1797, (steps, 64), generator=torch.Generator().manual_seed(0))
    for idx in plan:
        closure = make_closure(model, "digits", idx, torch.float32, [0])
        step_with(opt, closure)
    del closure
    after = live_storages()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(n for ptr, n in after.items() if ptr not in before), params


def test_holds_adams_memory_between_steps():
    """Adam keeps gradients and two moments (and a 0-dim step tensor per parameter);
    keep_backup=False the same, packed without padding (and one 0-dim step tensor per bucket),
    so not a byte more; the default also the backup and, on CPU, its work buffers."""
    adam, params = live_bytes(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True))
    lean, _ = live_bytes(lambda ps: SaLSA(ps, keep_backup=False))
    default, _ = live_bytes(lambda ps: SaLSA(ps))
    assert adam >= 4 * params  # parameters, gradients, two moments
    assert lean <= adam
    assert default >= adam + params  # at least the backup


def test_triton_backend_holds_adams_memory():
    """The Triton backend's parameter table is kept off the device in a lean bucket (copied in
    per launch), and no partial-sum buffers are kept: not a byte more than Adam either."""
    adam, params = live_bytes(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True))
    opts = []
    lean, _ = live_bytes(lambda ps: opts.append(SaLSA(ps, keep_backup=False, backend="triton")) or opts[-1])
    assert set().union(*(b.workspace for b in opts[0]._buckets)) == {"table"}
    tables = [b.workspace["table"] for b in opts[0]._buckets]
    assert all(t.device_rows is None and isinstance(t.host_rows, bytearray) for t in tables)
    assert max(t.sub for t in tables) > 1  # rows of several blocks: a shorter copy per launch
    assert lean <= adam


# -- failures mid-search -------------------------------------------------------------------------


class _Boom(Exception):
    pass


@pytest.mark.parametrize("failure", [_Boom, KeyboardInterrupt])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_a_closure_that_raises_mid_search_leaves_the_parameters(failure, backend, decay):
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters(), keep_backup=False, backend=backend, weight_decay=decay)
    train(model, opt, 3, dtype=torch.float64)
    assert next_step_searches(opt)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    scalars = dict(opt.state_dict()["param_groups"][0]["salsa"])
    x, y = digits(torch.float64)
    calls = [0]

    def closure(backwards=False):
        calls[0] += 1
        if calls[0] == 3:  # the second trial: two moves away from the start
            raise failure("in the second trial")
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        if backwards:
            loss.backward()
        return loss if backwards else loss + 1.0  # every trial fails the criterion

    opt.zero_grad()
    with pytest.raises(failure, match="in the second trial"):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)  # back, to a rounding per move
    for k, v in opt.state[next(iter(model.parameters()))].items():
        assert torch.equal(v, state[k])
    assert opt.state_dict()["param_groups"][0]["salsa"] == scalars
    line = testing.line(opt)  # (every bucket back at p0, the search's work buffers gone)
    assert line.at is None and line.places == [None] * len(line.buckets)
    assert all(not b.scratch for b in testing.buckets(opt))
    train(model, opt, 3, dtype=torch.float64, start=3)  # and training goes on


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_gradient_on_a_search_step_moves_nothing(backend):
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters(), keep_backup=False, backend=backend)
    x, y = digits(torch.float64)

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        if backwards:
            (loss * float("nan")).backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with pytest.warns(Warning, match="non-finite"):
        opt.step(closure)
    assert opt.last_step.skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_resume_equals_the_uninterrupted_run():
    a, b = mlp(torch.float64), mlp(torch.float64)
    opt_a = SaLSA(a.parameters(), keep_backup=False)
    ra = train(a, opt_a, 40, dtype=torch.float64)
    opt_b = SaLSA(b.parameters(), keep_backup=False)
    train(b, opt_b, 20, dtype=torch.float64)
    saved = opt_b.state_dict()
    opt_c = SaLSA(b.parameters(), keep_backup=False)
    opt_c.load_state_dict(saved)
    rc = train(b, opt_c, 20, dtype=torch.float64, start=20)
    assert ra.calls[20:] == [c + ra.calls[19] for c in rc.calls]
    assert max_abs_diff(a, b) == 0.0


def test_keep_backup_is_checked():
    with pytest.raises(ValueError, match="keep_backup"):
        SaLSA(mlp().parameters(), keep_backup="no")
    with pytest.raises(ValueError, match="keep_backup"):
        SaLSA([{"params": list(mlp().parameters()), "keep_backup": False}])


# -- LABPAL ------------------------------------------------------------------------------------

LABPAL_DIGITS = dict(training_set_size=1797, batch_size=64, reuse_steps=60, warmup_updates=40, max_step_size=0.2)
LABPAL_CASES = [
    dict(mode="nsgd"),
    dict(mode="sgd", momentum=0.5),
    dict(mode="nsgd", momentum=0.5, batch_size_schedule=((0, 1), (150, 40))),  # accumulation becomes 3
]


@pytest.mark.parametrize("options", LABPAL_CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_labpal_same_decisions_as_the_default(options, backend):
    """LABPAL(keep_backup=False) moves along the measured line and back instead of writing each
    point from a copy: in float64, the same closure calls, steps and parameters to ~1e-13."""
    steps = 300 if backend == "torch" else 130
    a, b = mlp(torch.float64), mlp(torch.float64)
    groups_a = [{"params": list(a.parameters())[:2], "lr": 0.5}, {"params": list(a.parameters())[2:]}]
    groups_b = [{"params": list(b.parameters())[:2], "lr": 0.5}, {"params": list(b.parameters())[2:]}]
    fast = LABPAL(groups_a, backend=backend, **LABPAL_DIGITS, **options)
    lean = LABPAL(groups_b, backend=backend, keep_backup=False, **LABPAL_DIGITS, **options)
    ra = train(a, fast, steps, dtype=torch.float64)
    rb = train(b, lean, steps, dtype=torch.float64)
    assert ra.calls == rb.calls
    assert lean.stats["measurements"] >= 2
    assert lean.step_size == pytest.approx(fast.step_size, rel=1e-9)
    assert max_abs_diff(a, b) <= 1e-9
    assert all(bk.backup is None for bk in testing.buckets(lean))


def test_labpal_holds_no_backup_between_steps():
    """The default keeps the measurement's copy of the parameters; keep_backup=False does not
    (both keep the gradient sum and the momentum buffer the algorithm needs)."""
    opts = {}

    def make(keep):
        return lambda ps: opts.setdefault(keep, LABPAL(ps, keep_backup=keep, **LABPAL_DIGITS))

    default, params = live_bytes(make(True), steps=12)
    lean, _ = live_bytes(make(False), steps=12)
    assert opts[True].stats["measurements"] >= 1 and opts[False].stats["measurements"] >= 1
    assert lean <= default - params
    # parameters, gradients, momentum buffer, gradient sum; and the measurement's stored
    # closures, each holding its batch's 64 int64 indices
    assert lean <= 4 * params + 12 * 64 * 8


@pytest.mark.parametrize("failure_at", [2, 3])  # the first line point, the second
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_labpal_closure_raising_on_the_line_returns_to_theta0(failure_at, backend):
    model = mlp(torch.float64)
    params = list(model.parameters())
    opt = LABPAL(
        [{"params": params[:2], "lr": 0.5}, {"params": params[2:]}],
        keep_backup=False,
        backend=backend,
        momentum=0.5,
        **LABPAL_DIGITS,
    )
    train(model, opt, 9, dtype=torch.float64)  # nine of the first measurement's ten calls
    theta0 = [p.detach().clone() for p in params]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
    x, y = digits(torch.float64)
    calls = [0]

    def closure(backwards=False):
        calls[0] += 1
        if calls[0] == failure_at:
            raise KeyboardInterrupt(f"at line point {failure_at - 1}")
        return nn.functional.cross_entropy(model(x[:64]), y[:64])

    opt.zero_grad()
    with pytest.raises(KeyboardInterrupt, match=f"at line point {failure_at - 1}"):
        opt.step(closure)
    for p, q in zip(params, theta0):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-16)  # back, to a rounding per move
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(params, momentum))
    assert opt.measuring and opt.stats["measurements"] == 0
    run = train(model, opt, 10, dtype=torch.float64, start=10, rng_seed=None)  # measures afresh
    assert run.calls[-1] == 30 and opt.stats["measurements"] == 1


def test_labpal_keep_backup_is_checked():
    with pytest.raises(ValueError, match="keep_backup"):
        LABPAL(mlp().parameters(), keep_backup=1)
