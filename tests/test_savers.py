"""The ecosystem's savers keep every parameter after training with SaLSA or LABPAL.

Savers that write safetensors (accelerate's ``save_state`` and ``save_model``, safetensors'
``save_model``) keep one tensor per storage, taking tensors that share one for tied weights. The
optimizers therefore leave every parameter in its own storage; these tests train with each
optimizer, torch's Adam as the control, and read back what the savers wrote.
"""

import os

import pytest
import torch
from helpers import batches, digits, make_closure, mlp, step_with
from torch import nn

from salsa_fast import LABPAL, SaLSA

safetensors_torch = pytest.importorskip("safetensors.torch")
accelerate = pytest.importorskip("accelerate")

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "salsa": lambda params: SaLSA(params),
    "labpal": lambda params: LABPAL(params, training_set_size=1797, batch_size=64, reuse_steps=5, measure_batches=2),
}


def _train(model, opt, steps=12):
    """Steps of the optimizer on digits batches (closures bind their own batch, as LABPAL needs)."""
    plan = batches(len(digits()[0]), steps)
    for idx in plan:
        closure = make_closure(model, "digits", idx, torch.float32, [0])
        step_with(opt, closure)


def _trained(name):
    model = mlp(hidden=40)
    opt = OPTIMIZERS[name](model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after), "training changed nothing"
    return model, opt


def _assert_all_saved(path, model):
    saved = safetensors_torch.load_file(path)
    expected = model.state_dict()
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accelerate_save_state_and_save_model_keep_every_parameter(name, tmp_path):
    acc = accelerate.Accelerator(cpu=True)
    model = mlp(hidden=40)
    model, opt = acc.prepare(model, OPTIMIZERS[name](model.parameters()))
    _train(model, opt)
    acc.save_state(str(tmp_path / "state"))
    _assert_all_saved(tmp_path / "state" / "model.safetensors", acc.unwrap_model(model))
    acc.save_model(model, str(tmp_path / "model"))
    _assert_all_saved(tmp_path / "model" / "model.safetensors", acc.unwrap_model(model))
    assert os.path.exists(tmp_path / "state" / "optimizer.bin")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_safetensors_save_model_writes_every_parameter(name, tmp_path):
    model, _ = _trained(name)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))  # refuses tensors that share a storage
    _assert_all_saved(path, model)
    fresh = mlp(hidden=40, seed=5)
    safetensors_torch.load_model(fresh, str(path))
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_torch_save_of_one_weight_writes_that_weight(name, tmp_path):
    model, _ = _trained(name)
    bias = model[2].bias  # 10 elements of a 64*40 + 40 + 40*10 + 10 parameter model
    path = tmp_path / "bias.pt"
    torch.save(bias, path)
    assert os.path.getsize(path) < 2048  # the 40 bytes of data and the pickle around them
    assert torch.equal(torch.load(path, weights_only=True), bias)


@pytest.mark.parametrize("name", ["salsa", "labpal"])
def test_no_two_parameters_share_a_storage(name):
    model, _ = _trained(name)
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
