"""`fastload estimate NAME`: memory needed to load and QLoRA-train a model, before loading it."""

from __future__ import annotations

import argparse

from fastload.cli.arguments import positive_int
from fastload.cli.output import EXIT_OK, emit
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registry name, hub id in the HF cache, or a folder with config.json")
    parser.add_argument("--seq", type=positive_int, default=DEFAULT_MAX_SEQ_LENGTH,
                        help="sequence length of a training batch")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size")
    parser.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    parser.add_argument("--gpus", type=positive_int, default=1,
                        help="GPUs to train on: memory per GPU for DDP and FSDP2-QLoRA (--batch is per GPU)")


def run(args: argparse.Namespace) -> int:
    from fastload.load import memory
    from fastload.sources.model_config import config_or_param_count

    config, basis = config_or_param_count(args.name)
    if isinstance(config, float):
        family = registry_family(args.name)
        counts = memory.approximate_counts(config, family)
        if counts.experts:
            share = f"{memory.APPROX_EXPERT_SHARE:.0%}"
            basis += f"; {family} is a mixture of experts: {share} of it assumed in experts"
    else:
        counts = memory.count_params(config)
    est = memory.estimate_counts(counts, args.seq, args.batch, args.r, basis=basis)
    data, text = {"name": args.name, **est.as_dict()}, est.table()
    if args.gpus > 1:
        spread = memory.per_gpu(est, args.gpus)
        data, text = {**data, **spread.as_dict()}, text + "\n" + spread.table()
    emit(args, data, text)
    return EXIT_OK


def registry_family(name: str) -> str | None:
    """The model_type the registry gives `name` (an MoE family changes the approximate sizes), or None."""
    from fastload.sources.registry import get_registry

    match = get_registry().find(name)
    return match.entry.family if match is not None else None
