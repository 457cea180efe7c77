"""fastload's Triton `launch`: which calls go through Triton's JIT and which through the compiled kernel's launcher,
and with what arguments. A stand-in kernel, driver and compiled kernel record the calls (no Triton or GPU needed);
the real kernels' equality to the JIT launch is checked on the GPU (tests/test_gpu.py, `lean_launch`)."""

from __future__ import annotations

import types

import pytest
import torch

from fastload.engine.triton import launch as launching


class Compiled:
    """What Triton's JIT returns from a launch: the compiled kernel, with its launcher."""

    function, packed_metadata = "cu-function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class Kernel:
    """A @triton.jit kernel as `launch` sees it: parameters (x, n, WIDTH constexpr, BLOCK constexpr)."""

    def __init__(self):
        names = (("x", False), ("n", False), ("WIDTH", True), ("BLOCK", True))
        self.params = [types.SimpleNamespace(name=n, is_constexpr=c) for n, c in names]
        self.pre_run_hooks = []
        self.debug = None
        self.jit_calls = []
        self.compiled = Compiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return self.compiled
        return run


@pytest.fixture
def kernel(monkeypatch):
    k = Kernel()
    driver = types.SimpleNamespace(active=types.SimpleNamespace(get_current_device=lambda: 0,
                                                                 get_current_stream=lambda device: 77))
    monkeypatch.setattr(launching, "_driver", lambda: driver)
    knobs = types.SimpleNamespace(runtime=types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None,
                                                               debug=False),
                                  compilation=types.SimpleNamespace(instrumentation_mode=""))
    monkeypatch.setattr(launching, "_knobs", lambda: knobs)
    monkeypatch.setattr(launching, "_constexpr_positions", lambda kern: frozenset({2}))  # WIDTH is positional
    monkeypatch.setattr(launching, "direct_launch", lambda: True)
    monkeypatch.setattr(launching, "_COMPILED", {})
    return k


def test_the_first_call_compiles_through_the_jit_and_the_next_go_to_the_launcher(kernel):
    x = torch.zeros(64)
    for _ in range(3):
        launching.launch(kernel, (5,), x, 100, 32, BLOCK=128, num_warps=4)
    assert len(kernel.jit_calls) == 1 and kernel.jit_calls[0][2] == {"BLOCK": 128, "num_warps": 4}
    assert len(kernel.compiled.launches) == 2
    grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, leave, *values = \
        kernel.compiled.launches[0]
    assert (grid_x, grid_y, grid_z, stream, function, metadata) == (5, 1, 1, 77, "cu-function", "metadata")
    assert (launch_metadata, enter, leave) == (None, None, None)
    assert values[0] is x and values[1:] == [100, 32, 128]  # every parameter in signature order, num_warps not


@pytest.mark.parametrize("change", ["misaligned", "dtype", "multiple of 16", "one", "constexpr", "option",
                                    "64-bit"])
def test_what_triton_specializes_on_sends_the_call_to_the_jit_again(kernel, change):
    """A call that Triton would compile apart (another specialization) must not reuse the compiled kernel."""
    base = torch.zeros(64)
    args, kwargs = [base, 100, 32], {"BLOCK": 128, "num_warps": 4}
    launching.launch(kernel, (1,), *args, **kwargs)
    if change == "misaligned":
        args[0] = base[1:]
    elif change == "dtype":
        args[0] = base.half()
    elif change == "multiple of 16":
        args[1] = 96
    elif change == "one":
        args[1] = 1
    elif change == "constexpr":
        args[2] = 48
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        args[1] = 2 ** 40 + 4
    launching.launch(kernel, (1,), *args, **kwargs)
    assert len(kernel.jit_calls) == 2 and not kernel.compiled.launches


def test_equal_specializations_share_the_launcher_whatever_the_values(kernel):
    launching.launch(kernel, (1,), torch.zeros(64), 100, 32, BLOCK=128)
    launching.launch(kernel, (2, 3), torch.ones(128), 132, 32, BLOCK=128)  # another aligned tensor, int, grid
    assert len(kernel.jit_calls) == 1 and kernel.compiled.launches[0][:3] == (2, 3, 1)
    assert kernel.compiled.launches[0][10] == 132


def test_hooks_other_argument_kinds_and_the_default_take_the_jit(kernel, monkeypatch):
    x = torch.zeros(64)
    launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    monkeypatch.setattr(launching, "_knobs", lambda: types.SimpleNamespace(
        runtime=types.SimpleNamespace(launch_enter_hook=print, launch_exit_hook=None)))
    launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)  # a profiler's hook wants the JIT's metadata
    assert len(kernel.jit_calls) == 2 and not kernel.compiled.launches
    launching.launch(kernel, (1,), [1, 2], 100, 32, BLOCK=128)  # an argument kind the key does not follow
    assert len(kernel.jit_calls) == 3
    monkeypatch.setattr(launching, "direct_launch", lambda: False)  # FASTLOAD_TRITON_LAUNCH=jit
    monkeypatch.setattr(launching, "_knobs", lambda: types.SimpleNamespace(
        runtime=types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)))
    launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    assert len(kernel.jit_calls) == 4 and not kernel.compiled.launches


def test_a_kernel_with_pre_run_hooks_stays_on_the_jit(kernel):
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    for _ in range(2):
        launching.launch(kernel, (1,), torch.zeros(64), 100, 32, BLOCK=128)
    assert len(kernel.jit_calls) == 2 and not kernel.compiled.launches


def test_a_pre_run_hook_added_after_the_first_call_sends_calls_to_the_jit(kernel):
    x = torch.zeros(64)
    for _ in range(2):
        launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    assert len(kernel.compiled.launches) == 1
    kernel.pre_run_hooks.append(lambda *a, **k: None)  # e.g. a tracing tool, after the kernel was cached
    launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    assert len(kernel.jit_calls) == 2 and len(kernel.compiled.launches) == 1


class HookChain:
    """Triton 3.5 on: each launch hook is a chain, always present, holding the hooks added to it."""

    def __init__(self, *calls):
        self.calls = list(calls)


def test_triton_3_5s_empty_hook_chains_are_no_hooks_and_a_hook_added_to_one_is(kernel, monkeypatch):
    """From Triton 3.5 launch_enter_hook and launch_exit_hook are HookChain objects even with no hook set: read as
    hooks, they would keep every call on the JIT and the direct path would never run."""
    runtime = types.SimpleNamespace(launch_enter_hook=HookChain(), launch_exit_hook=HookChain())
    monkeypatch.setattr(launching, "_knobs", lambda: types.SimpleNamespace(runtime=runtime))
    x = torch.zeros(64)
    for _ in range(3):
        launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    assert len(kernel.jit_calls) == 1 and len(kernel.compiled.launches) == 2
    runtime.launch_exit_hook.calls.append(print)  # proton adds itself to the chain
    launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    assert len(kernel.jit_calls) == 2 and len(kernel.compiled.launches) == 2


def test_direct_launch_is_the_default_read_from_the_environment_and_a_typo_is_said(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(launching, "_knobs", lambda: types.SimpleNamespace())  # a Triton with knobs (3.4 on)
    launching.direct_launch.cache_clear()
    monkeypatch.setenv("FASTLOAD_TRITON_LAUNCH", " Direct ")
    assert launching.direct_launch() is True
    launching.direct_launch.cache_clear()
    monkeypatch.delenv("FASTLOAD_TRITON_LAUNCH")
    assert launching.direct_launch() is True  # the default
    launching.direct_launch.cache_clear()
    monkeypatch.setenv("FASTLOAD_TRITON_LAUNCH", "JIT")
    assert launching.direct_launch() is False
    launching.direct_launch.cache_clear()
    monkeypatch.setenv("FASTLOAD_TRITON_LAUNCH", "fast")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        assert launching.direct_launch() is True
    assert any("FASTLOAD_TRITON_LAUNCH='fast'" in r.getMessage() and "'jit'" in r.getMessage()
               for r in caplog.records)
    launching.direct_launch.cache_clear()
    monkeypatch.setattr(launching, "_knobs", lambda: None)  # an older Triton: its launchers take other arguments
    monkeypatch.setenv("FASTLOAD_TRITON_LAUNCH", "direct")
    assert launching.direct_launch() is False
    launching.direct_launch.cache_clear()


def test_debug_or_instrumentation_turned_on_after_the_first_launch_compiles_anew(kernel):
    """The JIT keys its kernels by debug mode (the kernel's or Triton's) and instrumentation mode: a launcher kept
    from before the change would run the kernel compiled without them."""
    x = torch.zeros(64)
    launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
    assert len(kernel.jit_calls) == 1
    knobs = launching._knobs()
    for change in (lambda: setattr(knobs.runtime, "debug", True),
                   lambda: setattr(knobs.compilation, "instrumentation_mode", "consan"),
                   lambda: setattr(kernel, "debug", True)):
        change()
        launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)
        launching.launch(kernel, (1,), x, 100, 32, BLOCK=128)  # then this specialization's launcher again
    assert len(kernel.jit_calls) == 4 and len(kernel.compiled.launches) == 4


def test_values_the_launcher_could_take_wrongly_go_through_the_jit(kernel):
    """An integer past 64 bits (the JIT refuses it; the launcher would wrap it), an unhashable constexpr (Triton
    3.4's tl.constexpr objects), and constexprs equal as values but not as types (1, True) each get the JIT."""
    x = torch.zeros(64)
    for _ in range(2):
        launching.launch(kernel, (1,), x, 2 ** 64, 32, BLOCK=128)
    assert len(kernel.jit_calls) == 2 and not kernel.compiled.launches
    for _ in range(2):
        launching.launch(kernel, (1,), x, 100, [32], BLOCK=128)
    assert len(kernel.jit_calls) == 4 and not kernel.compiled.launches
    for width in (1, True):
        launching.launch(kernel, (1,), x, 100, width, BLOCK=128)
    assert len(kernel.jit_calls) == 6


@pytest.mark.parametrize(("rows", "cols", "rank", "padded"), [(4192, 1000, 8, 16), (64, 64, 16, 16), (130, 6, 33, 64)])
def test_the_merge_kernels_grid_covers_every_tile(monkeypatch, rows, cols, rank, padded):
    """dequantize_4bit_lora's grid and padded rank, computed on the host in plain Python (no Triton call): every
    (BM x BN) tile of the weight gets a program, and the rank is padded to a power of two of at least 16."""
    import sys

    from fastload.engine.triton import nf4

    kernel = types.SimpleNamespace(fn="merge-kernel")
    monkeypatch.setitem(sys.modules, "fastload.engine.triton.nf4_kernels",
                        types.SimpleNamespace(dequantize_4bit_lora=kernel))
    launched = []
    monkeypatch.setattr(nf4, "launch", lambda fn, grid, *args, **kw: launched.append((fn, grid, kw)))
    monkeypatch.setattr(nf4, "quant_state_args", lambda state: ((), {"NESTED": False}))
    state = types.SimpleNamespace(shape=(rows, cols), dtype=torch.bfloat16, blocksize=64)
    packed = torch.zeros(rows * cols // 2, 1, dtype=torch.uint8)
    tile = {"BM": 64, "BN": 128, "num_warps": 4}
    monkeypatch.setitem(nf4._LORA_TILE_CHOSEN, (rows, cols, padded, torch.bfloat16, torch.float32, False, 64,
                                                packed.device), tile)
    nf4.dequantize_4bit_lora(packed, state, torch.zeros(rank, cols), torch.zeros(rows, rank), 1.0)
    ((fn, grid, kw),) = launched
    assert fn == "merge-kernel" and kw["R"] == padded
    assert grid[0] * 64 >= rows > (grid[0] - 1) * 64 and grid[1] * 128 >= cols > (grid[1] - 1) * 128
