"""state_dict: exact resume into fresh objects, torch's layout, weights_only checkpoints."""

import io

import pytest
import torch
from helpers import mlp, pixel_lm, train, without_scalars

from salsa_fast import SaLSA


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _make(kind, dtype, options, groups):
    model = pixel_lm(dtype) if kind == "lm" else mlp(dtype)
    if groups:
        params = list(model.parameters())
        params = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "lr": 0.5}]
    else:
        params = model.parameters()
    return model, SaLSA(params, **options)


CASES = {
    "default": ("digits", {}, False),
    "use_mv_groups": ("digits", dict(use_mv=True), True),
    "sgd": ("digits", dict(direction="sgd", init_step_size=0.1), False),
    "dropout_transformer": ("lm", {}, False),
}


@pytest.mark.parametrize("case", CASES)
def test_resume_at_step_40_equals_uninterrupted_run(case):
    kind, options, groups = CASES[case]
    dtype = torch.float32
    steps, cut = 80, 40

    model, opt = _make(kind, dtype, options, groups)
    full = train(model, opt, steps, kind, dtype)

    model, opt = _make(kind, dtype, options, groups)
    first = train(model, opt, cut, kind, dtype)
    checkpoint = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    del model, opt

    model, opt = _make(kind, dtype, options, groups)  # fresh objects
    for p in model.parameters():  # make sure nothing carries over by accident
        torch.nn.init.normal_(p.data)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    second = train(model, opt, steps - cut, kind, dtype, start=cut, rng_seed=None)

    for p, q in zip(full.model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert first.calls[-1] + second.calls[-1] == full.calls[-1]
    assert opt.stats == full.opt.stats
    _assert_states_equal(opt.state_dict(), full.opt.state_dict())


def _assert_states_equal(a, b):
    assert a["param_groups"][0]["salsa"] == b["param_groups"][0]["salsa"]
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])


def test_layout_is_torchs_per_index_layout():
    model = mlp()
    opt = SaLSA(model.parameters())
    train(model, opt, 3)
    sd = opt.state_dict()
    params = list(model.parameters())
    assert sd["param_groups"][0]["params"] == list(range(len(params)))
    for i, p in enumerate(params):
        assert set(sd["state"][i]) == {"exp_avg", "exp_avg_sq"}
        for t in sd["state"][i].values():
            assert t.shape == p.shape and t.dtype == torch.float32
    assert set(sd["param_groups"][0]["salsa"]) >= {
        "step_size",
        "steps",
        "decrease_avg",
        "norm_avg",
        "step_size_slow",
        "step_size_fast",
        "since_search",
    }
    assert sd["param_groups"][0]["lr"] == 1.0
    assert sd["param_groups"][0]["step_size"] == opt.step_size
    # only plain Python numbers outside the tensors: loads with weights_only=True
    _assert_states_equal(_roundtrip(sd), sd)


def test_sgd_direction_keeps_no_second_moment():
    model = mlp()
    opt = SaLSA(model.parameters(), direction="sgd")
    train(model, opt, 2)
    assert all(set(s) == {"exp_avg"} for s in opt.state_dict()["state"].values())


def test_bfloat16_parameters_keep_float32_state_through_a_checkpoint():
    model = mlp(torch.bfloat16)
    opt = SaLSA(model.parameters())
    train(model, opt, 5, dtype=torch.bfloat16)
    sd = _roundtrip(opt.state_dict())
    assert all(t.dtype == torch.float32 for s in sd["state"].values() for t in s.values())
    model2 = mlp(torch.bfloat16)
    opt2 = SaLSA(model2.parameters())
    opt2.load_state_dict(sd)
    _assert_states_equal(opt2.state_dict(), opt.state_dict())


def test_state_from_another_device_or_dtype_is_converted():
    """A checkpoint's tensors are copied into our buffers whatever their device/dtype (a GPU
    checkpoint loaded with map_location='cpu' is the common case)."""
    model = mlp(torch.float64)
    opt = SaLSA(model.parameters())
    train(model, opt, 4, dtype=torch.float64)
    sd = opt.state_dict()
    sd["state"] = {i: {k: v.float() for k, v in s.items()} for i, s in sd["state"].items()}
    opt2 = SaLSA(mlp(torch.float64).parameters())
    opt2.load_state_dict(sd)
    for i, s in opt2.state_dict()["state"].items():
        for k, v in s.items():
            assert v.dtype == torch.float64
            assert torch.equal(v, sd["state"][i][k].double())


def test_load_rejects_mismatched_checkpoints():
    model = mlp()
    opt = SaLSA(model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()

    with pytest.raises(ValueError, match="salsa"):
        SaLSA(mlp().parameters()).load_state_dict(without_scalars(sd, "salsa"))
    with pytest.raises(ValueError, match="number of parameter groups"):
        params = list(mlp().parameters())
        SaLSA([{"params": params[:1]}, {"params": params[1:]}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="size"):
        SaLSA(list(mlp().parameters())[:-1]).load_state_dict(sd)
    bad = dict(sd, state={**sd["state"], 0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}})
    with pytest.raises(ValueError, match="shape"):
        SaLSA(mlp().parameters()).load_state_dict(bad)
    sgd_sd = SaLSA(mlp().parameters(), direction="sgd").state_dict()
    with pytest.raises(ValueError, match="no 'exp_avg_sq'"):
        SaLSA(mlp().parameters()).load_state_dict(sgd_sd)


def test_load_state_dict_hooks_run():
    model = mlp()
    opt = SaLSA(model.parameters())
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("save"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["save", "pre", "post"]
