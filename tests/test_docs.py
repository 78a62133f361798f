"""The documentation cannot rot: every Python snippet of README.md and docs/ runs here (on a small
digits model, on CPU), or says right above it why it does not; the API reference names every
public name; every public name's docstring states its arguments.

A page's snippets run in order in one namespace, so a later snippet may use what an earlier one
defined. The namespace starts with what a snippet takes for granted (:func:`_prelude`): a
model, a loss function, a data set and a loader of a few batches, an ``inputs``/``targets``
batch, ``SaLSA`` and an ``optimizer`` of the model. A snippet that cannot run here (it needs a
GPU, ``torchrun``, or a framework's own training loop) is preceded by
``<!-- not run: REASON -->``, and its reason must name the test or script that covers it
instead.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]*\S)\s*-->\s*$")


def snippets(page: Path) -> list[dict]:
    """The page's Python snippets, in order: line, code, and why not run (None: it runs)."""
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = NOT_RUN.search(before)
        code = "\n".join(row[len(m["indent"]) :] for row in m["code"].splitlines())
        found.append(dict(line=line, code=code, not_run=skip["reason"] if skip else None))
    return found


def _prelude() -> dict:
    """What the snippets take for granted: a digits MLP, its loss, data set, loader and a batch,
    and a SaLSA optimizer of it."""
    from sklearn.datasets import load_digits

    from salsa_fast import SaLSA

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:256] / 16.0, dtype=torch.float32), torch.tensor(y[:256])
    train_set = torch.utils.data.TensorDataset(x, y)
    loader = list(torch.utils.data.DataLoader(train_set, batch_size=64))  # four batches
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    inputs, targets = loader[0]
    namespace = dict(torch=torch, nn=nn, F=nn.functional, loss_fn=nn.CrossEntropyLoss(), model=model)
    namespace.update(train_set=train_set, loader=loader, inputs=inputs, targets=targets)
    namespace.update(SaLSA=SaLSA, optimizer=SaLSA(model.parameters()))
    return namespace


def _cases():
    for page in PAGES:
        found = snippets(page)
        if found:
            yield pytest.param(page, found, id=str(page.relative_to(ROOT)))


@pytest.mark.parametrize("page,found", list(_cases()))
def test_every_snippet_runs_or_says_why_not(page, found, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (what a snippet writes, a checkpoint, lands here)
    namespace = _prelude()
    for s in found:
        if s["not_run"] is not None:
            assert re.search(r"tests/|benchmarks/|examples/", s["not_run"]), (
                f"{page.name}:{s['line']}: a snippet not run names what covers it instead"
            )
            continue
        try:
            exec(compile(s["code"], f"{page.name}:{s['line']}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, the snippet at line {s['line']}, raised {e!r}") from e


def test_the_pages_have_snippets_and_most_run():
    found = [s for page in PAGES for s in snippets(page)]
    ran = [s for s in found if s["not_run"] is None]
    assert len(found) >= 10 and len(ran) >= len(found) // 2


def _public():
    import salsa_fast
    from salsa_fast.integrations import lightning, log_values, transformers

    names = {f"salsa_fast.{n}": getattr(salsa_fast, n) for n in salsa_fast.__all__}
    names["salsa_fast.integrations.log_values"] = log_values
    names["salsa_fast.integrations.transformers.SaLSATrainer"] = transformers.SaLSATrainer
    names["salsa_fast.integrations.lightning.SaLSAMixin"] = lightning.SaLSAMixin
    return names


def test_the_api_reference_names_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^::: (\S+)", api, re.M))
    assert set(_public()) <= listed


def _documented_parameters(obj) -> list[str]:
    """The names of ``obj``'s parameters that its docstring (the class's, for a class) must state."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return []
    return [
        n for n, p in parameters.items() if n not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


@pytest.mark.parametrize("name", sorted(_public()))
def test_public_docstrings_state_every_argument(name):
    obj = _public()[name]
    doc = inspect.getdoc(obj) or ""
    assert len(doc) > 40, f"{name} has no docstring to speak of"
    if inspect.isclass(obj) and obj.__init__ is object.__init__:
        return
    if inspect.isclass(obj) and "__init__" not in vars(obj):
        return  # (a subclass that takes its base's arguments says so in its own words)
    missing = [p for p in _documented_parameters(obj) if p not in doc]
    assert not missing, f"{name}'s docstring does not state {missing}"


def test_every_member_the_api_reference_lists_has_a_docstring():
    api = (ROOT / "docs" / "api.md").read_text()
    listed = re.findall(r"^::: (\S+)\n    options:\n      members: \[([^\]]*)\]", api, re.M)
    assert len(listed) >= 3
    public = _public()
    for name, members in listed:
        for member in (m.strip() for m in members.split(",")):
            attr = inspect.getattr_static(public[name], member)
            doc = attr.__doc__ if isinstance(attr, property) else inspect.getdoc(getattr(public[name], member))
            assert doc and len(doc) > 20, f"{name}.{member} has no docstring"
