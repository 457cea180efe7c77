"""`fastload train DATA --model M --out DIR`: QLoRA fine-tuning; resumable checkpoints and the adapter in DIR."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastload.cli.arguments import non_negative_int, out_folder, positive_float, positive_int, seed
from fastload.cli.output import EXIT_OK, emit, note
from fastload.errors import InvalidOption
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="records: messages, ShareGPT conversations, Alpaca, prompt/response")
    parser.add_argument("--model", required=True, help="the base model (any name `fastload resolve` accepts)")
    parser.add_argument("--out", type=out_folder, required=True,
                        help="folder for checkpoints (checkpoint-N) and the final adapter")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in --out")
    parser.add_argument("--steps", type=non_negative_int, default=0,
                        help="stop after this many optimizer steps (0: use --epochs)")
    parser.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data when --steps is 0")
    parser.add_argument("--seq", type=positive_int, default=DEFAULT_MAX_SEQ_LENGTH,
                        help="max_seq_length: longer records are truncated")
    parser.add_argument("--batch", type=positive_int, default=2, help="per-device batch size")
    parser.add_argument("--grad-accum", type=positive_int, default=4, help="gradient accumulation steps")
    parser.add_argument("--lr", type=positive_float, default=2e-4, help="learning rate")
    parser.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=positive_int, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--save-steps", type=positive_int, default=100,
                        help="save a resumable checkpoint every N steps")
    parser.add_argument("--keep", type=positive_int, default=2, help="how many checkpoint-N folders to keep")
    parser.add_argument("--seed", type=seed, default=DEFAULT_SEED, help="random seed (0 .. 2**32 - 1)")


def newest_checkpoint(out: Path) -> Path | None:
    """The checkpoint-N folder with the largest N in `out` (what the Trainer resumes from)."""
    found = []
    for p in out.glob("checkpoint-*") if out.is_dir() else []:
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(suffix), p))
    return max(found)[1] if found else None


def check_out(args: argparse.Namespace, out: Path) -> None:
    """Before minutes of loading: --out is writable and is not the model's own folder (its config and tokenizer
    would be overwritten; a folder inside or around the model is fine: nothing of the model is replaced)."""
    import os

    from fastload.atomic import check_writable

    asked = f"fastload train --model {args.model} --out {out}"
    model = Path(args.model).expanduser()
    if model.is_dir() and out.is_dir() and os.path.samefile(model, out):
        raise InvalidOption(asked, found=f"--out is the model's own folder {model}: training would write over the "
                            "model it starts from", fix="choose another --out folder")
    check_writable(out, asked)


def resume_point(args: argparse.Namespace, out: Path) -> Path | None:
    """With --resume, the newest checkpoint-N in --out (a note says when there is none)."""
    if not args.resume:
        return None
    found = newest_checkpoint(out)
    note(args, f"resuming from {found}" if found else
         f"--resume: no checkpoint-N folder in {out}; starting from step 0")
    return found


def run(args: argparse.Namespace) -> int:
    from transformers import PrinterCallback

    from fastload.atomic import clean_leftovers
    from fastload.cli.progress import progress_callback
    from fastload.data import load_records
    from fastload.facade import FastModel
    from fastload.save.saving import save_adapter_into

    out = Path(args.out).expanduser().absolute()
    check_out(args, out)
    records = load_records(args.data)  # read first: a bad file fails before minutes of loading
    if not records:
        raise InvalidOption(f"Training on {args.data}", found="the file holds no records", fix="give a non-empty file")
    if out.parent.is_dir():  # a previous run killed while writing its adapter: put its folder back first
        clean_leftovers(out.parent, out)
    resume_from = resume_point(args, out)
    model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=args.seq,
                                                 lora={"r": args.r, "lora_alpha": args.alpha or args.r})
    options = {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": args.grad_accum,
               "learning_rate": args.lr, "num_train_epochs": args.epochs, "max_steps": args.steps or -1,
               "save_strategy": "steps", "save_steps": args.save_steps, "save_total_limit": args.keep,
               "logging_steps": 1, "disable_tqdm": True, "include_num_input_tokens_seen": True, "seed": args.seed}
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
    emit(args, data, f"trained {state.global_step} steps (last loss {rounded(data['final_loss'])}, mean loss "
                     f"{rounded(data['train_loss'])}); adapter saved in {out}")
    return EXIT_OK


def rounded(loss: float | None) -> str:
    """4 significant digits for the text line (--json keeps the full value)."""
    return "-" if loss is None else f"{loss:.4g}"
