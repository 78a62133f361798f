"""``state_dict`` and ``load_state_dict`` of the flat-buffer shell (:class:`salsa_fast._flat_optimizer.FlatOptimizer`):
torch's per-index layout, the run's scalars in every param group, and a load that checks
everything before it changes anything."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar

import torch

from .checks import checked_scalars
from .distributed import as_dtensor_like, local_part

__all__ = ["StateDictMixin", "plain"]


class StateDictMixin:
    """Saving and loading for :class:`~salsa_fast._flat_optimizer.FlatOptimizer` (which sets the
    names used here: ``name``, ``entry``, ``Scalars``, ``_scalars`` and the group checks)."""

    # scalars a previous release saved under another name: {old name: present name}
    renamed_scalars: ClassVar[dict[str, str]] = {}

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
        for i, p in enumerate(p for g in self.param_groups for p in g["params"]):
            entry = sd["state"].get(i)
            if entry is not None and hasattr(p, "device_mesh"):
                sd["state"][i] = {key: as_dtensor_like(p, v.clone()) for key, v in entry.items()}
        return sd

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: resuming continues exactly as if never stopped.

        Everything is checked before anything changes (a bad checkpoint leaves the optimizer as
        it was). Tensors may come from another device (a GPU checkpoint loads on CPU) and are
        cast to the optimizer's state dtype.

        Args:
            state_dict: what :meth:`state_dict` returned (also of the previous release's layout).

        Raises:
            ValueError: the checkpoint is not this optimizer's, its state has the wrong shape, or
                a scalar is out of range (naming the entry).
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_layout_of(state_dict)
        scalars = checked_scalars(self.Scalars, self._saved_scalars(state_dict), self.entry)
        index_of = {
            p: i
            for g, sg in zip(self.param_groups, state_dict["param_groups"])
            for p, i in zip(g["params"], sg["params"])
        }
        copies = self._checked_copies(state_dict["state"], index_of)
        with torch.no_grad():  # (from here on nothing fails: everything was checked)
            for target, value in copies:
                target.zero_() if value is None else target.copy_(value)
        self._take_groups_and_scalars(state_dict, set(index_of.values()), scalars)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_layout_of(self, state_dict: dict[str, Any]) -> None:
        """``ValueError`` unless ``state_dict`` has our layout: its entries, as many groups of as
        many parameters, and group values in range."""
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"not a {self.name} state_dict: it has no {key!r} entry")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            self._check_group_values(sg, "the state_dict's param group")

    def _checked_copies(self, saved_state: dict, index_of: dict) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(our state tensor, the saved one, or None for zeros)`` for every parameter's state,
        each saved tensor checked (present, shaped like ours) before any copy is made."""
        copies = []
        for p, entry in self.state.items():
            if not isinstance(p, torch.Tensor):
                continue  # not a parameter's: replaced by the checkpoint's own
            i = index_of[p]
            saved = saved_state.get(i)
            for key, target in entry.items():
                if saved is None:  # no state saved for it (e.g. it was frozen then)
                    copies.append((target, None))
                    continue
                value = saved.get(key)
                if value is None:
                    raise ValueError(f"the state of parameter {i} has no {key!r}{self._missing_state_hint(key)}")
                value = local_part(p, value, f"state {key!r} of parameter {i}")
                if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                    shape = tuple(getattr(value, "shape", ()))
                    raise ValueError(
                        f"state {key!r} of parameter {i} has shape {shape}, expected {tuple(target.shape)}"
                    )
                copies.append((target, value))
        return copies

    def _take_groups_and_scalars(self, state_dict: dict[str, Any], saved_indices: set, scalars: Any) -> None:
        """The loaded checkpoint's group values, scalars and state under other keys than the
        parameters' (passed through, as torch's load does; the checkpoint's ``param_names``
        replace ours, as torch's)."""
        for key in [k for k in self.state if not isinstance(k, torch.Tensor)]:
            del self.state[key]
        self.state.update({k: v for k, v in state_dict["state"].items() if k not in saved_indices})
        for g, sg in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in sg.items() if k not in ("params", self.entry)})
        self._scalars = scalars
        for g in self.param_groups:
            g[self.entry] = self._scalars_entry()
        self._shared.clear()
        self._follow_shared()
        self._on_load()

    def _scalars_entry(self) -> dict[str, Any]:
        """The run's scalars as a group holds them: numbers, flags, and lists written as text
        (``"0.25,0.5"``). Loading a full state dict, torch takes a list apart into its elements,
        drops an empty one and lays the rest over the loading optimizer's own list (a longer one
        would keep its tail): text comes through every way of saving whole."""
        return {k: ",".join(map(repr, v)) if isinstance(v, list) else v for k, v in asdict(self._scalars).items()}

    def _saved_scalars(self, state_dict: dict[str, Any]) -> Any:
        """The run's scalars in a state_dict: in every param group, alike (else at its top level,
        where checkpoints written before they moved into the groups hold them), under their
        present names (:attr:`renamed_scalars`), lists read back."""
        in_groups = [sg.get(self.entry) for sg in state_dict["param_groups"]]
        if all(s is None for s in in_groups):
            if self.entry not in state_dict:
                raise ValueError(
                    f"not a {self.name} state_dict: neither its param groups nor itself hold a {self.entry!r} entry"
                )
            saved = state_dict[self.entry]
        elif any(_plain_scalars(s) != _plain_scalars(in_groups[0]) for s in in_groups):
            raise ValueError(f"the state_dict's param groups hold different {self.entry!r} entries: they must be alike")
        else:
            saved = in_groups[0]
        if not isinstance(saved, dict):
            return saved  # (checked_scalars names it)
        lists = {f.name for f in fields(self.Scalars) if f.default_factory is list}
        saved = {self.renamed_scalars.get(k, k): v for k, v in saved.items()}
        return {
            k: _list_from_text(v, f"{self.entry!r} entry has {k}") if k in lists and isinstance(v, str) else v
            for k, v in saved.items()
        }

    def _missing_state_hint(self, key: str) -> str:
        return ""

    def _on_load(self) -> None:
        """Rebuild what depends on the loaded scalars."""


def plain(value: Any) -> Any:
    """Lists as tuples (a checkpoint may turn a group's tuple into a list)."""
    return tuple(value) if isinstance(value, list) else value


def _list_from_text(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"the state_dict's {what}={text!r}: must be numbers separated by commas") from None


def _plain_scalars(saved: Any) -> Any:
    return {k: plain(v) for k, v in saved.items()} if isinstance(saved, dict) else saved
