"""Fused mixture-of-experts weights stored in 4 bits: a tensor that holds bitsandbytes' packed NF4/FP4 data and reads
as the 16-bit expert stack it stands for.

transformers 5 keeps each MoE layer's experts as 3-D parameters (gate_up_proj, down_proj), which bitsandbytes' Linear
replacement never reaches. NF4ExpertStack takes their place under the same names, with the 16-bit stack's shape, dtype
and device: peft's `target_parameters` still finds and wraps them, and any torch operation on one (transformers'
grouped_mm or per-expert forward, peft's W + s B A, a merge) runs on the stack dequantized for that operation only.
Views that only reorder (detach, the transpose of the last two axes, a move to another device or dtype) stay packed,
so the tensors autograd saves for backward are the packed ones and backward dequantizes again rather than keeping
a 16-bit stack per layer alive. In-place writes (load_state_dict's copy_, peft's merge and unmerge) quantize the
result back, as peft's merge into a bitsandbytes Linear4bit does.

It is not a traceable subclass (no __tensor_flatten__): torch would then swap tensors where peft's parametrization
sets a parameter to itself; assigning `.data` carries the packed state instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map_only

aten = torch.ops.aten
BLOCKSIZE = 64  # bitsandbytes' Linear4bit default: BitsAndBytesConfig has no field for it


@dataclass(frozen=True)
class StackForm:
    """What the packed bytes stand for: the stored (untransposed) shape and dtype, and how they were quantized."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested_blocksize: int | None = None  # set when the absmax statistics are themselves quantized (double quant)
    nested_dtype: torch.dtype | None = None


class NF4ExpertStack(torch.Tensor):
    """A frozen 3-D expert stack in bitsandbytes 4-bit form that computes as its dequantized values.

    Build one with `quantize_stack`; `dequantize()` gives the 16-bit tensor. Its statistics are its own tensor
    attributes (absmax, code and, with double quantization, nested_absmax, nested_code, offset), so moving the
    model moves them too.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # results are plain tensors unless said otherwise

    @staticmethod
    def __new__(cls, packed: torch.Tensor, stats: dict, form: StackForm, transposed: bool = False,
                dtype: torch.dtype | None = None):
        shape = form.shape if not transposed else (*form.shape[:-2], form.shape[-1], form.shape[-2])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or form.dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed: torch.Tensor, stats: dict, form: StackForm, transposed: bool = False,
                 dtype: torch.dtype | None = None):
        self.packed, self.form, self.transposed = packed, form, transposed
        self.stat_names = tuple(stats)
        for name, value in stats.items():
            setattr(self, name, value)

    @property
    def stats(self) -> dict:
        return {name: getattr(self, name) for name in self.stat_names}

    def quant_state(self):
        """bitsandbytes' QuantState of the packed data (built per call from the tensor's own attributes)."""
        from bitsandbytes.functional import QuantState

        form, s = self.form, self.stats
        # bitsandbytes writes 16/32-bit floats: straight in the stack's dtype when it is one of them
        dtype = self.dtype if self.dtype in (torch.float16, torch.bfloat16, torch.float32) else form.dtype
        nested = None
        if form.nested_blocksize is not None:
            nested = QuantState(absmax=s["nested_absmax"], code=s["nested_code"], blocksize=form.nested_blocksize,
                                dtype=form.nested_dtype)
        return QuantState(absmax=s["absmax"], shape=torch.Size(form.shape), code=s["code"], blocksize=form.blocksize,
                          quant_type=form.quant_type, dtype=dtype, offset=s.get("offset"), state2=nested)

    def absmax_values(self) -> torch.Tensor:
        """The fp32 absmax of every block (the nested statistics dequantized, as bitsandbytes does)."""
        if self.form.nested_blocksize is None:
            return self.absmax.float()
        from bitsandbytes.functional import dequantize_blockwise

        return (dequantize_blockwise(self.absmax, self.quant_state().state2) + self.offset).float()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stack's values as a plain tensor (in `dtype`, default the stack's), in this view's axis order."""
        from bitsandbytes.functional import dequantize_4bit

        dense = dequantize_4bit(self.packed, self.quant_state())
        dtype = dtype or self.dtype
        dense = dense if dense.dtype == dtype else dense.to(dtype)
        return dense.transpose(-2, -1) if self.transposed else dense

    def packed_bytes(self) -> int:
        """Bytes this stack holds: the packed values and their statistics."""
        return sum(t.numel() * t.element_size() for t in (self.packed, *self.stats.values()))

    def store(self, dense: torch.Tensor) -> None:
        """Quantize `dense` (in this view's axis order) into this stack's own buffers, which every view shares."""
        other = quantize_stack(dense.transpose(-2, -1) if self.transposed else dense, self.form.quant_type,
                               self.form.nested_blocksize is not None, self.form.blocksize)
        self.packed.copy_(other.packed)
        for name, value in other.stats.items():
            getattr(self, name).copy_(value)

    def _with(self, fn=None, dtype: torch.dtype | None = None, transposed: bool | None = None) -> NF4ExpertStack:
        """A stack over fn(each inner tensor) (the same tensors when fn is None)."""
        fn = fn or (lambda t: t)
        return NF4ExpertStack(fn(self.packed), {k: fn(v) for k, v in self.stats.items()}, self.form,
                              self.transposed if transposed is None else transposed, dtype or self.dtype)

    # -- what torch needs to move, copy and trace it ----------------------------------------------------------------

    @property
    def data(self) -> NF4ExpertStack:
        return self.detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        """module.to() and peft's merge set `.data`: a stack is taken over whole (device and dtype included), other
        values are quantized into this stack's buffers."""
        if not isinstance(value, NF4ExpertStack):
            self.store(value)
            return
        torch._C.TensorBase.data.__set__(self, value)
        self.packed, self.form, self.transposed, self.stat_names = (value.packed, value.form, value.transposed,
                                                                    value.stat_names)
        for name, stat in value.stats.items():
            setattr(self, name, stat)

    def __deepcopy__(self, memo):
        new = self._with(lambda t: copy.deepcopy(t, memo))
        new.requires_grad_(self.requires_grad)
        if getattr(self, "_is_param", False):  # a Parameter's flag: modules keep it registered as one
            new._is_param = True
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol):
        return _rebuild, (self.packed, self.stats, self.form, self.transposed, self.dtype, self.requires_grad,
                          getattr(self, "_is_param", False))

    def __repr__(self) -> str:
        form = self.form
        return (f"NF4ExpertStack(shape={tuple(self.shape)}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"{form.quant_type}{'+double quant' if form.nested_blocksize else ''}, device={self.device})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func.overloadpacket)
        if handler is not None:
            result = handler(func, args, kwargs)
            if result is not NotImplemented:
                return result
        if func._schema.is_mutable and isinstance(args[0], NF4ExpertStack):
            return _write_back(func, args, kwargs)
        return func(*_dense(args), **_dense(kwargs))


def _rebuild(packed, stats, form, transposed, dtype, requires_grad, is_param):
    stack = NF4ExpertStack(packed, stats, form, transposed, dtype)
    stack.requires_grad_(requires_grad)
    if is_param:
        stack._is_param = True
    return stack


def _dense(tree):
    return tree_map_only(NF4ExpertStack, lambda t: t.dequantize(), tree)


def _write_back(func, args, kwargs):
    """An in-place operation on a stack: computed on its dequantized values, then quantized back into it."""
    target = args[0]
    dense = target.dequantize()
    func(dense, *_dense(args[1:]), **_dense(kwargs))
    target.store(dense)
    return target


def _same_view(func, args, kwargs):
    return args[0]._with()


def _transpose(func, args, kwargs):
    stack, dims = args[0], sorted(d % args[0].ndim for d in args[1:3])
    if dims != [stack.ndim - 2, stack.ndim - 1]:
        return NotImplemented
    return stack._with(transposed=not stack.transposed)


def _to_copy(func, args, kwargs):
    """A move to another device or dtype stays packed (the dtype is the one it dequantizes to)."""
    stack = args[0]
    if (set(kwargs) - {"device", "dtype", "non_blocking", "memory_format", "layout", "pin_memory"}
            or kwargs.get("memory_format") not in (None, torch.preserve_format)
            or kwargs.get("layout") not in (None, torch.strided) or kwargs.get("pin_memory")):
        return NotImplemented
    dtype = kwargs.get("dtype") or stack.dtype
    if not dtype.is_floating_point:
        return NotImplemented
    device = kwargs.get("device") or stack.device
    return stack._with(lambda t: t.to(device, non_blocking=kwargs.get("non_blocking", False)), dtype=dtype)


def _clone(func, args, kwargs):
    if kwargs.get("memory_format") not in (None, torch.preserve_format):
        return NotImplemented
    return args[0]._with(torch.clone)


def _copy(func, args, kwargs):
    """copy_ from a stack of the same form copies the packed bytes (exact); anything else is quantized."""
    target, source = args[0], args[1]
    if (isinstance(source, NF4ExpertStack) and source.form == target.form
            and source.transposed == target.transposed and source.dtype == target.dtype):
        target.packed.copy_(source.packed)
        for name, value in source.stats.items():
            getattr(target, name).copy_(value)
        return target
    return NotImplemented


def _select(func, args, kwargs):
    """One expert (transformers' eager experts forward reads them one by one): only its blocks dequantized."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    stack, dim, index = args
    form = stack.form
    per_expert = stack.numel() // stack.shape[0]
    if dim % stack.ndim != 0 or per_expert % form.blocksize or not isinstance(index, int):
        return NotImplemented
    index %= stack.shape[0]
    blocks = per_expert // form.blocksize
    absmax = stack.absmax_values()[index * blocks:(index + 1) * blocks]
    state = QuantState(absmax=absmax, shape=torch.Size(form.shape[1:]), code=stack.code, blocksize=form.blocksize,
                       quant_type=form.quant_type, dtype=stack.quant_state().dtype)
    dense = dequantize_4bit(stack.packed[index * per_expert // 2:(index + 1) * per_expert // 2], state)
    dense = dense if dense.dtype == stack.dtype else dense.to(stack.dtype)
    return dense.t() if stack.transposed else dense


def _set(func, args, kwargs):
    """parametrize sets a parameter to itself when it registers: nothing to do."""
    if len(args) > 1 and isinstance(args[1], NF4ExpertStack) and args[1].packed is args[0].packed:
        return args[0]
    return NotImplemented


_HANDLERS = {aten.detach: _same_view, aten.alias: _same_view, aten.transpose: _transpose, aten._to_copy: _to_copy,
             aten.clone: _clone, aten.copy_: _copy, aten.set_: _set, aten.select: _select}


def quantize_stack(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = BLOCKSIZE) -> NF4ExpertStack:
    """`weight` (a 3-D expert stack) in bitsandbytes 4-bit form, on its device, dequantizing to its dtype.

    Args:
        weight: the 16-bit (or fp32) stack, e.g. an experts module's gate_up_proj.
        quant_type: "nf4" or "fp4", as the model's BitsAndBytesConfig says.
        double_quant: quantize the absmax statistics too (bnb_4bit_use_double_quant).
        blocksize: values per absmax (bitsandbytes' Linear4bit uses 64).

    Returns:
        The NF4ExpertStack (requires_grad False).
    """
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight.detach().contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type=quant_type)
    stats = {"absmax": state.absmax, "code": state.code}
    nested = state.state2 if state.nested else None
    if nested is not None:
        stats.update(nested_absmax=nested.absmax, nested_code=nested.code, offset=state.offset)
    form = StackForm(tuple(weight.shape), weight.dtype, quant_type, blocksize,
                    nested.blocksize if nested is not None else None, nested.dtype if nested is not None else None)
    return NF4ExpertStack(packed, stats, form)


def is_stack(t) -> bool:
    return isinstance(t, NF4ExpertStack)
