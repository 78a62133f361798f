"""Flat parameter and gradient buffers.

A :class:`FlatBucket` owns the parameters of one (param group, device, dtype). Their values live
in one contiguous buffer and each ``p.data`` becomes a view into it; their gradients live in a
matching buffer with each ``p.grad`` a view, so autograd accumulates straight into it and
``zero_grad()`` is one memset. The gradient views are attached at the first step after packing,
once the gradients autograd produced on its own have been looked at (a sparse one is an error:
attached to a dense view, autograd would densify it silently). The optimizer state (``exp_avg``, ``exp_avg_sq``, the search
backup) lives in buffers of the same layout, so every update is a handful of whole-buffer ops
(torch backend) or one kernel launch per buffer (Triton backend), never a loop over tensors.

Each parameter starts at an offset aligned to ``ALIGN_BYTES``; the padding between parameters
is zero in every buffer and stays zero under every update (a zero gradient gives a zero
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


def _dense_strides(t: torch.Tensor) -> bool:
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

    Channels-last and other dense permuted layouts keep their strides, so convolutions see the
    memory format they had before packing; anything else becomes contiguous.
    """
    n = like.numel()
    if like.is_contiguous() or not _dense_strides(like):
        return flat[offset : offset + n].view(like.shape)
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)


class FlatBucket:
    """The parameters of one (param group, device, dtype) packed into flat buffers.

    Attributes:
        params: the parameters, in group order.
        param, grad: the flat value and gradient buffers (parameter dtype).
        exp_avg, exp_avg_sq: flat fp32 (fp64 for fp64 parameters) moments; ``exp_avg_sq`` is
            None for the SGD direction.
        backup: the flat buffer a search returns to (allocated on the first search).
    """

    mirrored = False  # see ShardBucket
    sharded = False

    def __init__(self, params: list[torch.Tensor], group_index: int, keep_second_moment: bool):
        self.params = list(params)
        tensors = self._laid_out(self.params)
        first = tensors[0]
        self.group_index = group_index
        self.device = first.device
        self.dtype = first.dtype
        self.state_dtype = state_dtype_for(first.dtype)

        align = max(1, ALIGN_BYTES // first.element_size())
        self.offsets: list[int] = []
        total = 0
        for t in tensors:
            self.offsets.append(total)
            total += -(-t.numel() // align) * align
        self.numel = total

        kw = dict(device=self.device)
        self.param = torch.zeros(total, dtype=self.dtype, **kw)
        self.grad = torch.zeros(total, dtype=self.dtype, **kw)
        self.exp_avg = torch.zeros(total, dtype=self.state_dtype, **kw)
        self.exp_avg_sq = torch.zeros(total, dtype=self.state_dtype, **kw) if keep_second_moment else None
        self.backup: torch.Tensor | None = None
        self.search_active = False  # between a search's first pass and its commit or abort
        # Backend-owned tensors: per-search scratch (dropped after each search) and small
        # buffers kept between steps (a step tensor, partial sums).
        self.scratch: dict[str, torch.Tensor] = {}
        self.workspace: dict[str, torch.Tensor] = {}

        self.param_views = [_view_like(self.param, o, t) for t, o in zip(tensors, self.offsets)]
        self.grad_views = [_view_like(self.grad, o, t) for t, o in zip(tensors, self.offsets)]
        with torch.no_grad():
            for t, pv in zip(tensors, self.param_views):
                pv.copy_(t.detach())
        self.grads_attached = False  # see adopt_grads
        self._bind()

    def _laid_out(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors whose elements the buffers hold: the parameters themselves."""
        return params

    def _bind(self) -> None:
        """Make every ``p.data`` a view into the flat buffer."""
        with torch.no_grad():
            for p, pv in zip(self.params, self.param_views):
                p.data = pv
        self._ptrs = list(map(_data_ptr, self.params))

    def pull_params(self) -> None:
        """(ShardBucket: bring values the sharding framework holds into the buffer.)"""

    def push_params(self) -> None:
        """(ShardBucket: write the buffer back to the sharding framework's tensors.)"""

    # -- views --------------------------------------------------------------------------------
    def views_of(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of a buffer laid out like this bucket (e.g. ``exp_avg``)."""
        return [_view_like(flat, o, p) for p, o in zip(self.param_views, self.offsets)]

    def ensure_backup(self) -> torch.Tensor:
        if self.backup is None:
            self.backup = torch.zeros_like(self.param)
        return self.backup

    # -- detecting what happened behind the optimizer's back ----------------------------------
    def params_intact(self) -> bool:
        """True when every parameter's ``.data`` is still the view into ``self.param``."""
        return list(map(_data_ptr, self.params)) == self._ptrs

    def grads_intact(self) -> bool:
        """True when every parameter's ``.grad`` is still the view into ``self.grad``."""
        return all(map(operator.is_, map(_grad_of, self.params), self.grad_views))

    def relocated(self) -> bool:
        """True when some parameter moved to another device or dtype (``model.to(...)``)."""
        return any(p.device != self.device or p.dtype != self.dtype for p in self.params)

    @torch.no_grad()
    def adopt_param_data(self) -> None:
        """Copy values from parameters whose ``.data`` was replaced, then re-view them.

        Handles ``p.data = new_tensor`` of the same shape, device and dtype (the caller repacks
        for device or dtype changes).
        """
        for i, p in enumerate(self.params):
            view = self.param_views[i]
            if p.data_ptr() != view.data_ptr() or p.stride() != view.stride():
                if p.shape != view.shape:
                    raise ValueError(
                        f"a parameter's shape changed from {tuple(view.shape)} to {tuple(p.shape)} "
                        "after it was given to the optimizer; build a new optimizer"
                    )
                view.copy_(p.detach())
                p.data = view
        self._ptrs = list(map(_data_ptr, self.params))

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
    """A bucket over DTensor parameters (FSDP2 ``fully_shard``), holding their *local* shards.

    The sharding framework owns those tensors (it all-gathers from their storage before each
    forward), so here the flat buffer is a mirror instead of their storage: values are pulled
    in when something else changed them (their version counter moved), pushed back after every
    write (each trial point, each step), and the gradients, which the framework sets after each
    backward, are copied in every step. That costs a copy per write; what it buys is that the
    same kernels and decisions serve sharded training.
    """

    mirrored = True

    def __init__(self, params: list[torch.Tensor], group_index: int, keep_second_moment: bool):
        from .distributed import is_sharded

        self.sharded = any(is_sharded(p) for p in params)
        super().__init__(params, group_index, keep_second_moment)

    def _laid_out(self, params):
        return [p._local_tensor for p in params]

    def _bind(self) -> None:
        self._versions = [p._local_tensor._version for p in self.params]

    def params_intact(self) -> bool:
        return True

    def relocated(self) -> bool:
        return any(
            p._local_tensor.device != self.device or p._local_tensor.dtype != self.dtype for p in self.params
        )

    def grads_intact(self) -> bool:
        return False  # the framework hands over new gradients every backward

    @torch.no_grad()
    def pull_params(self) -> None:
        for i, p in enumerate(self.params):
            local = p._local_tensor
            if local._version != self._versions[i]:
                self.param_views[i].copy_(local)
                self._versions[i] = local._version

    @torch.no_grad()
    def push_params(self) -> None:
        for i, p in enumerate(self.params):
            local = p._local_tensor
            local.copy_(self.param_views[i])
            self._versions[i] = local._version

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
