"""bitsandbytes' 8-bit blockwise AdamW update on a GPU: its CUDA kernel against its own Triton kernel (written for
Intel GPUs, importable wherever Triton runs), on the sizes fastload's optimizer updates in one launch.

The Qwen3-MoE shape's profile (benchmarks/results/2026-12-07-h100-b) spent 3.0 ms a step in the CUDA kernel for
107M values, about 0.6 TB/s on an H100; reading and writing what an update touches (16 bytes a value) at the
memory's speed would take ~0.6 ms. This says whether bitsandbytes' Triton kernel closes that gap and how far its
results are from the CUDA kernel's (its arithmetic is ordered differently).

    python benchmarks/adamw8bit_kernels.py            # needs CUDA, bitsandbytes and triton
"""

from __future__ import annotations

import argparse

import torch

SIZES = {  # values updated by one launch
    "Llama-3 8B pack (16M)": 1 << 24,
    "Qwen3-MoE expert adapter (128 x 2048 x 16)": 128 * 2048 * 16,
    "Qwen3-MoE expert adapter (128 x 16 x 1536)": 128 * 16 * 1536,
    "Llama-3 1B LoRA, one pack (11.3M)": 11_272_192,
}
LR, BETAS, EPS, WEIGHT_DECAY = 2e-4, (0.9, 0.999), 1e-8, 0.01


def _state(n: int, seed: int):
    import bitsandbytes.functional as F

    g = torch.Generator(device="cuda").manual_seed(seed)
    return {"p": torch.randn(n, device="cuda", generator=g) * 0.02,
            "state1": torch.zeros(n, dtype=torch.uint8, device="cuda"),
            "state2": torch.zeros(n, dtype=torch.uint8, device="cuda"),
            "absmax1": torch.zeros(n // 256, device="cuda"), "absmax2": torch.zeros(n // 256, device="cuda"),
            "qmap1": F.create_dynamic_map(signed=True).cuda(), "qmap2": F.create_dynamic_map(signed=False).cuda()}


def _cuda_update(s, grad, step):
    import bitsandbytes.functional as F

    F.optimizer_update_8bit_blockwise("adam", grad, s["p"], s["state1"], s["state2"], BETAS[0], BETAS[1], 0.0, 0.0,
                                      EPS, step, LR, s["qmap1"], s["qmap2"], s["absmax1"], s["absmax2"],
                                      WEIGHT_DECAY, gnorm_scale=1.0, skip_zeros=False)


def _triton_update(s, grad, step):
    from bitsandbytes.backends.triton import kernels_optim

    kernels_optim.optimizer_update_8bit_blockwise_impl("adam", grad, s["p"], s["state1"], s["state2"], BETAS[0],
                                                       BETAS[1], 0.0, 0.0, EPS, step, LR, s["qmap1"], s["qmap2"],
                                                       s["absmax1"], s["absmax2"], WEIGHT_DECAY, 1.0, False)


def _time(update, s, grads, repeats: int) -> float:
    for step, grad in zip((1, 16, 17), grads):  # Triton compiles an int argument apart when it is 1 or a multiple
        update(s, grad, step)                    # of 16: all three variants before the clock starts
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(repeats):
        update(s, grads[i % len(grads)], 4 + i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1000  # us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for label, n in SIZES.items():
        g = torch.Generator(device="cuda").manual_seed(1)
        grads = [torch.randn(n, device="cuda", generator=g) * 1e-3 for _ in range(4)]
        a, b = _state(n, 0), _state(n, 0)
        for step, grad in enumerate(grads, 1):  # the same four steps from the same state: how far apart
            _cuda_update(a, grad, step)
            _triton_update(b, grad, step)
        torch.cuda.synchronize()
        moved = (a["p"] - _state(n, 0)["p"]).abs().max().item()
        apart = (a["p"] - b["p"]).abs().max().item()
        codes = [(a[k] != b[k]).float().mean().item() for k in ("state1", "state2")]
        cuda_us = _time(_cuda_update, a, grads, args.repeats)
        triton_us = _time(_triton_update, b, grads, args.repeats)
        print(f"{label}: CUDA kernel {cuda_us:.0f} us ({16 * n / cuda_us / 1e6:.2f} TB/s), Triton kernel "
              f"{triton_us:.0f} us ({16 * n / triton_us / 1e6:.2f} TB/s); after 4 steps the values are at most "
              f"{apart:.2e} apart (largest move {moved:.2e}), state codes differ at {codes[0]:.2%} / {codes[1]:.2%}")


if __name__ == "__main__":
    main()
