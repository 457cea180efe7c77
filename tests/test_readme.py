"""The README tells the truth: its commands are the ones CI runs, every code block in it runs as written, and the
docs it points to document every option and command."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
LOADING = (DOCS / "loading.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def python_blocks(text: str) -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


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
    table = LOADING.split("## `FastModel.from_pretrained` options", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(\w+)`", table))
    missing = [name for name, p in params.items() if p.kind is not p.VAR_KEYWORD and name not in documented]
    assert not missing, f"undocumented from_pretrained options: {missing}"
    for name, p in params.items():  # booleans: the README shows the default the code has
        if isinstance(p.default, bool):
            row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
            assert f"`{p.default}`" in row, (name, p.default, row)


def test_every_cli_command_is_in_the_cli_page():
    from fastload.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    listed = set(re.findall(r"^fastload (\w+)", (DOCS / "cli.md").read_text(), flags=re.M))
    assert set(commands) <= listed, set(commands) - listed


def test_the_readme_estimate_figures_are_what_the_code_computes():
    """docs/loading.md compares `fastload estimate` on the benchmark's shapes with measured peaks: keep it true."""
    from fastload.bench.models import llama_config
    from fastload.load.memory import GIB, estimate

    for shape, seq, batch in (("llama3-8b", 2048, 2), ("llama3-8b", 8192, 1), ("llama3-1b", 2048, 2)):
        total = estimate(llama_config(shape), seq=seq, batch=batch).training_total(4) / GIB
        assert f"{total:.2f}" in LOADING, (shape, seq, batch, f"{total:.2f}")


def test_the_readme_links_to_docs_that_exist():
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).is_file(), target
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\((?!https?:)([^)#]+)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_the_torch_warning_comes_before_the_first_command():
    """A bare `torch` can pull a multi-GB CUDA build: a newcomer must read that before running anything."""
    warning = README.index("multi-GB CUDA build")
    assert warning < README.index("```bash"), "the torch warning must precede the two commands"
    assert "--index-url https://download.pytorch.org/whl/cpu" in README[:README.index("```bash")]


@pytest.fixture
def readme_workdir(tmp_path) -> Path:
    """A folder laid out like the repository for what the README's blocks read (examples/data)."""
    shutil.copytree(ROOT / "examples" / "data", tmp_path / "examples" / "data")
    return tmp_path


def run_here(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks(README))))
def test_every_readme_python_block_runs_as_written(index, readme_workdir):
    """Each ```python block of the README, run as a script in a fresh process, exits 0 (offline: the hub id is the
    embedded SmolLM2)."""
    proc = run_here([sys.executable, "-c", python_blocks(README)[index]], readme_workdir)
    assert proc.returncode == 0, f"block {index} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_every_readme_shell_block_is_run_or_checked(readme_workdir):
    """The two set-up commands are checked against CI above; `fastload ...` lines run here; nothing else may hide."""
    for block in bash_blocks(README):
        if block.startswith("python3 -m venv .venv && "):
            continue
        for line in block.splitlines():
            assert line.startswith("fastload "), f"a README shell line no test runs: {line!r}"
            proc = run_here([sys.executable, "-m", "fastload.cli", *line.split()[1:]], readme_workdir)
            assert proc.returncode == 0, f"{line}:\n{proc.stdout}\n{proc.stderr}"
            assert proc.stdout.strip(), line


def test_the_install_page_names_only_extras_that_exist():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    install = (DOCS / "install.md").read_text()
    named = {e for group in re.findall(r"\.\[([\w,]+)\]", install) for e in group.split(",")}
    assert named and named <= extras, named - extras


def test_pyproject_uses_the_spdx_license_string_and_a_setuptools_that_reads_it():
    """A license table makes `pip install -e .` print setuptools' deprecation (measured: setuptools 84); the SPDX
    string needs setuptools >= 77. The test extras carry nbconvert for `jupyter nbconvert --execute` of the notebook."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    version = next(r for r in requires if r.startswith("setuptools")).split(">=")[1]
    assert tuple(int(x) for x in version.split(".")) >= (77,)
    assert any(r.startswith("nbconvert") for r in project["project"]["optional-dependencies"]["test"])


def test_the_readme_family_table_names_every_family_that_families_md_and_the_matrix_have():
    """The README's grouped table of families lists the same model types as docs/families.md's rows, and both as
    tests/train/test_families.py's matrix: a family added to one and not the others is caught."""
    sys.path.insert(0, str(ROOT / "tests" / "train"))  # as tests/train/test_families.py imports it
    from family_shapes import FAMILIES
    section = README.split("## Model families", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    in_readme = {name for row in rows for name in re.findall(r"`([a-z0-9_]+)`", row)}
    families_md = (DOCS / "families.md").read_text()
    in_docs = {m.group(1) for m in re.finditer(r"^\| ([a-z0-9_]+)[ (|]", families_md, flags=re.M)} - {"family"}
    assert in_readme == in_docs, (sorted(in_readme - in_docs), sorted(in_docs - in_readme))
    assert in_docs == set(FAMILIES), (sorted(in_docs - set(FAMILIES)), sorted(set(FAMILIES) - in_docs))
