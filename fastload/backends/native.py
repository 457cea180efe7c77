"""The native backend: transformers + bitsandbytes + peft, on CPU and CUDA."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import replace
from pathlib import Path

from fastload._log import logger
from fastload.errors import FastloadError
from fastload.load.loader import load_tokenizer, load_weights, materialize_gguf
from fastload.load.phases import add as add_phase
from fastload.load.phases import phase
from fastload.model_state import state_of
from fastload.sources import plan as P
from fastload.train.adapter_draws import EarlyDraws
from fastload.train.checkpointing import enable_checkpointing
from fastload.train.early_injection import EarlyInjection

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def tokenizer_source(plan):
    """Where the tokenizer is read from: a store entry keeps a copy made when it was stored, and its key covers only
    config and weights, so a local source folder's own tokenizer files win: edits to its chat template or special
    tokens after the first load are seen. A hub snapshot or GGUF source is keyed by its commit or bytes already."""
    original = Path(plan.original) if plan.source == P.STORE and plan.original else None
    if original is not None and original.is_dir() and any((original / name).is_file() for name in TOKENIZER_FILES):
        return replace(plan, source=P.LOCAL, location=str(original))
    return plan


def requantize_plan(plan, opts, store):
    """The plan that loads a store entry's 16-bit source again (the entry itself gone), as the user's name."""
    from dataclasses import asdict

    from fastload.sources.resolve import resolve

    fresh = resolve(plan.original, revision=plan.revision, cache_dir=opts.cache_dir,
                    local_files_only=opts.local_files_only, store=store, allow_pickle=opts.allow_pickle,
                    quantization_config=asdict(plan.quant))
    return replace(fresh, name=plan.name, adapter=plan.adapter)


class TokenizerLoad:
    """The tokenizer read on its own thread while the weights are read and quantized, when its files are in a local
    folder. start() is called by the direct load once the model's classes are imported: transformers' lazy imports
    are not safe from two threads at once. result() gives the tokenizer, or raises what loading it raised (the same
    fastload error as before); a load that never called start() reads it then, on the caller's thread."""

    def __init__(self, plan, opts):
        self.plan, self.opts = plan, opts
        self._value = self._error = None
        self._seconds = 0.0
        self._thread = None

    def start(self) -> None:
        if self._thread is not None or not Path(self.plan.location).is_dir() or self.plan.will_download:
            return
        from transformers import AutoTokenizer, GenerationConfig  # noqa: F401 - imported here, on the caller's thread

        self._thread = threading.Thread(target=self._run, daemon=True, name="fastload-tokenizer")
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self._value = load_tokenizer(self.plan, self.opts)
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread by result()
            self._error = e
        self._seconds = time.perf_counter() - started

    def result(self):
        if self._thread is None:
            with phase("tokenizer"):
                return load_tokenizer(self.plan, self.opts)
        with phase("tokenizer_wait"):
            self._thread.join()
        add_phase("tokenizer_overlapped", self._seconds)
        if self._error is not None:
            raise self._error
        return self._value


class NativeBackend:
    name = "native"

    def load(self, plan, opts, store, lora, gradient_checkpointing, random_state):
        early = EarlyDraws(lora, random_state) if lora is not None and not plan.adapter else None
        hook = early.start if early is not None else None
        # not where a store entry is written from the loaded model: it would be saved with peft's names
        injection = EarlyInjection(lora, random_state) if early is not None else None
        if plan.store_key and store is not None and not plan.prequantized:
            with store.lock(plan.store_key):
                entry = store.lookup(plan.store_key)  # another process may have stored it while we waited
                if entry is not None:
                    from dataclasses import replace

                    logger.info("store: another process stored %s while this one waited", entry.path.name)
                    plan = replace(plan, source=P.STORE, location=str(entry.path), prequantized=True,
                                   reason="stored by another process while this one waited")
                    model, tokenizer = self._load(plan, opts, store, hook)
                else:
                    model, tokenizer = self._load(plan, opts, store, hook)
                    with phase("store_write"):
                        self._store(plan, opts, model, tokenizer, store)
        elif plan.source == P.STORE and store is not None:
            model, tokenizer = self._load_stored(plan, opts, store, lora, gradient_checkpointing, random_state, hook,
                                                 injection)
            if model is None:  # the entry was damaged: discarded and loaded again from its source
                return tokenizer
        else:
            model, tokenizer = self._load(plan, opts, store, hook, injection)
        from fastload.load.experts import settle_experts
        from fastload.load.linear_coverage import note_unquantized_linears

        with phase("experts"):  # after the store entry is staged: the store keeps the 16-bit experts
            settle_experts(model, plan.quant.quantize_experts, model.dtype)
        note_unquantized_linears(model, plan.quant.load_in_4bit or plan.quant.load_in_8bit)
        if plan.adapter:
            from fastload.save.adapters import load_adapter

            if lora is not None and lora != type(lora)():
                logger.info("the adapter's own settings are used (lora=... applies to new adapters only)")
            model = load_adapter(model, plan.adapter)
            tokenizer = self._adapter_tokenizer(plan, opts) or tokenizer
        elif lora is not None:
            from fastload.train.lora import apply_lora

            with phase("lora"):
                model = apply_lora(model, lora, random_state, early, injection)
        if getattr(model, "peft_config", None):
            from fastload.save.adapters import name_base_model

            name_base_model(model, plan)  # adapter_config.json then names the 16-bit source, findable later
        elif getattr(model, "is_quantized", False):
            # quantized weights cannot train; the 16-bit rest alone is not what a QLoRA user wants to update
            model.requires_grad_(False)
            logger.info("no LoRA: every parameter frozen; add adapters with FastModel.get_peft_model(model)")
        if gradient_checkpointing:
            with phase("checkpointing"):
                on = enable_checkpointing(model)
            if on:
                logger.info("gradient checkpointing: on (non-reentrant, input grads enabled, use_cache off)")
        elif any(p.requires_grad for p in model.parameters()):
            # stated, not "as asked": the CLI's generate/merge/quantize load with it off on their own
            logger.info("gradient checkpointing: off (gradient_checkpointing=False: every layer's activations stay in "
                        "memory while training)")
        return model, tokenizer

    def _load_stored(self, plan, opts, store, lora, gradient_checkpointing, random_state, hook, injection=None):
        """A store entry whose damage no check caught (the sampled hash reads a few MiB) can still fail to load: it
        is discarded and the model loaded from its source, quantized and stored again, instead of every later load
        failing on it. Returns (model, tokenizer), or (None, what load returned) after such a rebuild."""
        from fastload.errors import CheckpointError

        try:
            return self._load(plan, opts, store, hook, injection)
        except CheckpointError as e:
            if not plan.original or not plan.store_key:
                raise
            logger.warning("store entry %s does not load (%s): discarded; loading %s again", Path(plan.location).name,
                           e.found or str(e), plan.original)  # text: a kept record must not hold the frames
            store.remove(plan.store_key)
            fresh = requantize_plan(plan, opts, store)
            if fresh.source == P.STORE:
                raise
        # outside the except block: its traceback holds the failed load's frames and what they built, and the
        # collector is paused during a load; collected before the source is read again
        gc.collect()
        return None, self.load(fresh, opts, store, lora, gradient_checkpointing, random_state)

    def _load(self, plan, opts, store, skeleton_hook=None, injection=None):
        if plan.gguf_file:
            plan = materialize_gguf(plan, store.root if store is not None else None)
        started = time.perf_counter()
        tokenizer = TokenizerLoad(tokenizer_source(plan), opts)
        model, dtype, device = load_weights(plan, opts, before_reading=tokenizer.start, skeleton_hook=skeleton_hook,
                                            injection=injection)
        what = "loaded pre-quantized" if plan.prequantized else f"quantized on the fly ({plan.quant.describe()})"
        logger.info("%s in %.1f s; compute dtype %s on %s", what, time.perf_counter() - started,
                    str(dtype).replace("torch.", ""), device)
        tokenizer = tokenizer.result()
        state_of(model).quantized_now = not plan.prequantized and plan.quant.quantized
        return model, tokenizer

    def _adapter_tokenizer(self, plan, opts):
        """The tokenizer saved next to the adapter (it may carry a changed chat template or pad token)."""
        from dataclasses import replace
        from pathlib import Path

        if not (Path(plan.adapter) / "tokenizer_config.json").is_file():
            return None
        return load_tokenizer(replace(plan, source=P.LOCAL, location=plan.adapter), opts)

    def _store(self, plan, opts, model, tokenizer, store):
        from fastload.load.task import loads_back

        if not loads_back(model.config, opts.task):
            logger.info("store: %s's config (%s) does not load back as this model in transformers: not stored, the "
                        "next load quantizes again", type(model).__name__, model.config.model_type)
            return
        started = time.perf_counter()
        key = plan.store_key
        if plan.source == P.HUB_DOWNLOAD:  # downloaded just now: keyed by the commit, as the next load looks it up
            from fastload.sources.hub import hub_cache_dir
            from fastload.sources.resolve import store_key_of

            key = store_key_of(plan.original, plan.revision, plan.quant, hub_cache_dir(opts.cache_dir))
        source = {"id": plan.original or plan.location, "revision": plan.revision, "location": plan.location,
                  "fingerprint": plan.fingerprint}

        from fastload.load.background_store import start_store_write, wants_background

        if wants_background(model, next(model.parameters()).device):
            start_store_write(store, key, source, plan.quant, model, tokenizer)
            logger.info("store: writing the quantized model in the background (the load does not wait for it)")
            return

        def save(directory):
            model.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)

        try:
            entry = store.write(key, source, plan.quant, save)
        except (FastloadError, OSError):  # a full disk, a read-only store: said as fastload's errors say them
            raise
        except Exception as e:  # noqa: BLE001 - transformers cannot save this model's quantized form: the load stands
            logger.warning("could not store the quantized model (%s: %s in save_pretrained); the model is loaded, "
                           "and the next load quantizes again (store=False skips the attempt)",
                           type(e).__name__, (str(e).splitlines() or [""])[0][:200])
            return
        logger.info("stored the quantized model in %s (%.0f MB, %.1f s): the next load skips quantization",
                    entry.path, entry.size_bytes / 1e6, time.perf_counter() - started)
