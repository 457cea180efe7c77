"""A warm Python that forks one child per fault case: torch, transformers, peft and bitsandbytes take ~10 s to
import on the CI machine, so importing them once and forking is what makes ~150 real-fault cases fit in CI.

Each child gets its own mount namespace (unshare(CLONE_NEWNS)), so the tiny tmpfs (a real full disk) and the
read-only bind mounts it asks for exist for it alone and vanish with it. The test process drives the server with
one JSON line per request on stdin and reads one JSON line per answer on stdout:

  {"op": "run", "code": ..., "env": {...}, "cwd": ..., "tmpfs": [[path, size, inodes]], "readonly": [path],
   "audit": bool, "memory": bytes|null, "out": file, "log": file}         -> {"pid": N}
  {"op": "wait", "pid": N, "timeout": s}                                   -> {"status": code or -signal,
                                                                               "timed_out": bool, "elapsed": s}
The child writes its outcome (the case's `result` dict, the exception that escaped, network events) to "out".
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def private_namespace() -> None:
    """A mount namespace of this process alone; mounts made afterwards never reach the test process."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")


def mount_tmpfs(path: str, size: int, inodes: int | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, opts.encode()), f"mount tmpfs ({opts}) on {path}")


def resize_tmpfs(path: str, size: int, inodes: int | None = None) -> None:
    """The user frees space: the same tmpfs, files kept, grown to `size`."""
    opts = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_REMOUNT, opts.encode()), f"remount {path} {opts}")


def set_readonly(path: str, readonly: bool = True) -> None:
    """A read-only bind mount of the folder onto itself (as root, chmod does not stop writes; this does)."""
    if readonly:
        _check(_libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
    last = None
    # in a user namespace the remount must keep the flags the outer mount locked
    for extra in (0, MS_NOSUID | MS_NODEV, MS_NOSUID | MS_NODEV | MS_NOEXEC, MS_NOSUID, MS_NODEV):
        flags = MS_REMOUNT | MS_BIND | extra | (MS_RDONLY if readonly else 0)
        if _libc.mount(b"none", path.encode(), None, flags, None) == 0:
            return
        last = ctypes.get_errno()
    raise OSError(last, f"remount {path} {'ro' if readonly else 'rw'}: {os.strerror(last)}")


def describe(error: BaseException) -> dict:
    """What the user would see of an exception: its class, whether it is fastload's, its message."""
    from fastload.errors import FastloadError

    tb = traceback.format_exception(type(error), error, error.__traceback__)
    return {"type": type(error).__name__, "module": type(error).__module__,
            "mro": [c.__name__ for c in type(error).__mro__], "fastload": isinstance(error, FastloadError),
            "message": str(error)[:6000], "asked": getattr(error, "asked", None),
            "found": getattr(error, "found", None), "fix": getattr(error, "fix", None),
            "traceback": "".join(tb)[-6000:]}


NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                  "socket.sendto", "urllib.Request")


def record_network(events: list) -> None:
    """Every connect / name lookup this process makes, whatever library makes it (sys.addaudithook)."""
    def hook(event, args):
        if event in NETWORK_EVENTS:
            try:
                events.append([event, repr(args[1:] if event == "socket.connect" else args)[:300]])
            except Exception:  # noqa: BLE001 - an audit hook must never raise into the code it watches
                pass
    sys.addaudithook(hook)


def run_child(req: dict) -> None:
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    outcome: dict = {"ok": False, "result": {}, "network": []}
    try:
        if req.get("tmpfs") or req.get("readonly"):
            private_namespace()
        for path, size, inodes in req.get("tmpfs", []):
            mount_tmpfs(path, size, inodes)
        for path in req.get("readonly", []):
            set_readonly(path)
        for key, value in req.get("env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if req.get("memory"):
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (req["memory"], req["memory"]))
        os.chdir(req["cwd"])
        from fastload.registry import reset_registry

        reset_registry()
        if req.get("audit"):
            record_network(outcome["network"])
        namespace = {"__name__": "__fault_case__", "result": outcome["result"]}
        try:
            exec(compile(req["code"], "<fault case>", "exec"), namespace)
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - the point is to see what escapes
            outcome["error"] = describe(e)
    except BaseException as e:  # noqa: BLE001 - set-up failed: reported, the test fails on it
        outcome["setup_error"] = describe(e)
    tmp = req["out"] + ".part"
    with open(tmp, "w") as f:
        json.dump(outcome, f, default=repr)
    os.replace(tmp, req["out"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def probe_mounts() -> str | None:
    """Why a child cannot mount (None when it can): forks a probe that tries a private namespace and a tmpfs."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            private_namespace()
            mount_tmpfs(f"/tmp/.fastload-fault-probe-{os.getpid()}", 65536)
            message = b""
        except OSError as e:
            message = str(e).encode() or b"?"
        os.write(w, message)
        os._exit(0)
    os.close(w)
    message = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    try:
        os.rmdir(f"/tmp/.fastload-fault-probe-{pid}")
    except OSError:
        pass
    return message or None


def warm_imports() -> None:
    """Everything a case needs, imported before the first fork (no torch op runs here: forked OpenMP would hang)."""
    import importlib

    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import fastload
    import fastload.cli.commands  # noqa: F401
    import fastload.data  # noqa: F401

    _ = fastload.FastModel, fastload.resolve, fastload.Store  # the public surface, imported lazily by fastload
    # the modules a load, save or train imports on first use, in the flat layout and the regrouped one
    for name in ("loader", "saving", "trainer", "sources", "load.loader", "save", "save.adapters", "save.merged",
                 "train.trainer", "sources.store"):
        try:
            importlib.import_module(f"fastload.{name}")
        except ImportError:
            pass


def serve() -> None:
    warm_imports()
    children: dict[int, float] = {}
    answer = sys.__stdout__
    print(json.dumps({"ready": True, "mount_problem": probe_mounts(), "pid": os.getpid()}), file=answer, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            pid = os.fork()
            if pid == 0:
                run_child(req)
            children[pid] = time.monotonic()
            print(json.dumps({"pid": pid}), file=answer, flush=True)
        elif req["op"] == "wait":
            print(json.dumps(wait_child(req["pid"], req["timeout"], children)), file=answer, flush=True)
        elif req["op"] == "quit":
            break


def wait_child(pid: int, timeout: float, children: dict[int, float]) -> dict:
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    elapsed = time.monotonic() - children.pop(pid, time.monotonic())
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return {"status": code, "timed_out": timed_out, "elapsed": elapsed}


if __name__ == "__main__":
    serve()
