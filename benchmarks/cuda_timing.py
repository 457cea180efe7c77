"""GPU time of a call, for the benchmark scripts beside this file: the median over N calls, each between two CUDA
events, after one untimed call (compilation, caches)."""

from __future__ import annotations

import statistics


def median_ms(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
