"""The README tells the truth: its commands are the ones CI runs, and it documents every option and command."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    blocks = bash_blocks(README)
    test_command = next(b for b in blocks if b.endswith("python -m pytest -q"))
    # CI makes the same venv in two lines, then runs the rest word for word
    assert test_command == "python3 -m venv .venv && . .venv/bin/activate && " + ci[-1]
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci


def test_the_readme_main_job_runs_the_sft_example():
    main_job = next(b for b in bash_blocks(README) if b.endswith("python examples/sft.py"))
    assert main_job.startswith("python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh && ")
    assert (ROOT / "examples/sft.py").is_file() and (ROOT / "scripts/setup.sh").is_file()


def test_every_from_pretrained_option_is_documented_with_its_default():
    from fastload.facade import FastModel

    params = inspect.signature(FastModel.from_pretrained).parameters
    table = README.split("### `FastModel.from_pretrained` options", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(\w+)`", table))
    missing = [name for name, p in params.items() if p.kind is not p.VAR_KEYWORD and name not in documented]
    assert not missing, f"undocumented from_pretrained options: {missing}"
    for name, p in params.items():  # booleans: the README shows the default the code has
        if isinstance(p.default, bool):
            row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
            assert f"`{p.default}`" in row, (name, p.default, row)


def test_every_cli_command_is_in_the_readme():
    from fastload.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    listed = set(re.findall(r"^fastload (\w+)", README, flags=re.M))
    assert set(commands) <= listed, set(commands) - listed


def test_the_readme_estimate_figures_are_what_the_code_computes():
    """The README compares `fastload estimate` on the benchmark's shapes with measured peaks; keep its side true."""
    from fastload.bench.models import llama_config
    from fastload.load.memory import GIB, estimate

    for shape, seq, batch in (("llama3-8b", 2048, 2), ("llama3-8b", 8192, 1), ("llama3-1b", 2048, 2)):
        total = estimate(llama_config(shape), seq=seq, batch=batch).training_total(4) / GIB
        assert f"{total:.2f}" in README, (shape, seq, batch, f"{total:.2f}")
