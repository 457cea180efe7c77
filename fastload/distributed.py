"""Several processes, one model each, under the launcher users already have (torchrun, accelerate launch).

fastload runs no engine of its own: DDP and FSDP2 are PyTorch's, driven by transformers' Trainer / accelerate. What
fastload adds is what a launched process must get right before training starts: its own device (cuda:LOCAL_RANK),
rank 0 alone writing the store while the other ranks wait and then read the whole entry, every rank told when any
rank failed (the same error everywhere, no rank left waiting in a collective), and logs and saves from rank 0 only.

The coordination runs on a gloo group of its own (CPU objects, its own timeout), beside the training backend's
group, so it works the same on CPUs and GPUs.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fastload._log import logger
from fastload.errors import InvalidOption, RankFailed

T = TypeVar("T")
TIMEOUT_ENV = "FASTLOAD_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600  # ranks wait this long for rank 0's load: quantizing a 70B and storing it takes minutes
FSDP_ENV_TRUE = ("1", "true", "yes")
LAUNCH_FIX = "launch with torchrun or accelerate launch, which set RANK, LOCAL_RANK and WORLD_SIZE"
_state: dict = {}  # the coordination group, made once per process


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process (torchrun and accelerate launch set the same variables)."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidOption(f"{name}={value!r} in the environment", found="the launcher's variable is not a number",
                            fix=LAUNCH_FIX) from None


def current_launch() -> Launch | None:
    """The launch this process is part of, or None when it runs alone (no WORLD_SIZE, or WORLD_SIZE=1)."""
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return None
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None:
        raise InvalidOption(f"WORLD_SIZE={world} in the environment", found="RANK is not set", fix=LAUNCH_FIX)
    return Launch(rank=rank, local_rank=rank if local is None else local, world_size=world)


def is_main_process() -> bool:
    """True outside a launch and on rank 0: the process that logs, saves and writes the store."""
    launch = current_launch()
    return launch is None or launch.is_main


def fsdp_from_launcher() -> bool:
    """accelerate launch --use_fsdp (or an FSDP accelerate config) tells its processes so through the environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in FSDP_ENV_TRUE


def rank_device(launch: Launch) -> str:
    """cuda:LOCAL_RANK where there are GPUs, else the CPU (gloo processes on one machine)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if launch.local_rank >= torch.cuda.device_count():
        from fastload.errors import DeviceUnavailable

        raise DeviceUnavailable(f"rank {launch.rank} (LOCAL_RANK={launch.local_rank}) needs a GPU of its own",
                                found=f"this machine shows {torch.cuda.device_count()} GPU(s)",
                                fix="launch at most as many processes per machine as it has GPUs "
                                    "(torchrun --nproc-per-node N)")
    return f"cuda:{launch.local_rank}"


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise InvalidOption(f"{TIMEOUT_ENV}={value!r}", found="it is not a positive number of seconds",
                            fix=f"set it to e.g. {DEFAULT_TIMEOUT_S}, or unset it")
    return seconds


def set_up(launch: Launch) -> None:
    """Join the launch: this rank's GPU becomes the current one, the process group exists (nccl on GPUs, gloo on
    CPUs, unless the user or accelerate made one first), a gloo group carries fastload's own coordination, and the
    ranks other than 0 keep their INFO lines to themselves."""
    import torch
    import torch.distributed as dist

    if _state.get("launch") == launch:
        return
    device = rank_device(launch)
    if device.startswith("cuda"):
        torch.cuda.set_device(launch.local_rank)
    timeout = datetime.timedelta(seconds=timeout_seconds())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    _state["group"] = dist.new_group(backend="gloo", timeout=timeout)
    _state["launch"] = launch
    if not launch.is_main:
        logger.addFilter(_rank_zero_only)
    logger.info("launched: %d processes; this is rank %d on %s%s", launch.world_size, launch.rank, device,
                " (FSDP asked by the launcher)" if fsdp_from_launcher() else "")


def _rank_zero_only(record: logging.LogRecord) -> bool:
    """Other ranks keep warnings and errors (a rank-local problem must be seen), not the decision lines."""
    return record.levelno >= logging.WARNING


def _gather_errors(error: BaseException | None) -> list[str | None]:
    """Every rank's failure (its message) or None, in rank order; a collective: every rank must call it."""
    import torch.distributed as dist

    text = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, text, group=_state["group"])
    return gathered


def _raise_if_any_failed(what: str, errors: list[str | None], own: BaseException | None) -> None:
    """The failed rank re-raises its own error; every other rank raises RankFailed quoting the first failure."""
    if own is not None:
        raise own
    failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
    if failed:
        rank, text = failed[0]
        raise RankFailed(f"{what} (on every rank of the launch)", found=f"rank {rank} failed: {text}",
                         fix=f"fix what rank {rank} reports; every rank stops so that none waits forever in a "
                             "collective")


def _attempt(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - reported to every rank, then raised here again unchanged
        return None, e


def rank_zero_first(what: str, fn: Callable[[], T]) -> T:
    """Run fn on rank 0, then on the other ranks (which find what rank 0 stored); alone, just run it.

    Args:
        what: what fn does, for the error the other ranks raise ("Loading 'org/model'").
        fn: the step; it returns this rank's result.
    Returns:
        fn's result on this rank.
    Raises:
        RankFailed: another rank's fn failed (this rank's own error is raised unchanged).
    """
    launch = _state.get("launch")
    if launch is None:
        return fn()
    result, error = _attempt(fn) if launch.is_main else (None, None)
    _raise_if_any_failed(what, _gather_errors(error), error)
    if not launch.is_main:
        result, error = _attempt(fn)
    _raise_if_any_failed(what, _gather_errors(error), error)
    return result


def on_every_rank(what: str, fn: Callable[[], T]) -> T:
    """Run fn on every rank at once; if any rank fails, every rank raises (see rank_zero_first)."""
    launch = _state.get("launch")
    if launch is None:
        return fn()
    result, error = _attempt(fn)
    _raise_if_any_failed(what, _gather_errors(error), error)
    return result


def launched() -> Launch | None:
    """The launch this process joined with set_up, or None."""
    return _state.get("launch")


def launch_advice(visible_gpus: int, launch: Launch | None) -> str | None:
    """What to tell a user who runs one process on a machine with several GPUs (only GPU 0 would work), or None."""
    if launch is not None or visible_gpus < 2:
        return None
    return (f"{visible_gpus} GPUs are visible but this process was not launched for several: it uses GPU 0 only. "
            f"To train on all of them: torchrun --nproc-per-node {visible_gpus} your_script.py (or accelerate launch "
            f"--num_processes {visible_gpus} your_script.py; `fastload train` the same way: torchrun "
            f"--nproc-per-node {visible_gpus} -m fastload.cli train ...). To keep one GPU and silence this: "
            "CUDA_VISIBLE_DEVICES=0")


def warn_if_unlaunched() -> None:
    """Say how to launch when several GPUs are visible to a process that runs alone (once per process)."""
    import torch

    if _state.get("advised") or not torch.cuda.is_available():
        return
    advice = launch_advice(torch.cuda.device_count(), current_launch())
    if advice:
        _state["advised"] = True
        logger.warning(advice)


def barrier(what: str) -> None:
    """Wait for every rank (on fastload's gloo group, with its timeout); alone, return at once."""
    if _state.get("launch") is None:
        return
    on_every_rank(what, lambda: None)


def check_fsdp_storage(storage: str, compute: str) -> None:
    """FSDP shards a 4-bit layer's packed weight like any parameter only when it is stored in the compute dtype."""
    if storage != compute:
        raise InvalidOption(f"fsdp=True with bnb_4bit_quant_storage={storage!r}",
                            found=f"FSDP needs the packed 4-bit weights stored in the compute dtype ({compute}) to "
                                  "shard them with the other parameters",
                            fix=f"leave bnb_4bit_quant_storage unset (fastload sets {compute!r} under FSDP), or "
                                f"pass bnb_4bit_quant_storage={compute!r}")



def join_launch(device_map):
    """The device map of this process: under a launch, its own device (set_up first); alone, as given (with advice
    when several GPUs are visible).

    Args:
        device_map: from_pretrained's device_map (None and "auto" mean: choose).
    Returns:
        The device map to load with.
    """
    launch = current_launch()
    if launch is None:
        if device_map is None:
            warn_if_unlaunched()
        return device_map
    set_up(launch)
    own = rank_device(launch)
    if device_map is None or device_map == "auto":
        if device_map == "auto":
            logger.info("device_map='auto' under a launch: each rank holds its whole model on %s (data parallel)", own)
        return own
    return device_map


def store_writes_on_rank_zero(plan):
    """The plan as this rank runs it: ranks other than 0 never write the store. They load after rank 0, so they
    find its entry; if rank 0 stored nothing (store=False, a failed write), they quantize for themselves only."""
    launch = launched()
    if launch is None or launch.is_main or not plan.store_key or plan.prequantized:
        return plan
    from dataclasses import replace

    logger.warning("rank %d: no store entry from rank 0; quantizing here without storing", launch.rank)
    return replace(plan, store_key=None)


def finish_store_writes() -> None:
    """Rank 0's store entry must be whole before the other ranks look for it: wait for a background write."""
    if launched() is None:
        return
    from fastload.load.background_store import wait_for_store_writes

    wait_for_store_writes()


def rank_zero_only(what: str, fn: Callable[[], T]) -> T | None:
    """Run fn on rank 0 only (a save, a log of results); the other ranks wait for it and learn if it failed.

    Returns:
        fn's result on rank 0, None elsewhere.
    Raises:
        RankFailed: on the other ranks, when rank 0's fn failed (rank 0 raises its own error).
    """
    launch = _state.get("launch")
    if launch is None:
        return fn()
    result, error = _attempt(fn) if launch.is_main else (None, None)
    _raise_if_any_failed(what, _gather_errors(error), error)
    return result
