"""The table of commands (PARSER_DATA) and `main`, which parses a command line and runs one of them.

A name ("cache rm" for an action of a group) maps to the function that runs it, its help, and the function adding
its arguments. Each command lives in its own small module; what they do beyond reading arguments and printing belongs
to the library (sources/, save/, export/, atomic.py).

Exit codes: 0 ok, 1 a fastload error (its message, no traceback unless --debug), 2 a usage error. Data goes to
stdout (as JSON with --json), decisions and progress to stderr. Every heavy import happens inside a command, so
`fastload --help` stays fast and never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from fastload._log import logger
from fastload.cli import bench, cache, estimate, export, generate, merge, quantize, registry, resolve, train
from fastload.cli.output import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CurrentStderr, configure_logging
from fastload.cli.unexpected import as_fastload_error
from fastload.errors import FastloadError


@dataclass(frozen=True)
class Command:
    """One command of the table.

    Args:
        run: runs the parsed command; returns the exit code.
        help: one line for `fastload --help` and the command's own help.
        arguments: adds the command's arguments to its parser (None: it takes none).
        loads_model: it imports transformers (its logging is then set by -v / --quiet too).
        json: it takes --json.
        defaults_in_help: its --help shows every default.
        run_argv: for a command with its own parser (bench): runs it on every argument after its name, --help too.
    """

    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    loads_model: bool = False
    json: bool = True
    defaults_in_help: bool = False
    run_argv: Callable[[list[str]], int] | None = None

    @classmethod
    def of(cls, module: str, help: str, **options) -> Command:
        """A command whose module defines `add_arguments(parser)` and `run(args)`, e.g. fastload.cli.export."""
        found = importlib.import_module(module)
        return cls(found.run, help, found.add_arguments, **options)


PARSER_DATA: dict[str, Command] = {
    "export gguf": Command(export.run_gguf, "merge the adapter and write one .gguf file for llama.cpp / Ollama "
                           "(with an Ollama Modelfile)", export.add_gguf_arguments, loads_model=True),
    "export hub": Command(export.run_hub, "push a trained adapter (or its merge, or a GGUF) to the Hugging Face "
                          "Hub in one commit", export.add_hub_arguments, loads_model=True),
    "push": Command(export.run_hub, "the same as `export hub`: push a trained adapter (or its merge, or a GGUF) "
                    "to the Hugging Face Hub", export.add_hub_arguments, loads_model=True),
    "resolve": Command(resolve.run, "show the load plan for a model name and why, without loading anything",
                       resolve.add_arguments),
    "quantize": Command(quantize.run, "write a bitsandbytes 4-bit checkpoint (into the store, or --out)",
                        quantize.add_arguments, loads_model=True),
    "train": Command(train.run, "QLoRA fine-tune on a JSONL/JSON/CSV file of conversations or prompt/response "
                     "pairs; the adapter is saved in --out", train.add_arguments, loads_model=True,
                     defaults_in_help=True),
    "merge": Command(merge.run, "merge a LoRA adapter into its base and save a model plain transformers loads",
                     merge.add_arguments, loads_model=True),
    "generate": Command(generate.run, "generate text from a model or a trained adapter", generate.add_arguments,
                        loads_model=True),
    "estimate": Command(estimate.run, "memory needed to load and QLoRA-train a model, before loading it",
                        estimate.add_arguments, loads_model=True, defaults_in_help=True),
    "cache list": Command(cache.list_entries, "every stored checkpoint"),
    "cache rm": Command(cache.remove, "remove an entry by key or source", cache.add_rm_arguments),
    "cache verify": Command(cache.verify, "hash every file of every entry"),
    "registry list": Command(registry.list_entries, "every entry", registry.add_list_arguments),
    "registry search": Command(registry.search, "entries whose id, alias or quantized id contains QUERY",
                               registry.add_search_arguments),
    "registry show": Command(registry.show, "one entry in full", registry.add_show_arguments),
    "bench": Command(bench.run, "benchmark load and training against the plain recipe (python -m fastload.bench)",
                     bench.add_arguments, json=False, run_argv=bench.run_argv),
}
# the help line of a command that only groups actions ("cache rm"); a group not named here lists its actions
GROUP_HELP = {"cache": "list, remove or verify fastload's store of quantized checkpoints",
              "registry": "the registry of pre-quantized checkpoints"}


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


def _top_parser() -> argparse.ArgumentParser:
    from fastload import __version__

    parser = argparse.ArgumentParser(prog="fastload", description="Load, quantize, fine-tune (QLoRA) and merge "
                                     "language models in one line each.")
    parser.add_argument("--version", action="version", version=f"fastload {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors: no decision lines, no progress bar")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv: transformers' too)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.set_defaults(json=False)
    return parser


def _group(sub, groups: dict, group: str, commands: dict[str, Command]):
    """The subparsers the actions of `group` ("cache" of "cache rm") are added to, made at its first action."""
    if group not in groups:
        actions = [n.partition(" ")[2] for n in commands if n.partition(" ")[0] == group]
        help = GROUP_HELP.get(group, f"{', '.join(actions)}: see `fastload {group} ACTION --help`")
        p = sub.add_parser(group, help=help, description=help)
        groups[group] = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    return groups[group]


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The parser of the whole command line, one subparser per entry of the table.

    Args:
        commands: the table (default: PARSER_DATA).
    Returns:
        The parser; a parsed command carries `func` (what runs it) and `command_entry` (its Command).
    """
    commands = PARSER_DATA if commands is None else commands
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    parents = {True: _common(True), False: _common(False)}
    for name, entry in commands.items():
        group, _, action = name.partition(" ")
        options = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter} if entry.defaults_in_help else {}
        if entry.run_argv is not None:  # listed for --help; its own parser reads its arguments
            options["add_help"] = False
        p = (_group(sub, groups, group, commands) if action else sub).add_parser(
            action or name, help=entry.help, description=entry.help,
            parents=[] if entry.run_argv is not None else [parents[entry.json]], **options)
        if entry.arguments is not None:
            entry.arguments(p)
        p.set_defaults(func=entry.run, command_entry=entry)
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace | None, int]:
    """(the parsed arguments, 0), or (None, the exit code) when argparse answered (--help, --version, bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2): argparse has printed why
        return None, int(e.code or 0) if isinstance(e.code, int) or e.code is None else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return None, EXIT_USAGE
    return args, 0


def _report(error: FastloadError, args: argparse.Namespace | None) -> int:
    if args is not None and args.debug:
        traceback.print_exc()
    print(f"fastload: error: {error}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script exits with it)."""
    handler = CurrentStderr() if not logger.handlers else None  # set_verbosity then adds none of its own
    if handler is not None:
        logger.addHandler(handler)
    args, restore = None, None
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        own_parser = PARSER_DATA.get(argv[0]) if argv else None
        if own_parser is not None and own_parser.run_argv is not None:
            return own_parser.run_argv(argv[1:])
        args, code = _parse(argv)
        if args is None:
            return code
        restore = configure_logging(args, args.command_entry.loads_model)
        return args.func(args)
    except FastloadError as e:
        return _report(e, args)
    except KeyboardInterrupt:
        print("fastload: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the user gets a fastload error, never a raw traceback
        return _report(as_fastload_error(e, argv), args)
    finally:
        if restore is not None:
            restore()
        if handler is not None:
            logger.removeHandler(handler)
