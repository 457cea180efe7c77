"""The engine's checkpoint function: each decoder layer's input kept in pinned CPU memory until its backward
(offload_checkpointing) or on the device, and/or the layer replayed as CUDA graphs (lever cuda_graphs: cuda_graphs.py).

Plain checkpointing keeps one hidden-state tensor per layer on the GPU (1 GiB for an 8B model at 4,096 tokens).
Here forward copies it to pinned host memory on a side stream, overlapped with the next layers' compute. Backward
runs the layers in reverse: when one layer's backward starts, the input of the latest layer still waiting (in
forward order) is already being copied back on the side stream, so the copy overlaps this layer's recomputation
instead of stalling it (benchmarks/README.md has the wait it removed). With several autograd graphs alive,
backpropagated oldest first, that guess is wrong: the gradients stay right, the copies just run in line as before.
Short sequences and scarce host memory keep the input on the device (with graphs) or fall back to torch's
non-reentrant checkpointing (without); dropout always falls back to it (recomputation needs the same random numbers).

Every GPU buffer belongs to the compute stream; the side stream only copies, ordered by events, and no buffer is
`record_stream`ed. A recorded buffer returns to the allocator only once the host sees its event complete, and the
host runs layers ahead of the GPU: at 32k tokens on 8B, such buffers held 3.5 GiB and the side stream's own pool
2.3 GiB of the 18.6 GiB reserved (benchmarks/memory_probe.py). Instead, once a layer's work is queued, the compute
stream waits for the copy of its input (which ran beside that work) before anything later, so the input's memory is
reused only after the copy read it.
"""

from __future__ import annotations

import functools
import weakref

import torch

from fastload._log import logger
from fastload.engine.cuda_graphs import graphs_for, layer_of, modules_of, parameters_of
from fastload.load.devices import free_memory_bytes
from fastload.model_state import state_of
from fastload.train.checkpointing import (
    checkpointed_layers,
    register_checkpoint_function,
)
from fastload.train.single_use import single_use_contexts, single_use_graph

MIN_BYTES = 4 * 1024 * 1024  # below this per layer, copies cost more than the memory they save
MAX_QUEUE = 4096  # forward passes whose backward never ran leave dead entries: pruned past this length


class _Slot:
    """One layer input on its way to host memory and back. The host copy itself is one of the autograd node's saved
    tensors (freed after its backward, kept for a retained graph's second one); the slot holds a weak reference to
    it, so a layer whose backward comes earlier can start bringing it back."""

    __slots__ = ("host", "copied", "device", "on_device", "ready", "__weakref__")

    def __init__(self, host, copied, device):
        self.host, self.copied, self.device = weakref.ref(host), copied, device
        self.on_device = self.ready = None

    def prefetch(self, stream, host=None) -> None:
        """Start copying back to the device on `stream` (after the copy to host finished), into a buffer of the
        current stream's pool."""
        host = host if host is not None else self.host()
        if self.on_device is not None or host is None:
            return
        current = torch.cuda.current_stream(self.device)
        on_device = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        stream.wait_stream(current)  # the buffer's memory may still be read by work queued before its allocation
        with torch.cuda.stream(stream):
            stream.wait_event(self.copied)
            on_device.copy_(host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)  # (the host allocator keeps the pinned block until the copy has run)
        self.on_device = on_device

    def __del__(self):
        # a copy back that was started but never taken (a guess the backward order proved wrong, a graph freed unused)
        # writes into a compute-stream buffer: the compute stream waits for it before that memory can be reused
        if self.on_device is not None and self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)

    def take(self, stream, host):
        """The input on the device, usable on the current stream."""
        self.prefetch(stream, host)
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        hidden, self.on_device = self.on_device, None
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


class EngineCheckpoint(torch.autograd.Function):
    """forward(run, graphs, offload, hidden, *trained_params) -> run(hidden), nothing saved but the input.

    The trained parameters are inputs only so that a replayed backward graph can hand autograd their
    gradients; an eager backward accumulates them itself and returns None for them."""

    @staticmethod
    def forward(ctx, run, graphs, offload, hidden, *params):
        # what torch's checkpoint restores for recomputation: the forward's autocast state
        ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                        torch.is_autocast_cache_enabled())
        if offload:
            stream = _side_stream(hidden.device)
            host = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            ctx.slot = _Slot(host, copied, hidden.device)
            _push(ctx.slot)
            ctx.save_for_backward(host)
        else:
            ctx.slot = None
            ctx.save_for_backward(hidden)  # kept on the device, freed by autograd after backward
        ctx.run, ctx.graphs, ctx.n_params = run, graphs, len(params)
        ctx.input_requires_grad = hidden.requires_grad
        with torch.no_grad():
            out = graphs.forward(run, hidden) if graphs is not None else None
            out = run(hidden) if out is None else out
        if offload:  # after this layer's work: later work, and any reuse of the input's memory, waits for the copy
            torch.cuda.current_stream(hidden.device).wait_event(copied)
        return out

    @staticmethod
    def backward(ctx, *grad_outs):
        (saved,) = ctx.saved_tensors  # the host copy, or the input itself
        slot = ctx.slot
        if slot is not None:
            stream = _side_stream(slot.device)
            hidden = slot.take(stream, saved)
            _pop_and_prefetch_next(slot, stream)
        else:
            hidden = saved
        hidden = hidden.detach().requires_grad_(ctx.input_requires_grad)
        enabled, dtype, cache = ctx.autocast
        replayed = None
        if ctx.graphs is not None and not enabled:
            replayed = ctx.graphs.backward(ctx.run, hidden, grad_outs)
        if replayed is not None and len(replayed[1]) == ctx.n_params:
            grad_hidden, _, grads = replayed
            return (None, None, None, grad_hidden, *(g.clone() if g is not None and needed else None
                                                     for g, needed in zip(grads, ctx.needs_input_grad[4:])))
        with torch.enable_grad(), torch.autocast("cuda", enabled=enabled, dtype=dtype, cache_enabled=cache), \
                single_use_graph():  # rebuilt on every backward and run once: kernels may reuse what they saved
            out = ctx.run(hidden)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, hidden.grad if ctx.input_requires_grad else None, *([None] * ctx.n_params))


_STREAMS: dict = {}


def _side_stream(device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _host_memory_available() -> int:
    return free_memory_bytes("cpu")


def engine_checkpoint(function, hidden_states, *args, offload: bool = True, graphs=None, **kwargs):
    """Same contract as the checkpoint function transformers calls: function(hidden_states, *args) -> output.

    offload: keep the layer's input in pinned host memory (inputs of at least MIN_BYTES); graphs: the model's
    `cuda_graphs.ModelGraphs`, or None for eager layers."""
    from torch.utils.checkpoint import checkpoint

    if args or kwargs or not hidden_states.is_cuda:
        return checkpoint(function, hidden_states, *args, use_reentrant=False, context_fn=single_use_contexts, **kwargs)
    offload = offload and hidden_states.numel() * hidden_states.element_size() >= MIN_BYTES
    if not offload and graphs is None:
        return checkpoint(function, hidden_states, use_reentrant=False, context_fn=single_use_contexts)
    layer = layer_of(function) if isinstance(function, functools.partial) else None
    modules = modules_of(layer) if layer is not None else []
    if _uses_dropout(modules):  # recomputation must replay the forward's random numbers: torch's checkpoint does
        return checkpoint(function, hidden_states, use_reentrant=False, context_fn=single_use_contexts)
    params = tuple(p for p in parameters_of(modules) if p.requires_grad) if graphs is not None else ()
    return EngineCheckpoint.apply(function, graphs, offload, hidden_states, *params)


def _uses_dropout(modules) -> bool:
    """Dropout active in these modules now (LoRA dropout can be added after the engine was installed)."""
    return any(_is_dropout(m) and m.training for m in modules)


def _is_dropout(module) -> bool:
    return isinstance(module, torch.nn.Dropout) and module.p > 0


def _has_dropout(model) -> bool:
    if any(_is_dropout(m) for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "attention_dropout", 0) or 0)


def offload_blocker(model) -> str:
    """Why offloaded checkpointing is not on for this model (the engine report names it)."""
    if not checkpointed_layers(model):
        return (f"no layer of {type(model).__name__} is checkpointed through transformers (gradient checkpointing "
                "off, or layers that are not GradientCheckpointingLayer)")
    if _has_dropout(model):
        return "dropout > 0: recomputation needs the forward's random numbers"
    return "too little free host memory for the layer inputs"


def install_engine_checkpointing(model, offload: bool, graphs: bool) -> list[str]:
    """Register the engine's checkpoint function on this model's state (train/checkpointing.py points the
    checkpointed layers at it, instance attributes only): inputs offloaded to pinned host memory and/or layers
    replayed as CUDA graphs; returns the levers used. Called again, it keeps the function it registered."""
    registered = state_of(model).checkpoint_function
    if registered is not None and getattr(registered.function, "func", None) is engine_checkpoint:
        register_checkpoint_function(model, registered.function, registered.applies, registered.levers)
        return list(registered.levers) if state_of(model).checkpoint_function is not None else []
    layers = checkpointed_layers(model)
    if not layers or not (offload or graphs):
        return []
    if _has_dropout(model):  # recomputation (and a graph's replay) would need the same random numbers
        logger.info("engine: offloaded checkpointing and CUDA graphs off (dropout > 0); plain checkpointing")
        return []
    if offload:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        per_layer_guess = getattr(config, "hidden_size", 4096) * 2 * 16384
        if _host_memory_available() < 2 * len(layers) * per_layer_guess:
            logger.info("engine: offloaded checkpointing off (little free host memory); layer inputs stay on the GPU")
            offload = False
    model_graphs = None
    if graphs:
        model_graphs = graphs_for(model, next(model.parameters()).device)
    if not (offload or model_graphs):
        return []
    levers = (["offload_checkpointing"] if offload else []) + (["cuda_graphs"] if model_graphs else [])
    function = functools.partial(engine_checkpoint, offload=offload, graphs=model_graphs)
    register_checkpoint_function(model, function, applies=lambda base: not _has_dropout(base), levers=tuple(levers))
    return levers


def uses_engine_checkpointing(model) -> bool:
    """Whether this model's checkpointed layers go through the engine's function."""
    return any(getattr(layer._gradient_checkpointing_func, "func", None) is engine_checkpoint
               for layer in checkpointed_layers(model))
