"""Command-line values that pass the parser and fail only after minutes of loading (or never fail and waste the
run), and the data-loss items of issue 19: fastload deletes or overwrites only what it can prove it wrote, and
refuses a destination that is a source of the same operation."""

from __future__ import annotations

import json
import shutil

import pytest

from faults.faultkit import assert_ran, assert_user_error, code, tree

TRAIN_DATA = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(8)]


@pytest.fixture
def data(case_dir):
    path = case_dir / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TRAIN_DATA))
    return path


def train_argv(data, model, out, *extra):
    return ["train", str(data), "--model", str(model), "--out", str(out), "--batch", "2", "--grad-accum", "1",
            "--seq", "64", "--steps", "1", *extra]


def run_cli(worker, case_dir, argv, timeout=120):
    outcome = worker.run(code("result['run'] = ops.cli(*argv)", argv=[str(a) for a in argv]), timeout=timeout,
                         env={"FASTLOAD_HOME": str(case_dir / "home")})
    assert_ran(outcome)
    return outcome.result["run"]


def assert_refused_before_loading(run, *words):
    """Exit 1 (a fastload error) or 2 (a usage error) naming the value, before any model was loaded."""
    assert run["escaped"] is None, f"a raw {run['escaped']['type']} escaped: {run['escaped']['message'][:400]}"
    assert run["code"] in (1, 2), f"exit {run['code']}: the value was accepted; stderr: {run['stderr'][-600:]}"
    assert "source:" not in run["stderr"], "the model was loaded before the value was refused"
    missing = [w for w in words if w.lower() not in run["stderr"].lower()]
    assert not missing, f"the message does not name {missing}: {run['stderr'][-600:]}"


# -- values that pass argparse --------------------------------------------------------------------------------------

TRAIN_VALUES = [("epochs_negative", ["--steps", "0", "--epochs", "-3"], "--epochs"),  # issue 19 item 9
                ("epochs_zero", ["--steps", "0", "--epochs", "0"], "--epochs"),
                ("epochs_nan", ["--steps", "0", "--epochs", "nan"], "--epochs"),
                ("epochs_inf", ["--steps", "0", "--epochs", "inf"], "--epochs"),
                ("steps_negative", ["--steps", "-5"], "--steps"),
                ("lr_nan", ["--lr", "nan"], "--lr"),
                ("lr_negative", ["--lr", "-1"], "--lr"),
                ("lr_inf", ["--lr", "inf"], "--lr"),
                ("seed_negative", ["--seed", "-1"], "--seed"),
                ("seed_too_large", ["--seed", str(2 ** 40)], "--seed")]


@pytest.mark.parametrize("extra,word", [(e, w) for _, e, w in TRAIN_VALUES], ids=[i for i, _, _ in TRAIN_VALUES])
def test_train_value_is_refused_before_loading(worker, case_dir, tiny_llama, data, extra, word):
    """User loses: minutes of loading, then an untrained adapter saved as if trained (exit 0) or a crash."""
    run = run_cli(worker, case_dir, train_argv(data, tiny_llama, case_dir / "run", *extra))
    assert_refused_before_loading(run, word)


def test_train_out_is_a_file(worker, case_dir, tiny_llama, data):
    (case_dir / "file").write_text("mine")
    run = run_cli(worker, case_dir, train_argv(data, tiny_llama, case_dir / "file"))
    assert_refused_before_loading(run, "file")
    assert (case_dir / "file").read_text() == "mine"


def test_train_out_is_the_data_file(worker, case_dir, tiny_llama, data):
    before = data.read_bytes()
    run = run_cli(worker, case_dir, train_argv(data, tiny_llama, data))
    assert_refused_before_loading(run, "data.jsonl")
    assert data.read_bytes() == before


def test_train_out_is_the_model_folder(worker, case_dir, model_copy, data):
    """--out DIR being the base model's own folder: its config.json and tokenizer would be overwritten."""
    before = tree(model_copy)
    run = run_cli(worker, case_dir, train_argv(data, model_copy, model_copy))
    assert_refused_before_loading(run, str(model_copy))
    assert tree(model_copy) == before, "the base model's files changed"


def test_train_model_that_does_not_exist_fails_before_reading_data(worker, case_dir, data):
    run = run_cli(worker, case_dir, train_argv(data, case_dir / "no-such-model", case_dir / "run"))
    assert_refused_before_loading(run, "no-such-model")


GENERATE_VALUES = [("temperature_negative", ["--temperature", "-1"], "--temperature"),
                   ("temperature_nan", ["--temperature", "nan"], "--temperature"),
                   ("temperature_inf", ["--temperature", "inf"], "--temperature"),
                   ("prompt_empty", ["--prompt", ""], "--prompt")]


@pytest.mark.parametrize("extra,word", [(e, w) for _, e, w in GENERATE_VALUES], ids=[i for i, _, _ in GENERATE_VALUES])
def test_generate_value_is_refused_before_loading(worker, case_dir, tiny_llama, extra, word):
    run = run_cli(worker, case_dir, ["generate", str(tiny_llama), "--prompt", "hi", "--max-new-tokens", "2", *extra])
    assert_refused_before_loading(run, word)


def test_merge_out_is_the_adapter_folder(worker, case_dir, adapter_copy):
    """`fastload merge A --out A` would replace the adapter with the merged model."""
    before = tree(adapter_copy)
    run = run_cli(worker, case_dir, ["merge", str(adapter_copy), "--out", str(adapter_copy)])
    assert_refused_before_loading(run, str(adapter_copy))
    assert tree(adapter_copy) == before


def test_merge_out_is_the_base_model_folder(worker, case_dir, tiny_llama, saved_adapter, model_copy):
    """The adapter's base is the user's 16-bit folder: merging into it would destroy the original weights."""
    adapter = case_dir / "adapter-of-copy"
    shutil.copytree(saved_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(model_copy)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    before = tree(model_copy)
    run = run_cli(worker, case_dir, ["merge", str(adapter), "--out", str(model_copy)])
    assert_refused_before_loading(run, str(model_copy))
    assert tree(model_copy) == before


def test_quantize_out_is_the_source(worker, case_dir, model_copy):
    """Issue 19 item 2: `fastload quantize ./model --out ./model` replaced the 16-bit original with its 4-bit copy."""
    before = tree(model_copy)
    run = run_cli(worker, case_dir, ["quantize", str(model_copy), "--out", str(model_copy)])
    assert_refused_before_loading(run, str(model_copy))
    assert tree(model_copy) == before, "the 16-bit original was replaced"


def test_estimate_huge_sequence_is_a_clear_answer(worker, case_dir, tiny_llama):
    run = run_cli(worker, case_dir, ["estimate", str(tiny_llama), "--seq", str(10 ** 15), "--batch", str(10 ** 9)])
    assert run["escaped"] is None, run["escaped"]
    assert run["code"] in (0, 1), run["stderr"][-500:]


def test_cache_rm_of_an_unknown_key_says_so(worker, case_dir):
    run = run_cli(worker, case_dir, ["cache", "rm", "0123456789abcdef"])
    assert run["escaped"] is None and run["code"] == 1, run
    assert "0123456789abcdef" in run["stderr"], run["stderr"]


# -- the data-loss items of issue 19 --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["notes", "a.b.c", "x.1.y", "model.99999999.abcdef12"])
def test_store_never_deletes_user_folders_in_its_tmp(worker, case_dir, tiny_llama, name):
    """Issue 19 item 1: FASTLOAD_HOME set to a folder the user already uses; its tmp/ sub-folders are theirs
    (whatever their name looks like), not leftovers fastload wrote."""
    home = case_dir / "home"
    mine = home / "tmp" / name
    mine.mkdir(parents=True)
    (mine / "thesis.txt").write_text("three years of work")
    outcome = worker.run(code("ops.load(model, store=True)", model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)},
                         timeout=90)
    assert_ran(outcome)
    assert (mine / "thesis.txt").is_file(), f"the store's clean-up deleted the user's folder tmp/{name}"


def test_save_merged_into_the_16bit_source_after_a_store_load(worker, case_dir, model_copy):
    """Issue 19 item 3: loaded from the store, save_merged(source='dequantized') into the original folder."""
    before = tree(model_copy)
    outcome = worker.run(code("""
        from fastload import FastModel
        ops.load(model, store=True)
        m, t = ops.load(model, store=True)
        result["source"] = m.fastload.plan.source
        result["r"] = ops.attempt(lambda: FastModel.save_merged(m, model, tokenizer=t, source="dequantized"))
    """, model=model_copy), env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=120)
    assert_ran(outcome)
    assert_user_error(outcome.result["r"], str(model_copy), what="save_merged over its own 16-bit source")
    assert tree(model_copy) == before, "the 16-bit original was overwritten"


@pytest.mark.slow
def test_save_adapter_into_a_train_out_keeps_its_checkpoints(worker, case_dir, tiny_llama, data):
    """Issue 19 item 4: save_adapter into the folder `fastload train --out` wrote deletes its resume points."""
    out = case_dir / "run"
    run = run_cli(worker, case_dir, train_argv(data, tiny_llama, out, "--save-steps", "1"))
    assert run["code"] == 0, run["stderr"][-800:]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints
    outcome = worker.run(code("""
        from fastload import FastModel
        m, t = ops.load(out, store=False)
        result["r"] = ops.attempt(lambda: FastModel.save_adapter(m, out, tokenizer=t))
    """, out=out), env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=90)
    assert_ran(outcome)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == checkpoints, "the resume points were deleted"


@pytest.mark.slow
def test_train_out_keeps_the_users_own_files(worker, case_dir, tiny_llama, data):
    """Issue 19 item 5: `fastload train --out DIR` overwrote the user's README.md with peft's model card."""
    out = case_dir / "project"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    run = run_cli(worker, case_dir, train_argv(data, tiny_llama, out))
    assert run["escaped"] is None, run["escaped"]
    assert (out / "README.md").read_text() == "# my project\n", "the user's README.md was overwritten"


def test_edited_chat_template_is_seen_by_the_next_load(worker, case_dir, model_copy):
    """Issue 19 item 7: the store served its stale tokenizer copy after the source's chat template was edited."""
    outcome = worker.run(code("""
        import json
        ops.load(model, store=True)
        cfg_file = model / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        (model / "chat_template.jinja").unlink(missing_ok=True)
        cfg["chat_template"] = "EDITED {{ messages[0]['content'] }}"
        cfg_file.write_text(json.dumps(cfg))
        m, t = ops.load(model, store=True)
        result["template"] = t.chat_template
        result["source"] = m.fastload.plan.source
    """, model=model_copy), env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=120)
    assert_ran(outcome)
    assert "EDITED" in (outcome.result["template"] or ""), \
        f"the edited template was ignored (plan source {outcome.result['source']})"


def test_store_entry_replaced_by_a_symlink_is_not_followed_by_cache_rm(worker, case_dir, tiny_llama):
    """A store entry that is a symlink to the user's folder: `cache rm` removes the link, never the user's files."""
    home = case_dir / "home"
    outcome = worker.run(code("ops.load(model, store=True)", model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)},
                         timeout=90)
    assert_ran(outcome)
    entry = next((home / "quantized").iterdir())
    mine = case_dir / "mine"
    shutil.copytree(entry, mine)
    shutil.rmtree(entry)
    entry.symlink_to(mine)
    run = run_cli(worker, case_dir, ["cache", "rm", entry.name.rsplit("--", 1)[-1]])
    assert run["escaped"] is None, run["escaped"]
    assert (mine / "fastload-manifest.json").is_file(), "cache rm deleted the files behind a symlink"
