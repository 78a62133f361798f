"""Parameters that own their storage beside flat optimizer buffers (gradients as views into the
flat gradient buffer), and everything users do behind the optimizer's back: model.zero_grad(),
replaced .grad/.data, model.load_state_dict, model.to(), freezing, new param groups, unused
parameters, parameters no kernel can address directly."""

import warnings

import pytest
import torch
from helpers import convnet, digits, max_abs_diff, mlp, train
from torch import nn

from salsa_fast import SaLSA, SaLSAWarning, testing
from salsa_fast.salsa_reference import SaLSAReference


def _inside(t, flat):
    start = flat.data_ptr()
    end = start + flat.numel() * flat.element_size()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= end


def _own_storage(p):
    """``p`` is alone in its storage: savers that keep one tensor per storage keep it."""
    return p.untyped_storage().nbytes() == p.numel() * p.element_size()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parameters_own_their_storage_and_gradients_are_views(backend):
    model = mlp()
    where = [(p.data_ptr(), p.untyped_storage().data_ptr()) for p in model.parameters()]
    opt = SaLSA(model.parameters(), backend=backend)
    (bucket,) = testing.buckets(opt)
    assert all(p.grad is None for p in model.parameters())  # grads: views from the first step on
    train(model, opt, 12)
    # the optimizer wrote into the parameters in place: same tensors, same storages
    assert [(p.data_ptr(), p.untyped_storage().data_ptr()) for p in model.parameters()] == where
    assert all(_own_storage(p) for p in model.parameters())
    for p in model.parameters():
        assert _inside(p.grad, bucket.grad)
    opt.zero_grad(set_to_none=True)  # grads stay (zeroed) views: autograd accumulates into them
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any() and _inside(p.grad, bucket.grad)


def test_values_are_preserved_when_packing():
    model = convnet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    SaLSA(model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_channels_last_weights_keep_their_layout():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    stride = conv.weight.stride()
    opt = SaLSA(conv.parameters())
    assert conv.weight.stride() == stride
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)

    def closure(backwards=False):
        loss = conv(x).pow(2).mean()
        if backwards:
            loss.backward()
        return loss

    # the twin channels_last too, so both run the same convolution kernels (one for another
    # layout may sum in another order, by how much depends on the CPU) and only the optimizers'
    # roundings separate them: a few per element per step, against 13 ulps of the largest weight
    # (0.15) per step that atol=1e-6 allows over these 5 steps
    ref_conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    ref_conv.load_state_dict(conv.state_dict())
    ref = SaLSAReference(ref_conv.parameters())

    def ref_closure(backwards=False):
        loss = ref_conv(x).pow(2).mean()
        if backwards:
            loss.backward()
        return loss

    for _ in range(5):
        opt.zero_grad()
        opt.step(closure)
        ref.zero_grad()
        ref.step(ref_closure)
    assert conv.weight.stride() == stride and conv.weight.grad.stride() == stride
    assert torch.allclose(conv.weight, ref_conv.weight, atol=1e-6)


def test_model_zero_grad_is_detected_and_gives_the_same_result():
    a, b = mlp(torch.float64), mlp(torch.float64)
    ra = train(a, SaLSA(a.parameters()), 30, dtype=torch.float64)
    with pytest.warns(SaLSAWarning, match="model.zero_grad"):
        rb = train(b, SaLSA(b.parameters()), 30, dtype=torch.float64, zero_grad=b.zero_grad)
    assert ra.calls == rb.calls
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_replaced_grad_tensor_is_copied_in():
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters())
    x, y = digits(torch.float64)
    ref_model = mlp(torch.float64)
    ref = SaLSAReference(ref_model.parameters())

    def closure_for(m, replace):
        def closure(backwards=False):
            loss = nn.functional.cross_entropy(m(x[:64]), y[:64])
            if backwards:
                loss.backward()
                if replace:  # e.g. a hook that swaps in a processed gradient
                    for p in m.parameters():
                        p.grad = p.grad * 0.5
            return loss

        return closure

    with pytest.warns(SaLSAWarning, match="replaced"):
        for _ in range(5):
            opt.zero_grad()
            opt.step(closure_for(model, True))
            ref.zero_grad()
            ref.step(closure_for(ref_model, True))
    assert max_abs_diff(model, ref_model) <= 1e-12


def test_unused_parameters_get_a_zero_gradient():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(64, 10)
            self.unused = nn.Linear(64, 10)

        def forward(self, x):
            return self.used(x)

    def make():
        torch.manual_seed(0)
        return WithUnused().double()

    a, b = make(), make()
    before = [p.detach().clone() for p in a.unused.parameters()]
    ra = train(a, SaLSA(a.parameters()), 40, dtype=torch.float64)
    rb = train(b, SaLSAReference(b.parameters()), 40, dtype=torch.float64, zero_grad=b.zero_grad)
    assert ra.calls == rb.calls
    assert max_abs_diff(a, b) <= 1e-9
    assert all(torch.equal(p, q) for p, q in zip(a.unused.parameters(), before))


def test_model_load_state_dict_after_the_optimizer_was_built():
    trained = mlp(torch.float64, seed=3)
    train(trained, SaLSA(trained.parameters()), 20, dtype=torch.float64)

    late = mlp(torch.float64)
    opt = SaLSA(late.parameters())
    late.load_state_dict(trained.state_dict())  # copies into the flat buffer in place
    early = mlp(torch.float64)
    early.load_state_dict(trained.state_dict())
    ref = SaLSAReference(early.parameters())
    ra = train(late, opt, 30, dtype=torch.float64)
    rb = train(early, ref, 30, dtype=torch.float64)
    assert ra.calls == rb.calls and max_abs_diff(late, early) <= 1e-9


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replaced_param_data_is_followed(backend):
    """``p.data = new`` between steps: the optimizer reads and writes the new tensor (the Triton
    backend rebuilds its parameter table), with the same results as changing the values in place."""
    a, b = mlp(torch.float64), mlp(torch.float64)
    opt_a, opt_b = SaLSA(a.parameters(), backend=backend), SaLSA(b.parameters(), backend=backend)
    train(a, opt_a, 15, dtype=torch.float64)
    train(b, opt_b, 15, dtype=torch.float64)
    with torch.no_grad():
        for p in a.parameters():
            p.data = p.data * 0.5  # a new tensor
        for p in b.parameters():
            p.mul_(0.5)  # in place
    new = [p.data_ptr() for p in a.parameters()]
    ra = train(a, opt_a, 15, dtype=torch.float64, start=15)
    rb = train(b, opt_b, 15, dtype=torch.float64, start=15)
    assert ra.calls == rb.calls
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [p.data_ptr() for p in a.parameters()] == new


def test_replaced_param_data_of_another_shape_is_refused():
    model = mlp()
    opt = SaLSA(model.parameters())
    train(model, opt, 2)
    model[0].bias.data = torch.zeros(5)
    with pytest.raises(ValueError, match="shape changed"):
        train(model, opt, 1, start=2)


def test_model_to_another_dtype_after_the_optimizer_was_built():
    model = mlp()
    opt = SaLSA(model.parameters())
    train(model, opt, 10)
    before = [{k: v.clone() for k, v in s.items()} for s in opt.state_dict()["state"].values()]
    model.double()
    train(model, opt, 1, dtype=torch.float64, start=10)  # repacks, then steps
    assert [b.dtype for b in testing.buckets(opt)] == [torch.float64]
    assert all(p.dtype == torch.float64 and _own_storage(p) for p in model.parameters())
    # the moments came along (fp32 -> fp64 is exact), then took one Adam update with this
    # step's gradient (still in p.grad: the trials run without backward). fp64, about three
    # roundings: rtol 1e-12; atol 1e-15 (moments ~1e-2) for elements where the terms cancel
    after = opt.state_dict()["state"].values()
    for p, old, new in zip(model.parameters(), before, after):
        g = p.grad
        assert new["exp_avg"].dtype == new["exp_avg_sq"].dtype == torch.float64
        torch.testing.assert_close(new["exp_avg"], old["exp_avg"].double() * 0.9 + 0.1 * g, rtol=1e-12, atol=1e-15)
        v = old["exp_avg_sq"].double() * 0.999 + 0.001 * g * g  # (no cancellation: terms >= 0)
        torch.testing.assert_close(new["exp_avg_sq"], v, rtol=1e-12, atol=0)
    r = train(model, opt, 20, dtype=torch.float64, start=11)
    assert r.losses[-1] < r.losses[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_memory_format_change_mid_training_keeps_each_moment_with_its_element(backend):
    """``model.to(memory_format=channels_last)`` after 10 steps reorders every conv weight's
    memory: the optimizer repacks and each moment follows its element, so it goes on exactly as
    the reference twin (which keeps per-parameter state) on a model converted the same way."""
    a, b = convnet(torch.float64), convnet(torch.float64)
    opt_a, opt_b = SaLSA(a.parameters(), backend=backend), SaLSAReference(b.parameters())
    train(a, opt_a, 10, dtype=torch.float64)
    train(b, opt_b, 10, dtype=torch.float64)
    stride = a.conv1.weight.stride()
    a.to(memory_format=torch.channels_last)
    b.to(memory_format=torch.channels_last)
    assert a.conv1.weight.stride() != stride
    ra = train(a, opt_a, 20, dtype=torch.float64, start=10)
    rb = train(b, opt_b, 20, dtype=torch.float64, start=10)
    assert ra.calls == rb.calls
    assert max_abs_diff(a, b) <= 1e-12
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(opt_a.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"], rtol=1e-12, atol=0)


class _StridedLinear(nn.Module):
    """A linear layer whose weight is a strided view (every other column of a wider tensor):
    no kernel can walk it as one run of memory."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(3)
        self.weight = nn.Parameter((torch.randn(10, 128, dtype=dtype) * 0.1)[:, ::2])
        self.bias = nn.Parameter(torch.zeros(10, dtype=dtype))

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_parameter_trains_like_the_reference(backend):
    a, b = _StridedLinear(torch.float64), _StridedLinear(torch.float64)
    assert not a.weight.is_contiguous()
    ra = train(a, SaLSA(a.parameters(), backend=backend), 25, dtype=torch.float64)
    rb = train(b, SaLSAReference(b.parameters()), 25, dtype=torch.float64)
    assert ra.calls == rb.calls
    assert max_abs_diff(a, b) <= 1e-12
    assert a.weight.stride() == (128, 2)


def test_freezing_and_unfreezing_mid_training():
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters())
    train(model, opt, 10, dtype=torch.float64)
    first = model[0]
    m_saved = opt.state[first.weight]["exp_avg"].clone()
    v_saved = opt.state[first.weight]["exp_avg_sq"].clone()
    first.requires_grad_(False)
    frozen = first.weight.detach().clone()
    train(model, opt, 10, dtype=torch.float64, start=10)
    assert torch.equal(first.weight, frozen)
    assert torch.equal(opt.state[first.weight]["exp_avg"], m_saved)  # parked, as torch keeps it
    assert 0 in opt.state_dict()["state"]
    first.requires_grad_(True)
    train(model, opt, 1, dtype=torch.float64, start=20)
    assert not torch.equal(first.weight, frozen)
    # its moments were kept while frozen, then took one Adam update with this step's gradient
    # (fp64, about three roundings: rtol 1e-12; atol 1e-15, moments ~1e-2, for cancellations)
    g = first.weight.grad
    torch.testing.assert_close(opt.state[first.weight]["exp_avg"], m_saved * 0.9 + 0.1 * g, rtol=1e-12, atol=1e-15)
    v = v_saved * 0.999 + 0.001 * g * g  # (no cancellation: terms >= 0)
    torch.testing.assert_close(opt.state[first.weight]["exp_avg_sq"], v, rtol=1e-12, atol=0)


def test_add_param_group_mid_training():
    def run(optimizer):
        model = mlp(torch.float64)
        head = list(model.parameters())[-2:]
        body = list(model.parameters())[:-2]
        for p in body:
            p.requires_grad_(True)
        opt = optimizer(head)
        train(model, opt, 10, dtype=torch.float64)
        frozen_body = [p.detach().clone() for p in body]
        opt.add_param_group({"params": body, "lr": 0.5})
        r = train(model, opt, 10, dtype=torch.float64, start=10)
        assert not all(torch.equal(p, q) for p, q in zip(body, frozen_body))
        return model, opt, r

    model, opt, r = run(SaLSA)
    ref_model, _, ref_r = run(SaLSAReference)  # the twin: per-parameter state, lazily created
    assert len(testing.buckets(opt)) == 2
    # the head keeps its moments, the body starts from zero moments at lr 0.5: the same closure
    # calls and parameters as the twin (fp64, 20 steps: 1e-12, as the other twin comparisons)
    assert r.calls == ref_r.calls
    assert max_abs_diff(model, ref_model) <= 1e-12


def test_zero_grad_inside_the_closure_does_not_break_the_search():
    """LBFGS-style closures zero the gradients themselves; during a trial that would wipe the
    gradient the search is using, so the optimizer ignores it there."""

    def run(inside):
        model = mlp(torch.float64)
        opt = SaLSA(model.parameters())
        x, y = digits(torch.float64)
        calls = 0
        for step in range(25):
            xb, yb = x[step * 40 : step * 40 + 40], y[step * 40 : step * 40 + 40]

            def closure(backwards=False, xb=xb, yb=yb):
                nonlocal calls
                calls += 1
                if inside:
                    opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                if backwards:
                    loss.backward()
                return loss

            if not inside:
                opt.zero_grad()
            opt.step(closure)
        return model, calls

    a, calls_a = run(True)
    b, calls_b = run(False)
    assert calls_a == calls_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_gradient_accumulation_inside_the_closure():
    def run(micro):
        model = mlp(torch.float64)
        opt = SaLSA(model.parameters())
        x, y = digits(torch.float64)
        for step in range(15):
            xb, yb = x[step * 64 : step * 64 + 64], y[step * 64 : step * 64 + 64]

            def closure(backwards=False, xb=xb, yb=yb):
                if not backwards:
                    return nn.functional.cross_entropy(model(xb), yb)
                total = 0.0
                for xs, ys in zip(xb.chunk(micro), yb.chunk(micro)):
                    loss = nn.functional.cross_entropy(model(xs), ys) / micro
                    loss.backward()
                    total = total + loss.detach()
                return total

            opt.zero_grad()
            opt.step(closure)
        return model

    assert max_abs_diff(run(1), run(4)) <= 1e-9


def test_no_warning_on_the_fast_path():
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, SaLSA(model.parameters()), 20)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _bn_step(preserve):
    torch.manual_seed(0)
    model = _BNNet()
    opt = SaLSA(model.parameters(), init_step_size=30.0)  # several trials per search
    if preserve:
        opt.preserve_buffers(model)
    x, y = digits()
    xb, yb = x[:64], y[:64]

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(model(xb), yb)
        if backwards:
            loss.backward()
        return loss

    # what one train-mode forward of this batch does to the statistics
    expected = nn.BatchNorm1d(32)
    expected.load_state_dict(model.bn.state_dict())
    with torch.no_grad():
        expected(model.fc1(xb))
    opt.step(closure)
    assert opt.last_step.trials > 1
    return model.bn, expected


def test_preserve_buffers_keeps_batchnorm_statistics_out_of_the_trials():
    bn, expected = _bn_step(preserve=True)
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_without_preserve_buffers_trials_update_the_statistics():
    bn, expected = _bn_step(preserve=False)
    assert int(bn.num_batches_tracked) > 1  # as in the published package
    assert not torch.equal(bn.running_mean, expected.running_mean)


def test_preserve_buffers_takes_modules():
    opt = SaLSA(mlp().parameters())
    with pytest.raises(TypeError, match="nn.Modules"):
        opt.preserve_buffers(torch.zeros(3))
