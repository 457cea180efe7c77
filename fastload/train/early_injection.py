"""peft's injection run on the direct load's skeleton while its readers read a pre-quantized checkpoint.

peft's injection is Python work on the loading thread (0.6-0.9 s for an 8B's 224 layers on the GPU hosts), and it
came after the weights: the readers sat idle while it ran, and the loading thread had waited for them before (the
load's read_wait). Here it runs as soon as the readers start, on the skeleton, whose layers are the ones the loaded
model will have; the tensors read meanwhile queue up (a pre-quantized checkpoint's tensors are the model's own
storage, so reading ahead costs no memory). The adapters stay empty until apply_lora fills them after the load, from
the same generator state as ever: the model is the one the late injection builds, bit for bit
(tests/load/test_early_injection.py).

Only where that is certain: a LoRA fastload builds empty and fills (peft's default init on linear layers, found or
named), a pre-quantized checkpoint with no store entry being written from the model (the entry would save peft's
names), no fused experts, a causal LM, onto a GPU (on the CPU the weights are mapped, not read: there is nothing to
overlap). FASTLOAD_EARLY_LORA=0 turns it off, =1 on the CPU too (the tests' way to compare both on a CPU).
"""

from __future__ import annotations

import time

import torch

from fastload._log import logger
from fastload.load.fast_4bit import InjectionFailed
from fastload.load.phases import add as add_phase
from fastload.settings import env_switch

SWITCH = "FASTLOAD_EARLY_LORA"


class EarlyInjection:
    """The injection for one load: `inject` on the skeleton while the weights are read, `take` by apply_lora."""

    def __init__(self, lora, random_state: int | None):
        self.lora, self.random_state = lora, random_state
        self._done: tuple | None = None  # (skeleton, plan, peft model, predicted adapters)

    def why_not(self, plan, skeleton, device) -> str | None:
        """None when this load's skeleton can take the injection now, else the reason it waits for the weights."""
        from fastload.train.lora import find_expert_parameters

        switch = env_switch(SWITCH)
        if switch is False:
            return f"{SWITCH} turns it off"
        if switch is None and torch.device(device).type == "cpu":
            # the readers map the file instead of reading it: nothing to overlap, and the injection only competes
            # with them for the interpreter (3% slower on a 2-core CI machine); FASTLOAD_EARLY_LORA=1 forces it
            return "on the CPU there is no read to overlap"
        if not plan.prequantized:
            return "the checkpoint is quantized as it is read (reading ahead would hold its 16-bit tensors)"
        if find_expert_parameters(skeleton)[0]:
            return "fused experts are quantized as they arrive"
        named = self.lora.target_modules
        tied = {key.rpartition(".")[0].rpartition(".")[2] for key in getattr(skeleton, "all_tied_weights_keys", None)
                or {}}
        if named and not isinstance(named, str) and tied & set(named):
            return "a target's weight is tied to another, which the load ties after the weights"
        return None

    def inject(self, skeleton, device) -> bool:
        """On the loading thread, right after the readers started: plan and inject the adapters into `skeleton`,
        as apply_lora would after the load; True when they went in. Nothing is drawn from any generator."""
        from fastload.train.adapter_draws import predicted_adapters
        from fastload.train.lora import inject_lora, plan_lora

        try:
            plan = plan_lora(skeleton, self.lora)
        except Exception as e:  # noqa: BLE001 - nothing touched yet: apply_lora raises it after the load
            logger.debug("LoRA injected after the load: %s", e)
            return False
        if not plan.fill_here:  # peft would draw real initial values into meta tensors: left to apply_lora
            logger.debug("LoRA injected after the load: its init is not the one fastload fills")
            return False
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the loaded layers' weights say cuda:0, and so must this
            device = torch.device("cuda", torch.cuda.current_device())
        predicted = [(a, b, device) for a, b, _ in
                     predicted_adapters(skeleton, plan.targets, plan.config.r, plan.config.exclude_modules)]
        skeleton.eval()  # as the late injection finds the loaded model: its own adapters are then in train mode
        skeleton.is_loaded_in_4bit = True  # peft wraps bitsandbytes layers only in a model that says it is 4-bit
        started = time.perf_counter()
        try:
            peft_model = inject_lora(skeleton, plan, sharing=True, phase_name=None)
        except Exception as e:  # peft refused midway: the skeleton may be partly wrapped
            raise InjectionFailed(f"{type(e).__name__}: {e}") from e
        add_phase("lora_peft_overlapped", time.perf_counter() - started)  # recorded only for an injection made
        self._done = (skeleton, plan, peft_model, predicted)
        return True

    def take(self, model):
        """(plan, peft model, predicted adapters) when the injection was made into `model`, else None; once."""
        done, self._done = self._done, None
        if done is None or done[0] is not model:
            return None
        return done[1:]

    def drop(self) -> None:
        """The skeleton was not used (the general path loads the model again): forget the injection."""
        self._done = None
