"""bitsandbytes' AdamW8bit without a device synchronization after every parameter.

bitsandbytes' `step()` waits for the device after each parameter's update (its paged optimizers need that order for
their prefetches). A LoRA model has hundreds of small parameters (448 for Llama-3 8B at 7 projections), so the host
stalls hundreds of times a step and cannot queue the next step's work while the GPU finishes this one. A non-paged
optimizer whose kernels run on the device's default stream is ordered by that stream alone: this subclass updates
its parameters back to back there, with bitsandbytes' own state, kernels and arithmetic (bit-for-bit the same
result), and keeps bitsandbytes' step for paged optimizers and for calls made on another stream.
"""

from __future__ import annotations

import torch
from bitsandbytes.optim import AdamW8bit


class AdamW8bitNoSync(AdamW8bit):
    """`bitsandbytes.optim.AdamW8bit` whose step queues every update without waiting for the device in between."""

    def step(self, closure=None):
        if self.is_paged or not self._ordered_by_default_stream():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:  # what bitsandbytes' step does first
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
        return loss

    def _ordered_by_default_stream(self) -> bool:
        """bitsandbytes launches its CUDA update kernels on the legacy default stream: work the caller queued on
        another stream is ordered before them only by the synchronization. (Other accelerators keep it too.)"""
        devices = {p.device for group in self.param_groups for p in group["params"]}
        return all(d.type == "cpu" or (d.type == "cuda" and torch.cuda.current_stream(d) == torch.cuda.default_stream(d))
                   for d in devices)
