"""How much an FP8 frozen-base matmul could save on Llama-3 8B's projections (GPUs with FP8 tensor cores: sm_89+).

Before writing an FP8 lever, the ceiling: per projection shape at 4,096 tokens, the bf16 matmul against
torch._scaled_mm in e4m3 with row-wise scales (tokens x output channels), plus what making the FP8 operands costs
(the activation's row-wise cast each call; the weight's cast, which a lever would fold into the 4-bit
dequantization). Forward (x W^T) and the input gradient (dy W) are timed; the frozen base needs no weight gradient.
Median of N calls with CUDA events, and the relative error of the FP8 product against bf16.

    python benchmarks/fp8_matmul.py [--tokens 4096] [--repeats 20]
"""

from __future__ import annotations

import argparse

from cuda_timing import median_ms  # beside this script (python benchmarks/fp8_matmul.py)

SHAPES = {"q/o (4096 -> 4096)": (4096, 4096), "k/v (4096 -> 1024)": (4096, 1024),
          "gate/up (4096 -> 14336)": (4096, 14336), "down (14336 -> 4096)": (14336, 4096)}


def rowwise_fp8(t, dtype):
    """t (rows x cols) as FP8 with one float32 scale per row (what _scaled_mm's row-wise mode takes)."""
    import torch

    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    return (t.float() / scale).to(dtype), scale


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    e4m3 = torch.float8_e4m3fn
    print(f"{torch.cuda.get_device_name()}; {args.tokens} tokens; median of {args.repeats}, ms")
    print(f"{'projection':<26} {'bf16 fwd':>9} {'fp8 fwd':>9} {'bf16 dX':>9} {'fp8 dX':>9} {'x cast':>8} "
          f"{'W cast':>8} {'fwd err':>8}")
    counts = {"q/o (4096 -> 4096)": 2, "k/v (4096 -> 1024)": 2, "gate/up (4096 -> 14336)": 2, "down (14336 -> 4096)": 1}
    layer = [0.0] * 6
    for name, (k, n) in SHAPES.items():
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dy = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        xq, xs = rowwise_fp8(x, e4m3)
        wq, ws = rowwise_fp8(w, e4m3)  # per output channel
        wtq, wts = rowwise_fp8(w.t().contiguous(), e4m3)  # per input channel: dX reduces over n
        dyq, dys = rowwise_fp8(dy, e4m3)

        def fp8_fwd():
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)

        def fp8_dx():
            return torch._scaled_mm(dyq, wtq.t(), scale_a=dys, scale_b=wts.t(), out_dtype=torch.bfloat16)

        ref = x @ w.t()
        err = ((fp8_fwd().float() - ref.float()).norm() / ref.float().norm()).item()
        row = [median_ms(lambda: x @ w.t(), args.repeats), median_ms(fp8_fwd, args.repeats),
               median_ms(lambda: dy @ w, args.repeats), median_ms(fp8_dx, args.repeats),
               median_ms(lambda: rowwise_fp8(x, e4m3), args.repeats),
               median_ms(lambda: rowwise_fp8(w, e4m3), args.repeats)]
        layer = [t + counts[name] * v for t, v in zip(layer, row)]
        print(f"{name:<26} " + " ".join(f"{v:9.3f}" if i < 4 else f"{v:8.3f}" for i, v in enumerate(row))
              + f" {err:8.4f}")
    # a checkpointed layer runs each projection forward twice (forward, recomputation) and once for dX
    bf16 = 2 * layer[0] + layer[2]
    fp8 = 2 * layer[1] + layer[3]
    casts = 3 * layer[4]  # each FP8 call casts its activation (or gradient), here with torch's unfused ops
    print(f"one checkpointed layer: bf16 {bf16:.2f} ms, fp8 matmuls {fp8:.2f} ms ({bf16 / fp8:.2f}x), "
          f"{fp8 + casts:.2f} with torch's unfused casts; 32 layers: {32 * bf16:.0f}, {32 * fp8:.0f}, "
          f"{32 * (fp8 + casts):.0f} ms a step")


if __name__ == "__main__":
    main()
