"""Closure randomness: one seed per step, drawn from torch's generator, shared by every call."""

import pytest
import torch
from conftest import cuda
from helpers import digits, max_abs_diff, pixel_lm, train
from torch import nn

from salsa_fast import SaLSA


def _recording_closure(model, record):
    x, y = digits()

    def closure(backwards=False):
        record.append(torch.rand(4))
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        if backwards:
            loss.backward()
        return loss

    return closure


def test_every_closure_call_of_a_step_sees_the_same_random_numbers():
    model = nn.Sequential(nn.Linear(64, 10))
    opt = SaLSA(model.parameters())
    per_step = []
    for _ in range(6):
        record = []
        opt.zero_grad()
        opt.step(_recording_closure(model, record))
        assert len(record) >= 2  # the early steps search
        assert all(torch.equal(r, record[0]) for r in record)
        per_step.append(record[0])
    assert not torch.equal(per_step[0], per_step[1])


def test_dropout_masks_are_identical_in_the_gradient_pass_and_the_trials():
    model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, 10))
    masks = []
    model[1].register_forward_hook(lambda mod, inp, out: masks.append(out == 0))
    opt = SaLSA(model.parameters())
    x, y = digits()

    def closure(backwards=False):
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        if backwards:
            loss.backward()
        return loss

    for _ in range(3):
        masks.clear()
        opt.zero_grad()
        opt.step(closure)
        assert len(masks) >= 2
        assert all(torch.equal(m, masks[0]) for m in masks)


def test_the_callers_generator_advances_by_exactly_one_draw_per_step():
    model = nn.Sequential(nn.Linear(64, 10))
    opt = SaLSA(model.parameters())
    torch.manual_seed(7)
    for _ in range(4):
        start = torch.get_rng_state()
        record = []
        opt.zero_grad()
        opt.step(_recording_closure(model, record))
        after = torch.get_rng_state()
        torch.set_rng_state(start)
        torch.empty((), dtype=torch.int64).random_()
        assert torch.equal(torch.get_rng_state(), after)
        torch.set_rng_state(after)


def test_runs_are_reproducible_with_dropout():
    a, b = pixel_lm(), pixel_lm()
    ra = train(a, SaLSA(a.parameters()), 15, kind="lm")
    rb = train(b, SaLSA(b.parameters()), 15, kind="lm")
    assert ra.calls == rb.calls and max_abs_diff(a, b) == 0.0


@cuda
def test_cuda_generator_is_forked_and_seeded():
    model = nn.Linear(8, 1).cuda()
    opt = SaLSA(model.parameters())
    x = torch.randn(16, 8, device="cuda")
    draws = []

    def closure(backwards=False):
        draws.append(torch.rand(3, device="cuda"))
        loss = (nn.functional.dropout(model(x), 0.5) ** 2).mean()
        if backwards:
            loss.backward()
        return loss

    state = torch.cuda.get_rng_state()
    opt.step(closure)
    assert all(torch.equal(d, draws[0]) for d in draws)
    assert torch.equal(torch.cuda.get_rng_state(), state)  # the CUDA stream was not advanced


pytestmark = pytest.mark.filterwarnings("error::UserWarning")
