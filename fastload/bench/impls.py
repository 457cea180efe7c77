"""The implementations compared: each goes from a checkpoint folder to (model, optimizer) ready for a training step.

All of them get the same LoRA (r=16, alpha=16, dropout 0, the seven Llama projections; on a mixture of experts the
attention projections and the fused expert weights), gradient checkpointing and
bitsandbytes AdamW8bit at lr 2e-4 (stepped as each library's user gets it: fastload's get_optimizer for fastload),
so a difference in the numbers is a difference in how they load and train.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = TARGETS[:4]
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers 5's fused 3-D expert weights
MOE_TYPES = ("qwen3_moe", "mixtral", "qwen2_moe")
LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none"}
LR = 2e-4
WEIGHT_DECAY = 0.0  # Trainer's default; bitsandbytes' own default is 0.01
# fastload-no<lever> trains with one engine lever off (fastload-noengine: all off), to measure what each lever gives;
# fastload-graphs turns the opt-in cuda_graphs lever on
ENGINE_VARIANTS = {"fastload-noengine": False, "fastload-nofused": {"fused_loss": False},
                   "fastload-nolora": {"fused_lora": False}, "fastload-noexperts": {"expert_lora": False},
                   "fastload-nooffload": {"offload_checkpointing": False}, "fastload-nokernels": {"kernels": False},
                   "fastload-nohostembed": {"host_embedding": False}, "fastload-graphs": {"cuda_graphs": True}}
# fastload-tritonadam: the default with bitsandbytes' Triton 8-bit update kernel (FASTLOAD_ADAMW8BIT_KERNEL=triton)
# fastload-jitlaunch: every Triton launch through Triton's JIT (FASTLOAD_TRITON_LAUNCH=jit), not the compiled launcher
ENV_VARIANTS = {"fastload-tritonadam": {"FASTLOAD_ADAMW8BIT_KERNEL": "triton"},
                "fastload-jitlaunch": {"FASTLOAD_TRITON_LAUNCH": "jit"}}
# fastload-norouter: the default with MoE routers left to transformers (the kernels lever's Triton router off)
IMPLS = ("fastload", "recipe", "recipe-noupcast", "unsloth", *ENGINE_VARIANTS, *ENV_VARIANTS, "fastload-norouter")
# recipe-noupcast loads exactly like recipe; only its training setup differs, so it has no load measurement
LOADS = ("fastload", "recipe", "unsloth")


def unsloth_importable() -> bool:
    """Whether unsloth is installed, asked without importing it (its import patches transformers)."""
    return importlib.util.find_spec("unsloth") is not None


@dataclass
class Ready:
    model: Any
    optimizer: Any
    from_pretrained_s: float         # the implementation's from_pretrained call, as a user makes it
    ready_s: float                   # from the call to LoRA, checkpointing and optimizer in place
    store_write_s: float | None = None  # fastload: time its first load spent writing the store (in from_pretrained_s)
    source: str = ""                 # where the weights came from

    @property
    def load_s(self) -> float:
        """from_pretrained without fastload's one-time store write, so every implementation is timed alike."""
        return self.from_pretrained_s - (self.store_write_s or 0.0)


def import_libraries(impl: str) -> None:
    """Import what `impl` uses, untimed by the loads; unsloth first, as it asks to be."""
    if impl == "unsloth":
        import unsloth  # noqa: F401
    if impl.startswith("fastload"):  # as FastModel.from_pretrained imports it
        from fastload.load.bitsandbytes_import import import_bitsandbytes

        import_bitsandbytes()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401  (transformers' lazy modules)

    if impl == "fastload":
        import fastload.backends.native  # noqa: F401
        import fastload.facade  # noqa: F401


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def device_map(device: str) -> dict:
    return {"": 0} if device == "cuda" else {"": "cpu"}


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def lora_targets(model_dir: str) -> dict:
    """target_modules (and target_parameters on an MoE, whose MLPs are fused experts, not Linear layers)."""
    import json

    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type in MOE_TYPES:
        return {"target_modules": list(ATTENTION), "target_parameters": list(EXPERTS)}
    return {"target_modules": list(TARGETS)}


def _adamw8bit(model):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)


def timed_store(root: str | Path):
    """A fastload Store that remembers how long writing its entry took (the cost of the first load only)."""
    from fastload.sources.store import Store

    class TimedStore(Store):
        write_s: float | None = None  # a write on the load's own thread: part of from_pretrained's time
        background_write_s: float | None = None  # a write by fastload's background writer: off the critical path

        def write(self, *args, **kwargs):
            import threading

            started = time.perf_counter()
            try:
                return super().write(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - started
                if threading.current_thread() is threading.main_thread():
                    self.write_s = seconds
                else:
                    self.background_write_s = seconds

    return TimedStore(root)


def fastload_ready(model_dir: str, device: str, dtype: str, seq: int, seed: int, store: Any = False,
                   engine: Any = True) -> Ready:
    """FastModel.from_pretrained (quantize, LoRA, checkpointing in one call) + FastModel.get_optimizer."""
    from fastload import FastModel
    from fastload.model_state import state_of

    started = time.perf_counter()
    model, _ = FastModel.from_pretrained(model_dir, max_seq_length=seq, dtype=torch_dtype(dtype),
                                         device_map=device_map(device), lora={**LORA, **lora_targets(model_dir)},
                                         random_state=seed, store=store, engine=engine)
    synchronize(device)
    loaded = time.perf_counter()
    optimizer = FastModel.get_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)
    return Ready(model, optimizer, loaded - started, time.perf_counter() - started,
                 store_write_s=getattr(store, "write_s", None), source=state_of(model).plan.source)


def bnb_nf4_config(dtype: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(dtype))


def recipe_load(model_dir: str, device: str, dtype: str, prequantized_dir: str | None = None):
    """transformers from_pretrained in NF4 + double quant; from a save_pretrained NF4 copy when one is given."""
    from transformers import AutoModelForCausalLM

    if prequantized_dir:
        return AutoModelForCausalLM.from_pretrained(prequantized_dir, dtype=torch_dtype(dtype),
                                                    device_map=device_map(device))
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_nf4_config(dtype),
                                                dtype=torch_dtype(dtype), device_map=device_map(device))


def recipe_ready(model_dir: str, device: str, dtype: str, seq: int, seed: int, prequantized_dir: str | None = None,
                 upcast: bool = True) -> Ready:
    """The plain QLoRA recipe of the peft/bitsandbytes docs; upcast=False skips prepare_model_for_kbit_training's
    fp32 copy of every non-quantized weight (checkpointing and input grads only)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    started = time.perf_counter()
    model = recipe_load(model_dir, device, dtype, prequantized_dir)
    synchronize(device)
    loaded = time.perf_counter()
    model.config.use_cache = False
    if upcast:
        # peft 0.22 renamed the checkpointing options (the old name warns, and goes in 1.2)
        named = "activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in \
            inspect.signature(prepare_model_for_kbit_training).parameters else "gradient_checkpointing_kwargs"
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                **{named: {"use_reentrant": False}})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(**LORA, **lora_targets(model_dir), task_type="CAUSAL_LM"))
    optimizer = _adamw8bit(model)
    synchronize(device)
    return Ready(model, optimizer, loaded - started, time.perf_counter() - started,
                 source="prequantized" if prequantized_dir else "on the fly")


def unsloth_ready(model_dir: str, device: str, dtype: str, seq: int, seed: int,
                  prequantized_dir: str | None = None) -> Ready:
    """unsloth's FastLanguageModel in 4-bit with its own ("unsloth") gradient checkpointing."""
    from unsloth import FastLanguageModel

    started = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(prequantized_dir or model_dir, max_seq_length=seq,
                                                 dtype=torch_dtype(dtype), load_in_4bit=True)
    synchronize(device)
    loaded = time.perf_counter()
    model = FastLanguageModel.get_peft_model(model, **LORA, **lora_targets(model_dir),
                                             use_gradient_checkpointing="unsloth", random_state=seed)
    optimizer = _adamw8bit(model)
    synchronize(device)
    return Ready(model, optimizer, loaded - started, time.perf_counter() - started,
                 source="prequantized" if prequantized_dir else "on the fly")


def ready(impl: str, model_dir: str, device: str, dtype: str, seq: int, seed: int,
          prequantized_dir: str | None = None, fastload_store: Any = False) -> Ready:
    if impl == "fastload":
        return fastload_ready(model_dir, device, dtype, seq, seed, store=fastload_store)
    if impl in ENV_VARIANTS:  # each job is its own worker process: the setting stays with this one
        os.environ.update(ENV_VARIANTS[impl])
        r = fastload_ready(model_dir, device, dtype, seq, seed, store=False)
        import bitsandbytes.functional as F

        if (impl == "fastload-tritonadam" and device == "cuda"
                and getattr(r.optimizer, "_update", None) is F.optimizer_update_8bit_blockwise):
            raise RuntimeError(f"{impl}: bitsandbytes' Triton update kernel does not import here (is triton "
                               "installed?); the row would measure its CUDA kernel")
        return r
    if impl == "fastload-norouter":  # its own worker process: the patch stays with this one
        import fastload.engine.kernels as kernels

        kernels.install_topk_router = lambda model: False
        return fastload_ready(model_dir, device, dtype, seq, seed, store=False)
    if impl in ENGINE_VARIANTS:
        return fastload_ready(model_dir, device, dtype, seq, seed, store=False, engine=ENGINE_VARIANTS[impl])
    if impl in ("recipe", "recipe-noupcast"):
        return recipe_ready(model_dir, device, dtype, seq, seed, prequantized_dir, upcast=impl == "recipe")
    if impl == "unsloth":
        if device != "cuda":
            raise RuntimeError("unsloth runs on CUDA GPUs only; this run is on the CPU")
        return unsloth_ready(model_dir, device, dtype, seq, seed, prequantized_dir)
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")


def save_prequantized(model_dir: str, target: str | Path, device: str, dtype: str) -> float:
    """The recipe's pre-quantized checkpoint: load in NF4, save_pretrained, tokenizer alongside; returns seconds."""
    import shutil

    from fastload.atomic import atomic_folder

    started = time.perf_counter()
    target = Path(target)
    model = recipe_load(model_dir, device, dtype)
    if target.exists():  # an earlier, unrecorded run's folder: replaced, as the benchmark always did
        shutil.rmtree(target)
    with atomic_folder(target, "benchmark checkpoint") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in Path(model_dir).iterdir():
            if f.is_file() and ("token" in f.name or f.name == "special_tokens_map.json"):
                shutil.copy2(f, tmp / f.name)
    return time.perf_counter() - started
