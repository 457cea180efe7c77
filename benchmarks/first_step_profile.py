"""Where a fresh process's first optimizer step goes, beside its second: cProfile of each, for one implementation.

    python benchmarks/first_step_profile.py /tmp/fastload-bench/llama3-8b --impl fastload [--seq 2048 --batch 2]

The first step of a fresh process costs seconds more than the next (recipe and fastload alike); this says which
first-use work (kernel loading, library handles, allocator growth, optimizer state) it is, so that the load can do
it meanwhile or a cache can keep it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--impl", default="fastload", choices=("fastload", "recipe"))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()

    from fastload.bench import impls

    impls.import_libraries(args.impl)
    import torch

    from fastload.bench.worker import train_step

    torch.empty(1, device="cuda")
    r = impls.ready(args.impl, args.model, "cuda", "bfloat16", args.seq, 3407, fastload_store=False)
    ids = torch.randint(0, r.model.get_input_embeddings().num_embeddings, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).to("cuda")
    r.model.train()
    for label in ("first", "second"):
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        train_step(r.model, r.optimizer, ids)
        torch.cuda.synchronize()
        profile.disable()
        print(f"== {args.impl} {label} step {time.perf_counter() - started:.2f} s")
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out).sort_stats("cumulative")
        stats.print_stats(args.top)
        stats.sort_stats("tottime").print_stats(15)
        print(out.getvalue())


if __name__ == "__main__":
    main()
