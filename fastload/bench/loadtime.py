"""One load in a fresh process, timed by phase: `python -m fastload.bench.loadtime --impl fastload --variant store DIR`.

Prints one JSON line: import, ready (load + LoRA + checkpointing + optimizer), first optimizer step, process start
to first step (with --t0, the launcher's time.time()), peak anonymous host memory (sampled: file pages mapped from
the checkpoint do not count), peak GPU memory allocated and reserved. Variants: first (empty store: quantizes and
stores), store (from fastload's store), onthefly (store=False). The recipe and unsloth load on the fly.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

GIB = 1024 ** 3


class AnonPeak:
    """The process's peak anonymous resident memory, sampled every few milliseconds from /proc/self/status."""

    def __init__(self, every: float = 0.005):
        self.peak = 0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _now(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(self.every)

    def __enter__(self):
        self.baseline = self._now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastload.bench.loadtime", description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--impl", default="fastload", choices=("fastload", "recipe", "unsloth"))
    p.add_argument("--variant", default="store", choices=("first", "store", "onthefly"))
    p.add_argument("--home", default="bench-out/loadtime-home", help="FASTLOAD_HOME of the store")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--step", action="store_true", help="also time the first optimizer step")
    p.add_argument("--t0", type=float, default=None, help="the launcher's time.time() just before starting this")
    args = p.parse_args(argv)
    os.environ["FASTLOAD_HOME"] = args.home
    started = time.perf_counter()
    from fastload.bench import impls

    impls.import_libraries(args.impl)
    import torch

    import fastload

    fastload.set_verbosity("INFO")

    record = {"impl": args.impl, "variant": args.variant, "import_s": time.perf_counter() - started}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = "bfloat16" if cuda else "float32"
    if cuda:
        t = time.perf_counter()
        torch.empty(1, device="cuda")
        record["cuda_init_s"] = time.perf_counter() - t
    store = False
    if args.impl == "fastload" and args.variant != "onthefly":
        import shutil

        if args.variant == "first":  # an empty store; the kernel cache under the same home stays
            shutil.rmtree(os.path.join(args.home, "quantized"), ignore_errors=True)
        store = impls.timed_store(args.home)
    with AnonPeak() as anon:
        r = impls.ready(args.impl, args.model_dir, device, dtype, args.seq, 3407, fastload_store=store)
        record.update(ready_s=r.ready_s, from_pretrained_s=r.from_pretrained_s, source=r.source,
                      store_write_s=getattr(store, "write_s", None),
                      phases_s=getattr(getattr(r.model, "fastload", None), "load_phases", None))
        if args.step:
            from fastload.bench.worker import train_step

            ids = torch.randint(0, r.model.get_input_embeddings().num_embeddings, (args.batch, args.seq),
                                generator=torch.Generator().manual_seed(0)).to(device)
            r.model.train()
            t = time.perf_counter()
            train_step(r.model, r.optimizer, ids)
            impls.synchronize(device)
            record["first_step_s"] = time.perf_counter() - t
            if args.t0 is not None:
                record["start_to_first_step_s"] = time.time() - args.t0
    record.update(anon_rss_peak_gib=anon.peak / GIB, anon_rss_above_start_gib=(anon.peak - anon.baseline) / GIB)
    if cuda:
        record.update(gpu_peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                      gpu_peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    if args.impl == "fastload":
        from fastload.load.background_store import wait_for_store_writes

        t = time.perf_counter()
        wait_for_store_writes()
        record["background_store_wait_s"] = time.perf_counter() - t
        record["background_write_s"] = getattr(store, "background_write_s", None)
    print("LOADTIME " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
