"""LABPAL's measurement where the reference's cannot resolve the loss (issue item 6): the sample
steps grow until rounding cannot decide the fit, the trusted norm range is an argument, and a
LABPAL that cannot train says so, once, naming why and the argument that changes it."""

import re
import warnings

import pytest
import torch
from helpers import digits, mlp, train
from torch import nn

from salsa_fast import LABPAL, SaLSAWarning
from salsa_fast.labpal_parabola import GROWTH, RESOLUTION, H, next_scale, parabola_step, verdict
from salsa_fast.labpal_reference import LABPALReference

DIGITS = dict(training_set_size=1797, batch_size=64)  # accumulation 1: one gradient batch per measurement
N = 10  # inference batches per measurement (measure_batches), so 3N forwards at the reference's two points


def torch_problem(seed, dtype=torch.float32):
    """torch's own optimizer test problem: ``(weight.mv(input) + bias).pow(2).sum()``, the same
    numbers in either dtype (drawn in float32)."""
    torch.manual_seed(seed)
    weight, bias, inputs = torch.randn(10, 5), torch.randn(10), torch.randn(5)
    weight, bias = weight.to(dtype).requires_grad_(), bias.to(dtype).requires_grad_()

    def closure(backwards=False):
        loss = (weight.mv(inputs.to(dtype)) + bias).pow(2).sum()
        if backwards:
            loss.backward()
        return loss

    return [weight, bias], closure


def run(opt, closure, calls):
    for _ in range(calls):
        opt.zero_grad()
        opt.step(closure)
    with torch.no_grad():
        return float(closure().detach())


def labpal_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, SaLSAWarning)]


# -- the three cases of the issue: each trains now --------------------------------------------------


def test_a_first_direction_norm_above_the_trusted_range_is_measured_all_the_same():
    """Seed 0: ||d|| = 102.4 > 100, the reference's bound. It abandoned such measurements (and then
    crashed with no step); measuring again on a fixed batch never ended. With no step in use there
    is none to keep, so the first is measured whatever its norm: it trains, silently."""
    params, closure = torch_problem(0)
    initial = float(closure().detach())
    opt = LABPAL(params)  # (a SaLSAWarning fails the test: pyproject's filterwarnings)
    assert run(opt, closure, 100) < initial / 2
    assert opt.stats["abandoned"] == 0 and opt.stats["measurements"] == 1


def test_a_float32_loss_the_reference_points_cannot_resolve_trains():
    """Seed 9: ||d|| = 29, loss 48.5. At h = 1.77e-4 the curvature term (~4e-7) is below float32's
    resolution of 48.5 (~4e-6): every fit was rejected, forever. The samples go farther out."""
    params, closure = torch_problem(9)
    initial = float(closure().detach())
    opt = LABPAL(params)
    assert run(opt, closure, 100) < initial / 2
    assert opt.stats["rescaled"] == opt.stats["measurements"] == 1 and opt.stats["rejected"] == 0


def test_bf16_autocast_forward_with_fp32_parameters_trains():
    """The remedy for bf16 docs/labpal.md gives: fp32 parameters, the forward autocast to bf16. The first
    sample (1.77e-4 in all over 2,500 weights) is far below a bf16 weight's resolution: the loss
    hardly moves, and every fit was rejected."""
    model = mlp()
    x, y = digits()

    def closure(backwards=False):  # the whole set: the same loss every call
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        if backwards:
            loss.backward()
        return loss

    initial = float(closure().detach())
    opt = LABPAL(model.parameters(), **DIGITS)
    assert run(opt, closure, 60) < initial / 2
    assert opt.stats["rescaled"] >= 1 and opt.stats["updates"] >= 50


def low_precision_digits(dtype, loss_dtype):
    model = mlp(dtype)
    x, y = digits(dtype)

    def closure(backwards=False):  # the whole set
        loss = nn.functional.cross_entropy(model(x).to(loss_dtype), y)
        if backwards:
            loss.backward()
        return loss

    with pytest.warns(SaLSAWarning, match="fitted farther out"):  # (said once, at construction)
        opt = LABPAL(model.parameters(), **DIGITS)
    return opt, closure


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bf16_and_fp16_parameters_train_with_a_float32_loss(dtype):
    """Their every measurement was rejected: 1.77e-4 over 2,500 weights moves none of them."""
    opt, closure = low_precision_digits(dtype, torch.float32)
    initial = float(closure().detach())
    assert run(opt, closure, 60) < initial / 2
    assert opt.stats["rescaled"] == opt.stats["measurements"] == 1


def test_a_bf16_loss_that_no_sample_resolves_says_so_naming_max_step_size():
    """A bf16 loss of 2.3 is resolved to 2^-6: even at the farthest samples (0.0177 and 1.0) the
    first changes it by less. LABPAL cannot measure, and says which argument bounds the samples."""
    opt, closure = low_precision_digits(torch.bfloat16, torch.bfloat16)
    initial = float(closure().detach())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run(opt, closure, 3 * N) == initial
    (message,) = labpal_warnings(record)
    assert "differ by no more than their rounding" in message and "0.0177 and 1" in message
    assert "max_step_size=1.0" in message and "does not train" in message
    assert opt.stats["rejected"] == opt.stats["rescaled"] == 3 and opt.stats["updates"] == 0


# -- where the reference's fit resolves, nothing changes ---------------------------------------------


def test_accepted_fits_cost_nothing_more():
    """Float64 digits: every measurement's fit is accepted at the reference's points; none is
    measured again, so the forward passes are the reference's: 3N per measurement."""
    model = mlp(torch.float64)
    opt = LABPAL(model.parameters(), **DIGITS, reuse_steps=20, warmup_updates=10)
    train(model, opt, 120, dtype=torch.float64)
    s = opt.stats
    assert s["measurements"] >= 3 and s["rejected"] == 0 and s["rescaled"] == 0
    assert s["forwards"] == s["calls"] + 2 * N * s["measurements"]


def concave_problem(dtype=torch.float64):
    """``-||theta||^2``: along the gradient the loss is exactly ``-(|theta0| + x)^2``, curvature -1,
    as resolved as it gets."""
    theta = torch.tensor([3.0, 4.0], dtype=dtype, requires_grad=True)

    def closure(backwards=False):
        loss = -(theta * theta).sum()
        if backwards:
            loss.backward()
        return loss

    return theta, closure


def test_a_resolved_rejection_stays_the_references_and_warns_once_naming_sample_step():
    theta, closure = concave_problem()
    opt = LABPAL([theta], **DIGITS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(opt, closure, 5 * N)
    s = opt.stats
    assert s["rejected"] == s["measurements"] == 5 and s["rescaled"] == 0 and s["updates"] == 0
    assert s["forwards"] == 5 * 3 * N  # not measured again farther out
    (message,) = labpal_warnings(record)
    assert "rejected the parabola fit of 3 measurements in a row" in message
    assert "not convex" in message and "sample_step=0.01" in message and "does not train" in message


def test_an_unresolved_rejection_with_no_room_to_grow_warns_naming_max_step_size():
    """The float32 case, with ``max_step_size`` at ``sample_step``: the samples may not go farther
    out, so every fit is rejected, as the reference's were; LABPAL names the argument."""
    params, closure = torch_problem(9)
    initial = float(closure().detach())
    opt = LABPAL(params, max_step_size=0.01)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run(opt, closure, 3 * N) == initial
    (message,) = labpal_warnings(record)
    assert "differ by no more than their rounding" in message and "max_step_size=0.01" in message
    assert opt.stats["rejected"] == 3 and opt.stats["rescaled"] == 0


def test_a_narrow_trusted_norm_warns_once_with_the_norm_seen():
    """With a step in use, a direction outside ``trusted_norm`` is not measured, as the reference
    has it: LABPAL trains on with the step it has. Three such in a row: it says so, once."""
    model = mlp()
    opt = LABPAL(model.parameters(), **DIGITS, reuse_steps=5, trusted_norm=(1e-3, 1e-2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, opt, N + 6 * 6)  # the first measurement, then six of 5 updates each and an abandoned one
    (message,) = labpal_warnings(record)
    assert "trusted_norm=(0.001, 0.01)" in message and "abandoned 3 measurements in a row" in message
    assert "trains on with the step last measured" in message
    norm = float(re.search(r"direction norm ([0-9.e+-]+) ", message).group(1))
    assert norm > 1e-2
    assert opt.stats["abandoned"] == 6 and opt.stats["measurements"] == 1 and opt.stats["updates"] == 1 + 6 * 5


@pytest.mark.parametrize(
    "value",
    [(1e-3,), (0.1, 0.01), (1.0, 1.0), (-1.0, 1.0), (0.0, float("nan")), "wide", (1e-3, "100"), 100.0, (True, 2.0)],
    ids=repr,
)
def test_trusted_norm_is_checked(value):
    with pytest.raises(ValueError, match=re.escape(f"invalid trusted_norm={value!r}:")):
        LABPAL(mlp().parameters(), trusted_norm=value)


def test_trusted_norm_is_not_a_group_or_checkpoint_value():
    params = list(mlp().parameters())
    with pytest.raises(ValueError, match="trusted_norm"):
        LABPAL([{"params": params, "trusted_norm": (0.0, 1.0)}])
    opt = LABPAL(params, trusted_norm=(0.0, float("inf")))  # 0 and inf: no bound on that side
    assert "trusted_norm" not in opt.state_dict()["param_groups"][0]["labpal"]
    assert "trusted_norm" not in opt.param_groups[0]


# -- the rule itself -------------------------------------------------------------------------------


def test_verdict_and_scales():
    mu = 0.01
    exact = tuple(10.0 - 2.0 * x + 3.0 * x * x for x in (0.0, H, mu))
    a, b, _ = parabola_step(exact, H, mu, "reference")
    assert verdict(a, b, H, mu, "reference", 0.0) is True
    assert verdict(-a, b, H, mu, "reference", 0.0) is False and verdict(a, -b, H, mu, "reference", 0.0) is False
    # an error of `noise` in each loss moves a by at most noise * sum|coefficients|: the verdict
    # holds while RESOLUTION times that stays below |a|, and is None past it
    rows = [parabola_step(e, H, mu, "reference") for e in ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0))]
    reach = sum(abs(r[0]) for r in rows)
    assert verdict(a, b, H, mu, "reference", 0.99 * a / (RESOLUTION * reach)) is True
    assert verdict(a, b, H, mu, "reference", 1.01 * a / (RESOLUTION * reach)) is None
    assert verdict(float("nan"), b, H, mu, "reference", 1.0) is False  # nothing to gain farther out
    assert next_scale(1.0, mu, 1.0) == GROWTH and next_scale(GROWTH, mu, 1.0) == 1.0 / mu
    assert next_scale(1.0 / mu, mu, 1.0) is None and next_scale(1.0, mu, mu) is None


# -- the twin measures the same way ------------------------------------------------------------------

QUANTUM = 2.0**-7  # the loss's resolution: far coarser than its change 10 * 1.77e-4 at the first sample


def quantized_quadratic(dtype=torch.float64):
    """``||theta||^2`` from (3, 4), its value rounded to multiples of 2^-7 (its gradient exact):
    along the unit direction ``(5 - x)^2``, slope -10. At the reference's first sample the loss
    falls by 1.77e-3, under half a quantum, so L1 = L0 = 25 and the reference's slope is 0:
    rejected; at 10x the sample steps the change is two quanta, still within the rounding; at
    100x (the second sample at max_step_size = 1) the fit is accepted."""
    theta = torch.tensor([3.0, 4.0], dtype=dtype, requires_grad=True)

    def closure(backwards=False):
        value = (theta * theta).sum()
        loss = value + (torch.round(value / QUANTUM) * QUANTUM - value).detach()  # (exactly the rounded value)
        if backwards:
            loss.backward()
        return loss

    return theta, closure


@pytest.mark.parametrize("options", [dict(mode="nsgd"), dict(mode="sgd", momentum=0.5), dict(fit="exact")], ids=str)
def test_the_twin_measures_farther_out_the_same_way(options):
    a, closure_a = quantized_quadratic()
    b, closure_b = quantized_quadratic()
    fast = LABPAL([a], **DIGITS, reuse_steps=15, **options)
    ref = LABPALReference([b], **DIGITS, reuse_steps=15, **options)
    torch.manual_seed(0)
    run(fast, closure_a, 60)
    torch.manual_seed(0)
    run(ref, closure_b, 60)
    assert fast.stats["rescaled"] == ref.rescaled >= 2
    assert fast.stats["forwards"] == ref.forwards
    assert fast.step_size == pytest.approx(ref.step_size, rel=1e-12)  # the same losses, fitted alike
    # The two write theta0 - x D / ||D|| in different orders of operations: a few roundings of
    # |theta| < 4 (2^-51 each) apart per update. Every move is along theta itself (the gradient
    # 2 theta, momentum too), r -> |r - step|, which carries a difference over without growing it.
    assert (a - b).abs().max() <= fast.stats["updates"] * 2 * 2.0**-51
    with torch.no_grad():
        assert float(closure_a()) < 25.0 / 2


def test_the_twin_measures_a_first_direction_of_any_norm():
    params_a, closure_a = torch_problem(0, torch.float64)  # ||d|| = 102.4
    params_b, closure_b = torch_problem(0, torch.float64)
    fast, ref = LABPAL(params_a), LABPALReference(params_b)
    torch.manual_seed(0)
    run(fast, closure_a, N)
    torch.manual_seed(0)
    run(ref, closure_b, N)
    assert fast.stats["measurements"] == 1 and fast.stats["forwards"] == ref.forwards == 3 * N
    assert fast.step_size == ref.step_size == 1.0 * 1.8  # the minimum lies beyond max_step_size
    # one closing update theta0 - step * D / ||D|| each, in two orders of operations: each within
    # half an ulp of its product (at most the step) and of its result, so both within an ulp of
    # the step and of the largest |theta| of each other
    for a, b in zip(params_a, params_b):
        assert (a - b).abs().max() <= 2.0**-52 * (fast.step_size + max(a.abs().max(), b.abs().max()))


def test_a_checkpoint_from_before_rescaled_was_counted_loads():
    params, closure = torch_problem(9, torch.float64)
    opt = LABPAL(params)
    run(opt, closure, 12)
    sd = opt.state_dict()
    old = {
        **sd,
        "param_groups": [
            {**g, "labpal": {k: v for k, v in g["labpal"].items() if k != "rescaled"}} for g in sd["param_groups"]
        ],
    }
    twin = LABPAL(torch_problem(9, torch.float64)[0])
    twin.load_state_dict(old)
    assert twin.stats == {**opt.stats, "rescaled": 0}
