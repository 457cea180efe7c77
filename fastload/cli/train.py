"""`fastload train DATA --model M --out DIR [--method M]`: QLoRA fine-tuning (SFT by default, or any method of
fastload.train.methods); resumable checkpoints and the adapter in DIR."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastload.cli.arguments import non_negative_int, out_folder, positive_float, positive_int, seed
from fastload.cli.output import EXIT_OK, emit, note
from fastload.cli.progress import progress_callback
from fastload.errors import InvalidOption
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEED
from fastload.train.methods import method_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="records: messages, ShareGPT conversations, Alpaca, prompt/response (sft); "
                        "prompt/chosen/rejected (dpo, orpo, simpo); prompt/completion/label (kto); text/label "
                        "(classify)")
    parser.add_argument("--method", choices=method_names(), default="sft", help="training method (default: sft)")
    parser.add_argument("--num-labels", type=positive_int, default=None,
                        help="classes of the classifier head (--method classify)")
    parser.add_argument("--model", required=True, help="the base model (any name `fastload resolve` accepts)")
    parser.add_argument("--out", type=out_folder, required=True,
                        help="folder for checkpoints (checkpoint-N) and the final adapter")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT|latest",
                        help="continue from a checkpoint-N folder (a path, or its name in --out), or with no value "
                             "or 'latest' the newest one in --out; optimizer, scheduler and data order restored")
    parser.add_argument("--steps", type=non_negative_int, default=0,
                        help="stop after this many optimizer steps (0: use --epochs)")
    parser.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the data when --steps is 0")
    parser.add_argument("--seq", type=positive_int, default=DEFAULT_MAX_SEQ_LENGTH,
                        help="max_seq_length: longer records are truncated")
    parser.add_argument("--batch", type=positive_int, default=2, help="per-device batch size")
    parser.add_argument("--grad-accum", type=positive_int, default=4, help="gradient accumulation steps")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="learning rate (default: the method's, 2e-4 for sft)")
    parser.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=positive_int, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--save-steps", type=positive_int, default=100,
                        help="save a resumable checkpoint every N steps")
    parser.add_argument("--keep", type=positive_int, default=2, help="how many checkpoint-N folders to keep")
    parser.add_argument("--seed", type=seed, default=DEFAULT_SEED, help="random seed (0 .. 2**32 - 1)")
    parser.add_argument("--reward", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="--method grpo: a reward function f(prompts, completions, **kw) -> list of floats "
                             "(repeat for several; the module on PYTHONPATH)")
    parser.add_argument("--embedding-lr", type=positive_float, default=None,
                        help="--method pretrain: train the embeddings and lm_head too, at this learning rate")
    parser.add_argument("--new-token", action="append", default=[], metavar="TOKEN",
                        help="--method pretrain: add this token to the tokenizer (repeat for several)")


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
    """With --resume, the checkpoint named, or the newest checkpoint-N in --out (a note says when there is none).

    Raises:
        InvalidOption: a named checkpoint that is no checkpoint folder (no trainer_state.json).
    """
    if not args.resume:
        return None
    if args.resume != "latest":
        named = Path(args.resume).expanduser()
        folder = named if named.is_dir() or named.is_absolute() else out / named
        if not (folder / "trainer_state.json").is_file():
            raise InvalidOption(f"fastload train --resume {args.resume}", found=f"{folder} is no training checkpoint "
                                "(no trainer_state.json)", fix=f"name a checkpoint-N folder of {out}, or pass "
                                "--resume alone for the newest")
        note(args, f"resuming from {folder}")
        return folder
    found = newest_checkpoint(out)
    note(args, f"resuming from {found}" if found else
         f"--resume: no checkpoint-N folder in {out}; starting from step 0")
    return found


def task_options(args: argparse.Namespace) -> dict:
    """from_pretrained's task options for the method: a classifier head for classify, which needs --num-labels."""
    if args.method != "classify":
        if args.num_labels is not None:
            raise InvalidOption(f"fastload train --num-labels {args.num_labels}", found="--num-labels is for "
                                f"--method classify (asked: --method {args.method})", fix="drop --num-labels")
        return {}
    if args.num_labels is None:
        raise InvalidOption("fastload train --method classify", found="no --num-labels",
                            fix="give the number of classes, e.g. --num-labels 2")
    return {"task": "sequence-classification", "num_labels": args.num_labels}
def method_options(method: str, args: argparse.Namespace) -> dict:
    """The keyword arguments the method's builder (fastload.train.methods) takes from the command line.

    Raises:
        InvalidOption: --method grpo without --reward, or a method's flag given to another method.
    """
    from fastload.train.methods.grpo import load_reward

    asked = f"fastload train --method {method}"
    if method != "grpo" and args.reward:
        raise InvalidOption(asked, found="--reward is given", fix="--reward goes with --method grpo")
    if method != "pretrain" and (args.embedding_lr is not None or args.new_token):
        raise InvalidOption(asked, found="--embedding-lr / --new-token given", fix="they go with --method pretrain")
    if method == "grpo":
        if not args.reward:
            raise InvalidOption(asked, found="no --reward", fix="pass --reward my_rewards:function (module:function)")
        return {"reward_funcs": [load_reward(spec) for spec in args.reward]}  # before minutes of loading
    if method == "pretrain":
        options = {"new_tokens": list(args.new_token)}
        if args.embedding_lr is not None:
            options.update(train_embeddings=True, embedding_learning_rate=args.embedding_lr)
        return options
    return {}


def run(args: argparse.Namespace) -> int:
    from transformers import PrinterCallback

    from fastload.atomic import clean_leftovers
    from fastload.data import load_records
    from fastload.facade import FastModel
    from fastload.save.adapters import save_adapter_into

    out = Path(args.out).expanduser().absolute()
    check_out(args, out)
    task = task_options(args)
    method_kwargs = method_options(args.method, args)  # a bad --reward fails before minutes of loading
    if args.method == "pretrain":  # raw text files (.txt, a folder of them) or records with a text field
        from fastload.train.methods.pretrain import read_texts

        records = read_texts(args.data)
    else:
        records = load_records(args.data)  # read first: a bad file fails before minutes of loading
    if not records:
        raise InvalidOption(f"Training on {args.data}", found="the file holds no records", fix="give a non-empty file")
    from fastload.distributed import is_main_process

    if out.parent.is_dir() and is_main_process():  # a previous run killed while writing its adapter: put it back
        clean_leftovers(out.parent, out)
    resume_from = resume_point(args, out)
    model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=args.seq,
                                                 lora={"r": args.r, "lora_alpha": args.alpha or args.r}, **task)
    options = {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": args.grad_accum,
               "num_train_epochs": args.epochs, "max_steps": args.steps or -1,
               "save_strategy": "steps", "save_steps": args.save_steps, "save_total_limit": args.keep,
               "logging_steps": 1, "disable_tqdm": True, "include_num_input_tokens_seen": True, "seed": args.seed}
    if args.lr is not None:
        options["learning_rate"] = args.lr
    progress = progress_callback(args.quiet)
    trainer = FastModel.get_trainer(model, tokenizer, records, method=args.method, output_dir=str(out),
                                    callbacks=[progress], **method_kwargs, **options)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the bar shows them instead
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_adapter_into(model, tokenizer, out)
    state = trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    data = {"out": str(out), "method": args.method, "steps": state.global_step,
            "resumed_from": str(resume_from) if resume_from else None,
            "started_at_step": getattr(progress, "first_step", 0),
            "final_loss": losses[-1] if losses else None, "train_loss": result.training_loss,
            "tokens": state.num_input_tokens_seen, "checkpoint": str(newest_checkpoint(out) or "")}
    if not is_main_process():  # under torchrun every rank trained; rank 0 alone reports (and saved)
        return EXIT_OK
    emit(args, data, f"trained {state.global_step} steps (last loss {rounded(data['final_loss'])}, mean loss "
                     f"{rounded(data['train_loss'])}); adapter saved in {out}")
    return EXIT_OK


def rounded(loss: float | None) -> str:
    """4 significant digits for the text line (--json keeps the full value)."""
    return "-" if loss is None else f"{loss:.4g}"
