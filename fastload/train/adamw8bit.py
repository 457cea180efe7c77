"""bitsandbytes' AdamW8bit with the host work of a step made small: no device synchronization per parameter, and
one update launch per pack of LoRA matrices (up to 16M values: one on Llama-3 1B, three on 8B) instead of one each;
matrices of a million values or more (stacked expert adapters, high-rank LoRA on wide layers) keep a launch of their
own, on their own state.

bitsandbytes' `step()` waits for the device after each parameter's update (its paged optimizers need that order for
their prefetches), and each update costs Python and a launch on the host. A LoRA model has hundreds of small
parameters (224 for Llama-3 1B at 7 projections), so that per-parameter work dominates the optimizer's step even
without the synchronizations (measured: benchmarks/README.md). bitsandbytes keeps 8-bit state in blocks of 256
values, so parameters whose sizes are multiples of 256 (every LoRA matrix of a usual shape) can live side by side in
one flat state without a block straddling two of them: here their gradients and values are gathered into flat
buffers and updated by one launch of bitsandbytes' own kernel over flat state that each parameter's state entries
are views of. The arithmetic is bitsandbytes', bit for bit; `state_dict()` keeps one entry per parameter.

Paged optimizers and calls made on another CUDA stream (the kernels launch on the default stream, ordered only by
the synchronization) get bitsandbytes' own step, synchronization included. Parameters that are small, fp16/bf16,
non-contiguous (or whose state is), of other sizes or with per-parameter overrides, and pack members without a
gradient this step, are updated one by one by bitsandbytes' update (without the synchronization); members whose step
counts went apart are regrouped by step count.
FASTLOAD_ADAMW8BIT_KERNEL=triton gives the packs (those of one large matrix included) bitsandbytes' Triton update
kernel instead of its CUDA one; the parameters updated one by one keep the CUDA kernel (an experiment: see
`cuda_update_kernel`).
As with torch's optimizers, the updates may still be running when `step()` returns: work on the default stream sees
them in order; code that reads the parameters from another stream waits for it first (`wait_stream`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import bitsandbytes.functional as F
import torch
from bitsandbytes.optim import AdamW8bit

BLOCK = 256  # values per absmax block of bitsandbytes' blockwise 8-bit optimizer state (CPU and CUDA kernels)
PACK_VALUES = 1 << 24  # at most 64 MiB of fp32 per pack: a step gathers values and gradients in that much, twice
ALONE_VALUES = 1 << 20  # a parameter this large gets its own launch: gathering and scattering it (24 bytes a value,
                        # ~10 us a million on an H100) costs about what the launch it would share costs the host;
                        # stacked expert adapters (Qwen3-MoE's: 3-4M values each, 107M in all, 1.3 ms a step) and
                        # r=128 on 8B's 14,336-wide MLP (1.8M) reach it


@dataclass
class _Pack:
    """Parameters of one group and device updated as one flat vector; their state entries are views of these."""

    members: list
    indices: list  # the members' indices in their group (bitsandbytes' get_config and overrides use them)
    sizes: list
    state1: torch.Tensor
    state2: torch.Tensor
    absmax1: torch.Tensor
    absmax2: torch.Tensor
    views: list  # each member's state["state1"]: replaced (load_state_dict, a user) means the pack is stale


class AdamW8bitNoSync(AdamW8bit):
    """`bitsandbytes.optim.AdamW8bit` whose step neither waits for the device between parameters nor launches one
    update per LoRA matrix. Same state, kernels and results (with FASTLOAD_ADAMW8BIT_KERNEL=triton: bitsandbytes'
    Triton kernel for the packs on CUDA, its results within a state code's rounding for finite gradients).

    full_precision: parameters given 32-bit state (a trained embedding, as transformers' adamw_8bit does), set on
    this optimizer alone: bitsandbytes' GlobalOptimManager would keep the module alive and, being global, hand
    the setting to the same-numbered parameter of every optimizer made after it."""

    def __init__(self, params, *args, full_precision=(), **kwargs):
        self._full_precision = {id(p) for p in full_precision}
        self._update = cuda_update_kernel()
        super().__init__(params, *args, **kwargs)

    def get_config(self, gindex, pindex, group):
        config = super().get_config(gindex, pindex, group)
        if id(group["params"][pindex]) in self._full_precision:
            config["optim_bits"] = 32
        return config

    def load_state_dict(self, state_dict):
        """Also a state saved with other empty parameter groups: transformers' optimizer always has a no-decay
        group (often empty), fastload's had one group before it grouped like transformers."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            ours = [g for g in self.param_groups if g["params"]]
            theirs = [g for g in saved if g["params"]]
            if [len(g["params"]) for g in ours] == [len(g["params"]) for g in theirs]:
                state_dict = {**state_dict, "param_groups": theirs}
                self.param_groups = ours
        return super().load_state_dict(state_dict)

    def step(self, closure=None):
        if self.is_paged or not self._ordered_by_default_stream():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:  # what bitsandbytes' step does first
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None and not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
            done = set()
            for pack in self._packs(gindex, group):
                if self._update_pack(gindex, group, pack):
                    done.update(id(p) for p in pack.members)
            for pindex, p in enumerate(group["params"]):
                if p.grad is not None and id(p) not in done:
                    self.update_step(group, p, gindex, pindex)
        return loss

    def _ordered_by_default_stream(self) -> bool:
        """bitsandbytes launches its CUDA update kernels on the legacy default stream: work the caller queued on
        another stream is ordered before them only by the synchronization. (Other accelerators keep it too.)"""
        devices = {p.device for group in self.param_groups for p in group["params"]}
        return all(d.type == "cpu"
                   or (d.type == "cuda" and torch.cuda.current_stream(d) == torch.cuda.default_stream(d))
                   for d in devices)

    # -- packing -----------------------------------------------------------------------------------------------

    def _packs(self, gindex: int, group: dict) -> list:
        cache = self.__dict__.setdefault("_pack_cache", {})
        params = group["params"]
        key = (tuple(map(id, params)), sum(1 for p in params if self.state[p]))  # params, and how many have state
        packs = cache.get(gindex)
        if packs is None or packs[0] != key or not all(self._intact(pack) for pack in packs[1]):
            packs = cache[gindex] = (key, self._build_packs(gindex, group))
        return packs[1]

    def _intact(self, pack: _Pack) -> bool:
        """The members' state is still the pack's, and their step counts agree (a missed gradient sets one apart:
        the pack is then regrouped by step count)."""
        return (len({self.state[p]["step"] for p in pack.members}) == 1
                and all(self.state[p].get("state1") is view for p, view in zip(pack.members, pack.views)))

    def _overridden(self, gindex: int, pindex: int, p) -> bool:
        """bitsandbytes reads per-parameter overrides (GlobalOptimManager.override_config) at every step; this
        optimizer's own 32-bit parameters (full_precision) take bitsandbytes' path too."""
        return ((gindex, pindex) in self.mng.index2config or id(p) in self.mng.pid2config
                or id(p) in self._full_precision)

    def _packable(self, gindex: int, pindex: int, p) -> bool:
        state = self.state[p]
        return (bool(state) and state["state1"].dtype == torch.uint8 and p.dtype == torch.float32
                and p.is_contiguous() and p.numel() % BLOCK == 0 and "unorm_vec" not in state
                and not self._overridden(gindex, pindex, p))

    @torch.no_grad()
    def _build_packs(self, gindex: int, group: dict) -> list:
        together: dict = {}  # members of a pack share a device and a step count
        alone = []  # large matrices: a pack of one, updated where they are
        for pindex, p in enumerate(group["params"]):
            if self._packable(gindex, pindex, p):
                if p.numel() >= ALONE_VALUES:  # updated on its own state, which must then be flat
                    if not all(self.state[p][k].is_contiguous() for k in ("state1", "state2")):
                        continue  # (state made while the parameter was strided: bitsandbytes' update takes it)
                    alone.append([(pindex, p)])
                else:
                    together.setdefault((p.device, self.state[p]["step"]), []).append((pindex, p))
        packs = []
        for indexed in [c for alike in together.values() for c in _chunks(alike) if len(c) >= 2] + alone:
            members = [p for _, p in indexed]
            states = [self.state[p] for p in members]
            sizes = [p.numel() for p in members]
            if len(members) == 1:  # its own state, flat views of it
                flat = {name: states[0][name].view(-1) for name in ("state1", "state2", "absmax1", "absmax2")}
            else:
                flat = {name: torch.cat([s[name].reshape(-1) for s in states])
                        for name in ("state1", "state2", "absmax1", "absmax2")}
                offset = block = 0
                for state, n in zip(states, sizes):  # each entry becomes a view of the flat state, same values
                    for name in ("state1", "state2"):
                        state[name] = flat[name][offset:offset + n].view(state[name].shape)
                    for name in ("absmax1", "absmax2"):
                        state[name] = flat[name][block:block + n // BLOCK]
                    offset, block = offset + n, block + n // BLOCK
            packs.append(_Pack(members, [i for i, _ in indexed], sizes, flat["state1"], flat["state2"],
                               flat["absmax1"], flat["absmax2"], [s["state1"] for s in states]))
        return packs

    @torch.no_grad()
    def _update_pack(self, gindex: int, group: dict, pack: _Pack) -> bool:
        """One bitsandbytes update over the pack; False (nothing done) where a member must go on its own."""
        grads = [p.grad for p in pack.members]
        if (any(g is None or g.dtype != torch.float32 or not g.is_contiguous() for g in grads)
                or not all(p.is_contiguous() and p.dtype == torch.float32 and p.numel() == n
                           and p.device == pack.state1.device for p, n in zip(pack.members, pack.sizes))
                or ((self.mng.index2config or self.mng.pid2config)
                    and any(self._overridden(gindex, i, p) for i, p in zip(pack.indices, pack.members)))):
            return False  # each member goes through bitsandbytes' own update this step
        first = pack.members[0]
        config = self.get_config(gindex, pack.indices[0], group)
        step = self.state[first]["step"] + 1  # the same for every member (_intact)
        for p in pack.members:
            self.state[p]["step"] = step
        alone = len(pack.members) == 1
        values = first.view(-1) if alone else torch.cat([p.reshape(-1) for p in pack.members])
        grad = grads[0].view(-1) if alone else torch.cat([g.reshape(-1) for g in grads])
        betas = config["betas"]
        update = (self._update if values.is_cuda and not config["skip_zeros"]
                  and values.device.index == torch.cuda.current_device() else F.optimizer_update_8bit_blockwise)
        update(self.optimizer_name, grad, values, pack.state1, pack.state2, betas[0], betas[1],
               betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0), config["eps"], step, config["lr"],
               self.state[first]["qmap1"], self.state[first]["qmap2"], pack.absmax1, pack.absmax2,
               config["weight_decay"], 1.0, config["skip_zeros"])
        if not alone:
            torch._foreach_copy_([p.view(-1) for p in pack.members], list(values.split(pack.sizes)))
        return True


def cuda_update_kernel():
    """bitsandbytes' 8-bit blockwise update for CUDA tensors: its CUDA kernel, or its Triton one (written for Intel
    GPUs, the same update with the arithmetic ordered otherwise; it launches on the current device, so parameters on
    another take the CUDA kernel) where FASTLOAD_ADAMW8BIT_KERNEL=triton asks for it. An experiment: 2.1-2.2x the
    CUDA kernel's speed on an H100 with the same state codes (benchmarks/adamw8bit_kernels.py), but it lacks the
    CUDA kernel's guard for non-finite gradients (which keeps such a value's parameter and zeroes its state): a NaN
    or Inf gradient value turns its whole 256-value block's state and then parameters into NaN."""
    if os.environ.get("FASTLOAD_ADAMW8BIT_KERNEL", "").lower() == "triton":
        try:
            from bitsandbytes.backends.triton import kernels_optim
        except ImportError as error:  # no triton: the CUDA kernel, said once per optimizer
            from fastload._log import logger

            logger.warning("FASTLOAD_ADAMW8BIT_KERNEL=triton: bitsandbytes' Triton kernels do not import here (%s); "
                           "the 8-bit updates use its CUDA kernel", error)
            return F.optimizer_update_8bit_blockwise
        return kernels_optim.optimizer_update_8bit_blockwise_impl
    return F.optimizer_update_8bit_blockwise


def _chunks(indexed: list) -> list:
    """Consecutive runs of (index, parameter) of at most PACK_VALUES values (a larger parameter alone)."""
    chunks, size = [[]], 0
    for pindex, p in indexed:
        if chunks[-1] and size + p.numel() > PACK_VALUES:
            chunks.append([])
            size = 0
        chunks[-1].append((pindex, p))
        size += p.numel()
    return chunks
