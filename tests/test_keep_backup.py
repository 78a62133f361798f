"""``SaLSA(keep_backup=False)``: Adam's memory, the default's decisions.

Without a backup the parameters move from trial point to trial point and back, one rounding per
element per move, so in float64 the run takes the same closure calls as the default mode with
parameters equal to ~1e-13; nothing parameter-sized is kept between steps; a closure that raises
mid-search, or a non-finite gradient, leaves the parameters where the step found them.
"""

import pytest
import torch
from helpers import digits, make_closure, max_abs_diff, mlp, next_step_searches, train
from torch import nn

from salsa_fast import SaLSA
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
    a, b = mlp(torch.float64), mlp(torch.float64)
    ra = train(a, SaLSA(a.parameters(), **options), 150, dtype=torch.float64)
    rb = train(b, SaLSA(b.parameters(), keep_backup=False, **options), 150, dtype=torch.float64)
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
        opt.zero_grad()
        if isinstance(opt, torch.optim.Adam):
            closure(backwards=True)
            opt.step()
        else:
            opt.step(closure)
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


def test_triton_backend_holds_adams_memory_and_its_table():
    """The Triton backend keeps one thing more between steps: the kernels' parameter table
    (3 int64 per chunk of 1024 elements, ~0.15% of Adam's bytes); no partial-sum buffers."""
    adam, params = live_bytes(lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True))
    opts = []
    lean, _ = live_bytes(lambda ps: opts.append(SaLSA(ps, keep_backup=False, backend="triton")) or opts[-1])
    table_bytes = sum(b.workspace["table"].rows.nbytes for b in opts[0]._buckets)
    assert set().union(*(b.workspace for b in opts[0]._buckets)) == {"table"}
    assert 0 < table_bytes < params * 4 * 0.0025
    assert lean <= adam + table_bytes


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
    scalars = dict(opt.state_dict()["salsa"])
    x, y = digits(torch.float64)
    calls = [0]

    def closure(backwards=False):
        calls[0] += 1
        if calls[0] == 3:  # the second trial: two moves away from the start
            raise failure()
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        if backwards:
            loss.backward()
        return loss if backwards else loss + 1.0  # every trial fails the criterion

    opt.zero_grad()
    with pytest.raises(failure):
        opt.step(closure)
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)  # back, to a rounding per move
    for k, v in opt.state[next(iter(model.parameters()))].items():
        assert torch.equal(v, state[k])
    assert opt.state_dict()["salsa"] == scalars
    assert all(b.lean_at is None and not b.scratch for b in opt._buckets)
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
