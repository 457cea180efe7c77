"""The `fastload` command line: resolve, quantize, train, merge, generate, estimate, cache, registry, bench.

Exit codes: 0 ok, 1 a fastload error (its message, no traceback unless --debug), 2 a usage error. Data goes to
stdout (as JSON with --json), decisions and progress to stderr. Every heavy import happens inside a command, so
`fastload --help` and `import fastload.cli` stay fast and never import torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from fastload._log import logger, set_verbosity
from fastload.errors import FastloadError, InvalidOption, ModelNotFound, StoreError
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEED
from fastload.export import cli as export_cli

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
LOADING_COMMANDS = {"quantize", "train", "merge", "generate", "estimate", "export"}
GIB = 1024 ** 3


# -- output -------------------------------------------------------------------------------------------------------

class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (a captured stream in tests, the terminal otherwise), never a stale one."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("fastload: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides instead
        pass


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print data as JSON with --json, else the human-readable text."""
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def note(args: argparse.Namespace, message: str) -> None:
    """A progress or status line on stderr; --quiet silences it."""
    if not args.quiet:
        print(f"fastload: {message}", file=sys.stderr, flush=True)


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


# -- resolve ------------------------------------------------------------------------------------------------------

def plan_dict(plan) -> dict:
    return {"name": plan.name, "source": plan.source, "location": plan.location, "prequantized": plan.prequantized,
            "quantization": plan.quant.describe(), "reason": plan.reason, "revision": plan.revision,
            "original": plan.original, "adapter": plan.adapter, "store_key": plan.store_key,
            "will_download": plan.will_download, "registry_id": plan.registry_entry.id if plan.registry_entry else None,
            "tried": list(plan.tried)}


def cmd_resolve(args) -> int:
    from fastload.sources.resolve import resolve

    plan = resolve(args.name, revision=args.revision, store=not args.no_store)
    emit(args, plan_dict(plan), plan.explain())
    return EXIT_OK


# -- quantize -----------------------------------------------------------------------------------------------------

def copy_checkpoint(src: Path, dst: Path) -> None:
    """Every file of a checkpoint folder but the store's manifest (hub-cache links are followed)."""
    import shutil

    from fastload.sources.store import MANIFEST

    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            shutil.copyfile(f, dst / f.name)


def cmd_quantize(args) -> int:
    from fastload.sources import plan as P
    from fastload.load.loader import LoadOptions, local_files_of
    from fastload.facade import FastModel
    from fastload.sources.store import Store

    quant = dict(bnb_4bit_quant_type=args.quant_type, bnb_4bit_use_double_quant=not args.no_double_quant)
    if args.out:
        _refuse_out_in_source(args, [args.source])
    if args.out:  # a 4-bit checkpoint already on this machine is copied as it is, without loading it
        from fastload.sources.resolve import make_store, resolve

        plan = resolve(args.source, store=make_store(True) or False, **quant)
        files = local_files_of(plan, LoadOptions()) if plan.prequantized else None
        if files is not None:
            note(args, f"copying the 4-bit checkpoint {plan.location}")
            out = _copy_prequantized(Path(files), args.out, args.source)
            return _quantize_done(args, plan, out, True)
    note(args, f"loading {args.source} in 4-bit (quantizing on the fly unless a quantized copy exists)")
    model, tokenizer = FastModel.from_pretrained(args.source, lora=None, gradient_checkpointing=False, engine=False,
                                                 **quant)
    plan = model.fastload_plan
    if args.out:
        _refuse_out_in_source(args, [plan.location, plan.original])
        if plan.prequantized:  # a 4-bit checkpoint that was downloaded while loading it: copied as it is
            files = local_files_of(plan, LoadOptions())
            if files is None:
                raise StoreError(f"Copying {args.source} to {args.out}", found=f"the files of {plan.location} are "
                                 "not on this machine after loading it", fix="download it into the Hugging Face "
                                 "cache (huggingface-cli download) and run the command again")
            where = _copy_prequantized(Path(files), args.out, args.source)
        else:
            from fastload.save.saving import atomic_directory

            where = Path(args.out).expanduser().absolute()
            with atomic_directory(where) as tmp:  # nothing half-written at --out, even on Ctrl-C
                model.save_pretrained(str(tmp), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
        written = True
    elif plan.source == P.STORE:
        where, written = Path(plan.location), False
    elif plan.prequantized:
        raise InvalidOption(f"Quantizing {args.source} into the store",
                            found=f"it is already a quantized checkpoint ({plan.location}); the store keeps only "
                                  "checkpoints fastload quantized itself",
                            fix="load it as it is, or pass --out DIR to write a copy")
    else:
        entry = Store().lookup(plan.store_key) if plan.store_key else None
        if entry is None:
            raise StoreError(f"Quantizing {args.source} into the store", found="no store entry was written",
                             fix="check FASTLOAD_HOME is writable, or pass --out DIR")
        where, written = entry.path, True
    return _quantize_done(args, plan, where, written)


def _refuse_out_in_source(args, sources: list) -> None:
    """--out must not be (or lie in, or hold) what is quantized: the 16-bit original would be replaced."""
    from fastload.atomic import refuse_source

    refuse_source(args.out, sources, f"fastload quantize {args.source} --out {args.out}",
                  found="--out is the checkpoint being quantized, or lies inside the checkpoint, or holds it: "
                  "the original would be replaced")


def _copy_prequantized(files: Path, out_arg: str, source: str) -> Path:
    """A 4-bit checkpoint copied as it is into --out, checked as a load would check it (complete, safetensors,
    tokenizer), atomically (nothing half-written, even on Ctrl-C); never into itself (a store entry would find a
    stranger and be removed)."""
    from fastload.sources.checkpoint_files import check_tokenizer_files, inspect_checkpoint
    from fastload.save.saving import atomic_directory

    out = Path(out_arg).expanduser().absolute()
    if out.resolve() == files.resolve() or files.resolve() in out.resolve().parents:
        raise InvalidOption(f"fastload quantize {source} --out {out}", found=f"{out} is inside the checkpoint it "
                            f"would copy ({files})", fix="pass an --out folder outside it")
    inspect_checkpoint(files)
    check_tokenizer_files(files)
    with atomic_directory(out) as tmp:
        copy_checkpoint(files, tmp)
    return out


def _written_quantization(where: Path, plan) -> str:
    """The quantization of what is at `where` (its config), which for a copied checkpoint may differ from what
    was asked (a 4-bit checkpoint is copied as it is)."""
    try:
        q = json.loads((where / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return plan.quant.describe()
    if q.get("load_in_4bit"):
        double = "+double quant" if q.get("bnb_4bit_use_double_quant") else ""
        return f"4-bit {q.get('bnb_4bit_quant_type', 'nf4')}{double}"
    return "8-bit" if q.get("load_in_8bit") else plan.quant.describe()


def _quantize_done(args, plan, where: Path, written: bool) -> int:
    size = sum(f.stat().st_size for f in where.iterdir() if f.is_file())
    data = {"source": args.source, "path": str(where), "written": written, "bytes": size,
            "quantization": _written_quantization(where, plan), "plan_source": plan.source}
    verb = "wrote" if written else "already stored:"
    emit(args, data, f"{verb} {where} ({size / 1e6:.1f} MB, {data['quantization']})")
    return EXIT_OK


# -- train --------------------------------------------------------------------------------------------------------

def newest_checkpoint(out: Path) -> Path | None:
    """The checkpoint-N folder with the largest N in `out` (what the Trainer resumes from)."""
    found = []
    for p in out.glob("checkpoint-*") if out.is_dir() else []:
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(suffix), p))
    return max(found)[1] if found else None


def peak_memory() -> str:
    """Peak memory of this run: the GPU's allocations on CUDA, the process's resident set on the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / GIB:.1f}G gpu"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.1f}G rss"  # Linux: KiB
    except ImportError:  # Windows
        return "?"


def progress_callback(quiet: bool):
    """A TrainerCallback drawing one tqdm bar: steps with ETA, and loss, tokens/s and peak memory as its postfix."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            disable=quiet, file=sys.stderr, dynamic_ncols=True)
            self.started, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen or 0
            self.first_step = state.global_step  # > 0 when resumed from a checkpoint

        def on_log(self, args, state, control, logs=None, **kwargs):
            # transformers logs after on_step_end: show the new loss now, not one step late
            if logs and "loss" in logs:
                self.loss = logs["loss"]
                self._show(state)

        def on_step_end(self, args, state, control, **kwargs):
            self._show(state)

        def _show(self, state):
            if self.bar is None:
                return
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            tokens = (state.num_input_tokens_seen or 0) - self.tokens_at_start
            postfix = {"tok/s": f"{tokens / elapsed:.0f}", "mem": peak_memory()}
            if self.loss is not None:
                postfix = {"loss": f"{self.loss:.4f}", **postfix}
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Progress()


def save_adapter_into(model, tokenizer, out: Path) -> None:
    """Write the adapter into --out beside the trainer's checkpoints as one folder swap (fastload.atomic): a kill
    leaves the previous adapter or the new one, whole; checkpoint-N folders and the user's own files stay."""
    from fastload.save.saving import atomic_directory, name_base_model

    name_base_model(model, getattr(model, "fastload_plan", None))
    with atomic_directory(out, marker="adapter_config.json", into_existing=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))


def cmd_train(args) -> int:
    from transformers import PrinterCallback

    from fastload.data import load_records
    from fastload.facade import FastModel

    records = load_records(args.data)  # read first: a bad file fails before minutes of loading
    if not records:
        raise InvalidOption(f"Training on {args.data}", found="the file holds no records", fix="give a non-empty file")
    out = Path(args.out).expanduser().absolute()
    if out.parent.is_dir():  # a previous run killed while writing its adapter: put its folder back first
        from fastload.atomic import clean_leftovers

        clean_leftovers(out.parent, out)
    resume_from = None
    if args.resume:
        resume_from = newest_checkpoint(out)
        if resume_from is None:
            note(args, f"--resume: no checkpoint-N folder in {out}; starting from step 0")
        else:
            note(args, f"resuming from {resume_from}")
    model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=args.seq,
                                                 lora={"r": args.r, "lora_alpha": args.alpha or args.r})
    options = dict(per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
                   learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.steps or -1,
                   save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.keep, logging_steps=1,
                   disable_tqdm=True, include_num_input_tokens_seen=True, seed=args.seed)
    training_args = FastModel.training_arguments(out, model=model, **options)
    progress = progress_callback(args.quiet)
    trainer = FastModel.get_trainer(model, tokenizer, records, args=training_args, callbacks=[progress])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the bar shows them instead
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_adapter_into(model, tokenizer, out)
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    data = {"out": str(out), "steps": state.global_step, "resumed_from": str(resume_from) if resume_from else None,
            "started_at_step": getattr(progress, "first_step", 0),
            "final_loss": losses[-1] if losses else None, "train_loss": result.training_loss,
            "tokens": state.num_input_tokens_seen, "checkpoint": str(newest_checkpoint(out) or "")}
    emit(args, data, f"trained {state.global_step} steps (loss {data['final_loss']}); adapter saved in {out}")
    return EXIT_OK


# -- merge, generate ----------------------------------------------------------------------------------------------

def cmd_merge(args) -> int:
    from fastload.facade import FastModel
    from fastload.sources.resolve import resolve

    if not resolve(args.adapter_dir).adapter:  # the plan alone tells, before minutes of loading
        raise InvalidOption(f"Merging {args.adapter_dir}", found="it is a model, not a LoRA adapter directory",
                            fix="pass the folder holding adapter_config.json (what `fastload train --out` wrote)")
    model, tokenizer = FastModel.from_pretrained(args.adapter_dir, gradient_checkpointing=False, engine=False)
    out = FastModel.save_merged(model, args.out, tokenizer=tokenizer, source=args.source, quantize=args.quantize)
    emit(args, {"adapter": args.adapter_dir, "out": str(out), "quantized": args.quantize},
         f"merged model saved in {out}" + (" (bitsandbytes 4-bit)" if args.quantize else ""))
    return EXIT_OK


def cmd_generate(args) -> int:
    from fastload.facade import FastModel

    model, tokenizer = FastModel.from_pretrained(args.model, lora=None, gradient_checkpointing=False,
                                                 max_seq_length=args.seq)
    kwargs = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    texts = FastModel.generate(model, tokenizer, list(args.prompt), max_new_tokens=args.max_new_tokens, **kwargs)
    data = [{"prompt": p, "text": t} for p, t in zip(args.prompt, texts)]
    emit(args, data if len(data) > 1 else data[0], "\n---\n".join(texts))
    return EXIT_OK


# -- estimate -----------------------------------------------------------------------------------------------------

def config_for_estimate(name: str) -> tuple[Any, str]:
    """(config dict or parameter count, where it came from): a local config.json, a resolvable model's config, or
    the registry's parameter count when no config is on this machine."""
    from fastload.sources.checkpoint_files import read_config
    from fastload.sources.registry import get_registry
    from fastload.sources.resolve import resolve

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"Estimating memory for {path}", found="the folder has no config.json",
                                fix="pass a checkpoint folder, a registry name or a hub id in the HF cache")
        return read_config(path), f"{path / 'config.json'}"
    match = get_registry().find(name)
    try:
        plan = resolve(name)
    except ModelNotFound:
        if match is None or not match.entry.params:
            raise
        plan = None
    if plan is not None:
        if plan.config:
            return plan.config, f"the config of {plan.location}"
        if (Path(plan.location) / "config.json").is_file():
            return read_config(Path(plan.location)), f"the config of {plan.location}"
    if match is not None and match.entry.params:  # nothing on this machine yet (a download would be needed)
        return float(match.entry.params), (f"the registry's parameter count of {match.entry.id} (approximate: no "
                                           "config on this machine, a Llama-like shape is assumed)")
    raise ModelNotFound(f"Estimating memory for {name!r}", found=f"no config.json of it on this machine "
                        f"({plan.source}: {plan.location}) and no parameter count in the registry",
                        fix="download it first (huggingface-cli download), or pass a folder with config.json")


def cmd_estimate(args) -> int:
    from fastload.load import memory

    config, basis = config_for_estimate(args.name)
    if isinstance(config, float):
        est = memory.estimate_counts(memory.approximate_counts(config), args.seq, args.batch, args.r, basis=basis)
    else:
        est = memory.estimate_counts(memory.count_params(config), args.seq, args.batch, args.r, basis=basis)
    emit(args, {"name": args.name, **est.as_dict()}, est.table())
    return EXIT_OK


# -- cache --------------------------------------------------------------------------------------------------------

def entry_dict(entry) -> dict:
    return {"key": entry.key, "source": entry.source, "path": str(entry.path), "bytes": entry.size_bytes,
            "created": entry.manifest.get("created"), "damaged": bool(entry.manifest.get("damaged"))}


def cmd_cache(args) -> int:
    from fastload.sources.store import Store

    store = Store()
    if args.action == "list":
        entries = [entry_dict(e) for e in store.entries()]
        lines = [f"{e['key']}  {e['bytes'] / 1e6:9.1f} MB  {e['source']}" + ("  (damaged)" if e["damaged"] else "")
                 for e in entries]
        emit(args, {"root": str(store.root), "entries": entries},
             "\n".join([f"store: {store.root}"] + (lines or ["  (empty)"])))
        return EXIT_OK
    if args.action == "rm":
        removed = store.remove(args.key)
        if not removed:
            keys = ", ".join(e.key for e in store.entries()) or "none"
            raise StoreError(f"Removing {args.key!r} from the store {store.root}", found=f"no entry has that key or "
                             f"source; keys: {keys}", fix="see `fastload cache list`")
        emit(args, {"removed": [entry_dict(e) for e in removed]},
             "\n".join(f"removed {e.key} ({e.source})" for e in removed))
        return EXIT_OK
    results = store.verify()  # verify
    data = [{**entry_dict(e), "problem": problem} for e, problem in results]
    emit(args, {"root": str(store.root), "entries": data},
         "\n".join([f"store: {store.root}"] + [f"{d['key']}  {'ok' if not d['problem'] else 'DAMAGED: ' + d['problem']}"
                                               f"  {d['source']}" for d in data] + ([] if data else ["  (empty)"])))
    bad = [d for d in data if d["problem"]]
    if bad:
        raise StoreError("Verifying the store", found=f"{len(bad)} damaged entr{'y' if len(bad) == 1 else 'ies'}: "
                         + ", ".join(d["key"] for d in bad),
                         fix="remove them with `fastload cache rm KEY`; the next load quantizes again")
    return EXIT_OK


# -- registry -----------------------------------------------------------------------------------------------------

def registry_entry_dict(entry) -> dict:
    return {"id": entry.id, "family": entry.family, "aliases": list(entry.aliases), "params": entry.params,
            "context_length": entry.context_length, "gated": entry.gated, "mirror": entry.mirror,
            "quantized": [q.id for q in entry.quantized], "packaged_gguf": entry.packaged_gguf, "origin": entry.origin}


def _registry_line(entry) -> str:
    params = f"{entry.params / 1e9:6.2f}B" if entry.params else "      ?"
    alias = f"  ({', '.join(entry.aliases)})" if entry.aliases else ""
    return f"{params}  {entry.family:<12} {entry.id}{alias}"


def cmd_registry(args) -> int:
    from fastload.sources.registry import get_registry

    reg = get_registry()
    if args.action == "show":
        match = reg.find(args.name)
        if match is None:
            close = reg.closest(args.name)
            raise ModelNotFound(f"Showing the registry entry {args.name!r}", found="no registry entry has that name"
                                + (f"; closest: {', '.join(close)}" if close else ""),
                                fix="see `fastload registry search TEXT`")
        d = registry_entry_dict(match.entry)
        shown = {**d, "params": f"{d['params'] / 1e9:.2f}B" if d["params"] else None}
        text = "\n".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in shown.items()
                         if v not in (None, []))
        emit(args, d, text)
        return EXIT_OK
    entries = reg.search(args.query) if args.action == "search" else list(reg.entries)
    if args.action == "list" and args.family:
        entries = [e for e in entries if e.family == args.family]
    emit(args, [registry_entry_dict(e) for e in entries],
         "\n".join(_registry_line(e) for e in entries) or "no registry entry matches")
    return EXIT_OK


def run_bench(argv: list[str]) -> int:
    from fastload.bench.driver import main as bench_main

    try:
        return bench_main(argv)
    except SystemExit as e:  # its parser's --help (0) or usage error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE


def cmd_bench(args) -> int:
    return run_bench(list(args.bench_args))


# -- the parser ---------------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    """argparse type: a bad number is a usage error (exit 2), caught before anything loads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for --steps: 0 means "use --epochs"; a negative count is a usage error, not ignored."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """argparse type for --epochs and --lr: a positive finite number, else a usage error before anything loads."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _common(json_output: bool) -> argparse.ArgumentParser:
    """Options every command takes, also after its name; SUPPRESS keeps the top-level values unless given here."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only errors: no decision lines, no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more detail (-vv: also transformers' own logging)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    if json_output:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the result as JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    from fastload import __version__

    parser = argparse.ArgumentParser(prog="fastload", description="Load, quantize, fine-tune (QLoRA) and merge "
                                     "language models in one line each.")
    parser.add_argument("--version", action="version", version=f"fastload {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors: no decision lines, no progress bar")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv: transformers' too)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.set_defaults(json=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data, plain = _common(True), _common(False)

    def command(name: str, func: Callable, help: str, parents=(data,), **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=list(parents), **kw)
        p.set_defaults(func=func)
        return p

    p = command("resolve", cmd_resolve, "show the load plan for a model name and why, without loading anything")
    p.add_argument("name", help="hub id, registry alias, local directory, adapter directory or .gguf file")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--no-store", action="store_true", help="ignore fastload's store of quantized checkpoints")

    p = command("quantize", cmd_quantize, "write a bitsandbytes 4-bit checkpoint (into the store, or --out)")
    p.add_argument("source", help="the 16-bit model: hub id, registry name, local directory or .gguf file (with "
                   "--out, a 4-bit checkpoint already on disk is copied as it is: --quant-type and "
                   "--no-double-quant then do not apply)")
    p.add_argument("--out", help="write the checkpoint to this folder instead of fastload's store")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type (default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax scales in fp32")

    p = command("train", cmd_train, "QLoRA fine-tune on a JSONL/JSON/CSV file of conversations or prompt/response "
                "pairs; the adapter is saved in --out", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="records: messages, ShareGPT conversations, Alpaca, prompt/response")
    p.add_argument("--model", required=True, help="the base model (any name `fastload resolve` accepts)")
    p.add_argument("--out", required=True, help="folder for checkpoints (checkpoint-N) and the final adapter")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in --out")
    p.add_argument("--steps", type=non_negative_int, default=0,
                   help="stop after this many optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data when --steps is 0")
    p.add_argument("--seq", type=positive_int, default=DEFAULT_MAX_SEQ_LENGTH,
                   help="max_seq_length: longer records are truncated")
    p.add_argument("--batch", type=positive_int, default=2, help="per-device batch size")
    p.add_argument("--grad-accum", type=positive_int, default=4, help="gradient accumulation steps")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="learning rate")
    p.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=positive_int, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--save-steps", type=positive_int, default=100, help="save a resumable checkpoint every N steps")
    p.add_argument("--keep", type=positive_int, default=2, help="how many checkpoint-N folders to keep")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")

    p = command("merge", cmd_merge, "merge a LoRA adapter into its base and save a model plain transformers loads")
    p.add_argument("adapter_dir", help="folder holding adapter_config.json")
    p.add_argument("--out", required=True, help="folder to write the merged model to")
    p.add_argument("--quantize", action="store_true", help="write a bitsandbytes 4-bit checkpoint instead of 16-bit")
    p.add_argument("--source", choices=("auto", "16bit", "dequantized"), default="auto",
                   help="merge into the 16-bit original (auto: when on this machine) or the dequantized 4-bit weights")

    p = command("export", export_cli.run, "export a trained adapter or merged model: `export gguf` for llama.cpp")
    export_cli.add_arguments(p, parents=[data])

    p = command("generate", cmd_generate, "generate text from a model or a trained adapter")
    p.add_argument("model", help="model name or adapter directory")
    p.add_argument("--prompt", action="append", required=True, help="the user's message (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--seq", type=positive_int, default=None, help="max_seq_length (default: the model's)")

    p = command("estimate", cmd_estimate, "memory needed to load and QLoRA-train a model, before loading it",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", help="registry name, hub id in the HF cache, or a folder with config.json")
    p.add_argument("--seq", type=positive_int, default=DEFAULT_MAX_SEQ_LENGTH,
                   help="sequence length of a training batch")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size")
    p.add_argument("--r", type=positive_int, default=16, help="LoRA rank")

    p = command("cache", cmd_cache, "list, remove or verify fastload's store of quantized checkpoints")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="every stored checkpoint", parents=[data])
    rm = actions.add_parser("rm", help="remove an entry by key or source", parents=[data])
    rm.add_argument("key", help="entry key (from `fastload cache list`) or source id/path")
    actions.add_parser("verify", help="hash every file of every entry", parents=[data])

    p = command("registry", cmd_registry, "the registry of pre-quantized checkpoints")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("list", help="every entry", parents=[data])
    ls.add_argument("--family", help="only this family (model_type), e.g. llama, qwen2")
    search = actions.add_parser("search", help="entries whose id, alias or quantized id contains QUERY", parents=[data])
    search.add_argument("query")
    show = actions.add_parser("show", help="one entry in full", parents=[data])
    show.add_argument("name", help="id, alias, mirror or quantized id")

    p = command("bench", cmd_bench, "benchmark load and training against the plain recipe (python -m fastload.bench)",
                parents=(), add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see `fastload bench "
                   "--help`)")
    p.set_defaults(json=False)
    return parser


def configure_logging(args: argparse.Namespace) -> Callable[[], None]:
    """--quiet: errors only; default: fastload's decision lines; -v: fastload debug; -vv: transformers' info too.

    Returns what puts the process-wide settings back (main runs in-process in tests and scripts)."""
    fastload_level, tqdm_env = logger.level, os.environ.get("TQDM_DISABLE")
    set_verbosity(logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # bars drawn by libraries (downloads, shard loading) too
    tlog = None
    quiet_filters = None
    if args.quiet:  # libraries' warnings (FutureWarning, bitsandbytes' kernel notices) are not errors either
        import warnings

        quiet_filters = warnings.filters[:]
        warnings.simplefilter("ignore")
        bnb_logger = logging.getLogger("bitsandbytes")
        bnb_level = bnb_logger.level
        bnb_logger.setLevel(logging.ERROR)
    if args.command in LOADING_COMMANDS:  # the light commands never import transformers
        import transformers.utils.logging as tlog

        transformers_level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity(logging.INFO if args.verbose >= 2 else logging.ERROR if args.quiet else logging.WARNING)
        if args.quiet:
            tlog.disable_progress_bar()

    def restore() -> None:
        logger.setLevel(fastload_level)
        if quiet_filters is not None:
            import warnings

            warnings.filters[:] = quiet_filters
            logging.getLogger("bitsandbytes").setLevel(bnb_level)
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
        if tlog is not None:
            tlog.set_verbosity(transformers_level)
            (tlog.enable_progress_bar if bars else tlog.disable_progress_bar)()

    return restore


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    handler = _CurrentStderr() if not logger.handlers else None  # set_verbosity then adds none of its own
    if handler is not None:
        logger.addHandler(handler)
    args, restore = None, None
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv[:1] == ["bench"]:  # everything after it, --help included, belongs to the benchmark's own parser
            return run_bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version (0) or a usage error (2): argparse has printed why
            return int(e.code or 0) if isinstance(e.code, int) or e.code is None else EXIT_USAGE
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        restore = configure_logging(args)
        return args.func(args)
    except FastloadError as e:
        if args is not None and args.debug:
            traceback.print_exc()
        print(f"fastload: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fastload: interrupted", file=sys.stderr)
        return 130
    finally:
        if restore is not None:
            restore()
        if handler is not None:
            logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
