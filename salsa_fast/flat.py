"""Flat optimizer buffers beside parameters that own their storage.

A :class:`FlatBucket` serves the parameters of one (param group, device, dtype). The parameters
keep their own tensors: the optimizer writes into them in place and never replaces a ``.data``,
so every saver (``torch.save``, safetensors, accelerate) sees one storage per parameter, as
with torch's own optimizers. What the optimizer owns is flat: the gradients, the moments
(``exp_avg``, ``exp_avg_sq``) and the search backup each live in one contiguous buffer per
bucket, in which parameter ``i`` occupies ``[offsets[i], offsets[i] + numel_i)``.

* **Gradients** are views into the flat gradient buffer (``p.grad``), so autograd accumulates
  straight into it and ``zero_grad()`` is one memset. The views are attached at the first step
  after packing, once the gradients autograd produced on its own have been looked at (a sparse
  one is an error: attached to a dense view, autograd would densify it silently).
* **Parameters** are reached per tensor: the torch backend runs ``torch._foreach_*`` ops over
  the parameter list against views of the flat buffers; the Triton kernels read a table of
  each parameter's address and flat offset (:mod:`salsa_fast.kernels.table`).

Each parameter's region starts at an offset aligned to ``ALIGN_BYTES`` (in a bucket of
``keep_backup=False``, regions are packed without gaps: not a byte beyond Adam's); the padding between
regions is zero in every buffer and stays zero under every update (a zero gradient gives a zero
direction), so it never contributes to a reduction.
"""

from __future__ import annotations

import operator

import torch

ALIGN_BYTES = 128

_grad_of = operator.attrgetter("grad")
_data_ptr = torch.Tensor.data_ptr


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp64 parameters keep fp64 state; everything else keeps fp32 state (fp32 math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_strides(t: torch.Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements (any dim order)."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _view_like(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view of ``flat[offset : offset + like.numel()]`` shaped (and strided) like ``like``.

    Dense permuted layouts (channels-last) keep their strides, so a flat region holds the
    parameter's elements in the parameter's memory order; anything else is contiguous.
    """
    n = like.numel()
    if like.is_contiguous() or not dense_strides(like):
        return flat[offset : offset + n].view(like.shape)
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)


class FlatBucket:
    """One (param group, device, dtype): its parameters and the optimizer's flat buffers.

    Attributes:
        params: the parameters, in group order (they keep their own storage).
        offsets, numel: each parameter's start in the flat index space, and its padded size.
        grad: the flat gradient buffer (parameter dtype); ``p.grad`` are views into it.
        exp_avg, exp_avg_sq: flat fp32 (fp64 for fp64 parameters) moments; ``exp_avg_sq`` is
            None for the SGD direction.
        backup: the flat buffer (parameter dtype) a search returns to, allocated on first use.
        adams_memory: the bucket holds no more than Adam's memory (the optimizer's
            ``keep_backup=False``): regions packed without padding, and no work buffer kept
            between steps (see :attr:`work`).
        scratch, workspace: backend-owned tensors, dropped after each search / kept between
            steps (work buffers, partial sums, the kernels' parameter table).
    """

    sharded = False  # see ShardBucket

    @property
    def work(self) -> dict[str, torch.Tensor]:
        """Where a backend caches its small work tensors (partial sums): the workspace, or, with
        ``keep_backup=False``, a throwaway dict, so that nothing outlives the step."""
        return {} if self.adams_memory else self.workspace

    def __init__(
        self, params: list[torch.Tensor], group_index: int, keep_second_moment: bool, adams_memory: bool = False
    ):
        self.params = list(params)
        tensors = self.tensors()
        first = tensors[0]
        self.group_index = group_index
        self.device = first.device
        self.dtype = first.dtype
        self.state_dtype = state_dtype_for(first.dtype)

        # not a byte beyond Adam's: no padding between regions
        align = 1 if adams_memory else max(1, ALIGN_BYTES // first.element_size())
        self.offsets: list[int] = []
        total = 0
        for t in tensors:
            self.offsets.append(total)
            total += -(-t.numel() // align) * align
        self.numel = total

        kw = dict(device=self.device)
        self.grad = torch.zeros(total, dtype=self.dtype, **kw)
        self.exp_avg = torch.zeros(total, dtype=self.state_dtype, **kw)
        self.exp_avg_sq = torch.zeros(total, dtype=self.state_dtype, **kw) if keep_second_moment else None
        self.backup: torch.Tensor | None = None
        self.search_active = False  # between a search's first pass and its commit or abort
        self.adams_memory = adams_memory
        self.scratch: dict[str, torch.Tensor] = {}
        self.workspace: dict[str, torch.Tensor] = {}
        self._views: dict[str, list[torch.Tensor]] = {}
        self.grad_views = self.views_of(self.grad)
        self.grads_attached = False  # see adopt_grads
        self._bind()

    def _bind(self) -> None:
        """Note where the parameters are (to notice replacements) and whether each is one dense
        run of memory laid out like its flat views (what whole-tensor kernels need)."""
        tensors = self.tensors()
        self._ptrs = list(map(_data_ptr, tensors))
        self._strides = [t.stride() for t in tensors]
        self.dense = all(map(dense_strides, tensors))

    def tensors(self) -> list[torch.Tensor]:
        """The tensors that hold the parameters' values, which the passes read and write."""
        return self.params

    # -- views of the flat buffers -------------------------------------------------------------
    def views_of(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a buffer laid out like this bucket (e.g. ``exp_avg``)."""
        return [_view_like(flat, o, t) for t, o in zip(self.tensors(), self.offsets)]

    def views(self, name: str) -> list[torch.Tensor]:
        """The per-parameter views of the bucket's own buffer ``name`` (cached)."""
        views = self._views.get(name)
        if views is None:
            views = self._views[name] = self.views_of(getattr(self, name))
        return views

    # -- the search's bookkeeping, the same for every backend ----------------------------------
    def ensure_backup(self) -> torch.Tensor:
        if self.backup is None:
            self.backup = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        return self.backup

    @torch.no_grad()
    def save_backup(self) -> None:
        """Copy the parameters into the backup: a search has begun, and can be undone."""
        self.ensure_backup()
        torch._foreach_copy_(self.views("backup"), self.tensors())
        self.search_active = True

    def backup_written(self) -> None:
        """A backend's own pass has written the backup: the search can be undone from now on.
        (Marked only after that pass, so that an abort never copies an unwritten backup.)"""
        self.search_active = True

    @torch.no_grad()
    def abort_search(self) -> None:
        """Undo a search that kept a backup: ``p`` back to the step's start, moments untouched."""
        if self.search_active:
            self.copy_params_from(self.backup)
        self.end_search()

    def end_search(self) -> None:
        """The search is over (committed or undone): no trial point, no scratch."""
        self.search_active = False
        self.scratch.clear()

    @torch.no_grad()
    def copy_params_to(self, flat: torch.Tensor) -> torch.Tensor:
        """Write the parameters' values into their regions of ``flat`` (any dtype); returns it."""
        torch._foreach_copy_(self.views_of(flat), self.tensors())
        return flat

    @torch.no_grad()
    def copy_params_from(self, flat: torch.Tensor) -> None:
        """Set the parameters to their regions of ``flat`` (rounded to the parameter dtype)."""
        torch._foreach_copy_(self.tensors(), self.views_of(flat))

    # -- detecting what happened behind the optimizer's back ----------------------------------
    def moved(self) -> bool:
        """True when some parameter's values now live elsewhere (``p.data = ...``, ``model.to``)."""
        return list(map(_data_ptr, self.tensors())) != self._ptrs

    def relaid(self) -> bool:
        """True when some parameter changed device, dtype or memory layout (``model.to(...)``):
        the buffers must be rebuilt, since a flat region holds a parameter's elements in its
        memory order."""
        return any(
            t.device != self.device or t.dtype != self.dtype or t.stride() != s
            for t, s in zip(self.tensors(), self._strides)
        )

    def rebind(self) -> None:
        """Follow parameters whose ``.data`` was replaced by a tensor of the same shape, layout,
        device and dtype: their values are read where they now are; the state stays. (The
        caller repacks when :meth:`relaid`.)"""
        for t, g in zip(self.tensors(), self.grad_views):
            if t.shape != g.shape:
                raise ValueError(
                    f"a parameter's shape changed from {tuple(g.shape)} to {tuple(t.shape)} "
                    "after it was given to the optimizer; build a new optimizer"
                )
        self.workspace.pop("table", None)  # the kernels' address table
        self._bind()

    # -- gradients -----------------------------------------------------------------------------
    def grads_intact(self) -> bool:
        """True when every parameter's ``.grad`` is still the view into ``self.grad``."""
        return all(map(operator.is_, map(_grad_of, self.params), self.grad_views))

    @torch.no_grad()
    def adopt_grads(self) -> None:
        """Bring gradients that are not our views into the flat gradient buffer and attach views.

        ``None`` (e.g. after ``model.zero_grad()`` for a parameter the loss did not use) becomes a
        zero gradient; any other tensor is copied in. Raises ``RuntimeError`` for a sparse
        gradient, before anything is changed.
        """
        grads = list(map(_grad_of, self.params))
        if any(g is not None and g.layout != torch.strided for g in grads):
            raise RuntimeError(
                "SaLSA does not support sparse gradients (e.g. nn.Embedding(sparse=True)): "
                "use dense gradients (sparse=False)"
            )
        for p, g, view in zip(self.params, grads, self.grad_views):
            if g is view:
                continue
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
            p.grad = view
        self.grads_attached = True

    def zero_grad(self) -> None:
        """Zero the gradient buffer; attached views stay (re-pointed if something replaced them),
        gradients not yet adopted are dropped (``p.grad = None``) as torch would."""
        self.grad.zero_()
        if self.grads_intact():
            return
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not view:
                p.grad = view if self.grads_attached else None


class ShardBucket(FlatBucket):
    """A bucket over DTensor parameters (FSDP2 ``fully_shard``): the passes read and write each
    DTensor's *local* shard in place, where the sharding framework all-gathers from.

    The framework hands over new gradients (DTensors) after every backward, so they are copied
    into the flat gradient buffer each step instead of accumulating into views.
    """

    def __init__(
        self, params: list[torch.Tensor], group_index: int, keep_second_moment: bool, adams_memory: bool = False
    ):
        from .distributed import is_sharded

        self.sharded = any(is_sharded(p) for p in params)
        super().__init__(params, group_index, keep_second_moment, adams_memory)

    def tensors(self) -> list[torch.Tensor]:
        return [p._local_tensor for p in self.params]

    def grads_intact(self) -> bool:
        return False  # the framework hands over new gradients every backward

    @torch.no_grad()
    def adopt_grads(self) -> None:
        for p, view in zip(self.params, self.grad_views):
            g = p.grad
            if g is None:
                view.zero_()
            elif g.layout != torch.strided:
                raise RuntimeError("SaLSA does not support sparse gradients")
            else:
                view.copy_(getattr(g, "_local_tensor", g))

    def zero_grad(self) -> None:
        self.grad.zero_()
        for p in self.params:
            p.grad = None
