"""A run killed after a checkpoint and resumed ends where the uninterrupted run ends: same losses, same adapter
(fastload's 8-bit AdamW state, the scheduler and the data order restored from the checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from fastload.cli import main

RECORDS = [{"prompt": f"question {i}: what comes next?", "response": f"the answer is number {i} and then {i + 1}"}
           for i in range(8)]


def train(data, model, out, steps, *extra):
    code = main([str(a) for a in ("train", data, "--model", model, "--out", out, "--steps", steps, "--save-steps", 2,
                                  "--batch", 2, "--grad-accum", 1, "--seq", 48, "--lr", "5e-3", "--json", "--quiet",
                                  *extra)])
    assert code == 0


def losses(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_four_steps_equal_two_steps_then_resume(tiny_llama, data_file, tmp_path, capsys):
    whole = tmp_path / "whole"
    train(data_file, tiny_llama, whole, 4)
    killed = tmp_path / "killed"  # a run stopped after its step-2 checkpoint
    killed.mkdir()
    shutil.copytree(whole / "checkpoint-2", killed / "checkpoint-2")
    train(data_file, tiny_llama, killed, 4, "--resume", "checkpoint-2")
    assert losses(killed / "checkpoint-4") == pytest.approx(losses(whole / "checkpoint-4"), abs=1e-5)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].float() - b[name].float()).abs().max().item() < 1e-6, name

    # the check can fail: without the optimizer's state the same resume ends elsewhere
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copytree(whole / "checkpoint-2", fresh / "checkpoint-2")
    (fresh / "checkpoint-2" / "optimizer.pt").unlink()
    train(data_file, tiny_llama, fresh, 4, "--resume")
    c = load_file(fresh / "adapter_model.safetensors")
    assert max((a[n].float() - c[n].float()).abs().max().item() for n in a) > 1e-4


def test_resume_names_a_checkpoint_that_does_not_exist(tiny_llama, data_file, tmp_path, capsys):
    code = main(["train", str(data_file), "--model", str(tiny_llama), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--resume", "checkpoint-9"])
    err = capsys.readouterr().err
    assert code != 0 and "checkpoint-9" in err and "trainer_state.json" in err
