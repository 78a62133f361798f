"""torch's own generic optimizer tests, ported to SaLSA and LABPAL, with torch's Adam as the control.

Every test runs over the ``OptimizerInfo`` entries of ``generic_infos.py``: SaLSA's and LABPAL's,
and torch's own Adam entry (``optim_inputs_func_adam``, ``optim_error_inputs_func_adam``), each
with its option sets (ids like ``SaLSA-keep_backup=False``). One test body drives all three
through ``closure_for`` (SaLSA's and LABPAL's ``backwards=`` contract, torch's for Adam): a test
that fails for Adam is a wrong port. Sources: torch's ``test/test_optim.py`` (``TestOptimRenewed``),
``test/optim/test_lrscheduler.py``, ``test/optim/test_swa_utils.py``,
``test/inductor/test_compiled_optimizers.py``; pytorch_optimizer's ``tests/test_optimizers.py``,
``test_gradients.py``, ``test_general_optimizer_parameters.py`` and ``test_optimizer_methods.py``.

Not ported, and why:

- Implementation comparisons (foreach, fused, capturable, differentiable) and their memory and
  kernel checks: ``test_foreach_matches_forloop``, ``test_fused_matches_forloop``,
  ``test_fused_cpu_matches_cuda``, ``test_set_default_dtype_works_with_foreach``,
  ``test_foreach_large_tensor``, ``test_fused_large_tensor``, ``test_peak_memory_foreach``,
  ``test_fused_does_not_step_if_foundinf``, ``test_fused_error_on_params_on_meta``,
  ``test_defaults_changed_to_foreach``, the implementation sweep of every test: SaLSA and LABPAL
  have one implementation per backend, held to each other and to their reference twins elsewhere
  (test_kernels.py, test_labpal_kernels.py, test_reference_equivalence.py; GradScaler skips in
  test_amp.py). ``_compare_between``'s freezing, unfreezing and step without backward are ported.
- ``test_rosenbrock_sparse``; pytorch_optimizer's ``test_sparse``, ``test_zero_epsilon``,
  ``test_madgrad_unsupported_sparse_options``: sparse gradients are refused by design
  (``test_sparse_gradients_refused``; a sparse parameter is an error input).
- ``test_complex``, ``test_complex_2d``: complex parameters are refused (error inputs).
- ``test_forloop_goes_right_direction_multigpu`` and ``test_mixed_device_dtype`` on two GPUs: one
  device here (``test_mixed_devices`` runs where a GPU is).
- ``test_second_order_optims_return_consistent_types``: LBFGS's ``tolerance_grad``; what it guards,
  the value ``step(closure)`` returns, is ``test_step_returns_the_closure_loss``.
- ``test_state_dict_with_cuda_params``, ``test_cpu_load_state_dict`` as written (fused and
  capturable flags on CUDA): ported as ``test_state_dict_loads_on_another_device``.
- test_lrscheduler.py, the scheduler alone (its arithmetic on SGD, its arguments, warnings and
  reference cycles, whatever the optimizer): ``test_error_when_getlr_has_epoch``,
  ``test_no_cyclic_references*``, ``test_old_pattern_warning*``, ``test_new_pattern_no_warning*``,
  ``test_*_is_constant_for_constant_epoch``, ``test_step_lr``, ``test_multi_step_lr*``,
  ``test_get_last_lr_*``, ``test_raise_error_when_last_epoch_is_greater_than_0_and_initial_lr_is_not_specified``,
  ``test_constantlr*``, ``test_linearlr*``, ``test_exp_lr``, ``test_poly_lr``, ``test_cos_anneal_lr*``,
  ``test_closed_form_*``, ``test_reduce_lr_on_plateau*`` (1 to 8, ``_get_last_lr_before_step``,
  ``_preserves_lr_type``, ``_state_dict``), ``test_sequentiallr*``, ``test_chained_lr*``,
  ``test_compound_*``, ``test_cycle_lr_*`` but the two with beta1, ``test_onecycle_lr_*``,
  ``test_lambda_lr*``, ``test_multiplicative_lr*``, ``test_CosineAnnealingWarmRestarts_*``,
  ``test_swalr_*``, ``test_swa_lr_state_dict``, ``test_step_lr_state_dict``, ``test_multi_step_lr_state_dict``,
  ``test_exp_step_lr_state_dict``, ``test_cosine_lr_state_dict``, ``test_cosine_then_cyclic``,
  ``test_constant_initial_*``, ``test_add_param_group_errors_reduce_lr_on_plateau``. Ported, over
  every scheduler class: ``test_lr_scheduler_state_dict_load`` (``test_scheduler_resume``),
  ``test_lr_scheduler_checkpoint(_on_plateau)``, ``test_cycle_lr_with_adam`` and
  ``test_cycle_lr_cycle_momentum_with_beta1_optimizer`` (``test_scheduler_cycles_beta1``),
  ``test_add_param_group_does_not_break_reduce_lr_on_plateau``.
- test_swa_utils.py: ``test_averaged_model_*``, ``test_bn_update_eval_momentum`` (the averaged
  model alone); ``test_update_bn_*`` and the averaging run alongside training
  (``test_swa_utils_alongside``).
- test_compiled_optimizers.py: kernel counts and Inductor internals of torch's optimizers (the
  ``make_test`` tests, ``test_foreach_map_adam``, ``test_basic_shampoo``,
  ``test_static_address_finalizer``, ``test_get_value_on_static_address``,
  ``test_compile_time_smoketest``, ``test_S429861``), ``test_guard_on_none_grads`` (a gradient is
  never None here), ``test_correctness`` without a closure (SaLSA and LABPAL need one). Ported:
  ``test_correctness`` with a closure, ``test_closure_graph_break`` and the ``make_recompile_test``
  tests, as ``test_compiled_step_matches_eager_without_recompiling``.
- pytorch_optimizer, tests of other optimizers or APIs: ``test_lookahead``, ``test_sam_*``,
  ``test_looksam_*``, ``test_wsam_*``, ``test_gsam_*``, ``test_bsam_*``, ``test_adanorm_*``,
  ``test_adamd_variant``, ``test_cautious_variant``, ``test_stable_adamw_variant``,
  ``test_pc_grad_optimizers``, ``test_nero_zero_scale``, ``test_rectified_optimizer``,
  ``test_hessian_optimizer``, ``test_swats_sgd_phase``, ``test_reset``, ``test_*_reset``,
  ``test_scalable_shampoo_*``, ``test_sm3_*``, ``test_lomo_*``, ``test_dynamic_scaler``,
  ``test_schedule_free_methods``, ``test_grokfast_*``, ``test_stableadamw_optimizer``,
  ``test_adam_mini_optimizer``, ``test_trac_*``, ``test_soap_*``, ``test_muon_*``, ``test_mars_*``,
  ``test_spam_optimizer``, ``test_kron_optimizer``, ``test_wd_ratio``, ``test_beta``,
  ``test_reduction``, ``test_update_frequency``, ``test_norm``, ``test_size_of_parameter``,
  ``test_nus``, and test_optimizer_methods.py; LABPAL in ``test_bf16_optimizers`` (bf16
  parameters make its measurements noise: its warning is checked instead). Ported:
  ``test_f32_optimizers``, ``test_bf16_optimizers``, ``test_closure`` (a step without gradients),
  ``test_no_closure``, ``test_learning_rate``, ``test_epsilon``, ``test_weight_decay``, ``test_betas``,
  ``test_momentum`` (error inputs), ``test_no_gradients``, ``test_sparse_not_supported``,
  ``test_complex_not_supported``.

Documented differences the port encodes (docs/differences.md):

- a parameter listed twice is a ``ValueError`` where torch warns; ``lr`` is no constructor argument,
  only a param group's multiplier, and a tensor ``lr`` is refused there (``ValueError``);
- ``zero_grad(set_to_none=True)`` keeps the gradients as zeroed views of the flat buffer;
- an unused parameter (no gradient) has a zero gradient: momentum and weight decay still move it,
  where torch's optimizers skip it; the same for a step whose closure runs no backward;
- the param groups share one step size (SaLSA) or one measurement (LABPAL): they are not separate
  optimizers (Adam alone runs that test); LABPAL has no weight decay;
- LABPAL restarts a measurement on resume (its closures cannot be saved): checkpoints that must
  resume exactly are taken between measurements; bf16/fp16 parameters make LABPAL warn.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from conftest import cuda
from generic_infos import (
    ADAM_INFO,
    CLOSURE_OPTIMIZERS,
    INFOS,
    LABPAL_INFO,
    SALSA_INFO,
    SCHEDULERS,
    TRAINING_KWARGS,
    OptimizerErrorEnum,
    assert_same,
    cases,
    clones,
    closure_for,
    constant_closure,
    error_cases,
    first_update_calls,
    forward_only,
    goes_right,
    group_lrs,
    quadratic,
    resumed_scheduler,
    run_steps,
    small_problem,
    split_kwargs,
    step_schedulers,
    take_step,
    torch_problem,
    trained,
    training_data,
    ulps,
    used_beta1,
    without_names,
)
from helpers import as_previous_release
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ConstantLR, OneCycleLR, ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from salsa_fast import LABPAL, SaLSAWarning

CASES = cases()
DEFAULTS = cases(first_only=True)
NAMED = pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
NAMED_PAIRS = (
    pytest.mark.parametrize("named1", [False, True], ids=["to_unnamed", "to_named"]),
    pytest.mark.parametrize("named0", [False, True], ids=["from_unnamed", "from_named"]),
)


@pytest.fixture(autouse=True)
def _seeded_one_thread():
    """Seeded; one thread: these problems are tiny, and two OpenMP threads on a busy 2-core
    machine make a 1x4x16x16 convolution take 100 ms instead of 0.3."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def is_closure_opt(info):
    return info.optim_cls in CLOSURE_OPTIMIZERS


# -- construction and errors --------------------------------------------------------------------------


def test_infos_do_not_specify_global_cliquey_kwargs():
    for info in INFOS:
        for optim_input in info.optim_inputs_func(device="cpu"):
            assert not {"foreach", "fused", "differentiable"} & set(optim_input.kwargs)


@pytest.mark.parametrize("info, error_input", error_cases())
def test_errors(info, error_input):
    i = error_input.optimizer_error_input
    expect = pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect(error_input.error_type, match=error_input.error_regex):
            info.optim_cls(i.params, **i.kwargs)
    else:
        opt = info.optim_cls(i.params, **i.kwargs)
        with expect(error_input.error_type, match=error_input.error_regex):
            opt.step()


@pytest.mark.parametrize("info, kwargs", CASES)
def test_optimizer_can_be_printed(info, kwargs):
    opt = info.optim_cls([Parameter(torch.randn(2, 3)) for _ in range(2)], **kwargs)
    assert info.name in repr(opt)


# -- training goes the right way ---------------------------------------------------------------------


@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "sched"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("info, kwargs", CASES)
def test_goes_right_direction(info, kwargs, contiguous, with_lrsched):
    forloop = {"foreach": False} if "foreach" in info.supported_impls else {}
    for constructors in info.scheduler_inputs if with_lrsched else [[]]:
        w, b, x = torch_problem(contiguous)
        opt = info.optim_cls([w, b], **kwargs, **forloop)
        loss_fn = quadratic(w, b, x)
        initial = loss_fn().item()
        run_steps(opt, loss_fn, 20, [c(opt) for c in constructors])
        goes_right(kwargs, initial, loss_fn().item())
        for p in (w, b):  # the state is laid out like its (strided) parameter
            assert all(v.shape == p.shape for v in opt.state[p].values() if torch.is_tensor(v) and v.dim())


@pytest.mark.parametrize("info, kwargs", DEFAULTS)
def test_param_group_with_lrscheduler_goes_right_direction(info, kwargs):
    group, ctor = split_kwargs(info, kwargs)
    for constructors in info.scheduler_inputs:
        w, b, x = torch_problem()
        opt = info.optim_cls([{"params": [w], **group}, {"params": [b], **group, "lr": 0.01}], **ctor)
        loss_fn = quadratic(w, b, x)
        initial = loss_fn().item()
        run_steps(opt, loss_fn, 20, [c(opt) for c in constructors])
        assert loss_fn().item() < initial


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_f32_training(info):
    x, y, model = training_data()
    opt = info.optim_cls(model.parameters(), **TRAINING_KWARGS[info.optim_cls])
    loss_fn = lambda: torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)  # noqa: E731
    initial = loss_fn().item()
    run_steps(opt, loss_fn, 30)
    assert initial > 1.5 * loss_fn().item()


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_bf16_training(info):
    x, y, model = training_data()
    model = model.bfloat16()
    if info.optim_cls is LABPAL:
        with pytest.warns(SaLSAWarning, match="bf16/fp16"):
            info.optim_cls(model.parameters(), **TRAINING_KWARGS[LABPAL])
        return

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.binary_cross_entropy_with_logits(model(x.bfloat16()).float(), y)

    opt = info.optim_cls(model.parameters(), **TRAINING_KWARGS[info.optim_cls])
    initial = loss_fn().item()
    run_steps(opt, loss_fn, 30)
    assert initial > 1.5 * loss_fn().item()


# -- param groups and lr -------------------------------------------------------------------------------


@pytest.mark.parametrize("info, kwargs", cases([SALSA_INFO, ADAM_INFO]))  # LABPAL has no weight decay
def test_param_groups_weight_decay(info, kwargs):
    group, ctor = split_kwargs(info, kwargs)
    w, b, x = torch_problem()
    opt = info.optim_cls([{"params": [w], **group}, {"params": [b], **group, "weight_decay": 0.0}], **ctor)
    loss_fn = quadratic(w, b, x)
    initial = loss_fn().item()
    run_steps(opt, loss_fn, 20)
    goes_right(kwargs, initial, loss_fn().item())


@pytest.mark.parametrize("info, kwargs", CASES)
def test_param_groups_lr(info, kwargs):
    group, ctor = split_kwargs(info, kwargs)
    if not group.get("lr"):
        group["lr"] = 1e-3
    w, b, x = torch_problem()
    irrelevant = Parameter(torch.randn(2))
    irrelevant_before = irrelevant.detach().clone()
    opt = info.optim_cls([{"params": [w, b], **group}, {"params": [irrelevant], "lr": 1e-28}], **ctor)
    quad = quadratic(w, b, x)
    loss_fn = lambda: quad() + (irrelevant * torch.rand_like(irrelevant)).sum()  # noqa: E731 (a random gradient)
    initial = quad().item()
    run_steps(opt, loss_fn, 20)
    goes_right(kwargs, initial, quad().item())
    # lr 1e-28 moves it by far less than half a unit in its last place: not at all. (LABPAL measures
    # along the unscaled line; without a backup, the way back rounds once per move, 3 per measurement)
    lean_labpal = isinstance(opt, LABPAL) and not opt.keep_backup
    atol = ulps(irrelevant, 3 * opt.stats["measurements"]) if lean_labpal else 0
    torch.testing.assert_close(irrelevant.detach(), irrelevant_before, rtol=0, atol=atol)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_param_groups_equal_one_group(info, kwargs):
    """Splitting the parameters into groups with the same options changes nothing (float64: the
    sums over buckets may be added in another order, a rounding per step)."""
    group, ctor = split_kwargs(info, kwargs)
    w, b, x = torch_problem(dtype=torch.float64)
    w2, b2 = clones(w, b)
    one = info.optim_cls([{"params": [w, b], **group}], **ctor)
    two = info.optim_cls([{"params": [w2], **group}, {"params": [b2], **group}], **ctor)
    run_steps(one, quadratic(w, b, x), 10)
    run_steps(two, quadratic(w2, b2, x), 10)
    for p, q in ((w, w2), (b, b2)):
        torch.testing.assert_close(q, p, rtol=0, atol=ulps(p, 10 * 8))


@pytest.mark.parametrize("info, kwargs", cases([ADAM_INFO]))  # SaLSA and LABPAL: one step size for all groups
def test_param_groups_equal_separate_optimizers(info, kwargs):
    w, b, x = torch_problem()
    w2, b2 = clones(w, b)
    grouped = info.optim_cls([{"params": [w], **kwargs}, {"params": [b], **kwargs, "lr": 0.01}])
    separate = [info.optim_cls([w2], **kwargs), info.optim_cls([b2], **{**kwargs, "lr": 0.01})]
    loss_fn, loss2 = quadratic(w, b, x), quadratic(w2, b2, x)
    for _ in range(10):
        take_step(grouped, loss_fn)
        for o in separate:
            o.zero_grad()
        loss2().backward()
        for o in separate:
            o.step()
        assert torch.equal(w, w2) and torch.equal(b, b2)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_tensor_lr(info, kwargs):
    """Adam: a tensor ``lr`` steps as the float; SaLSA, LABPAL: refused, naming the argument."""
    group, ctor = split_kwargs(info, {k: v for k, v in kwargs.items() if k != "lr"})
    lr = 1.0 if is_closure_opt(info) else 1e-3
    w, b, x = torch_problem()
    w_c, b_c = clones(w, b)
    ref = info.optim_cls([{"params": [w, b], **group, "lr": lr}], **ctor)
    if is_closure_opt(info):
        with pytest.raises(ValueError, match=r"invalid param group 'lr'=tensor"):
            info.optim_cls([{"params": [w_c, b_c], **group, "lr": torch.tensor(lr)}], **ctor)
        return
    opt = info.optim_cls([{"params": [w_c, b_c], **group, "lr": torch.tensor(lr)}], **ctor)
    for i in range(5):
        take_step(ref, quadratic(w, b, x))
        take_step(opt, quadratic(w_c, b_c, x))
        for p, q in ((w, w_c), (b, b_c)):  # the step size rounded in fp32 rather than in fp64
            torch.testing.assert_close(q, p, rtol=0, atol=ulps(p, 2 * (i + 1)))


@pytest.mark.parametrize("info, kwargs", CASES)
def test_scheduler_factor_scales_the_update(info, kwargs):
    """A scheduler's factor on every group's ``lr`` scales the first update by it; the line
    searches find the same step size (a common factor must not be undone by the search)."""
    w, b, x = small_problem()
    w2, b2 = clones(w, b)
    start = w.detach().clone(), b.detach().clone()
    one = info.optim_cls([w, b], **kwargs)
    half = info.optim_cls([w2, b2], **kwargs)
    ConstantLR(half, factor=0.5, total_iters=10)
    for _ in range(first_update_calls(one)):
        take_step(one, quadratic(w, b, x))
        take_step(half, quadratic(w2, b2, x))
    if is_closure_opt(info):
        assert half.step_size == one.step_size
    for p, q, p0 in ((w, w2, start[0]), (b, b2, start[1])):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(q - p0, 0.5 * (p - p0), rtol=0, atol=ulps(p, 4))


# -- steps without gradients, zero_grad, frozen and unused parameters ------------------------------------


@pytest.mark.parametrize("info, kwargs", CASES)
def test_step_is_noop_when_params_have_no_grad(info, kwargs):
    params = [torch.randn(2, 3) for _ in range(2)]  # none requires grad
    before = [p.clone() for p in params]
    opt = info.optim_cls(params, **kwargs)
    for _ in range(3):
        opt.step(constant_closure())
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("grad", ["zeros", "none"])
@pytest.mark.parametrize("info, kwargs", CASES)
def test_step_is_noop_for_zero_grads(info, kwargs, grad):
    if kwargs.get("weight_decay", 0):
        pytest.skip("weight decay moves parameters without a gradient (torch's test skips it too)")
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    opt = info.optim_cls([param], **kwargs)
    param.grad = torch.zeros_like(param) if grad == "zeros" else None
    opt.step(constant_closure())
    assert torch.equal(param, before)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_zero_grad(info, kwargs):
    w, b, x = small_problem()
    opt = info.optim_cls([w, b], **kwargs)
    loss_fn = quadratic(w, b, x)
    take_step(opt, loss_fn)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in (w, b))
    loss_fn().backward()
    assert all(p.grad.any() for p in (w, b))
    opt.zero_grad()
    if is_closure_opt(info):  # documented: zeroed views of the flat gradient buffer
        assert all(p.grad is not None and not p.grad.any() for p in (w, b))
    else:
        assert all(p.grad is None for p in (w, b))


@pytest.mark.parametrize("info, kwargs", CASES)
def test_freeze_unfreeze_and_a_step_without_gradients(info, kwargs):
    """``_compare_between``'s schedule: no backward at step 2, a layer frozen at 3, unfrozen at 5."""
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    opt = info.optim_cls(model.parameters(), **kwargs)
    loss_fn = lambda: model(inputs).sum()  # noqa: E731 (in (0, 3): bounded below)
    frozen = list(model[2].parameters())
    for i in range(10):
        if i == 3:
            model[2].requires_grad_(False)
            at_freeze = [p.detach().clone() for p in frozen]
            state_at_freeze = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in frozen]
        if i == 5:
            model[2].requires_grad_(True)
        before = [p.detach().clone() for p in model.parameters()]
        if i == 2:
            opt.zero_grad()
            opt.step(forward_only(loss_fn))
            if not is_closure_opt(info):  # gradients None: torch skips; here zero (documented)
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        else:
            take_step(opt, loss_fn)
        if i in (3, 4):  # frozen: neither it nor its state moves
            assert all(torch.equal(p, q) for p, q in zip(frozen, at_freeze))
            for p, saved in zip(frozen, state_at_freeze):
                assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    assert not all(torch.equal(p, q) for p, q in zip(frozen, at_freeze))  # trained again once unfrozen


@pytest.mark.parametrize("info, kwargs", CASES)
def test_only_frozen_parameters_then_unfreeze(info, kwargs):
    w, b, x = small_problem()
    w.requires_grad_(False)
    b.requires_grad_(False)
    before = w.detach().clone(), b.detach().clone()
    opt = info.optim_cls([w, b], **kwargs)
    for _ in range(2):
        opt.zero_grad()
        opt.step(constant_closure())
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss_fn = quadratic(w, b, x)
    initial = loss_fn().item()
    losses = [(take_step(opt, loss_fn), loss_fn().item())[1] for _ in range(8)]
    goes_right(kwargs, initial, max(losses) if kwargs.get("maximize") else min(losses))  # (NSGD may oscillate)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_unused_parameter(info, kwargs):
    """A parameter that stops getting a gradient: torch's optimizers skip it; here its gradient
    is zero and momentum and weight decay still move it (documented)."""
    w, b, x = small_problem()
    u = Parameter(torch.randn(3))
    opt = info.optim_cls([w, b, u], **kwargs)
    quad = quadratic(w, b, x)
    run_steps(opt, lambda: quad() + u.pow(2).sum(), 4)
    at_unused = u.detach().clone()
    run_steps(opt, quad, 4)
    if not is_closure_opt(info):
        assert torch.equal(u, at_unused)
    else:
        assert torch.isfinite(u).all()
        if kwargs.get("weight_decay") or kwargs.get("momentum") or kwargs.get("use_mv"):
            assert not torch.equal(u, at_unused)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_no_gradients_in_some_groups(info, kwargs):
    """pytorch_optimizer's ``test_no_gradients``: frozen parameters among groups, a group of them only."""
    p1, p2, p3, p4 = (Parameter(torch.randn(3), requires_grad=rg) for rg in (True, False, True, False))
    frozen = p2.detach().clone(), p4.detach().clone()
    opt = info.optim_cls([{"params": [p1, p2]}, {"params": [p3]}, {"params": [p4]}], **kwargs)
    start = p1.detach().clone()
    run_steps(opt, lambda: (p1 + p3).pow(2).sum(), 4)
    assert torch.equal(p2, frozen[0]) and torch.equal(p4, frozen[1])
    assert not torch.equal(p1, start)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_sparse_gradients_refused(info, kwargs):
    w = Parameter(torch.randn(4, 3))
    before = w.detach().clone()
    opt = info.optim_cls([w], **kwargs)

    def closure(*args, **kw):
        w.grad = torch.randn(4, 3).to_sparse()
        return torch.tensor(1.0)

    with pytest.raises(RuntimeError, match="(?i)sparse"):
        opt.step(closure)
    assert torch.equal(w, before)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_grads_not_modified_by_step(info, kwargs):
    """The step leaves the gradients of its gradient pass as autograd made them."""
    w, b, x = small_problem()
    loss_fn = quadratic(w, b, x)
    expected = torch.autograd.grad(loss_fn(), [w, b])
    opt = info.optim_cls([w, b], **kwargs)
    take_step(opt, loss_fn)
    assert torch.equal(w.grad, expected[0]) and torch.equal(b.grad, expected[1])


@pytest.mark.parametrize("info, kwargs", CASES)
def test_non_empty_state(info, kwargs):
    model = torch.nn.Linear(5, 5)
    inputs = torch.rand(2, 5)
    opt = info.optim_cls(model.parameters(), **kwargs)
    take_step(opt, lambda: model(inputs).pow(2).sum())
    assert opt.state and all(len(s) > 0 for s in opt.state.values())


@pytest.mark.parametrize("info, kwargs", CASES)
def test_step_returns_the_closure_loss(info, kwargs):
    w, b, x = small_problem()
    loss_fn = quadratic(w, b, x)
    opt = info.optim_cls([w, b], **kwargs)
    for _ in range(3):
        expected = loss_fn().item()
        loss = take_step(opt, loss_fn)
        assert torch.is_tensor(loss) and loss.item() == expected


def _mixed_dtypes(info):
    if info.optim_cls is LABPAL:  # bf16/fp16 parameters make LABPAL warn (checked below): fp32 and fp64 here
        return (torch.float64, torch.float32)
    return (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _train_mixed(info, kwargs, params):
    targets = [torch.randn(p.shape, dtype=torch.float64) for p in params]
    loss_fn = lambda: sum((p.double() - t.to(p.device)).pow(2).sum() for p, t in zip(params, targets))  # noqa: E731
    opt = info.optim_cls(params, **kwargs)
    initial = loss_fn().item()
    run_steps(opt, loss_fn, 10)
    goes_right(kwargs, initial, loss_fn().item())
    return opt


@pytest.mark.parametrize("info, kwargs", CASES)
def test_mixed_dtypes(info, kwargs):
    params = [Parameter(torch.randn(2, 3).to(dt)) for dt in _mixed_dtypes(info)]
    opt = _train_mixed(info, kwargs, params)
    for p, dt in zip(params, _mixed_dtypes(info)):
        assert p.dtype == dt and torch.isfinite(p).all()
        if is_closure_opt(info):  # fp32 state, fp64 for fp64 parameters
            want = torch.float64 if dt == torch.float64 else torch.float32
            assert all(v.dtype == want for v in opt.state[p].values() if torch.is_tensor(v))
    if info.optim_cls is LABPAL:
        with pytest.warns(SaLSAWarning, match="bf16/fp16"):
            info.optim_cls([Parameter(torch.randn(2, 3).bfloat16())], **kwargs)


@cuda
@pytest.mark.parametrize("info, kwargs", CASES)
def test_mixed_devices(info, kwargs):
    params = [Parameter(torch.randn(2, 3, device=d)) for d in ("cpu", "cuda", "cpu", "cuda")]
    _train_mixed(info, kwargs, params)


# -- state_dict ----------------------------------------------------------------------------------------


def _steps_alike(opt, params, opt2, params2, x, steps=5):
    for _ in range(steps):
        take_step(opt, quadratic(*params, x))
        take_step(opt2, quadratic(*params2, x))
        assert all(torch.equal(p, q) for p, q in zip(params, params2))


@NAMED_PAIRS[0]
@NAMED_PAIRS[1]
@pytest.mark.parametrize("info, kwargs", CASES)
def test_state_dict_deterministic(info, kwargs, named0, named1):
    opt, w, b, x = trained(info, kwargs, 10, named0)
    w_c, b_c = clones(w, b)
    opt_c = info.optim_cls([("name0", w_c), ("name1", b_c)] if named1 else [w_c, b_c], **kwargs)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps_alike(opt, (w, b), opt_c, (w_c, b_c), x, 10)
    assert_same(without_names(opt.state_dict()), without_names(opt_c.state_dict()))
    opt_c.param_groups.extend(opt_c.param_groups)  # a repeated group is represented alike
    last, last_c = (without_names(o.state_dict())["param_groups"][-1] for o in (opt, opt_c))
    assert_same(last, last_c)


def _conv_bn():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    inputs = torch.rand(1, 4, 16, 16)
    return model, lambda: model(inputs).sub(1).pow(2).mean()  # torch's .sum() is unbounded below (SaLSA warns)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_can_load_older_state_dict(info, kwargs):
    model, loss_fn = _conv_bn()
    opt = info.optim_cls(model.parameters(), **kwargs)
    run_steps(opt, loss_fn, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in info.not_og_supported_flags:
            group.pop(flag, None)
    if is_closure_opt(info):  # the previous release: the run's scalars a top-level entry
        old = as_previous_release(old, opt.entry)
    opt.load_state_dict(old)
    assert math.isfinite(take_step(opt, loss_fn).item())


@pytest.mark.parametrize("info, kwargs", CASES)
def test_can_load_partial_state_dict(info, kwargs):
    """A parameter without saved state (frozen when saved) starts afresh."""
    model, loss_fn = _conv_bn()
    opt = info.optim_cls(model.parameters(), **kwargs)
    run_steps(opt, loss_fn, 3)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]
    opt.load_state_dict(sd)
    first = next(model.parameters())
    assert all(not torch.is_tensor(v) or not v.any() for k, v in opt.state[first].items() if k != "step")
    assert math.isfinite(take_step(opt, loss_fn).item())


@NAMED_PAIRS[0]
@NAMED_PAIRS[1]
@pytest.mark.parametrize("info, kwargs", CASES)
def test_can_load_from_to_named_state_dict(info, kwargs, named0, named1):
    model, loss_fn = _conv_bn()
    opt = info.optim_cls(model.named_parameters() if named0 else model.parameters(), **kwargs)
    run_steps(opt, loss_fn, 3)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = info.optim_cls(model.named_parameters() if named1 else model.parameters(), **kwargs)
    opt2.load_state_dict(sd)
    take_step(opt2, loss_fn)
    if named0 or named1:  # the names are kept when either optimizer had them
        assert opt2.state_dict()["param_groups"][0].get("param_names") == ["0.weight", "0.bias", "1.weight", "1.bias"]


@NAMED
@pytest.mark.parametrize("info, kwargs", CASES)
def test_save_load_equality_with_weights_only(info, kwargs, named):
    opt = trained(info, kwargs, 3, named)[0]
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    for weights_only in (False, True):
        buf.seek(0)
        assert_same(torch.load(buf, weights_only=weights_only), sd)


@pytest.mark.parametrize("info, kwargs", CASES)
def test_load_nontensor_step(info, kwargs):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    closure = constant_closure(torch.rand(1).item())
    opt = info.optim_cls(params, **kwargs)
    for _ in range(3):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        if torch.is_tensor(entry.get("step")):
            entry["step"] = entry["step"].item()
    opt.load_state_dict(sd)
    opt.step(closure)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize("info, kwargs", CASES)
def test_state_dict_loads_on_another_device(info, kwargs, device):
    """A CPU checkpoint loaded (``map_location``, ``weights_only``) into an optimizer on ``device``
    continues as the original: bit for bit on CPU, to a rounding per step on a GPU."""
    opt, w, b, x = trained(info, kwargs)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    w_d, b_d = (Parameter(p.detach().to(device)) for p in (w, b))
    x_d = x.to(device)
    opt_d = info.optim_cls([w_d, b_d], **kwargs)
    opt_d.load_state_dict(torch.load(buf, map_location=device, weights_only=True))
    for i in range(5):
        take_step(opt, quadratic(w, b, x))
        take_step(opt_d, quadratic(w_d, b_d, x_d))
        for p, q in ((w, w_d), (b, b_d)):
            torch.testing.assert_close(q.cpu(), p, rtol=0, atol=0 if device == "cpu" else ulps(p, 4 * (i + 1)))


@pytest.mark.parametrize("info, kwargs", CASES)
def test_state_dict_non_parameter_keys(info, kwargs):
    """torch passes a key of ``optimizer.state`` that is no parameter through state_dict and load."""
    opt, w, b, x = trained(info, kwargs)
    opt.state["global_step"] = 1
    sd = opt.state_dict()
    assert sd["state"]["global_step"] == 1
    w_c, b_c = clones(w, b)
    opt_c = info.optim_cls([w_c, b_c], **kwargs)
    opt_c.load_state_dict(copy.deepcopy(sd))
    assert opt_c.state["global_step"] == 1
    _steps_alike(opt, (w, b), opt_c, (w_c, b_c), x, 3)


@pytest.mark.parametrize("info, kwargs", cases([LABPAL_INFO]))
def test_labpal_restarts_a_measurement_on_resume(info, kwargs):
    """Documented: a checkpoint taken during a measurement restarts it (its closures are not saved)."""
    w, b, x = small_problem()
    opt = info.optim_cls([w, b], **kwargs)
    take_step(opt, quadratic(w, b, x))  # the first of the first measurement's calls
    assert opt.measuring
    w_c, b_c = clones(w, b)
    opt_c = info.optim_cls([w_c, b_c], **kwargs)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_c.measuring
    start = w.detach().clone()
    take_step(opt, quadratic(w, b, x))  # ends the measurement: an update
    take_step(opt_c, quadratic(w_c, b_c, x))  # the restarted measurement's first call
    assert not torch.equal(w, start) and torch.equal(w_c, start)


# -- hooks -----------------------------------------------------------------------------------------------


def _one_param_opt(info, kwargs):
    return info.optim_cls([torch.rand(2, 3, requires_grad=True)], **kwargs)


def _a_step(opt):
    """A step on ``sum(p^2)`` of the optimizer's one parameter (the closure fits SGD's step too)."""
    (p,) = opt.param_groups[0]["params"]
    return closure_for(opt, lambda: p.pow(2).sum())


def _sd_pre_hook(opt):
    opt.state["test"] = 1


def _sd_post_hook(opt, sd):
    sd["ran_state_dict_pre_hook"] = "test" in sd["state"]
    sd["state"].pop("test", None)
    return sd


@pytest.mark.parametrize("hooks", ["pre", "post", "pre_post"])
@pytest.mark.parametrize("info, kwargs", CASES)
def test_state_dict_hooks(info, kwargs, hooks):
    """torch's ``test_state_dict_pre_hook``, ``_post_hook`` and ``_pre_post_hook``."""
    opt = _one_param_opt(info, kwargs)
    if hooks != "post":
        opt.register_state_dict_pre_hook(_sd_pre_hook)
    if hooks != "pre":
        opt.register_state_dict_post_hook(_sd_post_hook)
    sd = opt.state_dict()
    if hooks == "pre":
        assert sd["state"]["test"] == 1
    else:
        assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is (hooks == "pre_post")


def _load_pre_hook1(opt, sd):
    sd["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(opt, sd):
    sd = copy.deepcopy(sd)  # a hook that returns a new state dict, which is then loaded
    sd["param_groups"][0]["lr"] = 0.003
    return sd


def _load_post_hook(opt):
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("info, kwargs", CASES)
def test_load_state_dict_pre_hook_and_prepend(info, kwargs):
    opt = _one_param_opt(info, kwargs)
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_pre_hook1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002  # hook 1, run last, sets it again


@pytest.mark.parametrize("with_pre_hook", [False, True], ids=["post", "pre_post"])
@pytest.mark.parametrize("info, kwargs", CASES)
def test_load_state_dict_post_hook(info, kwargs, with_pre_hook):
    opt = _one_param_opt(info, kwargs)
    if with_pre_hook:
        opt.register_load_state_dict_pre_hook(_load_pre_hook2)
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is with_pre_hook
    assert opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("kind", ["pre", "post"])
@pytest.mark.parametrize("info, kwargs", CASES)
def test_step_hook(info, kwargs, kind):
    opt = _one_param_opt(info, kwargs)
    calls = []
    register = opt.register_step_pre_hook if kind == "pre" else opt.register_step_post_hook
    handle = register(lambda o, args, kw: calls.append(o))
    opt.step(_a_step(opt))
    opt.step(_a_step(opt))
    assert calls == [opt, opt]
    handle.remove()
    opt.step(_a_step(opt))
    assert len(calls) == 2


@pytest.mark.parametrize("info, kwargs", CASES)
def test_step_all_hooks(info, kwargs):
    """Global and local hooks, in torch's order, for this optimizer and an SGD beside it."""
    opt = _one_param_opt(info, kwargs)
    sgd = SGD(opt.param_groups[0]["params"])
    data = []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: data.append(0)),
        register_optimizer_step_post_hook(lambda *a: data.append(5)),
    ]
    try:
        for o in (opt, sgd):
            handles += [
                o.register_step_pre_hook(lambda *a: data.append(1)),
                o.register_step_post_hook(lambda *a: data.append(2)),
            ]
        for o in (opt, sgd, opt):
            o.step(_a_step(opt))
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step(_a_step(opt))
    sgd.step(_a_step(opt))
    assert data == [0, 1, 2, 5] * 3


# -- copies ------------------------------------------------------------------------------------------------


def _public(o):
    return {k for k in o.__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("info, kwargs", CASES)
def test_deepcopy_copies_all_public_attrs(info, kwargs):
    opt = trained(info, kwargs)[0]
    assert _public(copy.deepcopy(opt)) == _public(opt)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("info, kwargs", CASES)
def test_copy_then_steps_alike(info, kwargs, how):
    """A deep copy (or an unpickled copy) of the optimizer, with its own copies of the parameters,
    steps exactly as the original."""
    opt, w, b, x = trained(info, kwargs)
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    w_c, b_c = copied.param_groups[0]["params"]
    assert w_c is not w and torch.equal(w_c, w) and torch.equal(b_c, b)
    _steps_alike(opt, (w, b), copied, (w_c, b_c), x)


# -- LR schedulers -------------------------------------------------------------------------------------


def _sched_steps(opt, schedulers, loss_fn, steps, until_checkpoint=False):
    """``steps`` steps, each followed by the schedulers' (``until_checkpoint``: then on until LABPAL
    is out of its measurement); the last scheduler's ``get_last_lr`` is the groups' lr."""
    for i in range(steps + (20 if until_checkpoint else 0)):
        if i >= steps and not getattr(opt, "measuring", False):
            return
        step_schedulers(schedulers, take_step(opt, loss_fn))
        assert schedulers[-1].get_last_lr() == group_lrs(opt)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("info, kwargs", DEFAULTS)
def test_scheduler_resume(info, kwargs, name):
    """Each scheduler constructs on the optimizer, steps it, reports ``get_last_lr``, and a
    checkpoint of both (``weights_only``) resumes exactly."""
    opt, w, b, x = trained(info, kwargs, 0)
    lr = opt.param_groups[0]["lr"]
    schedulers = SCHEDULERS[name](opt, lr)
    _sched_steps(opt, schedulers, quadratic(w, b, x), 6, until_checkpoint=True)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "schedulers": [s.state_dict() for s in schedulers]}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    w_c, b_c = clones(w, b)
    opt_c = info.optim_cls([w_c, b_c], **kwargs)
    schedulers_c = SCHEDULERS[name](opt_c, lr)
    opt_c.load_state_dict(checkpoint["optimizer"])
    for s, sd in zip(schedulers_c, checkpoint["schedulers"]):
        s.load_state_dict(sd)
    for _ in range(6):
        _sched_steps(opt, schedulers, quadratic(w, b, x), 1)
        _sched_steps(opt_c, schedulers_c, quadratic(w_c, b_c, x), 1)
        assert group_lrs(opt_c) == group_lrs(opt) and torch.equal(w_c, w) and torch.equal(b_c, b)


@pytest.mark.parametrize(
    "name", ["StepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR", "OneCycleLR", "SWALR", "ReduceLROnPlateau"]
)
@pytest.mark.parametrize("info, kwargs", DEFAULTS)
def test_scheduler_checkpoint(info, kwargs, name):
    """torch's ``test_lr_scheduler_checkpoint(_on_plateau)``: a scheduler made with ``last_epoch=0``
    (``ReduceLROnPlateau``: anew) on an optimizer loaded from a checkpoint reports the saved lr."""
    opt, w, b, x = trained(info, kwargs, 0)
    scheduler = SCHEDULERS[name](opt, opt.param_groups[0]["lr"])[0]
    _sched_steps(opt, [scheduler], quadratic(w, b, x), 1)
    opt2 = info.optim_cls(clones(w, b), **kwargs)
    opt2.load_state_dict(opt.state_dict())
    if name == "ReduceLROnPlateau":
        scheduler2 = ReduceLROnPlateau(opt2)
    else:
        scheduler2 = resumed_scheduler(scheduler, opt2, last_epoch=0)
    assert scheduler2.get_last_lr()[0] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)


@pytest.mark.parametrize("info, kwargs", DEFAULTS)
def test_scheduler_cycles_beta1(info, kwargs):
    """``OneCycleLR`` with ``cycle_momentum`` moves beta1 (LABPAL: its momentum) in the groups, and
    each step uses the value its groups held when it began (LABPAL: outside measurements)."""
    opt, w, b, x = trained(info, kwargs, 0)
    scheduler = OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=40)
    key = "momentum" if isinstance(opt, LABPAL) else "betas"
    seen = set()
    for _ in range(12):
        group_beta1 = opt.param_groups[0][key] if key == "momentum" else opt.param_groups[0][key][0]
        measuring = getattr(opt, "measuring", False)
        take_step(opt, quadratic(w, b, x))
        if not (measuring or getattr(opt, "measuring", False)):
            assert used_beta1(opt) == group_beta1
        seen.add(group_beta1)
        scheduler.step()
    assert len(seen) > 1


@pytest.mark.parametrize("info, kwargs", DEFAULTS)
def test_add_param_group_with_reduce_lr_on_plateau(info, kwargs):
    w, b, x = small_problem()
    group, ctor = split_kwargs(info, kwargs)
    opt = info.optim_cls([{"params": [w], **group}], **ctor)
    scheduler = ReduceLROnPlateau(opt, patience=0, factor=0.5)
    loss_fn = quadratic(w, b, x)
    b_start = b.detach().clone()
    for i in range(12):
        if i == 4:
            opt.add_param_group({"params": [b], **group})
        step_schedulers([scheduler], take_step(opt, loss_fn))
    assert len(scheduler.get_last_lr()) == 2 and not torch.equal(b, b_start)


# -- swa_utils -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info, kwargs", DEFAULTS)
def test_swa_utils_alongside(info, kwargs):
    """``AveragedModel`` averages the trained weights, ``SWALR`` anneals the groups' lr, and
    ``update_bn`` recomputes the averaged model's BatchNorm statistics."""
    x, y = torch.rand(40, 5), torch.rand(40, 1)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    opt = info.optim_cls(model.parameters(), **kwargs)
    swa_model = AveragedModel(model)
    swa_lr = 0.5 * opt.param_groups[0]["lr"]
    scheduler = SWALR(opt, swa_lr=swa_lr, anneal_epochs=3)
    loss_fn = lambda: (model(x) - y).pow(2).mean()  # noqa: E731
    sums, n = [torch.zeros_like(p) for p in model.parameters()], 0
    for step in range(12):
        take_step(opt, loss_fn)
        if step >= 4:
            swa_model.update_parameters(model)
            scheduler.step()
            sums, n = [s + p.detach() for s, p in zip(sums, model.parameters())], n + 1
            assert scheduler.get_last_lr() == group_lrs(opt)
    assert group_lrs(opt) == pytest.approx([swa_lr], rel=4 * torch.finfo(torch.float32).eps)
    for s, p in zip(sums, swa_model.module.parameters()):  # a running mean: a rounding per update
        torch.testing.assert_close(p, s / n, rtol=0, atol=ulps(s / n, 4 * n))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    update_bn(loader, swa_model)
    with torch.no_grad():
        pre = swa_model.module[0](x)
    torch.testing.assert_close(swa_model.module[1].running_mean, pre.mean(0), rtol=0, atol=ulps(pre, 4 * len(x)))
    assert model.training and swa_model.training


# -- torch.compile -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("info, kwargs", DEFAULTS)
def test_compiled_step_matches_eager_without_recompiling(info, kwargs):
    """A compiled training step that defines the closure and calls ``opt.step(closure)`` (a graph
    break around the optimizer is fine) gives eager's parameters, to a rounding per step; once every
    path has run (the first 8 steps: searches, LABPAL's measurements and updates), nothing is
    compiled again: no recompile per step size, seed or counter."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import guard_failures

    torch._dynamo.reset()
    w, b, x = small_problem()
    w_c, b_c = clones(w, b)
    eager_opt, compiled_opt = info.optim_cls([w, b], **kwargs), info.optim_cls([w_c, b_c], **kwargs)

    def train_step(opt, w, b):
        if isinstance(opt, CLOSURE_OPTIMIZERS):

            def closure(backwards=False):
                loss = (w.mv(x) + b).pow(2).sum()
                if backwards:
                    loss.backward()
                return loss

        else:

            def closure():
                loss = (w.mv(x) + b).pow(2).sum()
                loss.backward()
                return loss

        opt.zero_grad()
        return opt.step(closure)

    counter = CompileCounter()
    compiled = torch.compile(train_step, backend=counter)

    def compiles():
        return counter.frame_count, {
            f"{c.co_name} ({c.co_filename}:{c.co_firstlineno})": list(r) for c, r in guard_failures.items()
        }

    try:
        with torch._dynamo.config.patch(recompile_limit=64):  # a recompile per step must not hide behind the limit
            for i in range(16):
                if i == 8:
                    warm = compiles()
                torch.manual_seed(i)
                train_step(eager_opt, w, b)
                torch.manual_seed(i)
                compiled(compiled_opt, w_c, b_c)
                for p, q in ((w, w_c), (b, b_c)):
                    torch.testing.assert_close(q, p, rtol=0, atol=ulps(p, 4 * (i + 1)))
        (frames_warm, recompiles_warm), (frames, recompiles) = warm, compiles()
        new = {k: r[len(recompiles_warm.get(k, [])) :] for k, r in recompiles.items()}
        new = {k: r for k, r in new.items() if r}
        assert frames == frames_warm and not new, (
            f"graphs compiled after warm-up: {frames_warm} -> {frames}; recompiles: {new}"
        )
    finally:
        torch._dynamo.reset()
