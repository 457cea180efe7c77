"""Where reserved GPU memory goes beyond allocated: train a few steps and print the allocator's peaks per pool and
the segments per stream at the end (issue 25: reserved 18.6 vs allocated 12.5 GiB for 8B at 32k tokens on an H200).

    python benchmarks/memory_probe.py MODEL_DIR --seq 32768 [--engine '{"offload_checkpointing": false}']
"""

from __future__ import annotations

import argparse
import collections
import json

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--engine", default="true", help="JSON: true, false or a dict of levers")
    args = parser.parse_args()

    import torch

    from fastload import FastModel

    model, _ = FastModel.from_pretrained(args.model, max_seq_length=args.seq, engine=json.loads(args.engine))
    optimizer = FastModel.get_optimizer(model, lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    model.train()
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    keys = ["allocated_bytes.all.peak", "reserved_bytes.all.peak", "reserved_bytes.large_pool.peak",
            "reserved_bytes.small_pool.peak", "inactive_split_bytes.all.peak", "active_bytes.all.peak",
            "requested_bytes.all.peak"]
    report = {k: round(stats.get(k, 0) / GIB, 2) for k in keys}
    report.update(num_alloc_retries=stats.get("num_alloc_retries"), num_ooms=stats.get("num_ooms"),
                  segments=stats.get("segment.all.current"))
    per_stream = collections.defaultdict(float)
    for segment in torch.cuda.memory_snapshot():
        per_stream[segment["stream"]] += segment["total_size"] / GIB
    report["reserved_per_stream_gib_now"] = {str(k): round(v, 2) for k, v in per_stream.items()}
    report["engine"] = args.engine
    print(json.dumps(report))


if __name__ == "__main__":
    main()
