"""Checkpointing that keeps each decoder layer's input in pinned CPU memory until its backward.

Plain checkpointing keeps one hidden-state tensor per layer on the GPU (1 GiB for an 8B model at 4,096 tokens).
Here forward copies it to pinned host memory on a side stream, overlapped with the next layers' compute. Backward
runs the layers in reverse: when one layer's backward starts, the input of the latest layer still waiting (in
forward order) is already being copied back on the side stream, so the copy overlaps this layer's recomputation
instead of stalling it (an 8B step spent ~20 ms waiting on such copies). With several graphs alive, backpropagated
oldest first, that guess is wrong: the gradients stay right, the copies just run in line as before. Short sequences, dropout (recomputation would need the same
random numbers) and scarce host memory fall back to plain non-reentrant checkpointing.
"""

from __future__ import annotations

import functools
import weakref

MIN_BYTES = 4 * 1024 * 1024  # below this per layer, copies cost more than the memory they save
MAX_QUEUE = 4096  # forward passes whose backward never ran leave dead entries: pruned past this length


class _Slot:
    """One layer input on its way to host memory and back; lives as long as the autograd graph holds it."""

    __slots__ = ("host", "copied", "device", "on_device", "ready", "__weakref__")

    def __init__(self, host, copied, device):
        self.host, self.copied, self.device = host, copied, device
        self.on_device = self.ready = None

    def prefetch(self, stream) -> None:
        """Start copying back to the device on `stream` (after the copy to host finished)."""
        import torch

        if self.on_device is not None or self.host is None:
            return
        with torch.cuda.stream(stream):
            stream.wait_event(self.copied)
            self.on_device = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.host = None

    def take(self, stream):
        """The input on the device, usable on the current stream."""
        import torch

        self.prefetch(stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        hidden, self.on_device = self.on_device, None
        hidden.record_stream(current)  # made on the side stream, used and freed on this one
        return hidden


_QUEUES: dict = {}  # device -> weak references to slots, in forward order


def _push(slot) -> None:
    queue = _QUEUES.setdefault(slot.device, [])
    if len(queue) >= MAX_QUEUE:
        queue[:] = [ref for ref in queue if ref() is not None]
    queue.append(weakref.ref(slot))


def _pop_and_prefetch_next(slot, stream) -> None:
    """Drop `slot` from its queue (normally the last entry), then start bringing back the latest live slot before
    it: the input of the layer whose backward runs next."""
    queue = _QUEUES.get(slot.device, [])
    for i in range(len(queue) - 1, -1, -1):
        if queue[i]() is slot:
            del queue[i]
            break
    while queue:
        following = queue[-1]()
        if following is not None:
            following.prefetch(stream)
            return
        queue.pop()


def _function():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        @staticmethod
        def forward(ctx, run, hidden):
            stream = _side_stream(hidden.device)
            host = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            hidden.record_stream(stream)  # keep the GPU buffer alive until the copy is done
            ctx.run, ctx.slot = run, _Slot(host, copied, hidden.device)
            _push(ctx.slot)
            ctx.input_requires_grad = hidden.requires_grad
            with torch.no_grad():
                return run(hidden)

        @staticmethod
        def backward(ctx, *grad_outs):
            stream = _side_stream(ctx.slot.device)
            hidden = ctx.slot.take(stream).detach().requires_grad_(ctx.input_requires_grad)
            _pop_and_prefetch_next(ctx.slot, stream)
            ctx.slot = None
            with torch.enable_grad():
                out = ctx.run(hidden)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grad_outs) if torch.is_tensor(o) and o.requires_grad and g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return None, hidden.grad if ctx.input_requires_grad else None

    return OffloadedCheckpoint


_STREAMS: dict = {}
_FN = None


def _side_stream(device):
    import torch

    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _host_memory_available() -> int:
    from ..devices import free_memory_bytes

    return free_memory_bytes("cpu")


def offloaded_checkpoint(function, hidden_states, *args, **kwargs):
    """Same contract as the checkpoint function transformers calls: function(hidden_states, *args) -> output."""
    import torch
    from torch.utils.checkpoint import checkpoint

    global _FN
    nbytes = hidden_states.numel() * hidden_states.element_size()
    if args or not hidden_states.is_cuda or nbytes < MIN_BYTES:
        return checkpoint(function, hidden_states, *args, use_reentrant=False, **kwargs)
    if _FN is None:
        _FN = _function()
    out = _FN.apply(function, hidden_states)
    return out


def _has_dropout(model) -> bool:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "attention_dropout", 0) or 0)


def install_offloaded_checkpointing(model) -> bool:
    """Point this model's checkpointed layers at the offloading function (instance attributes only)."""
    from .._log import logger

    layers = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func") and getattr(m, "gradient_checkpointing", False)]
    if not layers:
        return False
    if _has_dropout(model):
        logger.info("engine: offloaded checkpointing off (dropout > 0 needs replayed random numbers); plain checkpointing")
        return False
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    per_layer_guess = getattr(config, "hidden_size", 4096) * 2 * 16384
    if _host_memory_available() < 2 * len(layers) * per_layer_guess:
        logger.info("engine: offloaded checkpointing off (little free host memory); plain checkpointing")
        return False
    for layer in layers:
        layer._gradient_checkpointing_func = functools.partial(offloaded_checkpoint)
    return True
