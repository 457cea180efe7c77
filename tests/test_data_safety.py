"""What a user would lose if fastload wrote over what is not its own (issue 19, data loss): real files, real
processes, real SIGKILL; each test is named after what would be lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import user_files_snapshot
from fastload import FastModel
from fastload.cli import main
from fastload.errors import InvalidOption

ROOT = Path(__file__).parent.parent
RECORDS = [{"messages": [{"role": "user", "content": "hello world"},
                         {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}]},
           {"prompt": "how are you today?", "response": "fastload loads models for QLoRA fine-tuning"}] * 3
TRAIN_ARGS = ["--save-steps", "2", "--batch", "3", "--grad-accum", "1", "--seq", "48", "--lr", "5e-3", "--quiet"]


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def train(capsys, data: Path, model: Path, out: Path, steps: int, *extra) -> None:
    code, err = run(capsys, "train", data, "--model", model, "--out", out, "--steps", steps, *TRAIN_ARGS, *extra)
    assert code == 0, err


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def adapter_rank(folder: Path) -> tuple[int, int]:
    """(rank in adapter_config.json, rank of the saved lora_A weights): equal when config and weights match."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if "lora_A" in k)  # noqa: SIM118 (a safe_open handle, not a dict)
        return config["r"], f.get_slice(key).get_shape()[0]


# -- 1: the store's clean-up ---------------------------------------------------------------------------------------

def test_user_files_in_fastload_home_tmp_survive_a_store_write(tiny_llama, isolated_env):
    tmp = isolated_env / "tmp"
    own = {"photos": "holiday.jpg", "build.4000000.abcdef12": "x.o",  # the shape of the old leftover names
           ".model.tmp-4000000-deadbeef": "unmarked.bin", "trash.4000000.0123abcd": "keep.txt"}
    for folder, name in own.items():
        (tmp / folder).mkdir(parents=True)
        (tmp / folder / name).write_text(f"the user's {name}")
    before = user_files_snapshot(tmp)
    model, _ = FastModel.from_pretrained(tiny_llama, lora=None, gradient_checkpointing=False)
    assert model.fastload.quantized_now  # a store write happened, with its clean-up of tmp/
    assert user_files_snapshot(tmp) == before


# -- 2: quantize --out onto its source -----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same folder", "inside it", "around it"])
def test_quantize_out_onto_its_own_source_keeps_the_16bit_original(tiny_llama, tmp_path, capsys, where):
    import shutil

    src = tmp_path / "parent" / "model"
    shutil.copytree(tiny_llama, src)
    out = {"same folder": src, "inside it": src / "q4", "around it": src.parent}[where]
    before = user_files_snapshot(tmp_path / "parent")
    code, err = run(capsys, "quantize", src, "--out", out)
    assert code == 1 and "original would be replaced" in err, err
    assert user_files_snapshot(tmp_path / "parent") == before


# -- 3: save_merged onto the 16-bit original of a store-loaded model ----------------------------------------------

def test_merging_into_the_16bit_original_of_a_stored_model_keeps_the_original(tiny_copy):
    FastModel.from_pretrained(tiny_copy, gradient_checkpointing=False)  # quantizes and stores
    model, tok = FastModel.from_pretrained(tiny_copy, gradient_checkpointing=False)
    assert model.fastload.plan.source == "store"  # the protection must cover the original, not the store entry
    before = user_files_snapshot(tiny_copy)
    for target in (tiny_copy, tiny_copy / "merged"):
        with pytest.raises(InvalidOption, match="merged from"):
            FastModel.save_merged(model, target, tokenizer=tok, source="dequantized")
    assert user_files_snapshot(tiny_copy) == before


# -- 4 and 5: writing into a training run's folder -----------------------------------------------------------------

def test_checkpoints_of_a_training_run_survive_save_adapter_into_its_folder(tiny_llama, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    train(capsys, data_file, tiny_llama, out, 2)
    checkpoint = out / "checkpoint-2"
    before = user_files_snapshot(checkpoint)
    assert (checkpoint / "trainer_state.json").is_file()
    model, tok = FastModel.from_pretrained(out, gradient_checkpointing=False)
    FastModel.save_adapter(model, out, tokenizer=tok)
    assert user_files_snapshot(checkpoint) == before  # the resume point is still there, byte for byte
    train(capsys, data_file, tiny_llama, out, 3, "--resume")  # and still resumable
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_users_own_files_in_the_train_out_folder_survive_training(tiny_llama, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "notes").mkdir(parents=True)
    (out / "README.md").write_text("# my experiment log\n")
    (out / "notes" / "ideas.txt").write_text("try r=32")
    (out / "run.sh").write_text("fastload train ...\n")
    before = user_files_snapshot(out)
    for _ in range(2):  # the second run writes over the first one's adapter, never over the user's files
        train(capsys, data_file, tiny_llama, out, 1)
        assert (out / "adapter_model.safetensors").is_file()
        now = user_files_snapshot(out)
        assert {k: now[k] for k in before} == before
    # a file fastload would have to write over to save its adapter: refused, nothing written
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "adapter_model.safetensors").write_bytes(b"the user's own weights")
    (alien / "ideas.txt").write_text("keep")
    model, tok = FastModel.from_pretrained(out, gradient_checkpointing=False)
    from fastload.save.adapters import save_adapter_into

    with pytest.raises(InvalidOption, match="did not write"):
        save_adapter_into(model, tok, alien)
    assert sorted(p.name for p in alien.iterdir()) == ["adapter_model.safetensors", "ideas.txt"]


# -- 6: the final adapter write, killed mid-way --------------------------------------------------------------------

@pytest.mark.parametrize("point", ["written", "moved-aside", "swapped"])
def test_an_adapter_write_killed_mid_way_leaves_a_whole_adapter_and_the_next_run_succeeds(
        tiny_llama, data_file, tmp_path, capsys, point):
    out = tmp_path / "run"
    train(capsys, data_file, tiny_llama, out, 2, "--r", "4")
    assert adapter_rank(out) == (4, 4)
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "FASTLOAD_TEST_PAUSE_AT": json.dumps({"point": point, "dest": str(out), "ready": str(ready)})}
    argv = ["train", data_file, "--model", tiny_llama, "--out", out, "--steps", 2, *TRAIN_ARGS, "--r", "8"]
    proc = subprocess.Popen([sys.executable, "-m", "fastload.cli", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the writer never reached the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # the folder is never a mix: the previous adapter whole, or the new one whole; killed between the two renames,
    # the load itself puts the previous one back
    expected = 8 if point == "swapped" else 4
    model, _ = FastModel.from_pretrained(out, gradient_checkpointing=False)
    assert model.peft_config["default"].r == expected
    assert adapter_rank(out) == (expected, expected)
    # the next run, without any clean-up by hand: the previous adapter put back, leftovers gone, training resumes
    train(capsys, data_file, tiny_llama, out, 3, "--resume", "--r", "8")
    assert adapter_rank(out) == (8, 8)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "checkpoint-3").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")], "leftovers of the killed write"


# -- 11: a pickled adapter ------------------------------------------------------------------------------------------

def test_a_pickled_adapter_is_not_unpickled_without_allow_pickle(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    from fastload.errors import UnsafeCheckpoint

    model, tok = FastModel.from_pretrained(tiny_llama, gradient_checkpointing=False, store=False)
    adapter = FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), adapter / "adapter_model.bin")  # what older peft versions wrote
    weights.unlink()
    with pytest.raises(UnsafeCheckpoint, match="adapter_model.bin") as e:
        FastModel.from_pretrained(adapter, gradient_checkpointing=False, store=False)
    assert "allow_pickle=True" in e.value.fix
    trusted, _ = FastModel.from_pretrained(adapter, gradient_checkpointing=False, store=False, allow_pickle=True)
    assert trusted.fastload.plan.adapter == str(adapter)


# -- 15: file names that leave the checkpoint or the package -------------------------------------------------------

def test_a_shard_index_naming_a_file_outside_the_checkpoint_is_not_read(tiny_copy):
    from fastload.errors import CheckpointCorrupt

    outside = tiny_copy.parent / "someone-elses.safetensors"
    os.rename(tiny_copy / "model.safetensors", outside)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../someone-elses.safetensors"}}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointCorrupt, match="leave the checkpoint"):
        FastModel.from_pretrained(tiny_copy, lora=None, store=False)
    index["weight_map"]["model.embed_tokens.weight"] = str(outside)  # an absolute path
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointCorrupt, match="leave the checkpoint"):
        FastModel.from_pretrained(tiny_copy, lora=None, store=False)


def test_a_registry_packaged_gguf_path_outside_its_package_is_refused(tmp_path, monkeypatch):
    from fastload.registry import RegistryFormatError, get_registry, reset_registry
    from fastload.sources.resolve import packaged_gguf_path

    assert packaged_gguf_path("json:../os.py") is None  # a real file one folder up, never offered
    user = tmp_path / "registry.toml"
    user.write_text('[[model]]\nid = "someone/model"\nfamily = "llama"\npackaged_gguf = "json:../../etc/passwd"\n')
    monkeypatch.setenv("FASTLOAD_REGISTRY", str(user))
    reset_registry()
    with pytest.raises(RegistryFormatError, match="packaged_gguf"):
        get_registry()


# -- 14: a user alias equal to a shipped id -------------------------------------------------------------------------

def test_a_user_alias_cannot_redirect_a_shipped_id_to_another_repository(tmp_path, monkeypatch, caplog):
    from fastload.registry import get_registry, reset_registry

    shipped = "CohereForAI/c4ai-command-r-08-2024"
    user = tmp_path / "registry.toml"
    user.write_text(f'[[model]]\nid = "mallory/command-r"\nfamily = "cohere"\naliases = ["{shipped}", "my-r"]\n')
    monkeypatch.setenv("FASTLOAD_REGISTRY", str(user))
    reset_registry()
    with caplog.at_level("WARNING", logger="fastload"):
        registry = get_registry()
    assert registry.find(shipped).entry.id == shipped  # still the shipped entry
    assert registry.find("my-r").entry.id == "mallory/command-r"  # the user's other alias works
    assert any(shipped in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    # replacing a shipped entry on purpose: an entry with that very id
    user.write_text(f'[[model]]\nid = "{shipped}"\nfamily = "cohere"\nmirror = "mallory/command-r"\n')
    reset_registry()
    assert get_registry().find(shipped).entry.mirror == "mallory/command-r"


# -- 12: resolving a registry name imports nothing -----------------------------------------------------------------

def test_resolving_a_packaged_gguf_entry_runs_no_code_of_the_package(tmp_path, monkeypatch):
    from fastload.sources.resolve import packaged_gguf_path

    ran = tmp_path / "package-code-ran"
    pkg = tmp_path / "site" / "hostile_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(ran)!r}, 'w').write('imported')\n")
    (pkg / "models" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert packaged_gguf_path("hostile_pkg.models:m.gguf") == pkg / "models" / "m.gguf"
    assert packaged_gguf_path("hostile_pkg:models/m.gguf") is None  # folders go in the package part
    assert not ran.exists() and "hostile_pkg" not in sys.modules


# -- 9: training options that cannot work --------------------------------------------------------------------------

@pytest.mark.parametrize("option", [["--epochs", "-3"], ["--epochs", "0"], ["--epochs", "nan"], ["--steps", "-5"],
                                    ["--lr", "0"]])
def test_a_negative_epoch_or_step_count_is_a_usage_error_not_an_untrained_adapter(tiny_llama, data_file, tmp_path,
                                                                                   capsys, option):
    out = tmp_path / "run"
    code, err = run(capsys, "train", data_file, "--model", tiny_llama, "--out", out, *option)
    assert code == 2 and option[0] in err, err
    assert not out.exists()  # nothing trained, nothing saved


# -- 8: a missing answer is not the answer "None" ------------------------------------------------------------------

@pytest.mark.parametrize("name, text, where", [
    ("data.jsonl", '{"prompt": "hi", "response": "hello"}\n{"prompt": "how are you?", "response": null}\n', "record 2"),
    ("data.csv", "prompt,response\nhi,hello\nhow are you?\n", "record 2 (line 3)"),
    ("data.json", '[{"instruction": "add", "input": "1 1", "output": null}]', "record 1")])
def test_a_record_without_its_answer_is_refused_not_trained_on_as_none(tiny_llama, tmp_path, capsys, name, text, where):
    from fastload.data import load_records, to_messages

    data = tmp_path / name
    data.write_text(text)
    with pytest.raises(InvalidOption, match="null") as e:
        load_records(data)
    assert where in e.value.found
    with pytest.raises(InvalidOption, match="missing"):  # records given straight to the trainer
        to_messages({"prompt": "how are you?", "response": None})
    code, err = run(capsys, "train", data, "--model", tiny_llama, "--out", tmp_path / "run")
    assert code == 1 and where in err and not (tmp_path / "run").exists()
