"""The fault machinery itself: each fault is real (the kernel says ENOSPC / EROFS, the signal kills, the recorder
sees a connection, the fake hub stalls), so a case that passes does so because fastload coped, not because the
fault never happened."""

from __future__ import annotations

import errno
import signal
import time

from faults.faultkit import KiB, assert_ran, code, wait_for


def test_tiny_tmpfs_gives_a_real_enospc_and_grows_when_space_is_freed(worker, case_dir):
    disk = case_dir / "disk"
    outcome = worker.run(code("""
        try:
            (disk / "big").write_bytes(b"x" * 200_000)
        except OSError as e:
            result["errno"] = e.errno
        ops.free_space(disk)
        (disk / "big").write_bytes(b"x" * 200_000)
        result["after"] = (disk / "big").stat().st_size
    """, disk=disk), tmpfs=[(disk, 64 * KiB, None)])
    assert_ran(outcome)
    assert outcome.result == {"errno": errno.ENOSPC, "after": 200_000}
    assert not (disk / "big").exists(), "the tmpfs leaked out of the child's mount namespace"


def test_read_only_bind_mount_refuses_writes_even_to_root(worker, case_dir):
    ro = case_dir / "ro"
    ro.mkdir()
    outcome = worker.run(code("""
        try:
            (ro / "f").write_text("x")
        except OSError as e:
            result["errno"] = e.errno
        ops.set_readonly(str(ro), False)
        (ro / "f").write_text("x")
    """, ro=ro), readonly=[ro])
    assert_ran(outcome)
    assert outcome.result == {"errno": errno.EROFS}
    assert (ro / "f").read_text() == "x", "remounting read-write let the write through to the real folder"


def test_sigkill_stops_a_child_mid_way(worker, case_dir):
    ready = case_dir / "ready"
    child = worker.start(code("import time\nPath(ready).write_text('1')\ntime.sleep(30)\nresult['finished'] = True",
                              ready=str(ready)))
    assert wait_for(ready.exists, 30)
    child.kill(signal.SIGKILL)
    outcome = child.wait(10)
    assert outcome.status == -signal.SIGKILL and not outcome.result


def test_recorder_sees_every_connection_and_the_fake_hub_stalls(online_worker, hub, case_dir):
    started = time.monotonic()
    outcome = online_worker.run(code("""
        import socket
        s = socket.create_connection(("127.0.0.1", port), timeout=1)
        s.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n")
        try:
            s.recv(10)
        except socket.timeout:
            result["stalled"] = True
    """, port=hub.port), audit=True)
    assert_ran(outcome)
    assert outcome.result == {"stalled": True} and hub.connections == 1
    assert any(e[0] == "socket.connect" and str(hub.port) in e[1] for e in outcome.network), outcome.network
    assert time.monotonic() - started < 20
