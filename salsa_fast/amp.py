"""fp16 mixed precision: SaLSA drives a ``torch.amp.GradScaler`` itself.

A GradScaler cannot drive a closure optimizer (``scaler.step(optimizer, closure)`` is not
supported), so SaLSA takes the scaler: the closure scales its loss for backward
(``scaler.scale(loss).backward()``) and returns the unscaled loss; after the gradient pass the
optimizer unscales the gradient buffers in place with torch's fused check-and-unscale kernel
(one pass per flat buffer, which is also the non-finite check), skips the step on overflow
without touching parameters or state, and calls ``scaler.update()`` at the end of the step.
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState


class ScalerLink:
    """The optimizer's side of a GradScaler."""

    def __init__(self, scaler, optimizer) -> None:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self.key = id(optimizer)

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    @torch.no_grad()
    def unscale(self, buckets) -> torch.Tensor:
        """Divide every gradient buffer by the scale; 1.0 (on the first bucket's device) when
        some gradient overflowed. Recorded in the scaler for its update."""
        scale = self.scaler._get_scale_async()
        if scale is None:
            raise RuntimeError(
                "grad_scaler was given but the closure did not scale its loss: call "
                "scaler.scale(loss).backward() in the closure (and return the unscaled loss)"
            )
        inv_scale = scale.double().reciprocal().float()
        per_device: dict[torch.device, torch.Tensor] = {}
        grads: dict[torch.device, list[torch.Tensor]] = {}
        for b in buckets:
            grads.setdefault(b.device, []).append(b.grad)
        for device, tensors in grads.items():
            found = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, inv_scale.to(device))
            per_device[device] = found
        state = self.scaler._per_optimizer_states[self.key]
        state["found_inf_per_device"] = per_device
        state["stage"] = OptState.STEPPED  # what update() expects of a stepped optimizer
        first = buckets[0].device
        return torch.stack([f.to(first) for f in per_device.values()]).amax().reshape(())

    def update(self) -> None:
        self.scaler.update()
