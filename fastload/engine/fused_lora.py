"""LoRA projections as autograd functions in the compute dtype: y_i = x W_i^T + s_i (x A_i^T) B_i^T.

peft computes the adapter branch in the adapters' dtype (fp32 here, kept so on purpose for the optimizer): every
projection casts its input to fp32, multiplies in fp32 and adds an fp32 (tokens x out) result back, and autograd
keeps those copies for backward. Here the fp32 adapters are cast to the compute dtype once per call (r x in values,
not tokens x in) and backward re-dequantizes the 4-bit weight instead of keeping it. Gradients of A and B come back in
fp32.

A 4-bit weight is dequantized into a fresh buffer every call anyway, so on calls with enough tokens to pay for it
the adapter is merged into that buffer (W + s B A, one Triton kernel on CUDA) and the input is multiplied once: no
(tokens x out) adapter product added to the output in forward and recomputation, no (tokens x in) one added to the
input gradient in backward. In exact arithmetic the result is peft's; in 16 bits the merged weight is rounded once
per element, as the dequantized weight already is (bf16 training from a fresh adapter follows the plain path's
losses: tests/engine/test_engine.py). A 16-bit base weight is used as it is, with the adapter product added to the
output.

Projections that read the same input (q/k/v of attention, gate/up of a gated MLP) run as one group: one saved
input, one autograd node, and backward accumulates their input gradients in place into one buffer instead of
leaving autograd to add separate (tokens x hidden) tensors. The model's own forward code is unchanged: the
group's first projection computes every member's output and hands each of the others its result when it is
called next with that same input tensor.
"""

from __future__ import annotations

import torch

from fastload.engine.triton.nf4 import dequantize_4bit, dequantize_4bit_lora, lora_supported, supported
from fastload.model_state import mark_patched, state_of
from fastload.structure import is_linear4bit, is_plain_linear

LEVER = "fused_lora"

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings called on the same input
# Merging into the dequantized weight pays from ~half the weight's smaller side in tokens per call (measured:
# benchmarks/README.md); shorter calls, decoding above all, add the adapter's product to the output.
MERGE_MIN_TOKENS_PER_WIDTH = 0.5
# (cross-attention, whose k/v read another input, and members of unequal input width are never grouped)


def _full_weight(base, dtype):
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:  # a 16-bit base layer
        return weight.to(dtype)
    if supported(weight.data, state):
        return dequantize_4bit(weight.data, state).to(dtype)
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight.data, state).to(dtype)


def _merge_pays(tokens: int, base) -> bool:
    return tokens >= MERGE_MIN_TOKENS_PER_WIDTH * min(base.in_features, base.out_features)


def _merged_weight(base, a, b, scaling, dtype):
    """W + scaling * b @ a where merging pays, else None (the caller adds the adapter's product to the output): a 4-bit
    base (a 16-bit weight is not copied, so there is nothing to merge into) whose fresh dequantized buffer takes the
    adapter's product, by fastload's Triton kernel on CUDA, by torch on the CPU. On CUDA without the kernel no merge:
    torch's extra pass over the weight would cost more."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return None
    if dtype == state.dtype and lora_supported(weight.data, state, a, b):
        return dequantize_4bit_lora(weight.data, state, a, b, scaling)
    if weight.device.type == "cuda":
        return None
    return _full_weight(base, dtype).addmm_(b.to(dtype), a.to(dtype), alpha=scaling)


class LoraGroup(torch.autograd.Function):
    """forward(x, bases, scalings, a_1, b_1, ..., a_n, b_n) -> (y_1, ..., y_n)."""

    @staticmethod
    def forward(ctx, x, bases, scalings, *adapters):
        # what bitsandbytes computes in (its compute_dtype), else the input's; outputs keep the input's dtype
        dtype = getattr(bases[0], "compute_dtype", None) or x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        outs, products, casts = [], [], []
        for i, (base, s) in enumerate(zip(bases, scalings)):
            # merged: the kernel reads the fp32 adapters and rounds them itself, so the forward and its
            # recomputation cast nothing; backward casts them once (two launches a projection fewer per step)
            merged = (_merged_weight(base, adapters[2 * i], adapters[2 * i + 1], s, dtype)
                      if _merge_pays(x2.shape[0], base) else None)
            if merged is not None:
                y = x2 @ merged.t()
                products.append(None)  # x A^T, for B's gradient, is made in backward
                casts += [None, None]
            else:
                a, b = adapters[2 * i].to(dtype), adapters[2 * i + 1].to(dtype)
                casts += [a, b]  # saved as cast: backward needs them in the compute dtype too
                xa = x2 @ a.t()
                y = x2 @ _full_weight(base, dtype).t()
                y.addmm_(xa, b.t(), alpha=s)
                products.append(xa)
            if base.bias is not None:
                y += base.bias.to(dtype)
            outs.append(y.to(x.dtype))  # (tokens, out): a view made here could not be changed in place by the caller
        ctx.save_for_backward(x2, *products, *casts, *adapters)
        ctx.bases, ctx.scalings, ctx.x_shape, ctx.in_dtype = bases, scalings, x.shape, x.dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_ys):
        n = len(ctx.bases)
        saved = ctx.saved_tensors  # unpacked once: checkpointing allows no second unpack
        x2, products, casts, adapters = saved[0], saved[1:1 + n], saved[1 + n:1 + 3 * n], saved[1 + 3 * n:]
        dtype = x2.dtype
        grad_x, grads = None, []
        for i, (base, s, grad_y) in enumerate(zip(ctx.bases, ctx.scalings, grad_ys)):
            if grad_y is None:
                grads += [None, None]
                continue
            was_merged = products[i] is None  # forward merged the adapter into the weight
            a32, b32 = adapters[2 * i], adapters[2 * i + 1]
            dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            needs_a, needs_b = ctx.needs_input_grad[3 + 2 * i], ctx.needs_input_grad[4 + 2 * i]
            needs_x = ctx.needs_input_grad[0]
            if was_merged:  # cast here, once, only what backward multiplies by
                a = a32.to(dtype) if needs_b else None
                b = b32.to(dtype) if needs_a else None
            else:
                a, b = casts[2 * i], casts[2 * i + 1]
            dyb = _scaled(dy @ b, s) if needs_a or (needs_x and not was_merged) else None  # (tokens, r)
            xa = x2 @ a.t() if was_merged and needs_b else products[i]
            grads += [fp32_product(dyb.t(), x2) if needs_a else None,
                      _scaled(fp32_product(dy.t(), xa), s) if needs_b else None]
            if needs_x:
                weight = _merged_weight(base, a32, b32, s, dtype) if was_merged else _full_weight(base, dtype)
                if grad_x is None:
                    grad_x = dy @ weight
                else:
                    grad_x.addmm_(dy, weight)
                if not was_merged:
                    grad_x.addmm_(dyb, a)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.in_dtype)
        return grad_x, None, None, *grads


def _scaled(t: torch.Tensor, scaling: float) -> torch.Tensor:
    """t * scaling in place; no launch at scaling one (alpha = r: fastload's and Unsloth's default)."""
    return t if scaling == 1 else t.mul_(scaling)


def fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 for an adapter's gradient: on CUDA one matmul writing fp32 from its fp32 accumulator (torch's
    mm out_dtype), where 16-bit operands otherwise take a matmul and a cast, rounding the gradient to 16 bits in
    between. Asked once per device and dtype whether this torch takes it."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda and _out_dtype_runs(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


_OUT_DTYPE: dict = {}


def _out_dtype_runs(device, dtype) -> bool:
    key = (device, dtype)
    if key not in _OUT_DTYPE:
        try:
            probe = torch.ones(16, 16, device=device, dtype=dtype)
            _OUT_DTYPE[key] = bool(torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[key] = False
    return _OUT_DTYPE[key]


def _fusable(module) -> bool:
    """A peft LoRA projection on a bitsandbytes 4-bit or plain linear layer (what its adapters do is checked per
    call: adapters can be added or switched after installation)."""

    children = module._modules  # a dict lookup: getattr's miss raises and catches an AttributeError per module
    base = children.get("base_layer")
    if base is None or "lora_A" not in children:
        return False
    return is_linear4bit(base) or is_plain_linear(base)


def _adapter(module, x, args, kwargs) -> str | None:
    """The one active adapter this call can fuse, or None (peft's own forward then handles the call): no DoRA or
    other LoRA variant, no dropout, no bias on lora_B, no trained base bias."""
    active = module.active_adapters
    if (args or kwargs or module.disable_adapters or module.merged or len(active) != 1
            or active[0] not in module.lora_A or not x.is_floating_point()):
        return None
    name = active[0]
    if (module.use_dora.get(name) or name in getattr(module, "lora_variant", {})
            or not isinstance(module.lora_dropout[name], torch.nn.Identity)
            or module.lora_B[name].bias is not None):
        return None
    bias = module.base_layer.bias
    if bias is not None and bias.requires_grad:
        return None
    return name


def _run(members, names, x):
    adapters = []
    for module, name in zip(members, names):
        adapters += [module.lora_A[name].weight, module.lora_B[name].weight]
    outs = LoraGroup.apply(x, tuple(m.base_layer for m in members), tuple(m.scaling[n] for m, n in
                                                                                  zip(members, names)), *adapters)
    # shaped like x out here: autograd lets a caller add into a view made outside the Function (Falcon's
    # `mlp_output += attention_output`), never into one made inside it
    return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)


class _Group:
    """Projections that read the same input, computed together by the first (the leader); each other member picks
    its share up when called next on the same x with the adapter state it was computed for."""

    def __init__(self, members):
        self.members = list(members)
        self.pending: dict = {}  # follower's index -> (x, adapter name, its output), set by the leader's call


class _FusedForward:
    """A projection's fused forward, as an object rather than a closure: copy.deepcopy (trl's reference models, a
    user's copy) then rebinds its module, original forward and group to the copy's, where a closure would keep
    computing with the original model's adapters."""

    def __init__(self, module, original, group: _Group | None = None, index: int = 0):
        self.module, self.original, self.group, self.index = module, original, group, index

    def __call__(self, x, *args, **kwargs):
        if self.group is None:
            return self.alone(x, *args, **kwargs)
        if self.index == 0:
            return self.lead(x, *args, **kwargs)
        share = self.group.pending.pop(self.index, None)
        if share is not None and share[0] is x and share[1] == _adapter(self.module, x, args, kwargs):
            return share[2]
        return self.alone(x, *args, **kwargs)

    def alone(self, x, *args, **kwargs):
        name = _adapter(self.module, x, args, kwargs)
        if name is None:
            return self.original(x, *args, **kwargs)
        return _run((self.module,), (name,), x)[0]

    def lead(self, x, *args, **kwargs):
        group = self.group
        group.pending.clear()
        names = [_adapter(m, x, args, kwargs) for m in group.members]
        if None in names or len(set(names)) != 1:
            return self.alone(x, *args, **kwargs)  # fused on its own where it can, else peft's forward
        outs = _run(group.members, names, x)
        for index, out in enumerate(outs[1:], start=1):
            group.pending[index] = (x, names[0], out)
        return outs[0]


def _install_single(model, module) -> None:
    module.forward = _FusedForward(module, module.forward)
    mark_patched(model, module, LEVER)


def _install_group(model, members) -> None:
    group = _Group(members)
    for index, member in enumerate(members):
        member.forward = _FusedForward(member, member.forward, group, index)
        mark_patched(model, member, LEVER)


def install_fused_lora(model) -> int:
    """Give each fusable LoRA projection of this instance the fused forward, grouped where siblings share an
    input; returns how many projections.

    One walk over the model finds the projections and their parents: asking every module for each sibling's name
    costs an AttributeError per miss (~0.1 s for an 8B's 2,700 modules)."""
    state = state_of(model, create=False)
    parents, children = {}, {}  # module name -> module; a parent's id -> {leaf name: fusable child not yet patched}
    fusable = []
    for name, module in model.named_modules():
        parents[name] = module
        if LEVER in state.levers_of(module) or not _fusable(module):
            continue  # installed once only
        parent_name, _, leaf = name.rpartition(".")
        children.setdefault(id(parents[parent_name]), {})[leaf] = module
        fusable.append(module)
    grouped = set()
    for parent in parents.values():
        mine = children.get(id(parent), {})
        if not mine or "Cross" in type(parent).__name__:  # a cross-attention's q reads another input than its k/v
            continue
        for names in GROUPS:
            members = [mine.get(n) for n in names]
            if all(m is not None for m in members) and len({m.in_features for m in members}) == 1:
                _install_group(model, members)
                grouped.update(id(m) for m in members)
    for module in fusable:
        if id(module) not in grouped:
            _install_single(model, module)
    return len(fusable)
