"""The store entry written off the critical path: a writer thread saves the loaded 4-bit model once training runs.

What is saved is taken on the calling thread, right after the load: the state dict as save_pretrained would write
it (tensor references: the packed 4-bit weights are never written again, and QLoRA trains adapters, not the base),
the config files and the tokenizer files. The writer thread copies the tensors to the host one at a time on a side
CUDA stream and streams them into one safetensors file inside Store.write's temporary folder, which is renamed into
place only when whole. Its copies go through one pinned buffer, off the driver's staging path that the training's
own small pageable copies take.

When it starts: from_pretrained returning arms it, and it starts once the first optimizer step of the process has
finished (on the GPU too: it waits for the step's queued kernels). Its copies and disk writes slow whatever runs
beside them: on an H200, peft's creation of the adapters (5.9x slower) and the first training step (a third).
A process that never steps (generation, evaluation) gets it START_AFTER_S after from_pretrained returned, or at
once when its main thread ends. The deadline is long on purpose: it only serves a long-lived process that never
trains (its entry is for the next process, so a later start costs nothing), while a shorter one would land on the
first step of a run whose data preparation or compilation takes longer. wait_for_store_writes starts it at once.

Exit policy: the writer is a non-daemon thread, so a normal interpreter exit starts it (if still held) and waits
for it (a short script still leaves its entry behind); a process killed mid-write (SIGKILL, power loss) leaves only
a temporary folder named with its pid and fastload's marker, which the next writer removes (Store.cleanup_tmp). A
reader never sees a partial entry.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import threading
import time
import weakref
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastload._log import logger
from fastload.atomic import MARKER, leftover_name, write_marker
from fastload.model_state import state_of

SWITCH = "FASTLOAD_STORE_WRITE"  # "background" or "wait"; unset: background for a model on a GPU, wait on the CPU
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                      torch.bool: "BOOL"}
START_AFTER_S = 30.0  # a held write starts this long after from_pretrained returned, if no optimizer step came
POLL_S = 0.1  # how often a held writer looks whether the main thread has ended (the interpreter is exiting)
PINNED_BYTES = 64 << 20  # the host buffer device tensors are copied through, chunk by chunk
_writers: list[threading.Thread] = []
_lock = threading.Lock()
_held: list[HeldWrite] = []  # the staged writes not started yet
_step_hook = None  # torch's handle of _after_optimizer_step, registered by the first armed write


class HeldWrite:
    """When one staged write may start: once released, at its deadline, or when the main thread ends."""

    def __init__(self) -> None:
        self.armed = False  # from_pretrained returned: the next optimizer step releases it
        self.deadline = time.monotonic() + START_AFTER_S
        self.why = ""
        self.step_done = None  # a CUDA event after the releasing step's kernels
        self._released = threading.Event()

    def arm(self) -> None:
        self.armed = True
        self.deadline = time.monotonic() + START_AFTER_S

    def release(self, why: str, step_done=None) -> None:
        self.why, self.step_done = why, step_done
        self._released.set()

    def wait(self) -> str:
        """Block until the write may start; returns when it started, for the log."""
        while not self._released.wait(POLL_S):
            if not threading.main_thread().is_alive():
                return "at the main thread's end"
            if time.monotonic() >= self.deadline:
                return f"at the {START_AFTER_S:.0f} s deadline (no optimizer step)"
        if self.step_done is not None:
            self.step_done.synchronize()
        return self.why


def release_store_writes() -> None:
    """Let every staged write start now (wait_for_store_writes; a caller that knows no training follows)."""
    for held in _take(lambda held: True):
        held.release("on request")


def release_store_writes_after_first_step() -> None:
    """Let the staged writes start once an optimizer step has finished: from_pretrained calls it as it returns."""
    global _step_hook
    with _lock:
        for held in _held:
            held.arm()
        if _held and _step_hook is None:
            # kept for the process, idle while nothing is armed: torch runs the global hooks without copying their
            # dict, so a hook removing itself breaks the step of any hook registered after it
            _step_hook = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """torch's hook after every optimizer step: starts the armed writes."""
    if not _held:
        return
    armed = _take(lambda held: held.armed)
    if not armed:
        return
    step_done = None
    if torch.cuda.is_initialized():  # step() returns with its kernels queued: the write waits for them
        step_done = torch.cuda.Event()
        step_done.record()
    for held in armed:
        held.release("after the first optimizer step", step_done)


def _take(wanted) -> list[HeldWrite]:
    """Remove and return the held writes `wanted` accepts (two threads may release at once)."""
    with _lock:
        taken = [held for held in _held if wanted(held)]
        _held[:] = [held for held in _held if not wanted(held)]
    return taken


def wants_background(model, device) -> bool:
    """Whether this load's store entry is written in the background (see SWITCH); only for a direct load, whose
    tensors carry the checkpoint's own names (no conversion to undo when saving)."""
    asked = os.environ.get(SWITCH, "").strip().lower()
    if asked in ("wait", "sync", "0", "off"):
        return False
    if not state_of(model, create=False).direct_load:
        return False
    from fastload.load.experts import unquantized_expert_share

    if unquantized_expert_share(model)[0]:
        return False  # the entry keeps 16-bit experts, stored 4-bit right after: held for the writer, they would
        # stay on the device through the first training steps
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict  # noqa: F401
    except ImportError:  # an older transformers: save_pretrained's own ways, on this thread
        return False
    return asked == "background" or str(device).startswith("cuda")


def tensors_to_save(model) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained writes: bitsandbytes' packed weights and quantization states, ties removed."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {name: t.detach() for name, t in state.items()}


def write_config_files(model, directory: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them."""
    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], stream=None) -> None:
    """One safetensors file written tensor by tensor: never more than one tensor's bytes in host memory."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    pinned = None
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if not t.is_cuda:
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                continue
            if pinned is None:
                pinned = torch.empty(PINNED_BYTES, dtype=torch.uint8, pin_memory=True)
            _write_device_tensor(f, t, pinned, stream)


def _write_device_tensor(f, t: torch.Tensor, pinned: torch.Tensor, stream) -> None:
    """A CUDA tensor's bytes into `f`, through the pinned buffer, one chunk at a time on `stream`."""
    with torch.cuda.stream(stream):  # None: the current stream
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        for begin in range(0, flat.numel(), pinned.numel()):
            chunk = flat[begin:begin + pinned.numel()]
            pinned[:chunk.numel()].copy_(chunk, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
            f.write(pinned[:chunk.numel()].numpy().data)


class ChangedSinceLoaded(Exception):
    """A weight the entry holds was changed in place after the load (a base weight the user trains): the entry
    would store the trained value as the checkpoint's."""


def _owners(model, tensors: dict[str, torch.Tensor]) -> dict[str, weakref.ref]:
    """The parameter or buffer each staged tensor was taken from (the quantization states have none)."""
    held = dict(model.named_parameters(remove_duplicate=False))
    held.update(model.named_buffers(remove_duplicate=False))
    return {name: weakref.ref(held[name]) for name in tensors if name in held}


def _written_since_staged(t: torch.Tensor, version: int, owner: weakref.ref | None) -> bool:
    """True when `t` may hold other values than when it was staged. Its version counter is shared with the
    parameter it was taken from, and stays shared when that parameter is given new data (`p.data = p.data.float()`,
    as LoRA's trainable biases are upcast): a step on the new data bumps it without touching `t`, so a bump counts
    only while the parameter still holds `t`'s memory."""
    if t._version == version:
        return False
    param = owner() if owner is not None else None
    return param is None or param.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def _unchanged_since_staged(tensors: dict[str, torch.Tensor], versions: dict[str, int],
                            owners: dict[str, weakref.ref]) -> None:
    changed = [name for name, t in tensors.items() if _written_since_staged(t, versions[name], owners.get(name))]
    if changed:
        raise ChangedSinceLoaded(f"{changed[0]} was changed after the load (trained in place?)"
                                 + (f" and {len(changed) - 1} more" if len(changed) > 1 else ""))


def start_store_write(store, key: str, source: dict, quant, model, tokenizer) -> threading.Thread:
    """Stage what the entry holds (on this thread), then write and publish it on a writer thread.

    Args:
        store: the fastload Store.
        key: the entry's key.
        source: the entry's source facts (as Store.write records them).
        quant: the QuantSettings the model was quantized with.
        model: the freshly loaded 4-bit model (before LoRA).
        tokenizer: its tokenizer.

    Returns:
        The writer thread (started).
    """
    # a marked temporary folder (fastload.atomic): if this process dies, the next writer's clean-up removes it
    staging = leftover_name(store.entries_dir / f"staged-{key}", "tmp", staging=store.tmp_dir)
    staging.mkdir(parents=True)
    write_marker(staging, "tmp")
    write_config_files(model, staging)
    tokenizer.save_pretrained(staging)
    tensors = tensors_to_save(model)
    versions = {name: t._version for name, t in tensors.items()}  # in-place changes bump them (shared with params)
    owners = _owners(model, tensors)
    ready = None
    if any(t.is_cuda for t in tensors.values()):
        ready = torch.cuda.Event()
        ready.record()  # the writer's side stream waits for the load's last kernels, not for training's

    def save(directory) -> None:
        for f in staging.iterdir():
            if f.name == MARKER:
                continue
            shutil.move(str(f), str(Path(directory) / f.name))
        stream = None
        if ready is not None:
            stream = torch.cuda.Stream()
            stream.wait_event(ready)
        _unchanged_since_staged(tensors, versions, owners)
        write_safetensors(Path(directory) / "model.safetensors", tensors, stream)
        _unchanged_since_staged(tensors, versions, owners)  # a step during the write: published only if none came

    held = HeldWrite()
    with _lock:
        _held.append(held)

    def write() -> None:
        why = held.wait()
        started = time.perf_counter()
        try:
            with store.lock(key):
                if store.lookup(key) is not None:
                    logger.info("store: another process stored %s meanwhile; this copy is not written", key)
                    return
                entry = store.write(key, source, quant, save)
            logger.info("stored the quantized model in %s in the background (%.0f MB, %.1f s, started %s)",
                        entry.path, entry.size_bytes / 1e6, time.perf_counter() - started, why)
        except ChangedSinceLoaded as e:
            logger.info("store: %s; the entry is not written and the next load quantizes again", e)
        except Exception as e:  # noqa: BLE001 - a failed store write must not end the training it runs beside
            logger.warning("the background store write failed; the next load quantizes again: %s", e)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    thread = threading.Thread(target=write, name=f"fastload-store-{key}", daemon=False)
    thread.start()
    _writers.append(thread)
    return thread


def wait_for_store_writes(timeout: float | None = None) -> None:
    """Block until every background store write of this process is done (tests, benchmarks, `fastload quantize`)."""
    release_store_writes()
    for thread in list(_writers):
        thread.join(timeout)
        if not thread.is_alive():
            _writers.remove(thread)
