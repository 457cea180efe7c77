"""Where one load's host time goes: fastload's phases and a cProfile of from_pretrained, in this fresh process.

    FASTLOAD_HOME=<home with a store entry> python benchmarks/load_profile.py /tmp/fastload-bench/llama3-8b [--store]

Without --store the entry is not used (`store=False`: quantized on the fly). Unless --fresh, one unprofiled load runs
first (imports, kernels, and with --store the entry written), so the profile holds what a load costs, not what a
first import does.
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
    parser.add_argument("--store", action="store_true", help="load from the store entry (made by an earlier load)")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--fresh", action="store_true",
                        help="profile this process's first load (first-use imports and caches in it, as a user's "
                             "script has them); with --store an earlier process must have written the entry")
    parser.add_argument("--callees", default="apply_lora", help="print what this function's time went to")
    args = parser.parse_args()

    import torch

    from fastload import FastModel

    if torch.cuda.is_available():
        torch.empty(1, device="cuda")  # the CUDA context is not the load's time
    import gc

    from fastload.load.background_store import wait_for_store_writes

    if not args.fresh:
        warm, _ = FastModel.from_pretrained(args.model, store=args.store)
        wait_for_store_writes()
        del warm
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    model, _ = FastModel.from_pretrained(args.model, store=args.store)
    profile.disable()
    took = time.perf_counter() - started
    phases = getattr(model.fastload, "load_phases", None) or {}
    print(f"from_pretrained {took:.2f} s ({'store' if args.store else 'on the fly'}); phases:")
    print({k: round(v, 3) for k, v in phases.items() if v >= 0.005})
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
    if args.callees:
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_callees(args.callees)
    print(out.getvalue())


if __name__ == "__main__":
    main()
