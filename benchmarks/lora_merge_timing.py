"""GPU time of one 4-bit LoRA projection, two ways, on Llama-3 8B's shapes (4,096 tokens, r=16, bf16):

  added:  W = dequantize(W4); y = x W^T; y += s (x A^T) B^T     (the adapter product added to the output)
  merged: W' = dequantize(W4) + s B A (one kernel); y = x W'^T   (fastload.engine.triton.nf4.dequantize_4bit_lora)

    python benchmarks/lora_merge_timing.py   # needs CUDA, triton and bitsandbytes; prints tables in microseconds

The second table times the kernels alone: bitsandbytes-layout dequantization, the merging kernel as fastload
launches it (the autotuner's choice), and every tile it chooses from, each launched the same way as the others in
its table but not as the merging column (compare the tile columns with each other). Times are per call: CUDA events
around 50 back-to-back calls, so where the host launches more slowly than the GPU runs (the small k/v shapes) they
measure the host.
"""

from __future__ import annotations

import torch

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
TOKENS, RANK, REPEATS = 4096, 16, 50


def _time_us(function) -> float:
    for _ in range(5):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPEATS):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / REPEATS


def main() -> None:
    import bitsandbytes.functional as F
    import triton

    from fastload.engine.triton import nf4_kernels
    from fastload.engine.triton.nf4 import dequantize_4bit, dequantize_4bit_lora, quant_state_args

    gen = torch.Generator(device="cuda").manual_seed(0)
    kernels = []
    print(f"{'projection':<10} {'out x in':>13} {'added us':>9} {'merged us':>9} {'merged/added':>12}")
    for name, (out, inp) in SHAPES.items():
        packed, state = F.quantize_4bit(torch.randn(out, inp, device="cuda", dtype=torch.bfloat16, generator=gen),
                                        quant_type="nf4", compress_statistics=True)
        a = torch.randn(RANK, inp, device="cuda", dtype=torch.bfloat16, generator=gen)
        b = torch.randn(out, RANK, device="cuda", dtype=torch.bfloat16, generator=gen)
        x = torch.randn(TOKENS, inp, device="cuda", dtype=torch.bfloat16, generator=gen)

        def added():
            y = x @ dequantize_4bit(packed, state).t()
            return y.addmm_(x @ a.t(), b.t(), alpha=0.5)

        def merged():
            return x @ dequantize_4bit_lora(packed, state, a, b, 0.5).t()

        t_added, t_merged = _time_us(added), _time_us(merged)
        print(f"{name:<10} {out:>6} x {inp:<6} {t_added:>9.1f} {t_merged:>9.1f} {t_merged / t_added:>12.3f}")
        kernels.append((name, packed, state, a, b))
    kernel = nf4_kernels.dequantize_4bit_lora
    print(f"\n{'projection':<10} {'dequantize':>10} {'merging':>8}  " + "  ".join(
        f"{m}x{n}/{w}w" for m, n, w in nf4_kernels.LORA_TILES) + "   (us; tile rows x columns / warps)")
    for name, packed, state, a, b in kernels:
        rows, cols = state.shape
        scales, layout = quant_state_args(state)

        def tile(m, n, w, packed=packed, state=state, a=a, b=b, rows=rows, cols=cols, scales=scales, layout=layout):
            out = torch.empty(state.shape, dtype=state.dtype, device="cuda")
            kernel.fn[(triton.cdiv(rows, m), triton.cdiv(cols, n))](
                packed, *scales, a, b, out, rows, cols, RANK, 0.5, **layout, R=RANK, BM=m, BN=n, num_warps=w)

        times = [_time_us(lambda t=t: tile(*t)) for t in nf4_kernels.LORA_TILES]
        print(f"{name:<10} {_time_us(lambda: dequantize_4bit(packed, state)):>10.1f} "
              f"{_time_us(lambda: dequantize_4bit_lora(packed, state, a, b, 0.5)):>8.1f}  "
              + "  ".join(f"{t:>{len(f'{m}x{n}/{w}w')}.1f}" for t, (m, n, w) in zip(times, nf4_kernels.LORA_TILES)))


if __name__ == "__main__":
    main()
