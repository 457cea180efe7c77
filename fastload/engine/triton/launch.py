"""Whether a Triton kernel may launch here: the one place every lever asks before taking its kernel path."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fastload._log import logger
from fastload.engine.kernel_cache import cache_dir_for, point_triton_cache


@functools.lru_cache(maxsize=None)
def triton_available(device_type: str) -> bool:
    """fastload's Triton kernels run on NVIDIA CUDA devices where triton is installed (it comes with CUDA builds of
    torch). ROCm builds also say "cuda"; the kernels' launch settings (up to 32 warps) are NVIDIA's."""
    if device_type != "cuda":
        return False
    available = importlib.util.find_spec("triton") is not None and torch.version.hip is None
    if available:  # before any kernel module imports triton: compiled kernels then persist across runs
        point_triton_cache(cache_dir_for(torch.cuda.current_device()))
    return available


# torch.cuda.current_device() without its lazy-init check, for triton_runs_on, whose tensor on CUDA means CUDA is up:
# ~470 calls a 1B step (H100 host profile, 2026-12-08). CPU builds lack the C function.
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def triton_runs_on(tensor) -> bool:
    """Whether a Triton kernel can be launched on this tensor now: Triton launches on the current CUDA device, so
    a layer placed on another GPU (device_map over several) takes the torch path."""
    if not triton_available(tensor.device.type):
        return False
    return tensor.device.index is None or tensor.device.index == _current_device()


@functools.lru_cache(maxsize=None)
def _capability(device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def tensor_cores_take(dtype, device) -> bool:
    """tl.dot on bf16 needs Ampere (compute capability 8.0) or newer, on fp16 Volta (7.0); asked once per device."""
    return _capability(device) >= ((8, 0) if dtype == torch.bfloat16 else (7, 0))


def kernel_probe(key: tuple, probe) -> bool:
    """Whether `probe()` (a kernel's forward and backward on two rows) runs, tried once per key the first time it is
    asked, so a Triton or GPU that refuses the kernel (a compile error) sends these calls to the torch ops, with one
    warning, instead of failing a training step mid-backward."""
    if key not in _RUNS:
        try:  # with autograd on and no saved-tensor hooks of a checkpoint around it: the probe's own small graph
            with torch.inference_mode(False), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(_kept, _kept):
                probe()
            _RUNS[key] = True
        except Exception as e:  # noqa: BLE001 - any refusal: the torch ops compute the same
            logger.warning("engine: the Triton %s kernel does not run here for %s (%s: %s); the torch ops "
                           "compute it instead", key[0], key[1:], type(e).__name__, str(e).splitlines()[0][:200])
            _RUNS[key] = False
    return _RUNS[key]


_RUNS: dict[tuple, bool] = {}  # probe key -> whether the kernel ran


def _kept(tensor):
    return tensor


# -- launching ---------------------------------------------------------------------------------------------------
#
# Triton's JIT launch (`kernel[grid](...)`) binds and specializes every argument and looks the compiled kernel up on
# every call: 24 us of host time a launch on an H100 host where a torch operator takes 13 (2026-12-07,
# benchmarks/triton_launch_overhead.py), and a Qwen3-MoE step launches ~630 of fastload's Triton kernels. `launch`
# makes the first call of each specialization through the JIT, keeps the compiled kernel it returns, and afterwards
# calls the compiled kernel's own launcher, as the JIT ends up doing, whenever the arguments specialize the same way:
# the same tensor dtypes and 16-byte alignments, the same integer classes (one, multiples of 16, 32 or 64 bits),
# the same constexprs and launch options. Anything else (a launch hook, a kernel with pre-run hooks, an argument of
# another kind, a Triton whose compiled kernels lack the launcher) takes the JIT's path.
# On by default since its GPU cases passed (H100, 2026-12-07: bit-equal to the JIT's launch, and the engine's Triton
# GPU tests with every launch direct); FASTLOAD_TRITON_LAUNCH=jit keeps every launch on the JIT, as the interface
# it calls into, Triton's compiled kernel, is not documented as public. A compiled kernel without the launcher
# attributes this reads takes the JIT's path on its own.

_COMPILED: dict = {}  # (kernel, device, constexprs and options, argument classes) -> (compiled kernel, constexpr
                     # names), or None: the JIT's path only


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) for a @triton.jit kernel: its leading parameters positionally, the rest (all
    constexprs) by keyword, with launch options (num_warps...)."""
    classes = _classes(kernel, args) if direct_launch() else None
    if classes is None:
        kernel[grid](*args, **kwargs)
        return
    driver = _driver()
    device = driver.active.get_current_device()
    key = (id(kernel), device, tuple(kwargs.items()), classes, _compile_settings(kernel))
    try:
        compiled = _COMPILED.get(key)
    except TypeError:  # an unhashable constexpr value (Triton 3.4's tl.constexpr objects): the JIT's path
        kernel[grid](*args, **kwargs)
        return
    if compiled is None or _hooked() or kernel.pre_run_hooks:  # hooks: checked on every call, as they come and go
        result = kernel[grid](*args, **kwargs)
        if key not in _COMPILED:
            _COMPILED[key] = _launcher(kernel, result, args, kwargs)
        return
    launcher, order = compiled
    grid = tuple(grid) + (1,) * (3 - len(grid))
    launcher.run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), launcher.function,
                 launcher.packed_metadata, None, None, None, *args, *(kwargs[name] for name in order))


@functools.lru_cache(maxsize=None)
def direct_launch() -> bool:
    """Whether `launch` may call compiled kernels' launchers: yes unless FASTLOAD_TRITON_LAUNCH=jit, read once;
    another value than jit or direct is said once and read as direct, the default. Never on a Triton without its
    `knobs` module (before 3.4): those launchers take the non-constexpr arguments only, where this passes all."""
    value = os.environ.get("FASTLOAD_TRITON_LAUNCH", "direct").strip().lower()
    if value not in ("jit", "direct", ""):
        logger.warning("FASTLOAD_TRITON_LAUNCH=%r is neither 'jit' nor 'direct': the compiled launchers launch the "
                       "kernels, the default (set it to 'jit' for Triton's JIT on every launch)", value)
    return value != "jit" and _knobs() is not None


def _classes(kernel, args: tuple) -> tuple | None:
    """How Triton specializes these arguments (a constexpr by its value), or None where one is of a kind not
    followed here."""
    constexprs = _constexpr_positions(kernel)
    if constexprs is None:
        return None
    out = []
    for i, value in enumerate(args):
        if i in constexprs:
            out.append(("constexpr", type(value), value))  # typed: 1, True and 1.0 are equal keys otherwise
        elif isinstance(value, torch.Tensor):
            out.append((value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, bool):
            out.append(("bool",))
        elif isinstance(value, int):
            if not -2 ** 63 <= value < 2 ** 64:  # the JIT refuses it; the launcher would wrap it silently
                return None
            out.append(("int", value == 1, value % 16 == 0, -2 ** 31 <= value < 2 ** 31, value < 2 ** 63))
        elif isinstance(value, float):
            out.append(("float",))
        else:
            return None
    return tuple(out)


def _compile_settings(kernel) -> tuple:
    """What else the JIT compiles into a kernel and keys it by: debug mode (the kernel's or Triton's) and, from Triton
    3.6, the instrumentation mode; a change after the first launch then compiles anew, as through the JIT."""
    knobs = _knobs()
    return (getattr(kernel, "debug", None), getattr(getattr(knobs, "runtime", None), "debug", None),
            getattr(getattr(knobs, "compilation", None), "instrumentation_mode", None))


_CONSTEXPR_POSITIONS: dict = {}


def _constexpr_positions(kernel) -> frozenset | None:
    """The kernel's constexpr parameters by position; None for what is not a compiling JITFunction (Triton's
    interpreter, TRITON_INTERPRET=1, runs its kernels through the JIT's path)."""
    key = id(kernel)
    if key not in _CONSTEXPR_POSITIONS:
        from triton.runtime.jit import JITFunction

        params = getattr(kernel, "params", None) if isinstance(kernel, JITFunction) else None
        _CONSTEXPR_POSITIONS[key] = (None if params is None else
                                     frozenset(i for i, p in enumerate(params) if getattr(p, "is_constexpr", False)))
    return _CONSTEXPR_POSITIONS[key]


def _launcher(kernel, compiled, args: tuple, kwargs: dict):
    """(the compiled kernel, the keyword parameters' names in signature order), or None where this kernel or Triton
    does not allow calling its launcher directly."""
    params = kernel.params
    if getattr(kernel, "pre_run_hooks", None) or not all(
            hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
        return None
    rest = params[len(args):]
    if len(args) > len(params) or not all(p.is_constexpr and p.name in kwargs for p in rest):
        return None  # every parameter after the positional ones given by keyword: the one layout followed here
    return compiled, tuple(p.name for p in rest)


def _hooked() -> bool:
    """A launch hook (a profiler such as proton) wants Triton's metadata for each launch: the JIT's path."""
    knobs = _knobs()
    return knobs is None or _hook_set(knobs.runtime.launch_enter_hook) or _hook_set(knobs.runtime.launch_exit_hook)


def _hook_set(hook) -> bool:
    """Whether a launch hook is set: a callable before Triton 3.5; from 3.5 a HookChain, always present, whose
    `calls` list holds the hooks added (an empty chain is no hook)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or bool(calls)


_TRITON: dict = {}


def _driver():
    if "driver" not in _TRITON:
        from triton.runtime import driver

        _TRITON["driver"] = driver
    return _TRITON["driver"]


def _knobs():
    if "knobs" not in _TRITON:
        try:
            from triton import knobs
        except ImportError:  # a Triton before its knobs module: the JIT's path always
            knobs = None
        _TRITON["knobs"] = knobs
    return _TRITON["knobs"]
