"""Where the host's time goes in a training step, by Python function (cProfile), for one implementation.

The torch.profiler table (`bench --profile`) counts operators and kernels; a host-bound step (the GPU idle between
launches) is better read by Python function: which wrappers, checks and launches the host spends each step on.

    python benchmarks/host_profile.py --model-dir bench-out/models/llama3-1b --impl fastload [--steps 5]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fastload, installed or not


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--impl", default="fastload")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=45)
    args = parser.parse_args()

    import os

    from fastload.bench.driver import WORKER_ENV

    os.environ.update(WORKER_ENV)  # as the bench's workers run: offline, no telemetry, before torch/unsloth import
    import torch

    from fastload.bench import impls
    from fastload.bench.worker import train_step

    impls.import_libraries(args.impl)
    ready = impls.ready(args.impl, args.model_dir, "cuda", "bfloat16", args.seq, 0)
    model, optimizer = ready.model, ready.optimizer
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(3):
        train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    plain = (time.perf_counter() - started) / args.steps
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        train_step(model, optimizer, ids)
    torch.cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumtime").print_stats(args.rows)
    print(f"{args.impl}: {plain * 1000:.1f} ms a step without the profiler "
          f"({args.batch * args.seq / plain:,.0f} tokens/s); {args.steps} steps profiled, "
          f"per-step times below x{args.steps}")
    print(out.getvalue())


if __name__ == "__main__":
    main()
