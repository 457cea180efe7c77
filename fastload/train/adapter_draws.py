"""peft's default LoRA init drawn on a thread while peft builds the (empty) adapters.

fastload builds the adapters on the meta device and fills them with the values peft's own init would draw
(fastload.train.lora._fill_like_peft): for an 8B model that is ~56M draws from the CPU generator, ~0.2 s, plus a copy
of each A to the device. peft's injection is Python work on the caller's thread and the generator's draws release
the GIL, so the draws are made beside it, from a copy of the generator's state, for the adapters the model's
structure predicts. The fill uses them only when peft built exactly those adapters, in that order; otherwise it
draws as before. Either way the adapters and the generator's final state are peft's, bit for bit.
"""

from __future__ import annotations

import math
import re
import sys
import threading

import torch

from fastload.shared_setting import SharedSetting
from fastload.structure import is_linear
from fastload.train.lora_targets import find_lora_targets


def predicted_adapters(model, targets: list[str], rank: int, exclude) -> list[tuple]:
    """(A's shape, B's shape, device) of each adapter peft will add, in module order: the linear layers whose leaf
    name is a target, less those `exclude` (peft's exclude_modules: a pattern matched in full, or names) removes."""
    def excluded(name: str) -> bool:
        if isinstance(exclude, str):
            return re.fullmatch(exclude, name) is not None
        return bool(exclude) and any(name == e or name.endswith("." + e) for e in exclude)

    wanted = set(targets)
    return [((rank, m.in_features), (m.out_features, rank), m.weight.device)
            for name, m in model.named_modules()
            if name.rpartition(".")[2] in wanted and is_linear(m) and not excluded(name)]


def all_linear(model, targets, exclude=None) -> bool:
    """Whether the target_modules a user named (leaf names, peft's list matching) adapt linear layers only, as the
    found ones do: then the adapters can be built empty and filled with peft's values (fastload.train.lora). A
    pattern (a string), a dotted name or an exclusion is left to peft's own init, as is any name that also matches
    an embedding or another layer type."""
    if exclude or isinstance(targets, str) or not all(isinstance(t, str) and t.isidentifier() for t in targets):
        return False
    wanted = set(targets)
    matched = [m for name, m in model.named_modules() if name.rpartition(".")[2] in wanted]
    return bool(matched) and all(is_linear(m) for m in matched)


class AdapterDraws:
    """The kept A of each predicted adapter (on its device) and the generator's state after all of them, drawn on a
    thread from `start` (default: the global generator's state at construction). The global generator is not
    touched."""

    def __init__(self, adapters: list[tuple], start: torch.Tensor | None = None):
        self.adapters = adapters
        self._start = torch.get_rng_state() if start is None else start
        # peft's nn.Linear draws in the default dtype of the caller's thread, read here: a load running meanwhile
        # (transformers sets it process-wide while it loads) must not change what this thread draws
        self.dtype = torch.get_default_dtype()
        self._kept: list[torch.Tensor] = []
        self._end = None
        self._thread = threading.Thread(target=self._draw, daemon=True, name="fastload-lora-init")
        self._thread.start()

    def _draw(self) -> None:
        # the short switch interval for as long as the draws run: started beside the weight read, they otherwise
        # waited up to 5 ms for the interpreter after each of their 448 calls (8B) while the reader threads and the
        # loading thread held it, and were still running when the load got to LoRA
        try:
            with sharing_the_interpreter():
                self._kept, self._end = draw_like_peft(self.adapters, self._start, self.dtype)
        except Exception:  # noqa: BLE001 - the fill then draws on the caller's thread, as without this
            self._end = None

    def result(self, built: list[tuple]) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(kept A per adapter, generator state after them) when peft built exactly the predicted adapters, else
        None. Waits for the thread."""
        self._thread.join()
        if self._end is None or built != self.adapters:
            return None
        return self._kept, self._end


class EarlyDraws:
    """The draws started while the weights are read, from the skeleton the direct load built (its linear layers are
    the ones peft will adapt): by the time peft has built the adapters they are long done, instead of being waited
    for after it (0.2-0.6 s of an 8B load). Used only when the adapters and the generator's start state turn out
    to be the ones predicted here (`for_adapters`); otherwise apply_lora draws as without them.

    The start state is the one apply_lora will draw from: a generator seeded with `random_state`, or where none is
    given, the global generator's state now (the load draws nothing from it; any draw in between is caught by the
    comparison)."""

    def __init__(self, lora, random_state: int | None):
        self.lora, self.random_state = lora, random_state
        self.draws: AdapterDraws | None = None

    def start(self, skeleton, device) -> None:
        """Called by the direct load with its skeleton (weights on the meta device) and the device they go to."""
        if isinstance(self.lora.target_modules, str):  # a pattern: peft initialises those adapters itself
            return
        try:
            # the targets apply_lora fills itself: those it finds, or named ones that are all linear layers
            targets = list(self.lora.target_modules or ()) or find_lora_targets(skeleton)
            if self.lora.target_modules and not all_linear(skeleton, targets, self.lora.extra.get("exclude_modules")):
                return
        except Exception:  # noqa: BLE001 - apply_lora says what is wrong, on the loaded model
            return
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the layers' weights say cuda:0, and so must this
            device = torch.device("cuda", torch.cuda.current_device())
        adapters = [(a, b, device) for a, b, _ in
                    predicted_adapters(skeleton, targets, self.lora.r, self.lora.extra.get("exclude_modules"))]
        if self.random_state is None:
            state = torch.get_rng_state()
        else:
            state = torch.Generator().manual_seed(self.random_state).get_state()
        self.draws = AdapterDraws(adapters, state)

    def for_adapters(self, adapters: list[tuple]) -> AdapterDraws | None:
        """The early draws when they are for these adapters, drawn from the global generator's state now."""
        draws = self.draws
        if (draws is None or draws.adapters != adapters or draws.dtype != torch.get_default_dtype()
                or not torch.equal(draws._start, torch.get_rng_state())):
            return None
        return draws


def draw_like_peft(adapters: list[tuple], start_state: torch.Tensor,
                   dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """peft's draws for these adapters from a CPU generator in `start_state`: (kept A on its device per adapter,
    the generator's state after them). nn.Linear's own init of A and B, which peft overwrites, matters only by the
    generator's advance, one draw per element (tests/train/test_lora_identity.py): both go into one reused buffer.
    Every kept A is drawn into one host buffer, moved in one copy where all share a device (one blocking copy per
    adapter made the thread wait on the device 224 times for an 8B model)."""
    gen = torch.Generator()
    gen.set_state(start_state)
    dtype = dtype or torch.get_default_dtype()
    sizes = [math.prod(a_shape) for a_shape, _, _ in adapters]
    kept = torch.empty(sum(sizes), dtype=dtype)
    scratch = torch.empty(max((n + math.prod(b) for n, (_, b, _) in zip(sizes, adapters)), default=0), dtype=dtype)
    for (a_shape, b_shape, _), part in zip(adapters, kept.split(sizes)):
        scratch[:part.numel() + math.prod(b_shape)].uniform_(generator=gen)
        bound = kaiming_bound(a_shape[1])
        part.uniform_(-bound, bound, generator=gen)
    devices = {device for _, _, device in adapters}
    if len(devices) == 1 and devices != {torch.device("cpu")}:
        kept = kept.to(devices.pop())
        values = [part.view(a_shape).clone() for (a_shape, _, _), part in zip(adapters, kept.split(sizes))]
    else:
        values = [part.view(a_shape).to(device, copy=True)
                  for (a_shape, _, device), part in zip(adapters, kept.split(sizes))]
    return values, gen.get_state()


def kaiming_bound(fan_in: int) -> float:
    """The bound of torch.nn.init.kaiming_uniform_(a=math.sqrt(5)), peft's init of A, in the same arithmetic:
    written out because transformers' no_init_weights (on while peft builds the adapters, beside this thread) swaps
    torch.nn.init's functions for no-ops process-wide."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))  # calculate_gain("leaky_relu", sqrt(5))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _shorten_switch_interval() -> float:
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, 0.0005))
    return before


_SHORT_SWITCH = SharedSetting(_shorten_switch_interval, sys.setswitchinterval)


def sharing_the_interpreter():
    """While the draws run beside peft's injection (pure Python on the caller's thread), hand the interpreter lock
    over every 0.5 ms instead of every 5: the drawing thread needs it back after each draw, and waited up to a full
    switch interval each time (0.9 s of waits measured for an 8B model's 448 draws on an H200 host). Loads on
    several threads share the change; the last one out restores the interval, also on errors."""
    return _SHORT_SWITCH.held()
