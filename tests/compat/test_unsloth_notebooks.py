"""Three public Unsloth notebooks' call sequences run on fastload with only their imports changed
(examples/unsloth_notebooks).

Each script makes the calls a notebook makes, in our words; its import lines differ from Unsloth's (kept above them
as `# [unsloth] ...` comments) by `unsloth` -> `fastload` alone, and the lines changed to run on a CPU without
network end in `# [port] ...`. The scripts run in a subprocess on the embedded SmolLM2-135M: a step or two, short
sequences and few generated tokens, so each test stays well under two minutes on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "examples" / "unsloth_notebooks"
SCRIPTS = sorted(NOTEBOOKS.glob("*.py"))


def code_lines(script: Path) -> list[str]:
    """The lines from the first cell on (the module docstring above it explains the port)."""
    lines = script.read_text(encoding="utf-8").splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("# ---- cell")):]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_the_only_change_to_imports_is_unsloth_to_fastload(script):
    lines = code_lines(script)
    swapped = 0
    for i, line in enumerate(lines):
        if "fastload" in line and "# [port]" not in line:  # a port line may name fastload (the GGUF writer check)
            original = lines[i - 1].strip()
            assert original.startswith("# [unsloth] "), f"{script.name}: {line!r} has no original above it"
            assert re.match(r"\s*from fastload(\.chat_templates)? import ", line), line
            assert original[len("# [unsloth] "):] == line.strip().replace("fastload", "unsloth"), line
            swapped += 1
        assert "unsloth import" not in line or line.lstrip().startswith("# [unsloth] "), line
    assert swapped >= 1
    for line in lines:  # every other changed line says so
        if "cuda" in line or "load_dataset(" in line or "model_name" in line and '"' in line:
            assert "# [port]" in line or "folder just saved" in line, f"{script.name}: unmarked change? {line!r}"


@pytest.fixture(scope="module")
def notebook_home(smollm2_dir, tmp_path_factory) -> Path:
    """A fastload home whose conversion of the embedded GGUF is the session's cached one (no second conversion)."""
    home = tmp_path_factory.mktemp("unsloth-notebooks-home")
    (home / "converted").mkdir()
    (home / "converted" / smollm2_dir.name).symlink_to(smollm2_dir, target_is_directory=True)
    return home


def run_notebook(script: str, cwd: Path, home: Path, steps: int) -> str:
    env = {**os.environ, "FASTLOAD_HOME": str(home), "NOTEBOOK_MAX_STEPS": str(steps), "PYTHONUNBUFFERED": "1",
           "NOTEBOOK_MAX_SEQ_LENGTH": "256", "NOTEBOOK_NEW_TOKENS": "16",
           "PYTHONPATH": os.pathsep.join([str(NOTEBOOKS.parent.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(NOTEBOOKS / script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_alpaca_notebook_trains_generates_saves_and_reloads_the_adapter(notebook_home, tmp_path):
    out = run_notebook("llama31_alpaca.py", tmp_path, notebook_home, steps=1)
    assert re.search(r"[\d.]+ seconds used for training", out)
    assert out.count("### Response:") >= 3  # the three generation cells, the last one after reloading
    assert (tmp_path / "llama_lora" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "llama_lora" / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.slow
def test_conversational_notebook_trains_on_the_answers_only(notebook_home, tmp_path):
    out = run_notebook("llama32_conversational.py", tmp_path, notebook_home, steps=1)
    # cell 23 prints the labels with every masked token as a space: the answer, not the question, survives
    masked = next(line for line in out.splitlines() if re.match(r"^ {10,}Answer: ", line))
    assert "<|im_start|>" not in masked and "capital of Germany" not in masked
    assert "<|im_start|>user\nWhat is the capital of Germany?" in out  # cell 22: the whole example
    assert (tmp_path / "llama_lora" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fastmodel_notebook_saves_a_merged_16bit_model_transformers_loads(notebook_home, smollm2_dir, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_notebook("gemma3_save_merged.py", tmp_path, notebook_home, steps=2)  # step 1 of the warmup has lr 0
    merged_dir = tmp_path / "gemma_3_finetune_16bit"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    merged = load_file(merged_dir / "model.safetensors")
    base = load_file(next(smollm2_dir.glob("*.safetensors")))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype in (torch.bfloat16, torch.float16)
    assert not torch.equal(merged[key].float(), base[key].float())  # the r=128 LoRA was merged in
    assert torch.allclose(merged[key].float(), base[key].float(), atol=0.05)  # ... into this base
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert model.config.num_hidden_layers == 30
    if (NOTEBOOKS.parent.parent / "fastload" / "export" / "gguf.py").is_file():  # the GGUF cell runs with the writer
        assert any(path.stat().st_size > 0 for path in (tmp_path / "gemma_3_finetune").rglob("*.gguf"))


def checkpoint_functions(model) -> set:
    """What each decoder layer calls to checkpoint itself, as (function, keywords) pairs."""
    from fastload.structure import decoder_layers
    from fastload.train.checkpointing import _base

    found = set()
    for layer in decoder_layers(_base(model)):
        func = layer._gradient_checkpointing_func
        found.add((getattr(func, "func", func), tuple(sorted(getattr(func, "keywords", {}).items()))))
    return found


def test_unsloth_checkpointing_on_the_cpu_is_the_default_paths_checkpointing(tiny_llama):
    """use_gradient_checkpointing="unsloth" must not pick a slower checkpoint (e.g. one that offloads to the host)
    for a model already on the CPU: every layer checkpoints exactly as FastModel.from_pretrained's default does."""
    from fastload import FastLanguageModel, FastModel

    default, _ = FastModel.from_pretrained(str(tiny_llama))
    base, _ = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), load_in_4bit=True)
    notebook = FastLanguageModel.get_peft_model(base, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                use_gradient_checkpointing="unsloth", random_state=3407)
    assert checkpoint_functions(notebook) == checkpoint_functions(default)
    assert len(checkpoint_functions(default)) == 1  # one function for every layer
