"""GPU time of an input-embedding lookup, table on the GPU against the host_embedding lever's table in pinned host
memory (read over PCIe), through torch's lookup.

On an H100 (2026-12-08) torch's lookup read 4,096 host-resident rows in 0.70 ms, and a Triton gather written for the
lever (a program per row, 16-byte loads) took 0.87 ms: the gather was dropped and the lever uses torch's lookup.

Llama-3 8B's table (128,256 x 4,096 bf16, 1 GiB); the rows of a 2,048 x 2 batch and of a 32,768-token one, random
ids drawn once. Median of N lookups, each timed with CUDA events.

    python benchmarks/host_embedding_lookup.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_timing import median_ms  # noqa: E402 - beside this script


def main() -> None:
    import torch
    import torch.nn.functional as F

    from fastload.engine.host_embedding import host_mapped_copy

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    table = torch.randn(args.vocab, args.hidden, device="cuda").to(torch.bfloat16)
    host, why = host_mapped_copy(table)
    assert why is None, why
    print(f"{torch.cuda.get_device_name()}; table {args.vocab} x {args.hidden} bf16; median of {args.repeats}, ms")
    for tokens in (4096, 32768):
        ids = torch.randint(0, args.vocab, (tokens,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        assert torch.equal(F.embedding(ids, host), F.embedding(ids, table))
        rows = {"GPU table, torch lookup": lambda: F.embedding(ids, table),
                "host table, torch lookup": lambda: F.embedding(ids, host)}
        for name, lookup in rows.items():
            print(f"{tokens:>6} tokens  {name:<26} {median_ms(lookup, args.repeats):8.3f}")


if __name__ == "__main__":
    main()
