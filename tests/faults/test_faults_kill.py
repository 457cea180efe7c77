"""Real SIGKILL (and Ctrl-C, SIGTERM) at given points of every write: the store, adapters, merges, the trainer's
checkpoints and final adapter, `fastload quantize --out`. Afterwards the previous good state must be intact and
loadable, and the next run must succeed and leave no temporary files, with no clean-up by hand."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from faults.faultkit import assert_ran, assert_succeeded, code, temp_leftovers, wait_for

TRAIN_DATA = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(8)]


def kill_after(child, trigger, delay: float, sig=signal.SIGKILL, timeout: float = 90):
    """Wait for `trigger()` (a write has begun), wait `delay` more, send `sig`; the child's outcome. A folder that
    vanishes while the trigger scans it is being swapped by the writer: that write has begun too."""
    def began():
        try:
            return trigger()
        except FileNotFoundError:
            return True
    wait_for(began, timeout)
    time.sleep(delay)
    child.kill(sig)
    return child.wait(60)


def appeared(root: Path, before: set[str]):
    """A trigger: something new exists below root."""
    return lambda: root.exists() and any(str(p) not in before for p in root.rglob("*"))


# -- the store ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_store_write_killed_then_next_load_stores_and_verifies(worker, case_dir, tiny_llama, delay):
    """User loses (if broken): every later load to a half-written entry, or a tmp folder growing forever."""
    home = case_dir / "home"
    env = {"FASTLOAD_HOME": str(home)}
    child = worker.start(code("ops.load(model, store=True)", model=str(tiny_llama)), env=env)
    kill_after(child, lambda: (home / "tmp").is_dir() and any((home / "tmp").iterdir()), delay)
    outcome = worker.run(code("""
        m, t = ops.load(model, store=True)
        result["verify"] = ops.cli("cache", "verify")
        result["leftovers"] = ops.temp_leftovers(home)
    """, model=str(tiny_llama), home=home), env=env, timeout=90)
    assert_ran(outcome, "the load after a killed store write")
    assert outcome.result["verify"]["code"] == 0, outcome.result["verify"]["stderr"]
    assert outcome.result["leftovers"] == [], f"the killed write's files remain: {outcome.result['leftovers']}"


@pytest.mark.parametrize("delay", [0.0])
def test_store_write_interrupted_by_ctrl_c_leaves_nothing(worker, case_dir, tiny_llama, delay):
    """Ctrl-C (a real SIGINT) while the store is written: KeyboardInterrupt reaches the user, nothing is left."""
    home = case_dir / "home"
    child = worker.start(code("""
        result["load"] = ops.attempt(lambda: ops.load(model, store=True) and None)
        result["leftovers"] = ops.temp_leftovers(home)
        result["entries"] = ops.listing(home / "quantized")
    """, model=str(tiny_llama), home=home), env={"FASTLOAD_HOME": str(home)})
    outcome = kill_after(child, lambda: (home / "tmp").is_dir() and any((home / "tmp").iterdir()), delay,
                         sig=signal.SIGINT)
    assert_ran(outcome)
    r = outcome.result
    if not r["load"]["ok"]:
        assert r["load"]["type"] == "KeyboardInterrupt", r["load"]
        assert r["entries"] == [], f"an entry exists after an interrupted write: {r['entries']}"
    assert r["leftovers"] == [], f"Ctrl-C left temporary files: {r['leftovers']}"


# -- adapters -----------------------------------------------------------------------------------------------------

SAVE_THEN_SIGNAL = """
    action = ops.save_adapter_of(model, out, seed=9)
    Path(ready).write_text("go")
    result["save"] = ops.attempt(action)
"""

CHECK_ADAPTER = """
    result["digest"] = ops.adapter_weights(out) if (out / "adapter_model.safetensors").exists() else None
    result["load"] = ops.attempt(lambda: ops.load(out, store=False) and None)
    result["resave"] = ops.attempt(ops.save_adapter_of(model, out, seed=10))
    result["leftovers"] = ops.temp_leftovers(out.parent)
"""


@pytest.mark.parametrize("delay", [0.0, 0.015])
def test_save_adapter_killed_keeps_a_whole_adapter(worker, case_dir, tiny_llama, saved_adapter, delay):
    """SIGKILL at a point of save_adapter over a previous one: the folder holds the previous adapter or the new
    one, whole (loadable); the next save succeeds and leaves no temporary folder."""
    out = case_dir / "adapter"
    shutil.copytree(saved_adapter, out)
    ready = case_dir / "ready"
    env = {"FASTLOAD_HOME": str(case_dir / "home")}
    child = worker.start(code(SAVE_THEN_SIGNAL, model=str(tiny_llama), out=out, ready=str(ready)), env=env)
    kill_after(child, ready.exists, delay)
    outcome = worker.run(code(CHECK_ADAPTER, model=str(tiny_llama), out=out), env=env, timeout=90)
    assert_ran(outcome)
    r = outcome.result
    assert r["digest"] is not None, "the adapter folder lost its weights"
    assert_succeeded(r["load"], "loading the adapter folder after the killed save")
    assert_succeeded(r["resave"], "the next save")
    assert r["leftovers"] == [], f"the killed save's files remain: {r['leftovers']}"


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_save_adapter_interrupted_keeps_the_previous(worker, case_dir, tiny_llama, saved_adapter, sig):
    """Ctrl-C or a SIGTERM (a scheduler stopping the job) while saving: the previous adapter stays loadable."""
    out = case_dir / "adapter"
    shutil.copytree(saved_adapter, out)
    ready = case_dir / "ready"
    env = {"FASTLOAD_HOME": str(case_dir / "home")}
    child = worker.start(code(SAVE_THEN_SIGNAL, model=str(tiny_llama), out=out, ready=str(ready)), env=env)
    kill_after(child, ready.exists, 0.005, sig=sig)
    outcome = worker.run(code(CHECK_ADAPTER, model=str(tiny_llama), out=out), env=env, timeout=90)
    assert_ran(outcome)
    assert_succeeded(outcome.result["load"], "loading the adapter folder after the interrupted save")
    assert outcome.result["leftovers"] == [], outcome.result["leftovers"]


# -- merges -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05])
def test_save_merged_killed_keeps_a_loadable_merge(worker, case_dir, tiny_llama, delay):
    out = case_dir / "merged"
    ready = case_dir / "ready"
    env = {"FASTLOAD_HOME": str(case_dir / "home")}
    assert_ran(worker.run(code("ops.save_merged_of(model, out, seed=3)()", model=str(tiny_llama), out=out), env=env,
                          timeout=90), "the first merge")
    child = worker.start(code("""
        action = ops.save_merged_of(model, out, seed=4)
        Path(ready).write_text("go")
        action()
    """, model=str(tiny_llama), out=out, ready=str(ready)), env=env)
    kill_after(child, ready.exists, delay)
    outcome = worker.run(code("""
        result["load"] = ops.attempt(lambda: ops.load(out, store=False, lora=None) and None)
        result["again"] = ops.attempt(ops.save_merged_of(model, out, seed=4))
        result["leftovers"] = ops.temp_leftovers(out.parent)
    """, model=str(tiny_llama), out=out), env=env, timeout=90)
    assert_ran(outcome)
    assert_succeeded(outcome.result["load"], "loading the merged folder after the killed merge")
    assert_succeeded(outcome.result["again"], "the next merge")
    assert outcome.result["leftovers"] == [], outcome.result["leftovers"]


# -- the command line ---------------------------------------------------------------------------------------------

def _data(case_dir: Path) -> Path:
    data = case_dir / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TRAIN_DATA))
    return data


def _train_argv(data, model, out, r: int, steps: int = 2, save_steps: int = 1):
    return ["train", str(data), "--model", str(model), "--out", str(out), "--steps", str(steps), "--save-steps",
            str(save_steps), "--batch", "2", "--grad-accum", "1", "--seq", "64", "--r", str(r), "-q"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0])
def test_train_final_adapter_killed_leaves_config_and_weights_that_belong_together(worker, case_dir, tiny_llama,
                                                                                   delay):
    """Issue 19 item 6: `fastload train`'s final adapter write killed over a previous adapter (rank 8, the new
    one rank 4): the folder must load as one adapter, never the old config with the new weights."""
    out, data = case_dir / "run", _data(case_dir)
    env = {"FASTLOAD_HOME": str(case_dir / "home")}
    first = worker.run(code("result['run'] = ops.cli(*argv)", argv=_train_argv(data, tiny_llama, out, 8, 1, 5)),
                       env=env, timeout=120)
    assert_ran(first) and None
    assert first.result["run"]["code"] == 0, first.result["run"]["stderr"]
    before = {str(p) for p in out.rglob("*")}
    weights = out / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    child = worker.start(code("ops.cli(*argv)", argv=_train_argv(data, tiny_llama, out, 4, 1, 5)), env=env)

    def final_write_began():
        new = [p for p in out.glob(".*") if str(p) not in before]
        return bool(new) or (weights.exists() and weights.stat().st_mtime_ns != mtime)
    kill_after(child, final_write_began, delay)
    outcome = worker.run(code("result['load'] = ops.attempt(lambda: ops.load(out, store=False) and None)", out=out),
                         env=env, timeout=90)
    assert_ran(outcome)
    assert_succeeded(outcome.result["load"], "loading --out after the killed final write")


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0])
def test_train_checkpoint_killed_then_resume_succeeds(worker, case_dir, tiny_llama, delay):
    """SIGKILL while the Trainer writes checkpoint-N: `--resume` must continue (from an earlier whole checkpoint
    or from scratch), not crash on the half-written one."""
    out, data = case_dir / "run", _data(case_dir)
    env = {"FASTLOAD_HOME": str(case_dir / "home")}
    child = worker.start(code("ops.cli(*argv)", argv=_train_argv(data, tiny_llama, out, 8, 3, 1)), env=env)
    kill_after(child, lambda: any(out.glob("checkpoint-2*")), delay)
    outcome = worker.run(code("result['run'] = ops.cli(*argv, '--resume')", argv=_train_argv(data, tiny_llama, out, 8,
                                                                                            3, 1)), env=env,
                         timeout=150)
    assert_ran(outcome)
    run = outcome.result["run"]
    assert run["escaped"] is None, f"raw {run['escaped']['type']}: {run['escaped']['message'][:500]}"
    assert run["code"] == 0, run["stderr"][-1500:]
    assert temp_leftovers(out) == []


@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_cli_quantize_out_killed_then_rerun_succeeds(worker, case_dir, tiny_llama, delay):
    """`fastload quantize M --out DIR` killed mid-write: DIR is absent or whole, and the rerun succeeds."""
    out = case_dir / "q4"
    env = {"FASTLOAD_HOME": str(case_dir / "home")}
    child = worker.start(code("ops.cli('quantize', model, '--out', out, '-q')", model=str(tiny_llama), out=out),
                         env=env)
    kill_after(child, lambda: any(p.name.startswith(".q4") or p.name == "q4" for p in case_dir.iterdir()), delay)
    outcome = worker.run(code("""
        result["partial_loads"] = ops.attempt(lambda: ops.load(out, store=False) and None) if out.exists() else None
        result["again"] = ops.cli_ok("quantize", model, "--out", out, "-q")
        result["leftovers"] = ops.temp_leftovers(out.parent)
    """, model=str(tiny_llama), out=out), env=env, timeout=90)
    assert_ran(outcome)
    if outcome.result["partial_loads"] is not None:
        assert_succeeded(outcome.result["partial_loads"], "the --out folder left by the killed quantize")
    assert_succeeded(outcome.result["again"], "the rerun")
    assert [x for x in outcome.result["leftovers"] if not x.startswith("home")] == []
