"""One measurement in a fresh process: `python -m fastload.bench.worker --phase train --impl recipe ...`.

A fresh process per measurement, so no implementation inherits another's imports, CUDA context, allocator
cache or patched classes. The result is one JSON record written to --record; any failure (out of memory, import
error, missing package) becomes a record with an `error` field instead of a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

PHASES = ("create", "quantize", "load", "train", "longest")  # longest: one rung of the doubling, a train run
GIB = 1024 ** 3


@dataclass
class Job:
    """Everything one worker needs; the driver builds it, the command line carries it (to_argv / from_argv)."""

    phase: str                     # create | quantize | load | train | longest
    model: str = ""                # label in records (shape name or folder name)
    model_dir: str = ""
    impl: str = ""
    device: str = "cpu"
    dtype: str = "float32"         # compute dtype: bfloat16 on GPUs, float32 on CPUs (bf16 is emulated there)
    seq: int = 2048
    batch: int = 2
    steps: int = 10
    warmup: int = 3
    seed: int = 3407
    variant: str = "onthefly"      # load: onthefly | prequantized; fastload: first | store | onthefly (store=False)
    cache: str = "warm"            # load: warm | cold
    cold_method: str = "auto"      # auto (fadvise, else drop_caches where root may) | fadvise
    prequantized_dir: str = ""     # the recipe's NF4 save_pretrained copy (quantize writes it; loads read it)
    fastload_home: str = ""        # FASTLOAD_HOME for fastload's store
    profile: str = ""              # train: a folder for profile-<job>.txt (2 extra steps under torch.profiler)
    max_seq: int = 0               # longest: the driver doubles seq up to this while a step succeeds
    record: str = ""               # where the JSON record goes
    repeat: int = 0                # load: which of the --repeats runs this is (their median is reported); train:
                                   # which run of this implementation (an impl named twice, or an appended run)
    t0: str = ""                   # load: the driver's time.time() just before starting this process

    def to_argv(self) -> list[str]:
        argv = []
        for f in dataclasses.fields(self):
            argv += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str] | None) -> Job:
        parser = argparse.ArgumentParser(prog="python -m fastload.bench.worker", description=__doc__.splitlines()[0])
        for f in dataclasses.fields(cls):
            kind = int if f.type == "int" else str
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, required=f.name == "phase",
                                default=None if f.name == "phase" else f.default,
                                choices=PHASES if f.name == "phase" else None)
        return cls(**vars(parser.parse_args(argv)))

    @property
    def name(self) -> str:
        parts = [self.phase, self.impl, self.model] + ([self.variant, self.cache, f"r{self.repeat}"]
                                                       if self.phase == "load" else [])
        parts += [str(self.seq)] if self.phase == "longest" else []
        parts += [f"r{self.repeat}"] if self.phase == "train" and self.repeat else []
        return "--".join(p for p in parts if p)


def versions(impl: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    packages = ("torch", "transformers", "peft", "bitsandbytes", "fastload")
    packages += ("unsloth",) if impl == "unsloth" else ()
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    from fastload import __version__

    found["fastload"] = found["fastload"] or __version__
    return found


def init_device(device: str) -> dict:
    """Start CUDA before any timing, so no implementation pays for the context."""
    if device != "cuda":
        return {}
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    return {"gpu": torch.cuda.get_device_name(),
            "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / GIB}


def memory(device: str, prefix: str) -> dict:
    """GPU memory allocated/reserved now (CUDA) and the process's peak resident memory."""
    facts = {f"{prefix}_rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    if device == "cuda":
        import torch

        facts[f"{prefix}_allocated_gib"] = torch.cuda.memory_allocated() / GIB
        facts[f"{prefix}_reserved_gib"] = torch.cuda.memory_reserved() / GIB
    return facts


def load_files(job: Job) -> list[Path]:
    """The weight files this load will read (the page cache is made warm or cold for exactly these)."""
    from fastload.bench.models import weight_files

    if job.variant in ("onthefly", "first"):
        return weight_files(job.model_dir)
    if job.impl == "fastload":
        from fastload import resolve
        from fastload.sources.store import Store

        plan = resolve(job.model_dir, store=Store(job.fastload_home))
        if plan.source != "store":
            raise RuntimeError(f"fastload's store in {job.fastload_home} has no entry for {job.model_dir} "
                               f"(plan: {plan.source}); the on-the-fly load, which stores it, must run first")
        return weight_files(plan.location)
    if not job.prequantized_dir or not Path(job.prequantized_dir, "config.json").is_file():
        raise RuntimeError(f"no pre-quantized checkpoint in {job.prequantized_dir!r}; the quantize job makes it")
    return weight_files(job.prequantized_dir)


def prepare_cache(job: Job, files: list[Path]) -> dict:
    """Warm: every file read once. Cold: the files evicted, read once to time the disk itself (what a cold load is
    compared with), then evicted again."""
    from fastload.bench import pagecache

    if job.cache == "cold":
        raw = {}
        for attempt in ("disk", "load"):
            facts = pagecache.make_cold(files, allow_drop_caches=job.cold_method == "auto")
            if not facts["cold_ok"]:
                left = facts["resident_after_evict"]
                share = "an unknown share" if left is None else f"{left:.0%}"
                raise RuntimeError(f"could not make the page cache cold: after {facts['cold_method']} "
                                   f"{share} of the files stayed cached")
            if attempt == "disk":
                raw = pagecache.timed_read(files)
        return {**facts, **raw}
    pagecache.warm(files)
    return {"resident_before": pagecache.resident_fraction(files)}


def run_load(job: Job, record: dict) -> None:
    """Load to ready-to-train, then one optimizer step: times, fastload's phases, peak anonymous host memory (file
    pages of the checkpoint do not count) and GPU memory. fastload's variants: first (an empty store: quantizes and
    stores, in the background where it can), store (from its store; "prequantized" says the same), onthefly
    (store=False)."""
    import torch

    from fastload.bench import impls
    from fastload.bench.loadtime import AnonPeak

    store = False
    if job.impl == "fastload" and job.variant in ("first", "store", "prequantized"):
        import shutil

        if job.variant == "first":  # an empty store; the kernel cache stays, as on a machine that ran fastload
            for entry in Path(job.fastload_home).glob("*"):
                if entry.name != "kernels":
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        store = impls.timed_store(job.fastload_home)
    files = load_files(job)
    record.update(prepare_cache(job, files), read_bytes=sum(f.stat().st_size for f in files))
    if job.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with AnonPeak() as anon:
        r = impls.ready(job.impl, job.model_dir, job.device, job.dtype, job.seq, job.seed,
                        prequantized_dir=job.prequantized_dir if job.variant == "prequantized" else None,
                        fastload_store=store)
        record.update(from_pretrained_s=r.from_pretrained_s, load_s=r.load_s, ready_s=r.ready_s,
                      store_write_s=r.store_write_s, source=r.source, **memory(job.device, "after_load"),
                      phases_s=getattr(getattr(r.model, "fastload", None), "load_phases", None))
        ids = make_batch(job, r.model.get_input_embeddings().num_embeddings).to(
            "cuda" if job.device == "cuda" else "cpu")
        r.model.train()
        started = time.perf_counter()
        train_step(r.model, r.optimizer, ids)
        impls.synchronize(job.device)
        record["first_step_s"] = time.perf_counter() - started
        if job.t0:
            record["start_to_first_step_s"] = time.time() - float(job.t0)
    record.update(anon_rss_peak_gib=anon.peak / GIB, anon_rss_above_start_gib=(anon.peak - anon.baseline) / GIB)
    if job.device == "cuda":
        record.update(gpu_peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                      gpu_peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    if job.impl == "fastload":  # the next load from the store needs the entry whole
        from fastload.load.background_store import wait_for_store_writes

        started = time.perf_counter()
        wait_for_store_writes()
        record.update(background_store_wait_s=time.perf_counter() - started,
                      background_write_s=getattr(store, "background_write_s", None))


def make_batch(job: Job, vocab_size: int):
    """The same random token ids for every implementation: drawn on the CPU from a fixed seed."""
    import torch

    generator = torch.Generator().manual_seed(job.seed)
    return torch.randint(0, vocab_size, (job.batch, job.seq), generator=generator)


def run_train(job: Job, record: dict) -> None:
    import torch

    from fastload.bench import impls

    r = impls.ready(job.impl, job.model_dir, job.device, job.dtype, job.seq, job.seed)
    model, optimizer = r.model, r.optimizer
    record.update(load_s=r.load_s, ready_s=r.ready_s, **memory(job.device, "after_load"),
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  engine_levers=getattr(model, "fastload_engine", None))
    ids = make_batch(job, model.get_input_embeddings().num_embeddings).to("cuda" if job.device == "cuda" else "cpu")
    model.train()  # from_pretrained returns eval mode, where transformers skips gradient checkpointing
    if job.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times, step_peaks = [], [], []
    run_peak = run_reserved = 0.0
    for _ in range(job.warmup + job.steps):
        impls.synchronize(job.device)
        started = time.perf_counter()
        loss = train_step(model, optimizer, ids)
        impls.synchronize(job.device)
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach().float()))
        if job.device == "cuda":  # per step: a warm-up step that captures graphs peaks differently from replays
            step_peaks.append(torch.cuda.max_memory_allocated() / GIB)
            run_peak = max(run_peak, step_peaks[-1])
            run_reserved = max(run_reserved, torch.cuda.max_memory_reserved() / GIB)
            torch.cuda.reset_peak_memory_stats()
    timed = times[job.warmup:] or times
    median = statistics.median(timed)
    record.update(losses=losses, first_loss=losses[0], step_s=times, median_step_s=median,
                  tokens_per_s=job.batch * job.seq / median, **memory(job.device, "train"))
    if job.device == "cuda":
        pool = graph_pool_gib()
        steady = max(step_peaks[job.warmup:] or step_peaks)
        # CUDA graphs replay inside a private memory pool the allocator no longer counts as allocated: the
        # steady-state peak adds the pool, and the figure reported is the larger of that and the whole run's peak
        record.update(peak_allocated_gib=max(run_peak, steady + pool), run_peak_allocated_gib=run_peak,
                      steady_peak_allocated_gib=steady, graph_pool_gib=pool, step_peak_allocated_gib=step_peaks,
                      peak_reserved_gib=run_reserved)
        record.update(cuda_graphs=graphs_summary(model))
    if job.profile:
        record.update(profile_step(job, lambda: train_step(model, optimizer, ids)))


def graphs_summary(model) -> dict | None:
    """fastload's CUDA graphs in this run (captured, replayed, why capturing stopped), or None without the lever."""
    from fastload.engine.cuda_graphs import graphs_of

    graphs = graphs_of(model)
    return graphs.summary() if graphs is not None else None


def graph_pool_gib() -> float:
    """Memory held by CUDA graphs' private pools (segments outside the allocator's default pool)."""
    import torch

    segments = torch.cuda.memory_snapshot()
    return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0)) / GIB


def train_step(model, optimizer, ids):
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return loss


def profile_step(job: Job, step, steps: int = 2) -> dict:
    """Run `steps` more steps under torch.profiler after the timed ones; write where the time went, by kernel/op.

    Returns the wall seconds and the GPU's busy seconds (device-side events only, as the table's "Self CUDA time
    total"): busy far below wall means the step waits on the host (Python, launches), not on kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if job.device == "cuda" else [])
    from fastload.bench import impls

    impls.synchronize(job.device)
    started = time.perf_counter()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        impls.synchronize(job.device)
    wall = time.perf_counter() - started
    events = prof.key_averages()
    sort = "self_cuda_time_total" if job.device == "cuda" else "self_cpu_time_total"
    busy = None
    if job.device == "cuda":
        from torch.autograd import DeviceType

        # operator rows repeat their kernels' time: count the device-side rows alone, user ranges left out
        busy = sum(e.self_device_time_total for e in events
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e6
    path = Path(job.profile) / f"profile-{job.name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"{job.name}: {steps} steps in {wall:.3f} s wall" + (f", kernels busy {busy:.3f} s" if busy else "")
    text = header + "\n" + events.table(sort_by=sort, row_limit=60, max_name_column_width=90)
    if job.device == "cuda":  # where the host's time goes too: a step that waits on launches shows it here
        by_host = events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
        text += "\nBy host time:\n" + by_host
        # which call of an op costs what (the gate's mul against the LoRA scaling's): the largest items to attack
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=90,
                                                                       max_name_column_width=40)
        text += "\nBy input shape:\n" + by_shape
    path.write_text(text)
    return {"profile_wall_s": wall, "profile_gpu_busy_s": busy}


def run(job: Job) -> dict:
    """Do the job; return its record. Never raises: a failure is the record's `error`."""
    record = {"phase": job.phase, "impl": job.impl, "model": job.model, "device": job.device, "dtype": job.dtype,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}
    if job.phase == "load":
        record.update(variant=job.variant, cache=job.cache)
    if job.phase in ("train", "longest"):
        record.update(seq=job.seq, batch=job.batch, warmup=job.warmup, steps=job.steps)
    started = time.perf_counter()
    try:
        if job.fastload_home:
            os.environ["FASTLOAD_HOME"] = job.fastload_home
        if job.phase == "create":
            from fastload.bench.models import create

            record.update(create(job.model, job.model_dir, device=job.device))
        else:
            import fastload
            from fastload.bench import impls

            fastload.set_verbosity("INFO")
            t = time.perf_counter()
            impls.import_libraries(job.impl)
            record["import_s"] = time.perf_counter() - t
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # bars would fill the combined log
            record.update(versions=versions(job.impl), **init_device(job.device))
            if job.phase == "quantize":
                record["save_s"] = impls.save_prequantized(job.model_dir, job.prequantized_dir, job.device, job.dtype)
            elif job.phase == "load":
                run_load(job, record)
            else:
                run_train(job, record)
    except BaseException as e:  # noqa: BLE001 - every failure must become a record, out-of-memory included
        message = str(e).strip().splitlines()
        record["error"] = f"{type(e).__name__}: {message[0][:300] if message else ''}".strip()
        record["traceback"] = traceback.format_exc()[-3000:]
        if isinstance(e, KeyboardInterrupt):
            raise
    record["wall_s"] = time.perf_counter() - started
    return record


def write_record(record: dict, path: str) -> None:
    from fastload.atomic import atomic_file

    with atomic_file(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    job = Job.from_argv(argv)
    record = run(job)
    if job.record:
        write_record(record, job.record)
    else:
        print(json.dumps(record, default=str))
    if record.get("error"):
        print(f"worker {job.name}: {record['error']}\n{record.get('traceback', '')}", file=sys.stderr)
    return 1 if record.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
