"""CUDA graphs of checkpointed decoder layers: each layer's forward, and its recomputation with backward, replayed
as one graph each instead of hundreds of kernel launches issued from Python.

A QLoRA step on a small model is bound by the host: the GPU waits while Python issues thousands of kernel launches
a step (dequantization, LoRA matmuls, norms, RoPE, attention; measured in benchmarks/README.md). Under
checkpointing, a layer's work is two pure functions of its input: forward (nothing kept) and recomputation plus
backward (input, output gradient -> input gradient, trained-parameter gradients). Each is captured once per call
signature, after the signature was seen `WARM_CALLS` times (batches whose shapes vary never pay for a capture), and
replayed from then on.

What a graph bakes in is part of its signature: shapes, dtypes and strides of every tensor argument, the other
arguments' values, the layer's adapter state (active adapter, disabled, merged, scaling), the addresses of its
parameters, 4-bit scales and buffers (a merge or a move re-allocates them), which parameters are trained. Calls
under autocast, on another GPU, with module hooks or active dropout run eagerly. Inputs are copied into
the graphs' static buffers; outputs are copied out of them into buffers shared by all layers of a shape, so every
graph of a model draws its temporaries from one memory pool and holds no memory of its own between replays.
Anything the capture refuses (a host synchronization, an unsupported call, running out of memory) marks that
signature eager and stops the model capturing (graphs already captured keep replaying), with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch

from fastload.load.nf4_experts import is_stack
from fastload.model_state import state_of
from fastload.train.single_use import single_use_graph

WARM_CALLS = 2       # eager calls of a signature before it is captured
MAX_SIGNATURES = 4   # layer input shapes a model captures (and, apart, loss graphs); more run eagerly
MAX_SEEN = 4096      # signatures counted before the count starts over
MIN_FREE_FRACTION = 0.15  # captures start only while this much of the GPU (and at least MIN_FREE_BYTES) is free:
MIN_FREE_BYTES = 2 << 30  # the graphs' pool (about one layer's recomputation, ~0.5-1 GiB) is spare memory turned
                          # into speed, never the cause of an out-of-memory error


def _flatten(value, leaves: list):
    """tuple/list/dict nesting -> structure with leaves replaced by their index in `leaves`. Only these exact types
    are taken apart (a namedtuple or a ModelOutput is a leaf, which a capture then refuses as an output)."""
    if type(value) in (tuple, list):
        return type(value), tuple(_flatten(v, leaves) for v in value)
    if type(value) is dict:
        return dict, tuple((k, _flatten(v, leaves)) for k, v in value.items())
    leaves.append(value)
    return None, len(leaves) - 1


def _unflatten(structure, leaves: list):
    kind, body = structure
    if kind is None:
        return leaves[body]
    if kind is dict:
        return {k: _unflatten(v, leaves) for k, v in body}
    return kind(_unflatten(v, leaves) for v in body)


def _meta(t) -> tuple:
    return tuple(t.shape), t.dtype, t.stride(), t.requires_grad, t.device


class _Call:
    """One checkpointed call taken apart: the layer, the structure of its arguments, tensor leaves and the rest."""

    __slots__ = ("layer", "func", "structure", "leaves", "tensor_slots", "shape_key", "key")

    def __init__(self, function, hidden, key=None):

        self.func = function.func
        leaves: list = []
        self.structure = _flatten((function.args, function.keywords), leaves)
        self.leaves = leaves
        self.tensor_slots = tuple(i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor))
        self.layer = layer_of(function)
        tensor_metas = tuple(_meta(leaves[i]) for i in self.tensor_slots)
        self.shape_key = (_meta(hidden), tensor_metas)
        if key is not None:  # the forward's signature, reused by its backward: the same call, no second scan
            self.key = key
            return
        others = tuple(None if isinstance(v, torch.Tensor) else v for v in leaves)
        # the layer's own hooks run inside the checkpointed call only when it wraps layer.__call__ (transformers
        # 5.17 and earlier); later ones wrap its forward, with the hooks outside
        own = getattr(self.func, "__self__", None) is self.layer
        state = _layer_state(self.layer, own_hooks=own) if self.layer is not None else None
        self.key = (self.shape_key, self.func, others, state) if state is not None else None

    def rebuilt(self, tensors):
        """The same call with `tensors` in place of its tensor leaves."""
        leaves = list(self.leaves)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        args, keywords = _unflatten(self.structure, leaves)
        return functools.partial(self.func, *args, **keywords)


def layer_of(function):
    """The module a checkpointed partial runs, or None (then it runs eagerly)."""

    owner = getattr(function.func, "__self__", None)  # transformers 5.17: partial(layer.__call__, **kwargs)
    if owner is None and function.args:
        owner = function.args[0]                        # later: partial(forward, layer, **kwargs)
    return owner if isinstance(owner, torch.nn.Module) else None


_SAID: weakref.WeakSet = weakref.WeakSet()  # layers whose eager reason was logged (nothing written on them)


def _say_once(layer, why: str) -> None:
    if layer not in _SAID:
        from fastload._log import logger

        _SAID.add(layer)
        logger.info("engine: CUDA graphs: %s runs eagerly: %s", type(layer).__name__, why)


def modules_of(layer) -> list:
    """layer.modules() in the same order (depth first, each once), without its recursive generators: the scan
    below runs on every layer call, where the recursive walks showed in the step time."""
    seen, order, stack = set(), [], [layer]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        order.append(module)
        stack.extend(reversed([m for m in module._modules.values() if m is not None]))
    return order


def parameters_of(modules) -> list:
    """The parameters of these modules (from modules_of), each once, in layer.parameters()' order."""
    params, seen = [], set()
    for module in modules:
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _layer_state(layer, own_hooks: bool = True) -> tuple | None:
    """What a captured graph of this layer bakes in besides its arguments, or None where a graph cannot stand for
    the layer: module hooks (a replay would skip them), a parameter off the layer's device. (Active dropout never
    gets here: the engine's checkpoint hands such a layer to torch's.) Scanned on every forward call (its backward
    reuses that signature): adapters can be added, switched or rescaled at any time."""

    modules = modules_of(layer)
    adapters, buffers = [], []
    for module in modules:
        if (module is not layer or own_hooks) and (module._forward_hooks or module._forward_pre_hooks
                                                   or module._backward_hooks or module._backward_pre_hooks):
            _say_once(layer, "module hooks (transformers adds some once hidden states or attentions are asked for)")
            return None
        if "lora_A" in module._modules:
            adapters.append((tuple(module.active_adapters), module.disable_adapters, module.merged,
                             tuple(module.scaling.items())))
        buffers += [b for b in module._buffers.values() if b is not None]
    params = parameters_of(modules)
    if len({p.device for p in params}) > 1:
        return None
    addresses = []
    for p in params:
        if is_stack(p):  # 4-bit MoE experts: their packed bytes and statistics are what kernels read
            addresses += [t.data_ptr() for t in (p.packed, *p.stats.values())]
            continue
        addresses.append(p.data_ptr())
        state = getattr(p, "quant_state", None)  # a 4-bit weight's scales are read by address too
        if state is not None:
            addresses += [t.data_ptr() for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
            if getattr(state, "state2", None) is not None:
                addresses += [state.state2.absmax.data_ptr(), state.state2.code.data_ptr()]
    addresses += [b.data_ptr() for b in buffers]
    return (id(layer), layer.training, tuple(adapters), tuple(addresses), tuple(p.requires_grad for p in params))


class _Inputs:
    """Static input buffers shared by every graph of one shape; a source tensor already copied (the same object,
    unchanged since) is not copied again: all layers of a step get the same rotary tables and masks."""

    def __init__(self, hidden, tensors):
        self.hidden = hidden.detach().clone()
        self.tensors = [t.detach().clone() for t in tensors]
        self._sources = [None] * len(tensors)  # (weak reference, version): a mask is not kept alive for this

    def load(self, hidden, tensors) -> None:
        self.hidden.copy_(hidden)
        for i, source in enumerate(tensors):
            last = self._sources[i]
            if last is not None and last[0]() is source and last[1] == source._version:
                continue
            self.tensors[i].copy_(source)
            self._sources[i] = (weakref.ref(source), source._version)


class _LayerGraph:
    __slots__ = ("forward", "backward", "params", "grad_slots", "outputs")

    def __init__(self):
        self.forward = self.backward = None
        self.params, self.grad_slots, self.outputs = (), (), None


class ModelGraphs:
    """The CUDA graphs of one model's checkpointed layers, with their shared memory pool and buffers."""

    def __init__(self, device):

        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pool = None
        self.capture_stream = None
        self.seen: dict = {}
        self.graphs: dict = {}
        self.pure_graphs: dict = {}
        self.failed: set = set()
        self.signatures = weakref.WeakKeyDictionary()  # a forward's partial -> its signature, for its backward
        self.shapes: set = set()
        self.inputs: dict = {}
        self.outputs: dict = {}
        self.grad_outputs: dict = {}
        self.grads: dict = {}
        self.replays = 0
        self.disabled: str | None = None  # why nothing more is captured (what was captured still replays)
        self._warned_shapes = False

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, function, hidden):
        """The layer's output computed by replaying its graph, or None when this call runs eagerly."""
        if not self._applies(function, hidden):
            return None
        call = _Call(function, hidden)
        self.signatures[function] = call.key  # for this call's backward (the partial lives on its autograd node)
        try:
            if call.key is None or call.key in self.failed:
                return None
        except TypeError:  # an argument that cannot be part of a signature (unhashable): eager
            return None
        graph = self.graphs.get(call.key)
        if graph is None:
            graph = self._maybe_capture_forward(call, hidden)
            if graph is None:
                return None
        inputs = self.inputs[call.shape_key]
        inputs.load(hidden, [call.leaves[i] for i in call.tensor_slots])
        graph.forward.replay()
        self.replays += 1
        structure, buffers = graph.outputs
        return _unflatten(structure, [b.clone() if b is not None else v for b, v in buffers])

    def _maybe_capture_forward(self, call, hidden):
        if len(self.seen) > MAX_SEEN or len(self.failed) > MAX_SEEN:  # shapes that never repeat: forget them
            self.seen.clear()
            self.failed.clear()
        count = self.seen.get(call.key, 0) + 1
        self.seen[call.key] = count
        if count <= WARM_CALLS or self.disabled:
            return None
        if call.shape_key not in self.shapes and len(self.shapes) >= MAX_SIGNATURES:
            if not self._warned_shapes:
                self._warned_shapes = True
                from fastload._log import logger

                logger.info("engine: CUDA graphs for %d input shapes only; later shapes run eagerly (pad batches "
                            "to at most that many lengths to replay every step)", MAX_SIGNATURES)
            self.failed.add(call.key)
            return None
        if not self._room_to_capture():
            return None
        try:
            graph = self._capture_forward(call, hidden)
        except Exception as error:  # noqa: BLE001 - any refusal means: this signature runs eagerly
            self._give_up(call.key, "forward", error)
            return None
        self.graphs[call.key] = graph
        self.shapes.add(call.shape_key)
        return graph

    def _capture_forward(self, call, hidden):

        tensors = [call.leaves[i] for i in call.tensor_slots]
        inputs = self.inputs.get(call.shape_key)
        if inputs is None:
            inputs = self.inputs[call.shape_key] = _Inputs(hidden, tensors)
        inputs.load(hidden, tensors)
        run = call.rebuilt(inputs.tensors)
        with torch.no_grad():
            sample = _warm_up(lambda: run(inputs.hidden), self.device)
        leaves: list = []
        structure = _flatten(sample, leaves)
        if not all(isinstance(v, torch.Tensor) or v is None for v in leaves):
            raise TypeError("the layer returns something other than tensors, tuples, lists and dicts of them")
        key = (call.shape_key, tuple(_meta(v) if isinstance(v, torch.Tensor) else None for v in leaves))
        shared = self.outputs.get(key)
        if shared is None:
            shared = self.outputs[key] = [torch.empty_like(v) if isinstance(v, torch.Tensor) else None
                                          for v in leaves]
        del sample
        graph = _LayerGraph()
        graph.forward = torch.cuda.CUDAGraph()
        with torch.no_grad(), self._capturing(graph.forward):
            out_leaves: list = []
            _flatten(run(inputs.hidden), out_leaves)
            for buffer, value in zip(shared, out_leaves):
                if buffer is not None:
                    buffer.copy_(value)
        graph.outputs = (structure, [(b, None if b is not None else v) for b, v in zip(shared, leaves)])
        return graph

    # -- backward ------------------------------------------------------------------------------------------------
    def backward(self, function, hidden, grad_outs):
        """(input gradient, trained parameters, their gradients) by replaying the layer's backward graph, or None
        when this call runs eagerly."""
        if not self._applies(function, hidden):
            return None
        call = _Call(function, hidden, key=self.signatures.get(function))
        if call.key is None:
            return None
        try:
            graph = self.graphs.get(call.key)
        except TypeError:
            return None
        if graph is None or call.key in self.failed:
            return None
        if graph.backward is None:
            if self.disabled or not self._room_to_capture():
                return None
            try:
                self._capture_backward(call, graph, hidden)
            except Exception as error:  # noqa: BLE001
                self._give_up(call.key, "backward", error)
                return None
        inputs = self.inputs[call.shape_key]
        inputs.load(hidden, [call.leaves[i] for i in call.tensor_slots])
        for buffer, grad in zip(graph.grad_slots[0], grad_outs):
            if buffer is None:
                continue
            if grad is None:
                buffer.zero_()
            else:
                buffer.copy_(grad)
        graph.backward.replay()
        self.replays += 1
        grad_hidden, param_grads = graph.grad_slots[1], graph.grad_slots[2]
        return (grad_hidden.clone() if grad_hidden is not None else None), graph.params, param_grads

    def _capture_backward(self, call, graph, hidden) -> None:

        layer = call.layer
        params = tuple(p for p in parameters_of(modules_of(layer)) if p.requires_grad)  # as the Function's inputs
        inputs = self.inputs[call.shape_key]
        inputs.load(hidden, [call.leaves[i] for i in call.tensor_slots])
        run = call.rebuilt(inputs.tensors)
        needs_input_grad = hidden.requires_grad
        structure, buffers = graph.outputs
        out_key = tuple(None if b is None else _meta(b) for b, _ in buffers)
        grad_outs = self.grad_outputs.get(out_key)
        if grad_outs is None:  # one set for all layers of a shape, like the outputs
            grad_outs = self.grad_outputs[out_key] = [torch.zeros_like(b) if b is not None and b.is_floating_point()
                                                      else None for b, _ in buffers]

        def step(trained):
            x = inputs.hidden.detach().requires_grad_(needs_input_grad)
            with torch.enable_grad(), single_use_graph():  # each replay recomputes what the backward reads
                leaves: list = []
                _flatten(run(x), leaves)
            pairs = [(o, g) for o, g in zip(leaves, grad_outs)
                     if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
            wrt = ((x,) if needs_input_grad else ()) + tuple(trained[id(p)] for p in params)
            return torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)

        with _fresh_leaves(layer, params) as leaves:
            sample = _warm_up(lambda: step(leaves), self.device)
        key = tuple(None if g is None else _meta(g)[:3] for g in sample)
        shared = self.grads.get(key)
        if shared is None:
            shared = self.grads[key] = [None if g is None else torch.empty_like(g) for g in sample]
        del sample
        graph.backward = torch.cuda.CUDAGraph()
        with _fresh_leaves(layer, params) as leaves, self._capturing(graph.backward):
            for buffer, grad in zip(shared, step(leaves)):
                if buffer is not None:
                    buffer.copy_(grad)
        graph.params = params
        graph.grad_slots = (grad_outs, shared[0] if needs_input_grad else None, tuple(shared[int(needs_input_grad):]))

    # -- other pure functions (the loss) ---------------------------------------------------------------------------
    def pure(self, name: str, function, tensors, extra=()):
        """function(*tensors) -> tuple of tensors, replayed from a graph once (name, shapes, extra) repeats, in the
        layers' memory pool (so its temporaries share their memory); fresh output tensors, or None when eager."""

        if not all(t.device == self.device for t in tensors) or torch.is_autocast_enabled("cuda"):
            return None
        key = (name, tuple(_meta(t) for t in tensors), extra)
        entry = self.pure_graphs.get(key)
        if entry is None:
            if key in self.failed or self.disabled:
                return None
            count = self.seen.get(key, 0) + 1
            self.seen[key] = count
            if count <= WARM_CALLS:
                return None
            if len(self.pure_graphs) >= MAX_SIGNATURES:
                self.failed.add(key)
                return None
            if not self._room_to_capture():
                return None
            try:
                entry = self._capture_pure(function, tensors)
            except Exception as error:  # noqa: BLE001
                self._give_up(key, name, error)
                return None
            self.pure_graphs[key] = entry
        graph, inputs, outputs = entry
        for static, tensor in zip(inputs, tensors):
            static.copy_(tensor)
        graph.replay()
        self.replays += 1
        return tuple(o.clone() for o in outputs)

    def _capture_pure(self, function, tensors):

        inputs = [t.detach().clone() for t in tensors]
        sample = _warm_up(lambda: function(*inputs), self.device)
        outputs = [torch.empty_like(o) for o in sample]
        del sample
        graph = torch.cuda.CUDAGraph()
        with self._capturing(graph):
            for buffer, value in zip(outputs, function(*inputs)):
                buffer.copy_(value)
        return graph, inputs, outputs

    # -- shared --------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """What the graphs did so far, for a benchmark's record: a lever that replays nothing costs memory only."""
        return {"layer_graphs": sum(1 for g in self.graphs.values() if g.forward is not None),
                "with_backward": sum(1 for g in self.graphs.values() if g.backward is not None),
                "loss_graphs": len(self.pure_graphs), "replays": self.replays, "stopped": self.disabled}

    def _applies(self, function, hidden) -> bool:
        """Whether a graph may stand for this call at all: a partial over a module, on this model's device, which
        is the current one, outside autocast (a capture would bake autocast's cached casts of the weights in, and
        backward runs outside the forward's autocast region)."""

        return (isinstance(function, functools.partial) and hidden.is_cuda and hidden.device == self.device
                and torch.cuda.current_device() == hidden.device.index and not torch.is_autocast_enabled("cuda"))

    def _room_to_capture(self) -> bool:

        free, total = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if free >= max(MIN_FREE_BYTES, MIN_FREE_FRACTION * total):
            return True
        from fastload._log import logger

        self.disabled = "little free GPU memory"
        logger.info("engine: CUDA graphs: no more layers captured, %.1f of %.1f GiB free (their memory pool would "
                    "leave too little); the rest run eagerly", free / (1 << 30), total / (1 << 30))
        return False

    @contextlib.contextmanager
    def _capturing(self, graph):
        """torch.cuda.graph on this model's device and its own capture stream; the thread's stream is put back
        even when the capture fails (torch's context would leave the capture stream current)."""

        with torch.cuda.device(self.device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            if self.capture_stream is None:
                self.capture_stream = torch.cuda.Stream(self.device)
            previous = torch.cuda.current_stream(self.device)
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream,
                                      capture_error_mode="thread_local"):
                    yield
            finally:
                torch.cuda.set_stream(previous)

    def _give_up(self, key, part: str, error: Exception) -> None:

        from fastload._log import logger

        self.failed.add(key)
        self.graphs.pop(key, None)
        if self.pool is not None:
            try:  # a capture that raised may leave the allocator routing this thread's allocations to the pool
                torch._C._cuda_endAllocateToPool(self.device.index, self.pool)
            except Exception:  # noqa: BLE001 - nothing was left routed
                pass
        causes = []
        while error is not None and len(causes) < 3:  # the first refusal is often the context of a later one
            causes.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            error = error.__cause__ or error.__context__
        self.disabled = f"a {part} capture failed"  # captured graphs still replay; nothing more is captured
        logger.warning("engine: CUDA graphs: capturing a decoder layer's %s failed, so this model captures no more "
                       "layers (those captured keep replaying; the rest run eagerly): %s", part, " <- ".join(causes))


@contextlib.contextmanager
def _fresh_leaves(layer, params):
    """The layer's trained parameters swapped for new leaves on the same memory while a backward is warmed up or
    captured. A parameter's gradient accumulator lives as long as the step's autograd graph holds it and remembers
    the stream it was made on (the default one); differentiating the real parameter inside a capture would make
    autograd synchronize that stream with the capturing one, which a capture refuses. Yields {id(param): leaf}."""

    wanted = {id(p) for p in params}
    fresh: dict = {}
    swapped = []
    for module in layer.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in wanted:
                leaf = fresh.get(id(param))
                if leaf is None:
                    leaf = fresh[id(param)] = torch.nn.Parameter(param.detach(), requires_grad=True)
                module._parameters[name] = leaf
                swapped.append((module, name, param))
    try:
        yield fresh
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


_WARM_UP_STREAMS: dict = {}


def _warm_up(run, device):
    """One call on a side stream before capture, as CUDA graphs require (lazy initialisations happen outside).
    One stream per device for every warm-up: cuBLAS keeps a workspace per stream it ever ran on, so a stream per
    capture would hold one workspace per capture."""

    current = torch.cuda.current_stream(device)
    side = _WARM_UP_STREAMS.get(str(device))
    if side is None:
        side = _WARM_UP_STREAMS[str(device)] = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        result = run()
    current.wait_stream(side)
    return result


def graphs_for(model, device) -> ModelGraphs:
    """The model's graph set (one per model instance, kept on its state), made on first use."""
    state = state_of(model)
    if state.graphs is None:
        state.graphs = ModelGraphs(device)
    return state.graphs


def graphs_of(model) -> ModelGraphs | None:
    """The model's graph set if the cuda_graphs lever made one."""
    return state_of(model, create=False).graphs
