"""LoRA on the fused experts of mixture-of-experts layers, in low-rank form per routed token.

transformers 5 keeps each layer's experts as fused 3-D weights (Mixtral, Qwen3-MoE, gpt-oss, ...), which peft adapts
through `target_parameters`: its ParamWrapper registers a parametrization that, in 16-bit, builds W + s B A for every
expert on every call (a tensor as large as the layer's expert stack, built again in recomputation), and the experts'
own forward then reads that. Here each projection runs on the tokens routed to each expert only:
y = x W_e^T + s (x A_e^T) B_e^T, the tokens sorted by expert and multiplied by grouped matmuls (torch's grouped_mm
with per-expert offsets; a loop over the experts where it cannot run), so nothing weight-sized is built. The experts
module's own layout attributes (set by transformers' `use_experts_implementation`: transposed weights, biases, its
gate function) decide the arithmetic, which follows transformers' grouped_mm experts forward.

Experts stored 4-bit (fastload.load.nf4_experts) are dequantized per projection inside an autograd function, in
forward and again in backward: nothing weight-sized is kept between them, except the last projection's across a
checkpointed layer's recomputation, whose backward follows at once (Grouped4bit).

Patched per instance, on the outermost ParamWrapper of each experts module; every call the lever cannot compute
exactly (adapters disabled or merged, several active adapters, expert parallelism, another parametrization) goes to
peft's own forward, and merging, unmerging and saving stay peft's.
"""

from __future__ import annotations

import functools
import inspect
import types
from pathlib import Path

import torch

from fastload._log import logger
from fastload.engine.triton import experts as triton_experts
from fastload.engine.triton.launch import tensor_cores_take, triton_runs_on
from fastload.engine.triton.nf4 import dequantize_4bit, supported
from fastload.load.nf4_experts import is_stack
from fastload.model_state import is_patched, mark_patched
from fastload.train.single_use import graph_is_single_use

LEVER = "expert_lora"
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
LAYOUT = ("num_experts", "has_gate", "has_bias", "is_transposed")  # what use_experts_implementation sets (5.x)
GROUPED_MM_ALIGNMENT = 16  # bytes: grouped_mm's rule for data pointers and non-unit strides


def _param_wrapper_type():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def outer_wrappers(model) -> list:
    """The outermost peft ParamWrapper of each adapted module (peft nests one wrapper per targeted parameter)."""
    wrapper = _param_wrapper_type()
    wrappers = [m for m in model.modules() if isinstance(m, wrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    return [w for w in wrappers if id(w) not in inner]


def wrapper_chain(outer) -> list:
    """The nested ParamWrappers from `outer` inwards (one per adapted parameter)."""
    wrapper, chain = _param_wrapper_type(), [outer]
    while isinstance(chain[-1].base_layer, wrapper):
        chain.append(chain[-1].base_layer)
    return chain


def expert_blocker(outer) -> str | None:
    """Why the lever leaves the module under this ParamWrapper to peft, or None when it computes it."""
    experts = outer.get_base_layer()
    name = type(experts).__name__
    missing = [attr for attr in LAYOUT if not hasattr(experts, attr)]
    if missing:
        return f"{name} is not a transformers experts module (it lacks {', '.join(missing)})"
    others = sorted({w.parameter_name for w in wrapper_chain(outer)} - set(PROJECTIONS))
    if others:
        return f"{name}'s adapted parameters {others} are not expert projections"
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    if not all(isinstance(getattr(experts, p, None), torch.nn.Parameter) and getattr(experts, p).ndim == 3
               for p in (up, "down_proj")):
        return f"{name} does not hold its {up} and down_proj as 3-D parameters"
    if len(_routing_names(experts)) != 3:
        return f"{name}'s forward does not take (hidden_states, expert indices, routing weights)"
    if not _dispatches_to_experts_backends(type(experts)):
        return (f"{name} overrides transformers' experts forward with steps of its own (e.g. Ergo's per-route norm), "
                "which the low-rank path would skip")
    return None


@functools.cache
def _dispatches_to_experts_backends(experts_class) -> bool:
    """Whether the class's forward is the one `use_experts_implementation` installs (it dispatches to the grouped_mm
    and batched backends, whose arithmetic the lever follows), not a subclass's forward around it."""
    from transformers.integrations import moe

    code = getattr(experts_class.forward, "__code__", None)
    return code is not None and Path(code.co_filename).resolve() == Path(moe.__file__).resolve()


def _routing_names(experts) -> list[str]:
    """The names of the experts forward's first three arguments: hidden states, expert indices, routing weights
    (transformers names them top_k_index/top_k_weights, gpt-oss router_indices/routing_weights)."""
    return _forward_arguments(type(experts))


@functools.cache
def _forward_arguments(experts_class) -> list[str]:
    params = list(inspect.signature(experts_class.forward).parameters.values())[1:]  # after self
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:3]


def _routed(names: list[str], args: tuple, kwargs: dict):
    """(hidden_states, indices, weights) of this call, or None when it carries anything else."""
    if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
        return None
    values = dict(zip(names, args), **kwargs)
    routed = [values.get(n) for n in names]
    return None if any(v is None for v in routed) else routed


def active_factors(chain, experts) -> dict | None:
    """{parameter name: (A^T (E, in, r), B^T (E, r, out), scaling)} of the one active adapter on each wrapper, or
    None when this call must go to peft (adapters disabled or merged, several active, no adapter at all, expert
    parallelism, or a parametrization already on the experts)."""
    if getattr(experts, "_is_expert_parallel", False) or torch.nn.utils.parametrize.is_parametrized(experts):
        return None
    factors = {}
    for wrapper in chain:
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if wrapper.disable_adapters or wrapper.merged or len(active) > 1:
            return None
        if active:
            factors[wrapper.parameter_name] = _factors(wrapper, active[0])
    return factors or None


def _factors(wrapper, adapter: str):
    """peft's layout for E experts of rank r: lora_A (E*r, in), expert-major; lora_B (out, r*E), expert-minor."""
    experts = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    a_t = a.view(experts, -1, a.shape[-1]).transpose(-2, -1)            # (E, in, r)
    b_t = b.view(b.shape[0], -1, experts).permute(2, 1, 0)              # (E, r, out)
    return a_t, b_t, wrapper.scaling[adapter]


def experts_forward(experts, factors: dict, hidden: torch.Tensor, indices: torch.Tensor,
                    weights: torch.Tensor, scale_inputs: bool = False) -> torch.Tensor:
    """The experts' output for tokens routed by (indices, weights), each adapted projection in low-rank form:
    the arithmetic of transformers' grouped_mm experts forward plus s (x A_e^T) B_e^T per projection.
    `scale_inputs`: each routed row is scaled by its weight before the experts, not after (Llama-4's layout)."""
    top_k = indices.shape[-1]
    order, perm = routing_order(indices.reshape(-1), experts.num_experts)
    inverse = torch.empty_like(perm)
    inverse[perm] = positions(perm.numel(), perm.device)
    offsets = _offsets(order, experts.num_experts)
    expert_of_row = order.long() if experts.has_bias else None  # a bias's row index (a uint8 index would be a mask)
    fused = _fused_elementwise(experts, hidden)
    device, dtype, width = hidden.device, hidden.dtype, hidden.shape[-1]
    token_of_row = perm // top_k if fused else None
    if fused and triton_experts.kernel_runs("spread", device, dtype, width, top_k):
        x = triton_experts.spread_rows(hidden, token_of_row, inverse, top_k)
    else:
        x = SpreadRows.apply(hidden, perm, inverse, top_k)
    # a gather whose gradient is a gather: indexing's own backward accumulates with a sort and atomics (48 such
    # calls, 5 ms of host time in two Qwen3-MoE steps on an H100)
    routing = PermuteRows.apply(weights.reshape(-1), perm, inverse).unsqueeze(-1)
    if scale_inputs:
        x = x * routing
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    h, h_lora = _projection(experts, up, x, expert_of_row, offsets, factors.get(up))
    # (h r) W = (h W) r for each row's routing weight r: applied on the narrower side (768 against 2048 columns for
    # Qwen3-MoE, forward and backward) where nothing between them (a down_proj bias, a post-expert norm) is affine;
    # not for wider experts (Mixtral's 14336) or weights in another dtype (Mixtral's fp32: transformers' product)
    post_norm = getattr(experts, "has_post_expert_norm", False)  # set from transformers 5.2x on; absent means none
    inner = h.shape[-1] // (2 if experts.has_gate else 1)
    weighted_early = (not scale_inputs and not experts.has_bias and not post_norm and inner < width
                      and routing.dtype == h.dtype)
    if (fused and experts.has_gate and _default_gate(experts)
            and triton_experts.kernel_runs("gate", device, dtype, inner, h_lora is not None, weighted_early)):
        h = triton_experts.experts_gate(h, h_lora, routing if weighted_early else None)
    else:
        h = _summed(h, h_lora)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        if weighted_early:
            h = h * routing
    y, y_lora = _projection(experts, "down_proj", h, expert_of_row, offsets, factors.get("down_proj"))
    if (fused and weighted_early
            and triton_experts.kernel_runs("combine", device, dtype, width, top_k, y_lora is not None)):
        # summed over the k choices of each token, added to the adapter's rows: one launch
        return triton_experts.combine_rows(y, y_lora, inverse, token_of_row, top_k, dtype)
    y = _summed(y, y_lora)
    if post_norm:
        y = experts.post_expert_norm(y)
    if not weighted_early and not scale_inputs:
        y = y * routing
    # summed over the k choices of each token, as transformers does (fp32 accumulation inside the sum)
    return PermuteRows.apply(y, inverse, perm).view(hidden.shape[0], top_k, -1).sum(dim=1).to(hidden.dtype)


def _summed(y: torch.Tensor, lora: torch.Tensor | None) -> torch.Tensor:
    return y if lora is None else y + lora


def _fused_elementwise(experts, hidden: torch.Tensor) -> bool:
    """Whether the Triton gate and combine kernels compute this call: on the device Triton launches on, with the
    experts' weights in the activations' 16-bit dtype (the kernels round like the torch ops between them)."""
    if hidden.dtype not in (torch.bfloat16, torch.float16) or not triton_runs_on(hidden):
        return False
    up = "gate_up_proj" if experts.has_gate else "up_proj"
    return all(getattr(experts, name).dtype == hidden.dtype for name in (up, "down_proj"))


def _default_gate(experts) -> bool:
    """Whether the experts' gate is transformers' default, silu(gate) * up on concatenated [gate | up] columns."""
    from transformers.integrations.moe import _default_apply_gate

    return (type(experts)._apply_gate is _default_apply_gate and getattr(experts, "is_concatenated", True)
            and type(getattr(experts, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"))


class PermuteRows(torch.autograd.Function):
    """x[index] for a permutation `index` whose inverse is `inverse`: the gradient is a gather too (autograd's own
    backward of indexing accumulates with a sort and atomics, not knowing no row repeats)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class SpreadRows(torch.autograd.Function):
    """hidden[perm // k]: each token's row once per expert it was routed to, in expert order. The gradient sums each
    token's k rows, found through `inverse` (perm's inverse), instead of accumulating by index."""

    @staticmethod
    def forward(ctx, hidden, perm, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return hidden[perm // k]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None, None


def routing_order(flat: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sorted expert ids, in the narrowest integer type that holds them; the permutation sorting `flat`), the
    rows of one expert kept in routing order. The GPU's radix sort makes one pass per byte of key: eight launches for
    int64 ids, one for uint8 at up to 256 experts (the cast is one more)."""
    return torch.sort(flat.to(_narrowest(experts)), stable=True)


def _narrowest(experts: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if experts - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _offsets(order: torch.Tensor, experts: int) -> torch.Tensor:
    """End of each expert's rows among the sorted tokens (int32, as grouped_mm takes them): where each expert id
    would go after its equals in the sorted ids. One launch (a count and its running sum took four), and a static
    shape for CUDA graphs, as bincount's is not."""
    return torch.searchsorted(order, positions(experts, order.device, order.dtype), right=True, out_int32=True)


_POSITIONS: dict = {}  # (device, dtype) -> every positions tensor made there, the longest last


def positions(n: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """0 .. n-1 in `dtype`, a view of a tensor kept per device and dtype and grown to the next power of two when too
    short: one launch fewer per layer call than a fresh arange. Shorter ones stay alive: a CUDA graph may have
    captured a view of one (and nothing is kept while a graph captures: its values would be written only at
    replay). A narrow dtype's n stays within it: the next power of two above 2**k values still fits k bits."""
    kept = _POSITIONS.get((device, dtype))
    if kept and kept[-1].numel() >= n:
        return kept[-1][:n]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.arange(n, device=device, dtype=dtype)
    made = torch.arange(1 << max(n - 1, 0).bit_length(), device=device, dtype=dtype)
    _POSITIONS.setdefault((device, dtype), []).append(made)
    return made[:n]


def _projection(experts, name: str, x: torch.Tensor, expert_of_row, offsets, factors):
    """(x W_e^T (+ bias_e), s (x A_e^T) B_e^T or None) for the sorted rows of x, in the weight's dtype: the two
    terms apart, for a kernel after them to add while it reads them."""
    weight = getattr(experts, name)
    dtype = weight.dtype
    x = x.to(dtype)
    if is_stack(weight):
        y = Grouped4bit.apply(x, weight, offsets, experts.is_transposed, name == "down_proj")
    else:
        y = _grouped(x, weight if experts.is_transposed else weight.transpose(-2, -1), offsets)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[expert_of_row]
    if factors is None:
        return y, None
    a_t, b_t, scaling = factors  # cast per call: (E, in, r) and (E, r, out) values, not the expert stack
    xa = _grouped(x, a_t.to(dtype), offsets, dense_grad=True)  # read by the next grouped_mm (or a scale) only
    if scaling != 1:  # alpha = r (Unsloth's and fastload's default) scales by one: no launch, forward or backward
        xa = xa * scaling
    b_cast = b_t.contiguous() if b_t.dtype == dtype else b_t.to(dtype, memory_format=torch.contiguous_format)
    return y, _grouped(xa, b_cast, offsets)  # one copy, not two (and contiguous either way: grouped_mm's layout)


class Grouped4bit(torch.autograd.Function):
    """x W_e^T per expert for a frozen 4-bit stack: dequantized in forward and again in backward (for the input's
    gradient), so autograd keeps the packed stack, never its 16-bit values.

    `last`: the experts' last projection (down_proj). In a layer's recomputation (a single-use graph: checkpointing)
    its backward comes right after the layer's forward, so the 16-bit stack made for the forward serves it: one
    dequantization fewer per layer and step, held over the ops left in the layer (the gather back to tokens, a
    shared expert where the family has one), which are narrower than the forward that held it with its output. The
    first projection's would be held across the second's, adding its size to the peak."""

    @staticmethod
    def forward(ctx, x, stack, offsets, transposed: bool, last: bool = False):
        weight = _in_out(stack, transposed)
        ctx.stack, ctx.transposed = stack, transposed
        ctx.kept = last and x.requires_grad and graph_is_single_use()
        ctx.save_for_backward(offsets, *((weight,) if ctx.kept else ()))
        return _grouped(x, weight, offsets)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        offsets, *kept = ctx.saved_tensors
        weight = kept[0] if kept else _in_out(ctx.stack, ctx.transposed)
        return _grouped(grad.contiguous(), weight.transpose(-2, -1), offsets), None, None, None, None


def _in_out(stack, transposed: bool) -> torch.Tensor:
    """The stack dequantized as (experts, in, out): stored so when the experts module is transposed."""
    dense = dequantize_stack(stack)
    return dense if transposed else dense.transpose(-2, -1)


def dequantize_stack(stack) -> torch.Tensor:
    """stack.dequantize(), through the engine's Triton kernel where it runs (one launch, the same values as
    bitsandbytes' blockwise kernel; 217 against 322 us per Qwen3-MoE stack on an H200)."""
    state = stack.quant_state()
    if state.dtype != stack.dtype or not supported(stack.packed, state):
        return stack.dequantize()
    dense = dequantize_4bit(stack.packed, state)
    return dense.transpose(-2, -1) if stack.transposed else dense


def _grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, dense_grad: bool = False) -> torch.Tensor:
    """Rows offsets[e-1]:offsets[e] of x times w[e], for each expert e. `dense_grad`: the caller's use of the
    product gives it a dense gradient, so no hook makes it one (a Python call a projection less, both ways)."""
    if not grouped_mm_runs(x, w) or (x.device.type, x.dtype) in _REFUSED:
        return _looped(x, w, offsets)
    try:
        y = _grouped_mm()(x, w, offs=offsets)
    except RuntimeError as e:  # a GPU or build whose grouped_mm does not take these (checked per device and dtype)
        _REFUSED.add((x.device.type, x.dtype))
        logger.info("expert_lora: grouped_mm refused %s operands on %s (%s): one matmul per expert from now on",
                    str(x.dtype).replace("torch.", ""), x.device, str(e).splitlines()[0][:120])
        return _looped(x, w, offsets)
    if y.requires_grad and not dense_grad:  # grouped_mm's backward refuses a broadcast (stride 0) gradient
        y.register_hook(lambda grad: grad.contiguous())
    return y


_REFUSED: set = set()  # (device type, dtype) whose grouped_mm raised: the loop from then on


def _grouped_mm():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch's grouped_mm takes these operands and its backward the gradients: bf16 on CUDA from compute
    capability 8.0, any float on the CPU; row-major or column-major matrices with 16-byte-aligned data and strides,
    output rows included (its gradient's rows are the backward's operand)."""
    if _grouped_mm() is None or x.dtype != w.dtype or x.shape[0] == 0:  # no rows: its backward refuses K = 0
        return False
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or not tensor_cores_take(x.dtype, x.device):  # sm_80 on, asked once
            return False
    elif x.device.type != "cpu":
        return False
    return _aligned(x) and _aligned(w) and w.shape[-1] * w.element_size() % GROUPED_MM_ALIGNMENT == 0


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return (1 in t.stride()[-2:] and t.data_ptr() % GROUPED_MM_ALIGNMENT == 0
            and all(s == 1 or s * size % GROUPED_MM_ALIGNMENT == 0 for s in t.stride()))


def _looped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The per-expert loop for operands grouped_mm does not take (one host sync to read the offsets)."""
    if x.is_cuda:
        _note_loop(str(x.dtype).replace("torch.", ""), tuple(w.shape[-2:]))
    parts, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            parts.append(x[start:end] @ w[expert])
        start = end
    return torch.cat(parts) if parts else x.new_zeros(x.shape[0], w.shape[-1])


@functools.cache
def _note_loop(dtype: str, shape: tuple) -> None:
    logger.info("expert_lora: grouped_mm does not take %s operands of shape %s here: one matmul per expert instead",
                dtype, shape)


def _lever_forward(self, *args, **kwargs):
    """The outermost ParamWrapper's forward: the low-rank path where it computes the call exactly, else peft's. It
    reads everything from `self` at call time, so a deep copy of the model computes with the copy's weights."""
    experts = self.get_base_layer()
    routed = _routed(_routing_names(experts), args, kwargs)
    factors = active_factors(wrapper_chain(self), experts) if routed is not None else None
    if factors is None or not routed[0].is_floating_point():
        return type(self).forward(self, *args, **kwargs)
    return experts_forward(experts, factors, *routed)


def _install(model, outer) -> None:
    outer.forward = types.MethodType(_lever_forward, outer)
    mark_patched(model, outer, LEVER)


def install_expert_lora(model) -> dict[str, str]:
    """Give each experts module carrying peft LoRA on its fused weights the low-rank forward.

    Args:
        model: the model, or its peft wrapper (the patch is scoped to its modules).

    Returns:
        {experts class name: why} for the adapted modules the lever leaves to peft (empty when it covers all).
    """
    blocked = {}
    for outer in outer_wrappers(model):
        if is_patched(model, outer, LEVER):
            continue
        why = expert_blocker(outer)
        if why is None:
            _install(model, outer)
        else:
            blocked[type(outer.get_base_layer()).__name__] = why
    return blocked
