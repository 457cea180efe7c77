"""Single files whole or not at all (fastload.atomic.atomic_file), and scratch folders that never outlive their
writer: the kernel-compile cache, GGUF exports and the benchmark's records write through them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fastload.atomic import MARKER, atomic_file, scratch_folder


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_file_is_replaced_in_one_step_and_a_failed_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "choices.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("the writer fails")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choices.json"]  # no temporary file left behind
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".choices.json.tmp-")
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choices.json"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    target = tmp_path / "model.gguf"
    stale = tmp_path / f".model.gguf.tmp-{dead_pid()}-0123abcd"
    live = tmp_path / f".model.gguf.tmp-{os.getppid()}-4567cdef"
    recent = tmp_path / f".model.gguf.tmp-{dead_pid()}-89abcdef"
    unrelated = tmp_path / ".model.gguf.tmp-notes"
    for path in (stale, live, recent, unrelated):
        path.write_text("partial")
    an_hour_ago = time.time() - 3600
    for path in (stale, live, unrelated):
        os.utime(path, (an_hour_ago, an_hour_ago))
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
    assert not stale.exists()
    assert live.exists() and recent.exists() and unrelated.exists()  # a running writer's, a fresh one, not ours


def test_a_scratch_folder_is_marked_while_used_and_gone_after(tmp_path):
    near = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        with scratch_folder(near) as scratch:
            assert (scratch / MARKER).is_file() and scratch.name.startswith(".out.gguf.tmp-")
            (scratch / "model-f16.gguf").write_bytes(b"\0" * 16)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_writer_killed_mid_file_leaves_the_old_file_and_its_leftover_goes_with_the_next_write(tmp_path):
    """A real SIGKILL while the new content is half written: the old file stands whole, and the dead writer's
    temporary file is removed by the next write once it is a minute old."""
    import signal

    target = tmp_path / "choices.json"
    target.write_text("old")
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from fastload.atomic import atomic_file\n"
        "with atomic_file(sys.argv[1]) as tmp:\n"
        "    with open(tmp, 'w') as fh:\n"
        "        fh.write('half of the new'); fh.flush()\n"
        "        print('writing', flush=True); time.sleep(60)\n"), str(target)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "choices.json"]
    assert leftover.name.startswith(f".choices.json.tmp-{child.pid}-") and target.read_text() == "old"
    os.utime(leftover, (time.time() - 120, time.time() - 120))
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["choices.json"]
