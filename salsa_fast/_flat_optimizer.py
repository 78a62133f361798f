"""The shell SaLSA and LABPAL share: parameters that own their storage, optimizer state in flat
buckets beside them (:mod:`salsa_fast.flat`), and everything around the algorithm itself.

:class:`FlatOptimizer` does the argument and param-group checks, (re)packs the buckets when the
groups or the parameters change, notices what changed behind the optimizer's back (a frozen
parameter, ``model.to(...)``, ``p.data = ...``), zeroes gradients, keeps registered modules'
buffers out of the extra forward passes, and saves and loads ``state_dict`` all-or-nothing.
An algorithm subclasses it, declares its scalars (a dataclass whose fields carry their own
checks, see :mod:`salsa_fast.checks`), its per-parameter state buffers (:meth:`_state_buffers`) and what
it rebuilds after a repack (:meth:`_on_repack`), and writes its ``step``.
"""

from __future__ import annotations

import math
import operator
import warnings
from contextlib import contextmanager
from dataclasses import asdict, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from . import backends
from .checks import SaLSAWarning, check, checked_scalars, is_real
from .closure import call_closure, check_closure
from .distributed import as_dtensor_like, local_part
from .flat import FlatBucket, ShardBucket

__all__ = ["FlatOptimizer"]

_requires_grad = operator.attrgetter("requires_grad")


# -- the shell -------------------------------------------------------------------------------------


class FlatOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` over flat buckets; see the module docstring.

    Subclasses set the class attributes below, call ``super().__init__(params, defaults)``
    after their own argument checks, set up what :meth:`_on_repack` needs, then call
    :meth:`_pack`.
    """

    name: ClassVar[str]  # in messages: "SaLSA", "LABPAL"
    entry: ClassVar[str]  # the state_dict entry of the algorithm's scalars: "salsa", "labpal"
    Scalars: ClassVar[type]  # the dataclass of those scalars (fields from count(), finite(), ...)
    global_keys: ClassVar[frozenset[str]]  # arguments that hold for all groups (not settable per group)
    per_group_hint: ClassVar[str]  # what may be set per group instead, for the message
    group_numbers: ClassVar[tuple[str, ...]] = ("lr",)  # per-group numbers, each a real >= 0
    shared_across_groups: ClassVar[tuple[str, ...]] = ()  # group keys that must agree in every group
    shards: ClassVar[bool] = False  # DTensor parameters get a ShardBucket (their local shard)
    keep_second_moment: ClassVar[bool] = False

    def __init__(self, params, defaults: dict[str, Any], *, backend: str, keep_backup: bool) -> None:
        check(backend in backends.NAMES, "backend", backend, f"must be one of {backends.NAMES}")
        check(isinstance(keep_backup, bool), "keep_backup", keep_backup, "must be a bool")
        self.backend_name = backend
        self.keep_backup = keep_backup
        self._ready = False  # False until the first pack: add_param_group then only checks
        self._warned: set[str] = set()
        self._preserved: list[nn.Module] = []
        self._in_search = False  # the line search is re-evaluating the closure
        self._in_closure = False  # a closure called by step() is running
        self._shared: dict[str, Any] = {}  # the shared group values last seen (_follow_shared)
        super().__init__(params, defaults)

    def _pack(self) -> None:
        """The end of a subclass's ``__init__``: build the buckets."""
        self._repack()
        self._follow_shared()
        for group in self.param_groups:
            group[self.entry] = self._scalars_entry()
        self._ready = True

    # -- param groups --------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Torch's, with the checks below made before anything changes."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        shared = sorted(self.global_keys.intersection(param_group))
        if shared:
            raise ValueError(f"param group sets {shared}: {self.per_group_hint}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):  # (torch rejects sets itself)
            params = list(params)
        if isinstance(params, list):
            if len(set(map(id, params))) != len(params):
                # torch only warns; packed twice, one of its two regions would go stale
                raise ValueError("a param group lists the same parameter twice")
            for p in params:
                if isinstance(p, torch.Tensor):
                    if p.is_sparse or p.layout != torch.strided:
                        raise RuntimeError(f"{self.name} does not support sparse parameters")
                    if not p.is_floating_point():
                        raise ValueError(f"{self.name} optimizes floating-point parameters, got one of dtype {p.dtype}")
            param_group = {**param_group, "params": params}
        self._check_group_values({**self.defaults, **param_group}, "param group")
        for key in self.shared_across_groups:
            if key in param_group and self.param_groups:
                self._check_shared(key, self.param_groups[0][key], param_group)
        super().add_param_group(param_group)
        self._init_group(self.param_groups[-1])
        if self._ready:
            self.param_groups[-1][self.entry] = self._scalars_entry()
            self._repack()

    def _check_group_values(self, group: dict[str, Any], where: str) -> None:
        """``ValueError`` for a bad per-group value among those ``group`` holds."""
        for key in self.group_numbers:
            if key in group:
                value = group[key]
                check(is_real(value) and 0 <= value < math.inf, f"{where} '{key}'", value, "must be a finite number >= 0")

    def _check_shared(self, key: str, value: Any, group: dict[str, Any]) -> None:
        if _plain(group[key]) != _plain(value):
            raise ValueError(
                f"param groups hold different {key} ({_plain(value)!r} and {_plain(group[key])!r}): "
                f"{self.name} uses one value for all groups"
            )

    def _follow_shared(self) -> None:
        """The per-group keys that must agree (``shared_across_groups``: e.g. the betas that a
        scheduler with ``cycle_momentum`` moves) follow the first group: every group must hold
        its value, and a new value is checked, then handed to :meth:`_on_shared`."""
        for key in self.shared_across_groups:
            value = _plain(self.param_groups[0][key])
            for g in self.param_groups[1:]:
                self._check_shared(key, value, g)
            if key not in self._shared or self._shared[key] != value:
                self._check_group_values(self.param_groups[0], "param group")
                self._on_shared(key, value)
                self._shared[key] = value

    def _on_shared(self, key: str, value: Any) -> None:
        """A shared per-group value is new (see :meth:`_follow_shared`)."""

    def _init_group(self, group: dict[str, Any]) -> None:
        """Entries the algorithm keeps in every group (e.g. the step size in use)."""

    # -- buckets -------------------------------------------------------------------------------
    def _state_buffers(self, b: FlatBucket) -> dict[str, torch.Tensor]:
        """The per-parameter state of a bucket as flat buffers laid out like it, by state key."""
        raise NotImplementedError

    def _on_repack(self) -> None:
        """Rebuild what depends on the buckets (called at the end of every repack)."""

    def _fold_pending_skips(self) -> None:
        """Count the steps the device skipped that the host has not read yet (one sync)."""

    def _repack(self) -> None:
        """(Re)build the flat buckets from the param groups, carrying per-parameter state over.

        Parameters that stop requiring grad leave the buffers; their state is parked (and saved
        in state_dict) until they are unfrozen, as torch's optimizers keep it.
        """
        if self._ready:
            self._fold_pending_skips()  # (the counts live with the devices, which may change)
        buckets: list[FlatBucket] = []
        for gi, group in enumerate(self.param_groups):
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.requires_grad:
                    kind = ShardBucket if self.shards and hasattr(p, "_local_tensor") else FlatBucket
                    by_key.setdefault((kind, p.device, p.dtype), []).append(p)
            for (kind, _, _), plist in by_key.items():
                buckets.append(kind(plist, gi, keep_second_moment=self.keep_second_moment, lean=not self.keep_backup))
        if not buckets:
            raise ValueError(f"{self.name} got no parameters that require grad")

        # the state entries are views made at the last repack, with the layout the parameters had
        # then: they read each element right even after a parameter changed its strides
        old_state = dict(self.state)
        self.state.clear()
        with torch.no_grad():
            for b in buckets:
                views = {key: b.views_of(flat) for key, flat in self._state_buffers(b).items()}
                for i, p in enumerate(b.params):
                    entry = {key: v[i] for key, v in views.items()}
                    for key, old in old_state.pop(p, {}).items():
                        if key in entry:
                            entry[key].copy_(old)
                    self.state[p] = entry
        in_groups = {p for g in self.param_groups for p in g["params"]}
        parked = {p: {k: t.detach().clone() for k, t in e.items()} for p, e in old_state.items() if p in in_groups}
        self.state.update(parked)

        self._buckets = buckets
        self._all_params = [p for g in self.param_groups for p in g["params"]]
        self._requires_grad = list(map(_requires_grad, self._all_params))
        self._cuda_devices = sorted({b.device.index or 0 for b in buckets if b.device.type == "cuda"})
        self._host_checks = all(b.device.type == "cpu" for b in buckets)  # reading a number is free
        self._backend = backends.resolve(self.backend_name, {b.device for b in buckets})
        self._on_repack()

    def _check_layout(self) -> None:
        """Notice what changed behind our back since the last step and repair it."""
        if list(map(_requires_grad, self._all_params)) != self._requires_grad:
            self._repack()  # a parameter was frozen or unfrozen
            return
        for b in self._buckets:
            if b.moved():
                if b.relaid():
                    self._repack()  # model.to(device/dtype) after the optimizer was built
                    return
                b.rebind()  # p.data = ... (same shape, device, dtype): read it where it is now

    def _begin_step(self, closure) -> None:
        """What every ``step`` starts with: the closure's contract, and the layout repaired."""
        check_closure(closure)
        if self._in_closure:
            raise RuntimeError(f"{self.name}.step() was called from inside its own closure")
        self._check_layout()
        self._follow_shared()

    def _call(self, closure, seed: int, backwards: bool):
        """Call the closure (see :func:`salsa_fast.closure.call_closure`): ``(its output, the
        loss)``; meanwhile ``step()`` refuses to run."""
        self._in_closure = True
        try:
            return call_closure(closure, seed, self._cuda_devices, backwards=backwards)
        finally:
            self._in_closure = False

    def _first_call(self, closure, seed: int, backwards: bool = True):
        """The step's own call of the closure (with backward: its gradients then brought into
        the flat buffers). If that raises, :meth:`_on_undo` takes back what the step changed
        before the call: nothing has moved yet."""
        try:
            out = self._call(closure, seed, backwards=backwards)
            if backwards:
                self._adopt_grads()
            return out
        except BaseException:
            self._on_undo()
            raise

    def _on_undo(self) -> None:
        """The step is undone before anything moved (see :meth:`_first_call`); an algorithm
        that changes its scalars before calling the closure puts them back here."""

    def _adopt_grads(self) -> None:
        """Bring gradients that are not the flat buffer's views into it (after a backward)."""
        for b in self._buckets:
            if not b.grads_intact():
                was_attached = b.grads_attached
                b.adopt_grads()
                if was_attached:
                    self._warn_once(
                        "grads",
                        "a parameter's .grad was replaced or set to None (e.g. by model.zero_grad()); "
                        f"{self.name} copies it back into its flat gradient buffer, which costs an extra "
                        "pass. Call optimizer.zero_grad() instead to keep the fast path",
                    )

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient with one memset per flat buffer.

        Gradients stay views into the optimizer's flat buffer (so ``set_to_none`` is ignored):
        autograd then accumulates into them in place. (Until the first step after the optimizer
        was built, gradients are autograd's own and are set to None.) Inside a closure the line
        search calls again this does nothing, so the search keeps the gradient it uses.
        """
        if self._in_search:
            return
        # First follow what changed since the last step: model.to(...) swaps the data of the
        # gradient tensors in place, so zeroing the old buffer would leave them stale.
        self._check_layout()
        for b in self._buckets:
            b.zero_grad()

    # -- the extra forward passes --------------------------------------------------------------
    def preserve_buffers(self, *modules: nn.Module) -> None:
        """Keep these modules' buffers as the gradient pass left them through the line search.

        A forward pass in train mode updates BatchNorm's running statistics (and any other
        buffer a forward pass writes). With the modules registered here, their buffers are
        snapshotted before the search's extra forward passes and restored after each, so a
        step updates them exactly once."""
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(f"preserve_buffers takes nn.Modules, got {type(module).__name__}")
            if module not in self._preserved:
                self._preserved.append(module)

    @contextmanager
    def _replaying(self):
        """The line search's extra forward passes: yields ``replay(closure, seed)``, which calls
        the closure without backward under ``seed`` and then puts the registered modules'
        buffers back as they were on entry. Meanwhile ``zero_grad()`` is a no-op and ``step()``
        refuses to run."""
        buffers = list({id(t): t for m in self._preserved for t in m.buffers()}.values())
        saved = [t.clone() for t in buffers]

        def replay(closure, seed: int):
            try:
                return self._call(closure, seed, backwards=False)
            finally:
                with torch.no_grad():
                    for t, v in zip(buffers, saved):
                        t.copy_(v)

        self._in_search = True
        try:
            yield replay
        finally:
            self._in_search = False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, SaLSAWarning, stacklevel=3)

    # -- state_dict ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch's layout: per-index state and param groups, every group also holding the
        algorithm's entry with every scalar of the run (the same in each group: torch's
        distributed checkpoint keeps only ``state`` and ``param_groups``, and its flattened form
        only what each parameter's group holds). Tensors in ``state`` are live views of the
        optimizer's buffers, as with torch's own optimizers (``torch.save`` copies them); those
        of DTensor parameters (FSDP2) are copies, as DTensors laid out like the parameters,
        which the distributed checkpoint can reshard."""
        self._fold_pending_skips()
        entry = self._scalars_entry()  # (its values immutable: a shallow copy per group is its own)
        for group in self.param_groups:  # (also the live groups': see _unflatten_optim_state_dict)
            group[self.entry] = dict(entry)
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group[self.entry] = dict(entry)  # (its own copy: a loader may fill it in place)
        # DTensors over copies: torch.save cannot write a DTensor whose local tensor is a view at
        # an offset (its pickling takes the wrapper for a plain tensor and reads a null storage)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, entry in list(sd["state"].items()):
            if hasattr(params[i], "device_mesh"):
                sd["state"][i] = {key: as_dtensor_like(params[i], v.clone()) for key, v in entry.items()}
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: resuming continues exactly as if never stopped.

        Everything is checked before anything changes (a bad checkpoint leaves the optimizer as
        it was). Tensors may come from another device (a GPU checkpoint loads on CPU) and are
        cast to the optimizer's state dtype.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"not a {self.name} state_dict: it has no {key!r} entry")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
            self._check_group_values(sg, "the state_dict's param group")
        scalars = checked_scalars(self.Scalars, self._saved_scalars(state_dict), self.entry)

        index_of = {p: i for g, sg in zip(self.param_groups, saved_groups) for p, i in zip(g["params"], sg["params"])}
        copies = []  # (our tensor, saved tensor or None for zeros): all checked before any is made
        for p, entry in self.state.items():
            saved = state_dict["state"].get(index_of[p])
            for key, target in entry.items():
                if saved is None:  # no state saved for it (e.g. it was frozen then)
                    copies.append((target, None))
                    continue
                value = saved.get(key)
                if value is None:
                    raise ValueError(f"the state of parameter {index_of[p]} has no {key!r}{self._missing_state_hint(key)}")
                value = local_part(p, value, f"state {key!r} of parameter {index_of[p]}")
                if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                    raise ValueError(
                        f"state {key!r} of parameter {index_of[p]} has shape "
                        f"{tuple(getattr(value, 'shape', ()))}, expected {tuple(target.shape)}"
                    )
                copies.append((target, value))
        with torch.no_grad():
            for target, value in copies:
                target.zero_() if value is None else target.copy_(value)
        for g, sg in zip(self.param_groups, saved_groups):
            g.update({k: v for k, v in sg.items() if k not in ("params", "param_names", self.entry)})
        self._scalars = scalars
        for g in self.param_groups:
            g[self.entry] = self._scalars_entry()
        self._shared.clear()
        self._follow_shared()
        self._on_load()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _scalars_entry(self) -> dict[str, Any]:
        """The run's scalars as a group holds them: numbers, flags, and lists written as text
        (``"0.25,0.5"``). Loading a full state dict, torch takes a list apart into its elements,
        drops an empty one and lays the rest over the loading optimizer's own list (a longer one
        would keep its tail): text comes through every way of saving whole."""
        return {k: ",".join(map(repr, v)) if isinstance(v, list) else v for k, v in asdict(self._scalars).items()}

    def _saved_scalars(self, state_dict: dict[str, Any]) -> Any:
        """The run's scalars in a state_dict: in every param group, alike (else at its top level,
        where checkpoints written before they moved into the groups hold them), lists read back."""
        in_groups = [sg.get(self.entry) for sg in state_dict["param_groups"]]
        if all(s is None for s in in_groups):
            if self.entry not in state_dict:
                raise ValueError(f"not a {self.name} state_dict: neither its param groups nor itself hold a {self.entry!r} entry")
            return state_dict[self.entry]
        if any(_plain_scalars(s) != _plain_scalars(in_groups[0]) for s in in_groups):
            raise ValueError(f"the state_dict's param groups hold different {self.entry!r} entries: they must be alike")
        saved = in_groups[0]
        if not isinstance(saved, dict):
            return saved  # (checked_scalars names it)
        lists = {f.name for f in fields(self.Scalars) if f.default_factory is list}
        return {k: _list_from_text(v, f"{self.entry!r} entry has {k}") if k in lists and isinstance(v, str) else v
                for k, v in saved.items()}  # fmt: skip

    def _missing_state_hint(self, key: str) -> str:
        return ""

    def _on_load(self) -> None:
        """Rebuild what depends on the loaded scalars."""


def _plain(value: Any) -> Any:
    """Lists as tuples (a checkpoint may turn a group's tuple into a list)."""
    return tuple(value) if isinstance(value, list) else value


def _list_from_text(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"the state_dict's {what}={text!r}: must be numbers separated by commas") from None


def _plain_scalars(saved: Any) -> Any:
    return {k: _plain(v) for k, v in saved.items()} if isinstance(saved, dict) else saved
