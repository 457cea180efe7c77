"""The benchmark's family shapes (a mixture of experts beside the Llama shapes) and its longest-sequence phase, on the
CPU with tiny shapes: every measurement a fresh worker process, as on the GPU."""

from __future__ import annotations

import json
import math

import pytest

from fastload.bench import main, models


def run_bench(tmp_path, *argv) -> tuple[int, dict]:
    out = tmp_path / "out"
    code = main(["--device", "cpu", "--out", str(out), "--cache-dir", str(tmp_path / "models"), *argv])
    return code, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_moe_shape_trains_the_same_lora_in_fastload_and_the_recipe(tmp_path):
    """tiny-moe (Qwen3-MoE): both adapt attention and the fused experts, the same parameter count, the same first
    loss within bf16-level 2e-2 (fp32 here, the same quantized weights and batch)."""
    code, results = run_bench(tmp_path, "--model", "tiny-moe", "--impl", "fastload,recipe", "--phase", "train",
                              "--seq", "64", "--batch", "1", "--steps", "1", "--warmup", "1")
    assert code == 0, results["errors"]
    records = {r["impl"]: r for r in results["records"] if r["phase"] == "train"}
    assert records["fastload"]["trainable_params"] == records["recipe"]["trainable_params"]
    config = models.shape_config("tiny-moe")
    attention_only = config.num_hidden_layers * 16 * 4 * (config.hidden_size + config.num_attention_heads * 64)
    assert records["fastload"]["trainable_params"] > 2 * attention_only  # the experts' adapters are in
    rows = {r["impl"]: r for r in results["train"]}
    assert abs(rows["fastload"]["first_loss"] - rows["recipe"]["first_loss"]) <= 2e-2 * rows["recipe"]["first_loss"]


@pytest.mark.slow
def test_longest_doubles_in_fresh_processes_up_to_the_cap(tmp_path):
    """64, 128, 256 with a cap of 256: each length trained in its own process, with speed and memory; the cap is
    named as what stopped it, and the table shows every length."""
    code, results = run_bench(tmp_path, "--model", "tiny", "--impl", "fastload", "--phase", "longest",
                              "--seq", "64", "--max-seq", "256", "--steps", "1", "--warmup", "0")
    assert code == 0, results["errors"]
    (row,) = results["longest"]
    assert [a["seq"] for a in row["attempts"]] == [64, 128, 256]
    assert row["longest"] == 256 and row["stopped_by"] == "the --max-seq cap"
    assert all(a["error"] is None and a["tokens_per_s"] > 0 and a["peak_allocated_gib"] > 0 for a in row["attempts"])
    records = [r for r in results["records"] if r["phase"] == "longest"]
    assert len({r["pid"] for r in records}) == 3 and all(r["batch"] == 1 for r in records)
    assert all(math.isfinite(r["first_loss"]) for r in records)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "## Longest trainable sequence: tiny, batch 1" in table and "| fastload | 256 | the --max-seq cap |" in table


@pytest.mark.slow
def test_longest_stops_at_the_first_failure(tmp_path):
    """A length that fails ends the doubling (on a GPU: out of memory). Here the failure is real too: unsloth
    is not installed here, or refuses to run on a CPU: its first length fails, nothing longer is tried, and the run
    reports an error."""
    code, results = run_bench(tmp_path, "--model", "tiny", "--impl", "unsloth", "--phase", "longest",
                              "--seq", "64", "--max-seq", "256", "--steps", "1", "--warmup", "0")
    (row,) = results["longest"]
    assert [a["seq"] for a in row["attempts"]] == [64] and row["longest"] is None
    assert row["stopped_by"].startswith("64: ") and ("CUDA" in row["stopped_by"] or "unsloth" in row["stopped_by"])
    assert code == 1 and results["errors"]
