"""A real full disk (a tiny tmpfs in the child's own mount namespace, so writes end in ENOSPC from the kernel) and
real read-only folders (a read-only bind mount: as root, chmod stops nothing). For every write fastload does, the
user must see a fastload error saying the disk is full (or read-only) and where, find no temporary files left, find
the previous save intact, and succeed on the next try once space is freed, with no clean-up by hand."""

from __future__ import annotations

import pytest

from faults.faultkit import KiB, MiB, assert_ran, assert_succeeded, assert_user_error, code

DISK_FULL_WORDS = ("full",)
MARGINS = [16 * KiB, 480 * KiB]  # free bytes left: the write fills the disk at a different point each


def check_fault_then_retry(outcome, what, *words):
    assert_ran(outcome, what)
    r = outcome.result
    assert_user_error(r["first"], *words, what=f"{what} (the faulty write)")
    assert r["leftovers"] == [], f"{what}: the failed write left temporary files behind: {r['leftovers']}"
    assert_succeeded(r["second"], f"{what}: the next try once the fault was gone")
    assert r["after"] == [], f"{what}: temporary files remain after the successful retry: {r['after']}"


# -- the store ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("margin", [4 * KiB, 64 * KiB, 256 * KiB])
def test_store_write_on_a_full_disk_says_so_and_the_next_load_stores(worker, case_dir, tiny_llama, margin):
    """User loses: the first load (minutes of quantizing) to a raw SafetensorError, and a store that needs
    clean-up by hand; sees: 'disk is full' naming FASTLOAD_HOME, then a normal load once space is freed."""
    home = case_dir / "home"
    outcome = worker.run(code("""
        (home / "quantized").mkdir(parents=True)
        ops.shrink_to(home, margin)
        result.update(ops.fault_then_retry(lambda: ops.load(model, store=True) and None,
                                           lambda: ops.free_space(home), home))
        result["entries"] = ops.listing(home / "quantized")
    """, home=home, margin=margin, model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)},
        tmpfs=[(home, 64 * MiB, None)], timeout=90)
    check_fault_then_retry(outcome, f"store write with {margin} bytes free", *DISK_FULL_WORDS)
    assert any(e.endswith("fastload-manifest.json") for e in outcome.result["entries"]), "no entry after the retry"


def test_store_out_of_inodes_says_so(worker, case_dir, tiny_llama):
    """A disk with bytes but no inodes left (many small files elsewhere): ENOSPC on creating a file."""
    home = case_dir / "home"
    outcome = worker.run(code("""
        home.mkdir(exist_ok=True)
        import os
        for i in range(6):
            (home / f"user-file-{i}").write_text("x")
        result.update(ops.fault_then_retry(lambda: ops.load(model, store=True) and None,
                                           lambda: ops.resize_tmpfs(str(home), 512 * 1024 * 1024, 100000), home))
        result["user_files"] = sorted(p.name for p in home.glob("user-file-*"))
    """, home=home, model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)},
        tmpfs=[(home, 64 * MiB, 12)], timeout=90)
    check_fault_then_retry(outcome, "store write with no inode left", "full")
    assert len(outcome.result["user_files"]) == 6, "the user's files in FASTLOAD_HOME were touched"


# -- saves over a previous save -------------------------------------------------------------------------------------

def _previous_then_full(make_action: str, margin: int) -> str:
    return f"""
        import shutil
        shutil.copytree(previous, out)
        before = ops.tree(out)
        action = {make_action}
        ops.shrink_to(disk, margin)
        first = ops.attempt(action)
        result["first"] = first
        result["previous_intact"] = ops.tree(out) == before
        result["leftovers"] = ops.temp_leftovers(disk)
        ops.free_space(disk)
        result["second"] = ops.attempt(action)
        result["after"] = ops.temp_leftovers(disk)
        result["changed_after_retry"] = ops.tree(out) != before
    """


@pytest.mark.parametrize("margin", MARGINS)
def test_save_adapter_on_a_full_disk_keeps_the_previous_adapter(worker, case_dir, tiny_llama, saved_adapter, margin):
    """User loses: the adapter saved yesterday; sees: 'disk is full' and yesterday's adapter unchanged."""
    disk = case_dir / "disk"
    outcome = worker.run(code(_previous_then_full("ops.save_adapter_of(model, out)", margin), disk=disk,
                              out=disk / "adapter", previous=str(saved_adapter), model=str(tiny_llama), margin=margin),
                         tmpfs=[(disk, 64 * MiB, None)], env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=90)
    check_fault_then_retry(outcome, f"save_adapter with {margin} bytes free", *DISK_FULL_WORDS)
    assert outcome.result["previous_intact"], "the previous adapter changed after a failed save"
    assert outcome.result["changed_after_retry"], "the retry did not write the new adapter"


@pytest.mark.slow
@pytest.mark.parametrize("margin", [64 * KiB, 1 * MiB])
def test_save_merged_on_a_full_disk_keeps_the_previous_merge(worker, case_dir, tiny_llama, margin):
    """User loses: the merged model written before; sees: 'disk is full', the previous merge loadable."""
    disk = case_dir / "disk"
    outcome = worker.run(code("""
        first_save = ops.save_merged_of(model, out, seed=5)
        first_save()
        del first_save
        before = ops.tree(out)
        action = ops.save_merged_of(model, out, seed=6)
        ops.shrink_to(disk, margin)
        result["first"] = ops.attempt(action)
        result["previous_intact"] = ops.tree(out) == before
        result["leftovers"] = ops.temp_leftovers(disk)
        ops.free_space(disk)
        result["second"] = ops.attempt(action)
        result["after"] = ops.temp_leftovers(disk)
    """, disk=disk, out=disk / "merged", model=str(tiny_llama), margin=margin),
        tmpfs=[(disk, 256 * MiB, None)], env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=120)
    check_fault_then_retry(outcome, f"save_merged with {margin} bytes free", *DISK_FULL_WORDS)
    assert outcome.result["previous_intact"], "the previous merged model changed after a failed save"


@pytest.mark.parametrize("margin", [32 * KiB, 400 * KiB])
def test_save_merged_4bit_on_a_full_disk(worker, case_dir, tiny_llama, margin):
    """quantize=True writes a 16-bit merge then its 4-bit copy: a full disk at either step is 'disk is full'."""
    disk = case_dir / "disk"
    outcome = worker.run(code("""
        action = ops.save_merged_of(model, out, quantize=True)
        ops.shrink_to(disk, margin)
        result.update(ops.fault_then_retry(action, lambda: ops.free_space(disk), disk))
    """, disk=disk, out=disk / "merged4", model=str(tiny_llama), margin=margin),
        tmpfs=[(disk, 256 * MiB, None)], env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=120)
    check_fault_then_retry(outcome, f"save_merged(quantize=True) with {margin} bytes free", *DISK_FULL_WORDS)


# -- the command line ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("margin", [16 * KiB, 300 * KiB])
def test_cli_quantize_out_on_a_full_disk(worker, case_dir, tiny_llama, margin):
    """`fastload quantize M --out DIR` on a full disk: exit 1 saying so, nothing half-written at DIR."""
    disk = case_dir / "disk"
    outcome = worker.run(code("""
        disk.mkdir(exist_ok=True)
        ops.shrink_to(disk, margin)
        result.update(ops.fault_then_retry(lambda: ops.cli_ok("quantize", model, "--out", out, "-q"),
                                           lambda: ops.free_space(disk), disk))
        result["out_files"] = ops.listing(out)
    """, disk=disk, out=disk / "q4", model=str(tiny_llama), margin=margin),
        tmpfs=[(disk, 64 * MiB, None)], env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=120)
    check_fault_then_retry(outcome, f"fastload quantize --out with {margin} bytes free", *DISK_FULL_WORDS)


@pytest.mark.parametrize("margin", [16 * KiB])
def test_cli_merge_out_on_a_full_disk(worker, case_dir, tiny_llama, saved_adapter, margin):
    disk = case_dir / "disk"
    outcome = worker.run(code("""
        disk.mkdir(exist_ok=True)
        ops.shrink_to(disk, margin)
        result.update(ops.fault_then_retry(lambda: ops.cli_ok("merge", adapter, "--out", out, "-q"),
                                           lambda: ops.free_space(disk), disk))
    """, disk=disk, out=disk / "merged", adapter=str(saved_adapter), margin=margin),
        tmpfs=[(disk, 128 * MiB, None)], env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=120)
    check_fault_then_retry(outcome, f"fastload merge --out with {margin} bytes free", *DISK_FULL_WORDS)


TRAIN_DATA = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(8)]


@pytest.mark.slow
@pytest.mark.parametrize("margin", [900 * KiB])
def test_cli_train_out_on_a_full_disk(worker, case_dir, tiny_llama, margin):
    """`fastload train` whose checkpoint or final adapter meets a full disk: exit 1 saying so, and the rerun
    with --resume after freeing space finishes."""
    disk = case_dir / "disk"
    data = case_dir / "data.jsonl"
    import json
    data.write_text("\n".join(json.dumps(r) for r in TRAIN_DATA))
    outcome = worker.run(code("""
        disk.mkdir(exist_ok=True)
        ops.shrink_to(disk, margin)
        argv = ("train", data, "--model", model, "--out", out, "--steps", "2", "--save-steps", "1", "--batch", "2",
                "--grad-accum", "1", "--seq", "64", "-q")
        result.update(ops.fault_then_retry(lambda: ops.cli_ok(*argv, "--resume"), lambda: ops.free_space(disk), disk))
    """, disk=disk, out=disk / "run", model=str(tiny_llama), data=str(data), margin=margin),
        tmpfs=[(disk, 128 * MiB, None)], env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=150)
    check_fault_then_retry(outcome, f"fastload train --out with {margin} bytes free", *DISK_FULL_WORDS)


# -- read-only folders --------------------------------------------------------------------------------------------

def test_load_from_a_read_only_store_that_holds_the_entry(worker, case_dir, tiny_llama):
    """A shared, read-only FASTLOAD_HOME that already holds the model: the load reads it and writes nothing."""
    home = case_dir / "home"
    first = worker.run(code("ops.load(model, store=True)", model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)},
                       timeout=90)
    assert_ran(first, "filling the store")
    outcome = worker.run(code("""
        m, t = ops.load(model, store=True)
        result["source"] = m.fastload.plan.source
    """, model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)}, readonly=[home], timeout=90)
    assert_ran(outcome, "load from a read-only store holding the entry")
    assert outcome.result["source"] == "store"


def test_load_with_a_read_only_empty_store_is_a_store_error_naming_the_folder(worker, case_dir, tiny_llama):
    """FASTLOAD_HOME read-only and empty: the user must learn the store cannot be written (not a raw OSError)
    and be told store=False; the load itself may instead succeed without storing."""
    home = case_dir / "home"
    home.mkdir()
    outcome = worker.run(code("result['load'] = ops.attempt(lambda: ops.load(model, store=True) and None)",
                              model=str(tiny_llama)), env={"FASTLOAD_HOME": str(home)}, readonly=[home], timeout=90)
    assert_ran(outcome)
    r = outcome.result["load"]
    if not r["ok"]:
        assert_user_error(r, str(home), "store=False", what="load with a read-only FASTLOAD_HOME")


@pytest.mark.parametrize("what", ["save_adapter", "save_merged"])
def test_save_into_a_read_only_folder_names_the_folder_and_keeps_the_previous(worker, case_dir, tiny_llama,
                                                                              saved_adapter, what):
    disk = case_dir / "ro"
    disk.mkdir()
    import shutil
    if what == "save_adapter":  # over a previous adapter; a merge goes to a new folder
        shutil.copytree(saved_adapter, disk / "out")
    make = "ops.save_adapter_of(model, out)" if what == "save_adapter" else "ops.save_merged_of(model, out)"
    outcome = worker.run(code(f"""
        before = ops.tree(out)
        action = {make}
        result["first"] = ops.attempt(action)
        result["previous_intact"] = ops.tree(out) == before
        result["leftovers"] = ops.temp_leftovers(disk)
        ops.set_readonly(str(disk), False)
        result["second"] = ops.attempt(action)
    """, disk=disk, out=disk / "out", model=str(tiny_llama)), readonly=[disk],
        env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=90)
    assert_ran(outcome)
    r = outcome.result
    assert_user_error(r["first"], "read-only", what=f"{what} into a read-only folder")
    assert r["previous_intact"], "the previous save changed"
    assert r["leftovers"] == [], r["leftovers"]
    assert_succeeded(r["second"], f"{what} once the folder is writable")


@pytest.mark.parametrize("command", ["quantize", "merge", "train"])
def test_cli_out_in_a_read_only_folder_fails_before_loading(worker, case_dir, tiny_llama, saved_adapter, command):
    """User loses: minutes of loading (and for train, of training) before learning --out cannot be written;
    sees: exit 1 naming --out's folder, before the model is loaded."""
    ro = case_dir / "ro"
    ro.mkdir()
    data = case_dir / "data.jsonl"
    import json
    data.write_text("\n".join(json.dumps(r) for r in TRAIN_DATA))
    argv = {"quantize": ["quantize", str(tiny_llama), "--out", str(ro / "out")],
            "merge": ["merge", str(saved_adapter), "--out", str(ro / "out")],
            "train": ["train", str(data), "--model", str(tiny_llama), "--out", str(ro / "out"), "--steps", "1",
                      "--seq", "64"]}[command]
    outcome = worker.run(code("result['run'] = ops.cli(*argv)", argv=argv), readonly=[ro],
                         env={"FASTLOAD_HOME": str(case_dir / "home")}, timeout=120)
    assert_ran(outcome)
    r = outcome.result["run"]
    assert r["escaped"] is None, f"a raw {r['escaped']['type']} escaped the command: {r['escaped']['message'][:400]}"
    assert r["code"] == 1, f"exit {r['code']}: {r['stderr'][-800:]}"
    assert str(ro) in r["stderr"] and "read-only" in r["stderr"].lower(), r["stderr"][-800:]
    assert "source:" not in r["stderr"], "the model was loaded before --out was found unwritable"


def test_load_from_a_read_only_hugging_face_cache(worker, case_dir, tiny_llama):
    """A read-only HF cache (a shared one): an offline load of a cached repo reads it and never writes there."""
    cache = case_dir / "hub"
    snap = cache / "models--faultorg--tiny" / "snapshots" / ("a" * 40)
    import shutil
    shutil.copytree(tiny_llama, snap)
    (cache / "models--faultorg--tiny" / "refs").mkdir()
    (cache / "models--faultorg--tiny" / "refs" / "main").write_text("a" * 40)
    outcome = worker.run(code("""
        m, t = ops.load("faultorg/tiny", store=False)
        result["source"] = m.fastload.plan.source
    """), readonly=[cache], env={"HF_HUB_CACHE": str(cache), "FASTLOAD_HOME": str(case_dir / "home")}, timeout=90)
    assert_ran(outcome, "load from a read-only HF cache")
    assert outcome.result["source"] == "hub-cache"
