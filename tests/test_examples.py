"""The examples run as a user runs them: the scripts in a subprocess, the notebook top to bottom in a kernel.

Each checks what a user would see: exit code 0, the held-out loss went down, the adapter files exist, the
notebook drew its loss plot. All share one FASTLOAD_HOME so SmolLM2's GGUF is converted and quantized once.
Subprocesses inherit the isolated env (HF_HOME in tmp, HF_HUB_OFFLINE=1) and need no network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    """One store for every example in this session: the first one converts SmolLM2, the others load it."""
    return tmp_path_factory.mktemp("examples-fastload-home")


@pytest.fixture
def example_env(shared_home, monkeypatch) -> dict:
    monkeypatch.setenv("FASTLOAD_HOME", str(shared_home))  # the notebook kernel inherits os.environ too
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_example(script: str, args: list[str], cwd: Path, env: dict, returncode: int = 0) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == returncode, f"{script}: exit {proc.returncode}, expected {returncode}:\n" \
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr  # what the user's terminal shows (warnings go to stderr)


def test_sample_data_is_varied_chat_in_messages_format():
    lines = (EXAMPLES / "data" / "chat_sample.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert 60 <= len(records) <= 200
    questions = {r["messages"][0]["content"] for r in records}
    assert len(questions) == len(records)  # no duplicated prompt
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"]
        assert re.fullmatch(r"Answer: .+\nReason: .+", r["messages"][1]["content"])  # the skill to learn


def test_sft_script_lowers_the_heldout_loss_and_saves_the_adapter(tmp_path, example_env):
    # 3 steps and 8 new tokens cannot make the two-line card: the script's own check must say FAIL and exit 1
    out = run_example("sft.py", ["--steps", "3", "--batch-size", "2", "--heldout", "4", "--max-new-tokens", "8",
                                 "--out", "outputs/adapter"], tmp_path, example_env, returncode=1)
    assert "FAIL: the fine-tune did not teach the card format" in out, out
    match = re.search(r"held-out loss: before ([\d.]+) -> after ([\d.]+)", out)
    assert match, out
    before, after = map(float, match.groups())
    assert after < before - 0.1, (before, after)
    adapter = tmp_path / "outputs" / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "before training:" in out and "after training:" in out
    assert re.search(r"optimizer bitsandbytes\.AdamW8bit \(8-bit state, fastload's lean step\)", out), out


def test_dpo_script_widens_the_reward_margin_and_saves_the_adapter(tmp_path, example_env):
    out = run_example("dpo.py", ["--steps", "2", "--out", "outputs/dpo"], tmp_path, example_env)
    margins = [float(m) for m in re.findall(r"reward margin (-?[\d.]+)", out)]
    assert len(margins) == 2 and margins[0] == 0.0 and margins[-1] > 0, out
    assert "optimizer AdamW8bitNoSync; reference: the base with the adapter off" in out
    assert (tmp_path / "outputs" / "dpo" / "adapter_model.safetensors").stat().st_size > 0
    # TRL switches checkpointing off and on around each reference pass by transformers' deprecated names
    assert "is deprecated" not in out, out


def test_grpo_script_raises_the_reward_and_saves_the_adapter(tmp_path, example_env):
    out = run_example("grpo.py", ["--steps", "6", "--out", "outputs/grpo"], tmp_path, example_env)
    match = re.search(r"first 3 steps: ([\d.]+)  last 3 steps: ([\d.]+)", out)
    assert match, out
    first, last = map(float, match.groups())
    assert last > first, out
    assert "before:" in out and "after:" in out
    assert (tmp_path / "outputs" / "grpo" / "adapter_model.safetensors").stat().st_size > 0
    assert "is deprecated" not in out, out


def test_sft_script_with_its_defaults_teaches_the_card_and_checks_it(tmp_path, example_env):
    """The README's main job as written (40 steps, the default seed): every held-out reply becomes an
    Answer/Reason card, the script says PASS and exits 0 (~70 s on a free 2-core CPU)."""
    out = run_example("sft.py", [], tmp_path, example_env)
    assert "PASS: the fine-tune taught the card format" in out, out
    cards = re.search(r"Answer/Reason cards among (\d+) held-out replies: before (\d+) -> after (\d+)", out)
    total, before, after = map(int, cards.groups())
    assert after == total == 8 and before < total, out


def test_load_one_line_prints_plan_params_memory_and_an_answer(tmp_path, example_env):
    out = run_example("load_one_line.py", ["--max-new-tokens", "8", "--max-seq-length", "128"], tmp_path,
                      example_env)
    assert "'HuggingFaceTB/SmolLM2-135M-Instruct' -> " in out
    trainable, total = (int(n.replace(",", "")) for n in
                        re.search(r"trainable parameters: ([\d,]+) of ([\d,]+)", out).groups())
    assert 0 < trainable < total / 10
    assert "QLoRA training total" in out
    assert re.search(r"answer: \S", out), out


def test_notebook_runs_top_to_bottom_and_plots_the_loss(tmp_path, example_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / "finetune_smollm2.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += "\nSTEPS = 2\nBATCH_SIZE = 2\nDATA = " + repr(str(EXAMPLES / "data" / "chat_sample.jsonl"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the notebook's outputs"
    adapter = tmp_path / "outputs" / "smollm2-notebook-adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
