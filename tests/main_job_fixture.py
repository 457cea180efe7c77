"""A fixture (registered by tests/conftest.py; a second conftest module would shadow the first's helpers): the
README's main job (examples/sft.py: SmolLM2 taught the Answer/Reason card) run once per session with fewer
steps, so the export tests check a model that was really fine-tuned rather than one with random adapter weights."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SFT_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sft.py"
# the main job runs 40; 16 of its steps already drop the held-out loss from ~3.3 to ~1 and fit a CPU test budget
MAIN_JOB_STEPS = 16


@dataclass
class MainJob:
    """What the main job left: its saved adapter, the held-out records it never trained on, how long it took."""

    adapter: Path
    heldout: list[dict]
    train_seconds: float
    losses: list[float]


def load_sft_example():
    spec = importlib.util.spec_from_file_location("fastload_example_sft", SFT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def main_job(smollm2_dir, tmp_path_factory) -> MainJob:
    """examples/sft.py's own data split, model loading and training function on the real SmolLM2, then its adapter
    saved as the script saves it. Only the step count differs (MAIN_JOB_STEPS instead of 40)."""
    from fastload import FastModel

    sft = load_sft_example()
    root = tmp_path_factory.mktemp("main-job")
    with pytest.MonkeyPatch.context() as mp:  # session scope runs before the per-test isolation: isolate here too
        mp.setenv("FASTLOAD_HOME", str(root / "home"))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        args = sft.parse_args(["--model", str(smollm2_dir), "--steps", str(MAIN_JOB_STEPS),
                               "--out", str(root / "smollm2-answer-card")])
        train_records, heldout = sft.split_records(args)
        model, tokenizer = sft.load_model(args)
        started = time.perf_counter()
        trainer = sft.train(model, tokenizer, train_records, args)
        seconds = time.perf_counter() - started
        adapter = FastModel.save_adapter(model, args.out, tokenizer=tokenizer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"main job: {MAIN_JOB_STEPS} steps in {seconds:.0f} s, training loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    return MainJob(adapter=Path(adapter), heldout=heldout, train_seconds=seconds, losses=losses)
