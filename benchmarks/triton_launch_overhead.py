"""Host time of one Triton kernel launch, against one torch operator's, on this machine's CUDA GPU.

A host-bound QLoRA step (Qwen3-MoE shape, Llama-3 1B) issues ~300 of fastload's Triton launches a step beside ~1,800
torch launches; under torch.profiler a Triton launch showed as ~100 us of its caller's own CPU time. This measures
it without the profiler: the same tiny RMSNorm row launched through the JIT (`kernel[grid](...)`), through fastload's
`launch` (the JIT once per specialization, then the compiled kernel's launcher) and through the compiled kernel's own
launcher (what the JIT ends in), and a torch elementwise op, each
launched N times with the GPU far ahead of nothing (one row: the GPU work is ~2 us).

    python benchmarks/triton_launch_overhead.py [--launches 5000]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_launch_us(launch, n: int) -> float:
    import torch

    for _ in range(50):
        launch()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(n):
        launch()
    host = time.perf_counter() - started
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=5000)
    args = parser.parse_args()

    import torch
    import triton

    from fastload.engine.triton import layers_kernels as k

    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rstd = torch.empty(1, device="cuda", dtype=torch.float32)
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")

    def jit():
        k.rmsnorm_forward[(1,)](x, w, y, rstd, 2048, 1e-6, BLOCK=2048, num_warps=4)

    from fastload.engine.triton.launch import launch

    def lean():
        launch(k.rmsnorm_forward, (1,), x, w, y, rstd, 2048, 1e-6, BLOCK=2048, num_warps=4)

    rows = {"torch op (x.mul(2))": lambda: x.mul(2), "torch empty + op": lambda: torch.empty_like(x).copy_(x),
            "triton JIT kernel[grid](...)": jit, "fastload launch(kernel, grid, ...)": lean}
    compiled = None
    try:
        compiled = k.rmsnorm_forward.warmup(x, w, y, rstd, 2048, 1e-6, BLOCK=2048, num_warps=4, grid=(1,))
    except Exception as e:  # noqa: BLE001 - this script reports what the installed Triton offers
        print(f"warmup() did not return a compiled kernel: {type(e).__name__}: {e}")
    if compiled is not None:
        print(f"compiled kernel: {type(compiled).__module__}.{type(compiled).__name__}")
        for name in ("__getitem__", "launch_metadata", "run"):
            member = getattr(type(compiled), name, None)
            try:
                print(f"--- {name}:\n{inspect.getsource(member)}")
            except (TypeError, OSError):
                print(f"--- {name}: {member!r}")
        for label, call in (("compiled[grid](all args)", lambda: compiled[(1,)](x, w, y, rstd, 2048, 1e-6, 2048)),
                            ("compiled[grid](runtime args)", lambda: compiled[(1,)](x, w, y, rstd, 2048, 1e-6))):
            try:
                y.zero_()
                call()
                torch.cuda.synchronize()
                expected = torch.empty_like(y)
                k.rmsnorm_forward[(1,)](x, w, expected, rstd, 2048, 1e-6, BLOCK=2048, num_warps=4)
                torch.cuda.synchronize()
                print(f"{label}: runs, output equal to the JIT's: {torch.equal(y, expected)}")
                rows[label] = call
            except Exception as e:  # noqa: BLE001
                print(f"{label}: refused: {type(e).__name__}: {str(e)[:200]}")
    jit_source = inspect.getsource(type(k.rmsnorm_forward).run)
    print(f"--- JITFunction.run:\n{jit_source}")
    for label, launcher in rows.items():
        times = sorted(per_launch_us(launcher, args.launches) for _ in range(3))
        print(f"{label:34s} {times[1]:7.2f} us a launch (host; median of 3 x {args.launches})")
    from fastload.engine.triton import launch as launching

    # whether the lean row measured the compiled launcher, not the JIT again (a hook set, or direct launches off)
    print(f"fastload launch: direct launches {'on' if launching.direct_launch() else 'off'}, launch hooks "
          f"{'set' if launching._hooked() else 'none'}, launchers kept "
          f"{sum(v is not None for v in launching._COMPILED.values())}")


if __name__ == "__main__":
    main()
