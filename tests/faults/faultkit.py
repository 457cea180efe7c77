"""The test side of the fault machinery: a warm fork server to run cases in (real tmpfs, read-only mounts, SIGKILL,
a network recorder), a local socket server posing as the hub, and what every case checks afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KiB, MiB = 1024, 1024 * 1024


@dataclass
class Outcome:
    """What one case's child ended with."""

    status: int                       # exit code, or -signal when killed
    timed_out: bool
    elapsed: float
    ok: bool = False                  # the case's code ran to its end without an exception escaping
    error: dict | None = None         # the exception that escaped (see forkserver.describe)
    result: dict = field(default_factory=dict)
    network: list = field(default_factory=list)
    log: str = ""
    setup_error: dict | None = None

    def explain(self) -> str:
        if self.setup_error:
            return f"the fault could not be set up: {self.setup_error['message']}"
        if self.timed_out:
            return f"still running after {self.elapsed:.0f} s (killed)"
        if self.error:
            return f"{self.error['type']}: {self.error['message'][:800]}"
        return f"status {self.status}, result {json.dumps(self.result, default=repr)[:800]}"


class Worker:
    """One warm fork server. `env` is fixed at its start: libraries read HF_ENDPOINT and offline mode at import."""

    def __init__(self, env: dict[str, str], scratch: Path):
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE.parent), str(HERE)])}
        command = [sys.executable, str(HERE / "forkserver.py")]
        if os.geteuid() != 0 and shutil.which("unshare"):  # an unprivileged user namespace lets children mount
            command = ["unshare", "-rm", *command]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env,
                                     cwd=str(scratch))
        hello = json.loads(self.proc.stdout.readline() or "{}")
        if not hello.get("ready"):
            raise RuntimeError(f"the fork server did not start (see {command})")
        self.mount_problem = hello.get("mount_problem")
        self.lock = threading.Lock()

    def _ask(self, request: dict) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def start(self, code: str, *, env: dict | None = None, cwd: Path | None = None, tmpfs=(), readonly=(),
              audit: bool = False, memory: int | None = None) -> "Child":
        if (tmpfs or readonly) and self.mount_problem:
            raise AssertionError(f"this machine cannot mount a tmpfs or a read-only bind mount for the fault: "
                                 f"{self.mount_problem}")
        tag = uuid.uuid4().hex[:8]
        out, log = self.scratch / f"{tag}.json", self.scratch / f"{tag}.log"
        request = {"op": "run", "code": code, "env": env or {}, "cwd": str(cwd or self.scratch),
                   "tmpfs": [[str(p), int(size), inodes] for p, size, inodes in tmpfs],
                   "readonly": [str(p) for p in readonly], "audit": audit, "memory": memory,
                   "out": str(out), "log": str(log)}
        return Child(self, self._ask(request)["pid"], out, log)

    def run(self, code: str, timeout: float = 60, **kw) -> Outcome:
        return self.start(code, **kw).wait(timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


class Child:
    def __init__(self, worker: Worker, pid: int, out: Path, log: Path):
        self.worker, self.pid, self.out, self.log = worker, pid, out, log

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 60) -> Outcome:
        done = self.worker._ask({"op": "wait", "pid": self.pid, "timeout": timeout})
        outcome = Outcome(done["status"], done["timed_out"], done["elapsed"])
        if self.out.exists():
            data = json.loads(self.out.read_text())
            outcome.ok, outcome.error, outcome.result = data["ok"], data.get("error"), data["result"]
            outcome.network, outcome.setup_error = data["network"], data.get("setup_error")
        if self.log.exists():
            outcome.log = self.log.read_text(errors="replace")[-8000:]
        return outcome


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file below root: equal before and after means nothing was touched."""
    import hashlib

    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")} if root.exists() else {}


def wait_for(predicate, timeout: float = 60, every: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


# -- a local socket server posing as the hub ----------------------------------------------------------------------

class FakeHub:
    """Listens on 127.0.0.1; `mode` decides what a client gets: "stall" (accepted, never answered), "reset"
    (accepted, closed with a TCP reset), "500" (an HTTP 500), "garbage" (bytes that are not HTTP). Every accepted
    connection is counted: a load that needs no network must leave `connections` at zero."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "stall"
        self.connections = 0
        self.held: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.mode == "stall":
                self.held.append(conn)  # never answered, never closed while the test runs
            elif self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
            else:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            conn.recv(65536)
            if self.mode == "500":
                body = b'{"error": "internal"}'
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            else:
                conn.sendall(b"\x00\xffnot http at all\r\n\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def reset_count(self) -> None:
        self.connections = 0
        for conn in self.held:
            conn.close()
        self.held.clear()

    def close(self) -> None:
        self.stopped = True
        self.reset_count()
        self.sock.close()


def closed_port() -> int:
    """A local port nothing listens on: a connection there is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- what every case checks afterwards ----------------------------------------------------------------------------

TEMP_MARKS = (".tmp-", ".old-", ".part", ".adapter.tmp", ".merged-16bit", "trash.")


def temp_leftovers(*roots: Path) -> list[str]:
    """Files or folders a write leaves behind when it dies: temporary siblings, store tmp/ entries."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in root.rglob("*"):
            rel = str(p.relative_to(root))
            if any(mark in p.name for mark in TEMP_MARKS) or (p.parent.name == "tmp" and p.parent.parent == root):
                found.append(rel)
    return sorted(found)


def assert_fastload_error(outcome: Outcome, *words: str, what: str = "") -> None:
    """The user sees one of fastload's errors (not a raw library exception, not a hang) whose message names `words`."""
    assert not outcome.setup_error, outcome.explain()
    assert not outcome.timed_out, f"{what}: hung: {outcome.explain()}"
    assert outcome.error is not None, f"{what}: no error at all: {outcome.explain()}"
    assert outcome.error["fastload"], (f"{what}: a raw {outcome.error['module']}.{outcome.error['type']} escaped "
                                       f"instead of a fastload error: {outcome.error['message'][:500]}")
    missing = [w for w in words if w.lower() not in outcome.error["message"].lower()]
    assert not missing, f"{what}: the message does not name {missing}: {outcome.error['message'][:800]}"


def assert_ran(outcome: Outcome, what: str = "") -> None:
    assert not outcome.setup_error, outcome.explain()
    assert not outcome.timed_out, f"{what}: hung: {outcome.explain()}"
    assert outcome.ok, f"{what}: {outcome.explain()}\n{outcome.error and outcome.error['traceback'][-2500:]}"


def assert_user_error(attempt: dict, *words: str, what: str = "") -> None:
    """An attempt (ops.attempt / ops.cli_ok) ended in a fastload error whose message names `words`."""
    assert not attempt["ok"], f"{what}: succeeded where an error was due: {attempt}"
    assert attempt.get("fastload"), (f"{what}: a raw {attempt.get('module', '')}.{attempt.get('type')} reached the "
                                     f"user instead of a fastload error: {attempt.get('message', '')[:600]}")
    missing = [w for w in words if w.lower() not in attempt["message"].lower()]
    assert not missing, f"{what}: the message does not name {missing}: {attempt['message'][:800]}"


def assert_succeeded(attempt: dict, what: str = "") -> None:
    assert attempt["ok"], (f"{what}: failed: {attempt.get('type')}: {attempt.get('message', '')[:800]}\n"
                           f"{(attempt.get('traceback') or '')[-1500:]}")


def code(text: str, **values) -> str:
    """A case's child code: `text` dedented, with `values` bound as Python literals at its top."""
    import textwrap

    def literal(v):
        return f"Path({str(v)!r})" if isinstance(v, Path) else repr(v)

    head = "".join(f"{k} = {literal(v)}\n" for k, v in values.items())
    return "import ops\nfrom pathlib import Path\n" + head + textwrap.dedent(text)
