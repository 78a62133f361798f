"""The shell SaLSA and LABPAL share: parameters that own their storage, optimizer state in flat
buckets beside them (:mod:`salsa_fast.flat`), and everything around the algorithm itself.

:class:`FlatOptimizer` does the argument and param-group checks, (re)packs the buckets when the
groups or the parameters change, notices what changed behind the optimizer's back (a frozen
parameter, ``model.to(...)``, ``p.data = ...``), zeroes gradients, keeps registered modules'
buffers out of the extra forward passes, makes copies that step (``copy.deepcopy``, pickle),
and saves and loads ``state_dict`` all-or-nothing (:mod:`salsa_fast._state_dict`). An
algorithm subclasses it, declares its scalars (a dataclass whose fields carry their own checks,
see :mod:`salsa_fast.checks`), its per-parameter state buffers (:meth:`_state_buffers`), what it
rebuilds after a repack (:meth:`_on_repack`) and what a copy rebuilds (:meth:`_transient`), and
writes its ``step``.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from . import backends
from ._state_dict import StateDictMixin
from ._state_dict import plain as _plain
from .checks import check, is_real, warn
from .closure import call_closure, check_closure, draw_seed
from .flat import FlatBucket, ShardBucket

__all__ = ["FlatOptimizer"]

_requires_grad = operator.attrgetter("requires_grad")


# -- the shell -------------------------------------------------------------------------------------


class FlatOptimizer(StateDictMixin, Optimizer):
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
        self._warned: set[str] = set()
        self._preserved: list[nn.Module] = []
        self.__dict__.update(self._transient())
        super().__init__(params, defaults)

    def _transient(self) -> dict[str, Any]:
        """The attributes a copy rebuilds instead of copying (see :meth:`__getstate__`), with
        the values they start from; the buckets and what comes with them are made by the pack."""
        return {
            "_ready": False,  # False until the first pack: add_param_group then only checks
            "_in_search": False,  # the line search is re-evaluating the closure
            "_in_closure": False,  # a closure called by step() is running
            "_shared": {},  # the shared group values last seen (_follow_shared)
            "_buckets": [],
            "_all_params": [],
            "_requires_grad": [],
            "_cuda_devices": [],
            "_host_checks": True,
            "_backend": None,
        }

    # -- copies: copy.deepcopy, pickle, torch.save(optimizer) ------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Everything but what a copy rebuilds: the arguments, the run's scalars, ``state`` and
        ``param_groups`` (torch keeps only the last two and ``defaults``, and drops the hooks, as
        here). The copy packs its own buckets around its own parameters and steps exactly as
        this optimizer would."""
        self._fold_pending_skips()
        rebuilt = self._transient().keys()
        return {k: v for k, v in self.__dict__.items() if k not in rebuilt and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = dict(state["defaults"])
        super().__setstate__(state)  # torch's: empty hooks, the step patched for them
        self.defaults = defaults  # (torch's adds a "differentiable" default, which is not ours)
        self.__dict__.update(self._transient())
        self._pack()
        self._on_copy()

    def _on_copy(self) -> None:
        """A copy was just packed (see :meth:`__setstate__`)."""

    def _pack(self) -> None:
        """The end of a subclass's ``__init__`` (and of a copy's unpickling): build the buckets."""
        self._repack()
        self._follow_shared()
        for group in self.param_groups:
            group[self.entry] = self._scalars_entry()
        self._ready = True

    # -- param groups --------------------------------------------------------------------------
    def _check_params(self, tensors: list) -> None:
        """Refuse what torch only warns about (a parameter listed twice: packed twice, one of its
        two regions would go stale), sparse and non-floating-point parameters."""
        if len(set(map(id, tensors))) != len(tensors):
            raise ValueError("a param group lists the same parameter twice")
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                continue  # (torch's own check names it)
            if p.is_sparse or p.layout != torch.strided:
                raise RuntimeError(f"{self.name} does not support sparse parameters")
            if not p.is_floating_point():
                raise ValueError(f"{self.name} optimizes floating-point parameters, got one of dtype {p.dtype}")

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
            self._check_params([_tensor_of(p) for p in params])  # (named parameters: ("name", tensor))
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
                check(
                    is_real(value) and 0 <= value < math.inf, f"{where} '{key}'", value, "must be a finite number >= 0"
                )

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
        buckets = self._new_buckets()  # (none at all is fine: every parameter frozen for now)
        self._carry_state_into(buckets)
        self._buckets = buckets
        self._all_params = [p for g in self.param_groups for p in g["params"]]
        self._requires_grad = list(map(_requires_grad, self._all_params))
        self._cuda_devices = sorted({b.device.index or 0 for b in buckets if b.device.type == "cuda"})
        self._host_checks = all(b.device.type == "cpu" for b in buckets)  # reading a number is free
        self._backend = backends.resolve(self.backend_name, {b.device for b in buckets})
        self._on_repack()

    def _new_buckets(self) -> list[FlatBucket]:
        """One bucket per (param group, device, dtype) of the parameters that require grad
        (DTensor parameters, where the algorithm takes them, in buckets of their local shards)."""
        buckets: list[FlatBucket] = []
        for gi, group in enumerate(self.param_groups):
            by_key: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.requires_grad:
                    kind = ShardBucket if self.shards and hasattr(p, "_local_tensor") else FlatBucket
                    by_key.setdefault((kind, p.device, p.dtype), []).append(p)
            for (kind, _, _), plist in by_key.items():
                buckets.append(
                    kind(plist, gi, keep_second_moment=self.keep_second_moment, adams_memory=not self.keep_backup)
                )
        return buckets

    @torch.no_grad()
    def _carry_state_into(self, buckets: list[FlatBucket]) -> None:
        """``self.state`` as views of the new buckets' buffers, holding what it held. (The old
        entries are views made at the last repack, with the layout the parameters had then: they
        read each element right even after a parameter changed its strides.)"""
        old_state = dict(self.state)
        self.state.clear()
        for b in buckets:
            views = {key: b.views_of(flat) for key, flat in self._state_buffers(b).items()}
            for i, p in enumerate(b.params):
                entry = {key: v[i] for key, v in views.items()}
                for key, old in old_state.pop(p, {}).items():
                    if key in entry:
                        entry[key].copy_(old)
                self.state[p] = entry
        in_groups = {p for g in self.param_groups for p in g["params"]}
        for key, entry in old_state.items():
            if not isinstance(key, torch.Tensor):  # not a parameter's (torch passes such keys through)
                self.state[key] = entry
            elif key in in_groups:  # parked
                self.state[key] = {k: t.detach().clone() for k, t in entry.items()}

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

    def _begin_step(self, closure) -> bool:
        """What every ``step`` starts with: the closure's contract, and the layout repaired.
        Returns whether some parameter trains (else see :meth:`_idle_step`)."""
        check_closure(closure)
        if self._in_closure:
            raise RuntimeError(f"{self.name}.step() was called from inside its own closure")
        self._check_layout()
        self._follow_shared()
        return bool(self._buckets)

    def _idle_step(self, closure):
        """A step with every parameter frozen (for now): the closure is called once for its loss,
        without backward (there is nothing to differentiate), and nothing else changes."""
        out, _ = self._call(closure, draw_seed(), backwards=False)
        self._scalars.forwards += 1
        return out

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

        Args:
            set_to_none: ignored (accepted for torch's signature).
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
        step updates them exactly once.

        Args:
            *modules: the modules (a whole model is fine) whose buffers to keep.

        Raises:
            TypeError: something that is not an ``nn.Module``.
        """
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
            warn(message)


def _tensor_of(param: Any) -> Any:
    """The tensor of a named parameter ``("name", tensor)``; anything else as it is."""
    return param[1] if isinstance(param, tuple) and len(param) == 2 else param
