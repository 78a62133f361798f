"""The shell SaLSA and LABPAL share (salsa_fast._flat_optimizer): every bad input is refused by
both, alike, and leaves the optimizer exactly as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import as_previous_release, mlp, train, with_scalars

from salsa_fast import LABPAL, SaLSA, testing
from salsa_fast.backends import Backend, torch_ops

OPTIMIZERS = {
    "SaLSA": lambda params: SaLSA(params),
    "LABPAL": lambda params: LABPAL(params, measure_batches=2, reuse_steps=5, warmup_updates=3),
}
# what each saves in its entry, a float that must be finite and > 0, and a counter
ENTRY = {"SaLSA": ("salsa", "step_size", "steps"), "LABPAL": ("labpal", "step_size", "calls")}
# the scalars the previous release saved under other names: {name now: name then}
RENAMED = {"SaLSA": {"steps": "step"}, "LABPAL": {"step_size": "step", "accumulation": "k"}}


@pytest.fixture(params=list(OPTIMIZERS))
def name(request):
    return request.param


def _trained(name, steps=12):
    model = mlp(torch.float64)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, steps, dtype=torch.float64)
    return model, opt


def _everything(model, opt):
    """The parameters, the optimizer's state_dict (deep-copied) and its param groups."""
    sd = opt.state_dict()
    return (
        [p.detach().clone() for p in model.parameters()],
        {
            k: copy.deepcopy(v) if k != "state" else {i: {n: t.clone() for n, t in e.items()} for i, e in v.items()}
            for k, v in sd.items()
        },
    )


def _assert_same(before, model, opt):
    params, sd = before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = opt.state_dict()
    assert now.keys() == sd.keys()
    for key in sd:
        if key == "state":
            assert now["state"].keys() == sd["state"].keys()
            for i, entry in sd["state"].items():
                assert all(torch.equal(now["state"][i][n], t) for n, t in entry.items())
        else:
            assert now[key] == sd[key], key


# -- construction and param groups ------------------------------------------------------------------


def test_a_parameter_listed_twice_is_refused(name):
    model = mlp()
    p = next(model.parameters())
    with pytest.raises(ValueError, match="same parameter twice"):
        OPTIMIZERS[name]([p, p])
    opt = OPTIMIZERS[name](list(model.parameters())[:2])
    q = list(model.parameters())[2]
    with pytest.raises(ValueError, match="same parameter twice"):
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1 and len(opt.state) == 2


def test_a_parameter_in_two_groups_is_refused(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [next(model.parameters())]})
    assert len(opt.param_groups) == 1


def test_non_float_parameters_are_refused(name):
    with pytest.raises(ValueError, match="floating-point parameters"):
        OPTIMIZERS[name]([torch.zeros(3, dtype=torch.int64)])


def test_sparse_parameters_are_refused(name):
    with pytest.raises(RuntimeError, match="sparse parameters"):
        OPTIMIZERS[name]([torch.zeros(3, 3).to_sparse().requires_grad_()])


def test_a_group_that_is_not_a_dict_is_refused(name):
    model = mlp()
    opt = OPTIMIZERS[name](list(model.parameters())[:2])
    with pytest.raises(TypeError, match="param_group must be a dict"):
        opt.add_param_group(list(model.parameters())[2:])
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("lr", [-1.0, math.nan, math.inf, "0.1", True])
def test_a_bad_group_lr_is_refused_before_anything_changes(name, lr):
    model = mlp()
    opt = OPTIMIZERS[name](list(model.parameters())[:2])
    with pytest.raises(ValueError, match="param group 'lr'"):
        opt.add_param_group({"params": list(model.parameters())[2:], "lr": lr})
    assert len(opt.param_groups) == 1 and len(opt.state) == 2  # (torch's would have appended it)


def test_global_hyperparameters_cannot_be_set_per_group(name):
    model = mlp()
    key = {"SaLSA": "eps", "LABPAL": "weight_decay"}[name]
    with pytest.raises(ValueError, match=rf"param group sets \['{key}'\]"):
        OPTIMIZERS[name]([{"params": model.parameters(), key: 0.1}])


def test_the_shared_group_value_must_agree_across_groups(name):
    model = mlp()
    key, value = {"SaLSA": ("betas", (0.8, 0.99)), "LABPAL": ("momentum", 0.5)}[name]
    layers = list(model.parameters())
    with pytest.raises(ValueError, match=f"param groups hold different {key}"):
        OPTIMIZERS[name]([{"params": layers[:2]}, {"params": layers[2:], key: value}])
    opt = OPTIMIZERS[name]([{"params": layers[:2], key: value}, {"params": layers[2:], key: value}])
    assert opt.param_groups[1][key] == value
    opt.param_groups[1][key] = opt.defaults[key]  # out of step with group 0: refused at the next step
    with pytest.raises(ValueError, match=f"param groups hold different {key}"):
        train(model, opt, 1)


def test_no_parameters_or_none_that_requires_grad(name):
    with pytest.raises(ValueError, match="empty parameter list"):
        OPTIMIZERS[name]([])
    # every parameter frozen (for now) is fine, as for torch's optimizers (tests/test_drop_in.py)
    opt = OPTIMIZERS[name](torch.nn.Linear(2, 2).requires_grad_(False).parameters())
    assert opt.state_dict()["state"] == {}


def test_step_inside_its_own_closure(name):
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())

    def closure(backwards=True):
        opt.step(closure)

    with pytest.raises(RuntimeError, match=r"step\(\) was called from inside its own closure"):
        opt.step(closure)
    train(model, opt, 3)  # and nothing is left stuck


def test_sparse_gradients_are_refused_with_nothing_changed(name):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Flatten(), torch.nn.Linear(8, 1))
    opt = OPTIMIZERS[name](model.parameters())
    before = _everything(model, opt)

    def closure(backwards=True):
        loss = model(torch.tensor([[1, 2]])).pow(2).sum()
        if backwards:
            loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step(closure)
    _assert_same(before, model, opt)


# -- checkpoints ------------------------------------------------------------------------------------


def _bad_values(name):
    """(entry field, bad value) for every scalar the entry holds."""
    from dataclasses import fields

    opt = OPTIMIZERS[name]([torch.zeros(2, requires_grad=True)])
    cases = []
    for f in fields(opt.Scalars):
        value = getattr(testing.scalars(opt), f.name)
        if isinstance(value, bool):
            cases += [(f.name, "yes")]
        elif isinstance(value, int):
            cases += [(f.name, -1), (f.name, 1.5)] + (
                [(f.name, 0)] if f.name == "accumulation" else []
            )  # (LABPAL's >= 1)
        elif isinstance(value, list):
            cases += [(f.name, [1.0, math.nan]), (f.name, [-0.5]), (f.name, "1.0,nan"), (f.name, "0.5;0.25")]
        else:  # a float (or None until set)
            cases += [(f.name, math.nan), (f.name, math.inf), (f.name, -1.0)]
    return cases


@pytest.mark.parametrize("which", ["SaLSA", "LABPAL"])
def test_every_bad_checkpoint_scalar_is_refused_with_nothing_changed(which):
    model, opt = _trained(which)
    entry = ENTRY[which][0]
    good = opt.state_dict()
    before = _everything(model, opt)
    cases = _bad_values(which)
    assert len(cases) >= 20
    for field_name, value in cases:
        if field_name == "decrease_avg" and value == -1.0:
            continue  # (a smoothed decrease may be any finite number)
        sd = with_scalars(good, entry, **{field_name: value})
        with pytest.raises(ValueError, match=rf"'{entry}' entry has {field_name}="):
            opt.load_state_dict(sd)
        _assert_same(before, model, opt)


def test_nan_step_size_and_negative_step_count(name):
    model, opt = _trained(name)
    entry, size, counter = ENTRY[name]
    good = opt.state_dict()
    before = _everything(model, opt)
    with pytest.raises(ValueError, match=f"{size}=nan"):
        opt.load_state_dict(with_scalars(good, entry, **{size: math.nan}))
    with pytest.raises(ValueError, match=f"{counter}=-1"):
        opt.load_state_dict(with_scalars(good, entry, **{counter: -1}))
    _assert_same(before, model, opt)
    # and the optimizer trains on exactly as one that never saw the bad checkpoints
    twin_model, twin = _trained(name)
    train(model, opt, 6, dtype=torch.float64, start=12)
    train(twin_model, twin, 6, dtype=torch.float64, start=12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


@pytest.mark.parametrize("key,value", [("lr", math.nan), ("lr", -0.5)])
def test_a_bad_group_value_in_a_checkpoint_is_refused(name, key, value):
    model, opt = _trained(name)
    good = opt.state_dict()
    before = _everything(model, opt)
    groups = [{**g, key: value} for g in good["param_groups"]]
    with pytest.raises(ValueError, match=f"param group '{key}'"):
        opt.load_state_dict({**good, "param_groups": groups})
    _assert_same(before, model, opt)


def test_a_state_of_the_wrong_shape_is_refused_with_nothing_changed(name):
    model, opt = _trained(name)
    good = opt.state_dict()
    before = _everything(model, opt)
    state = {i: dict(e) for i, e in good["state"].items()}
    last = max(state)
    key = next(iter(state[last]))
    state[last][key] = torch.zeros(7)
    with pytest.raises(ValueError, match=f"state '{key}' of parameter {last}"):
        opt.load_state_dict({**good, "state": state})
    _assert_same(before, model, opt)


def test_a_checkpoint_of_the_other_optimizer_is_refused(name):
    other = "LABPAL" if name == "SaLSA" else "SaLSA"
    _, source = _trained(other)
    model, opt = _trained(name)
    before = _everything(model, opt)
    with pytest.raises(ValueError, match=f"not a {name} state_dict"):
        opt.load_state_dict(source.state_dict())
    _assert_same(before, model, opt)


# -- backends -----------------------------------------------------------------------------------------


def test_both_backends_implement_the_protocol():
    from salsa_fast.backends import triton_ops

    members = [n for n in Backend.__dict__ if not n.startswith("_")] + ["name"]
    for module in (torch_ops, triton_ops):
        missing = [n for n in members if not hasattr(module, n)]
        assert not missing, (module.__name__, missing)


def test_no_module_of_the_package_is_over_500_lines():
    from pathlib import Path

    import salsa_fast

    root = Path(salsa_fast.__file__).parent
    sizes = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert len(sizes) > 20 and not {m: n for m, n in sizes.items() if n > 500}


def _package_trees():
    import ast
    from pathlib import Path

    import salsa_fast

    root = Path(salsa_fast.__file__).parent
    return {str(p.relative_to(root)): ast.parse(p.read_text()) for p in root.rglob("*.py")}


def test_every_function_of_the_package_reads_at_a_glance():
    """No function or method is longer than 45 lines, ``def`` to its last line, docstring
    included; the reference twins, written as the papers state the algorithms, aside."""
    import ast

    lengths = {
        f"{module}:{node.name}": node.end_lineno - node.lineno + 1
        for module, tree in _package_trees().items()
        if not module.endswith("_reference.py")
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    assert len(lengths) > 200 and {name: n for name, n in lengths.items() if n > 45} == {}


def test_keep_backup_is_decided_in_few_places():
    """Whether a search keeps a backup is chosen once (the line object, at repack), not branched
    on by the steps."""
    import ast

    def mentions(node):
        return any(isinstance(n, (ast.Name, ast.Attribute)) and "keep_backup" in ast.unparse(n) for n in ast.walk(node))

    branches = [
        f"{module}:{node.lineno}"
        for module, tree in _package_trees().items()
        if not module.endswith("_reference.py")
        for node in ast.walk(tree)
        if isinstance(node, (ast.If, ast.IfExp, ast.While)) and mentions(node.test)
    ]
    assert len(branches) <= 3, branches


def test_a_checkpoint_of_the_previous_layout_loads_and_resumes_exactly(name):
    """Checkpoints written before the groups held ``betas`` (SaLSA) or ``momentum`` (LABPAL),
    and the run's scalars (they were a top-level entry, SaLSA's with ``step`` for ``steps``,
    LABPAL's with ``step`` and ``k`` for ``step_size`` and ``accumulation``)."""
    key = {"SaLSA": "betas", "LABPAL": "momentum"}[name]
    entry = ENTRY[name][0]
    model, opt = _trained(name)
    _, old = _everything(model, opt)  # (a copy: the state's tensors are live views)
    old = as_previous_release(old, entry)
    old[entry] = {RENAMED[name].get(k, k): v for k, v in old[entry].items()}
    assert set(RENAMED[name].values()) <= set(old[entry])
    old["param_groups"] = [{k: v for k, v in g.items() if k != key} for g in old["param_groups"]]
    twin_model, twin = _trained(name, steps=3)  # (other scalars than the checkpoint's)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(old)
    assert twin.param_groups[0][key] == opt.param_groups[0][key]
    assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    train(model, opt, 6, dtype=torch.float64, start=12)
    train(twin_model, twin, 6, dtype=torch.float64, start=12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
    assert twin.stats == opt.stats


def test_param_groups_that_hold_different_scalars_are_refused(name):
    entry, size, _ = ENTRY[name]
    model, opt = _trained(name)
    sd = opt.state_dict()
    groups = [{"params": [p]} for p in model.parameters()]
    two = type(opt)(groups)
    two_sd = two.state_dict()
    two_sd["param_groups"][1][entry] = {**two_sd["param_groups"][1][entry], size: 0.5}
    with pytest.raises(ValueError, match=f"different '{entry}' entries"):
        two.load_state_dict(two_sd)
    assert sd["param_groups"][0][entry] == opt.param_groups[0][entry]  # the live groups hold the last copy
