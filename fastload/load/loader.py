"""Reads a LoadPlan into a transformers model and tokenizer: quantizing on the fly or loading as stored."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fastload._log import logger
from fastload.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointIncomplete,
    FastloadError,
    GatedModel,
    InvalidOption,
    ModelNotFound,
    NotEnoughMemory,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
)
from fastload.load.devices import (
    check_dtype_supported,
    choose_compute_dtype,
    main_device,
    release_cached_memory,
    resolve_device_map,
    use_expandable_segments,
)
from fastload.load.phases import phase
from fastload.load.reads_in_turn import reads_in_turn
from fastload.load.transformers_floor import check_transformers_floor
from fastload.model_state import state_of
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH, dtype_name
from fastload.sources import plan as P
from fastload.sources.hub import cached_snapshot, check_reachable, hub_cache_dir, hub_kwargs, hub_stays_local
from fastload.sources.plan import LoadPlan


@dataclass
class LoadOptions:
    max_seq_length: int | None = None  # None: DEFAULT_MAX_SEQ_LENGTH, capped at the model's positions
    dtype: Any = None
    device_map: Any = None
    token: str | bool | None = None
    cache_dir: str | None = None
    local_files_only: bool | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None/"auto": the best the architecture runs here (load.attention.choice)
    allow_pickle: bool = False
    rope_scaling: dict | None = None
    model_kwargs: dict = field(default_factory=dict)
    task: str = "causal-lm"  # or "sequence-classification" (fastload.load.task)
    num_labels: int | None = None  # the classifier's classes


def torch_dtype(name: str | None):
    return getattr(torch, name) if name else None


@contextlib.contextmanager
def translated_errors(plan: LoadPlan, part: str = "model"):
    """Turn the errors of huggingface_hub, transformers and safetensors into fastload's, keeping the cause."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"Loading {plan.name!r} from {plan.location}" + ("" if part == "model" else f" ({part})")
    try:
        yield
    except FastloadError:
        raise
    except GatedRepoError as e:
        raise GatedModel(where, found="the repository is gated: its terms must be accepted and a token given",
                         fix="accept the terms on the model's hub page, then pass token=... or run `hf auth login`; "
                             "or use a registry name with an ungated pre-quantized copy") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFound(where, found="the hub has no such repository (or it is private)",
                            fix="check the repo id, or pass token=... for a private repo") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFound(where, found="not in the local cache, and the hub was not reached (offline or no network)",
                            fix="download it while online, or unset HF_HUB_OFFLINE / local_files_only") from e
    except Exception as e:
        error = classify_load_error(e, where, part)
        if error is None:
            raise
        raise error from e
    except BaseException as e:  # a Rust panic inside safetensors derives from BaseException
        if type(e).__name__ != "PanicException":
            raise
        raise CheckpointCorrupt(where, found=f"the weight reader failed on the file: {_first_line(e)}",
                                fix="download or save the checkpoint again") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


# exception types that transformers, tokenizers and safetensors raise for what is in the files; anything else is a bug
_FILE_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError, MemoryError)


def classify_load_error(e: Exception, where: str, part: str):
    """The fastload error for an exception raised while transformers read a checkpoint, or None to re-raise it."""
    from huggingface_hub.errors import StrictDataclassError

    text, first = str(e), _first_line(e)
    low = text.lower()
    kind = type(e).__name__
    if isinstance(e, MemoryError) or "out of memory" in low:
        return NotEnoughMemory(where, found=first, fix="load in 4-bit, free memory, or use a smaller model")
    if isinstance(e, StrictDataclassError):
        return CheckpointCorrupt(where, found=f"config.json holds an invalid value: {' '.join(text.split())[:300]}",
                                 fix="restore config.json from the original checkpoint")
    if "does not recognize this architecture" in text or "Unrecognized configuration" in text:
        return UnsupportedArchitecture(where, found=first,
                                       fix="upgrade transformers, or pass trust_remote_code=True if you trust the repo")
    if "custom code" in text or "trust_remote_code=True" in text:
        return UnsafeCheckpoint(where, found="the checkpoint ships its own Python code (auto_map in its config) and "
                                             "transformers has no built-in class for it; "
                                             "fastload never runs it implicitly",
                                fix="read the code, then pass trust_remote_code=True if you trust its origin")
    if "Unrecognized model" in text or "model_type" in text and "config.json" in text:
        return CheckpointIncomplete(where, found="config.json has no model_type, so no architecture can be chosen",
                                    fix="restore config.json from the original checkpoint "
                                        "(it names e.g. \"model_type\": \"llama\")")
    if "attn_implementation" in text:
        return InvalidOption(where, found=first, fix="leave attn_implementation unset: fastload picks the best "
                                                     "implementation this model supports on this device")
    if "size mismatch" in text or "shape" in low and "mismatch" in low or "ignore_mismatched_sizes" in text:
        # transformers 5 prints the mismatched keys in a report and raises only "You set `ignore_mismatched_sizes`..."
        return CheckpointIncomplete(where, found=f"weights do not match the config: {first}",
                                    fix="use the config.json that belongs to these weights")
    if kind == "SafetensorError" or "safetensors" in low or "header" in low or "deserializ" in low:
        return CheckpointCorrupt(where, found=f"the weight files cannot be read: {first}",
                                 fix="download or save the checkpoint again")
    if "use_safetensors" in text or "pytorch_model.bin" in text or ".bin" in text and "safetensors" in text:
        return UnsafeCheckpoint(where, found="the checkpoint has no safetensors weights, only pickle files",
                                fix="pass allow_pickle=True if you trust its origin")
    if part == "tokenizer" and (isinstance(e, ValueError) or "tokenizer" in low):
        damaged = kind == "JSONDecodeError" or "tokenizer.json" in text or "data did not match" in low
        cls = CheckpointCorrupt if damaged else CheckpointIncomplete
        return cls(where, found=f"the tokenizer files cannot be read: {kind}: {first}",
                   fix="copy the tokenizer files of the original model (tokenizer.save_pretrained(path))")
    if kind == "JSONDecodeError":
        return CheckpointCorrupt(where, found=f"a JSON file of the checkpoint is damaged: {first}",
                                 fix="restore the checkpoint's JSON files from the original")
    if isinstance(e, _FILE_ERRORS) or kind == "SafetensorError":
        return CheckpointError(where, found=f"transformers could not load the {part}: {kind}: {first}",
                               fix="check that the files belong together and are whole; the original error is chained")
    return None


def load_config(plan: LoadPlan, opts: LoadOptions):
    from transformers import AutoConfig

    check_reachable(plan, local_files_only=opts.local_files_only, token=opts.token)
    kw = hub_kwargs(plan, cache_dir=opts.cache_dir, token=opts.token, trust_remote_code=opts.trust_remote_code)
    with translated_errors(plan), hub_stays_local(plan):
        return AutoConfig.from_pretrained(plan.location, **kw)


# families whose positions are a table of max_position_embeddings rows: no position past its rows exists (an index
# error on the CPU, a device-side assert that ends the CUDA context on a GPU), so no length beyond it can train
POSITION_TABLES = {
    **dict.fromkeys(("gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt"), "learns one embedding per position"),
    # computed once at construction, for that many positions (no rope_scaling extends it)
    **dict.fromkeys(("gptj", "codegen"), "computes its rotary sin/cos table once"),
}


def check_max_seq_length(config, max_seq_length: int | None, rope_scaling: dict | None) -> int:
    """The sequence length to train with: as asked, or (unset) DEFAULT_MAX_SEQ_LENGTH capped at the model's
    positions."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None)
    if max_seq_length is None:
        return min(DEFAULT_MAX_SEQ_LENGTH, positions or DEFAULT_MAX_SEQ_LENGTH)
    if positions is None or max_seq_length <= positions:
        return max_seq_length
    table = POSITION_TABLES.get(getattr(text, "model_type", None))
    if table:
        raise InvalidOption(f"Loading with max_seq_length={max_seq_length}",
                            found=f"{text.model_type} {table} and has "
                                  f"{positions} (max_position_embeddings): a longer sequence has no position to "
                                  "look up",
                            fix=f"pass max_seq_length={positions} or less (or leave it unset: it is capped there)")
    if rope_scaling:
        logger.warning("max_seq_length=%s is beyond the model's %s positions; rope_scaling=%s extends them",
                       max_seq_length, positions, rope_scaling)
        return max_seq_length
    logger.warning("max_seq_length=%s is beyond the %s positions the model was trained for "
                   "(max_position_embeddings): quality degrades past them unless you pass rope_scaling={...} "
                   "to extend the context on purpose", max_seq_length, positions)
    return max_seq_length


def choose_dtype(plan: LoadPlan, opts: LoadOptions, device: str):
    asked = dtype_name(opts.dtype, "dtype") or plan.quant.bnb_4bit_compute_dtype
    dtype = torch_dtype(asked) if asked else choose_compute_dtype(device)
    check_dtype_supported(dtype, device)
    return dtype


def skip_modules(asked) -> list[str] | None:
    """A user's list replaces transformers' default (which keeps lm_head unquantized): keep lm_head out anyway."""
    if not asked:
        return None
    return list(asked) + ([] if "lm_head" in asked else ["lm_head"])


def bnb_config(plan: LoadPlan, compute_dtype, model_type: str | None = None, model_classes=()):
    """transformers' BitsAndBytesConfig for the plan; the layers fastload/layer_rules.toml keeps 16-bit in this
    model type, and those `model_classes` keep fp32 under the compute dtype, are added to the skipped ones."""
    from transformers import BitsAndBytesConfig

    from fastload.layer_rules import kept_unquantized

    q = plan.quant
    skipped = skip_modules(q.llm_int8_skip_modules)
    kept = kept_unquantized(model_type)
    if kept:
        skipped = list(dict.fromkeys((skipped or ["lm_head"]) + sorted(kept)))
        logger.info("kept 16-bit: %s", "; ".join(f"{name} ({why})" for name, why in sorted(kept.items())))
    strict = strict_fp32_names(model_classes, compute_dtype)
    if strict:
        skipped = list(dict.fromkeys((skipped or ["lm_head"]) + strict))
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit, load_in_8bit=q.load_in_8bit, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch_dtype(q.bnb_4bit_quant_storage), llm_int8_threshold=q.llm_int8_threshold,
        llm_int8_skip_modules=skipped,
        llm_int8_enable_fp32_cpu_offload=q.llm_int8_enable_fp32_cpu_offload,
        llm_int8_has_fp16_weight=q.llm_int8_has_fp16_weight)


def set_compute_dtype(model, dtype) -> None:
    """Pre-quantized checkpoints carry the compute dtype of the machine that made them; use this device's."""
    from fastload.structure import is_linear4bit

    for module in model.modules():
        if is_linear4bit(module) and getattr(module, "compute_dtype", None) != dtype:
            module.compute_dtype = dtype


def cast_unquantized(model, dtype) -> int:
    """transformers keeps a pre-quantized checkpoint's other weights (embeddings, norms, lm_head) in their stored
    dtype whatever `dtype` asks; cast them, or an fp32 load from a bf16 checkpoint computes in bf16 after all. The
    modules the model keeps fp32 under that dtype (its `_keep_in_fp32_modules[_strict]`) stay as transformers keeps
    them: HY-V4's lm_head had come back bf16 from the store, fp32 on the fly."""
    from fastload.structure import is_quantized_linear

    kept_fp32 = fp32_modules(model, dtype)
    changed = 0
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            # meta: LoRA adapters injected while the weights were read, filled (in fp32) after the load
            if param.is_floating_point() and param.dtype != dtype and param.device.type != "meta" \
                    and not kept_fp32(f"{name}.{param_name}" if name else param_name):
                param.data = param.data.to(dtype)
                changed += 1
    return changed


def strict_fp32_names(model_classes, dtype) -> list[str]:
    """The plain names in the classes' `_keep_in_fp32_modules_strict` (under fp16/bf16): transformers quantizes them
    (its bitsandbytes integration skips only `_keep_in_fp32_modules`), but a 4-bit checkpoint of such a layer does
    not load back everywhere (transformers 5.17 leaves HY-V4's indexer.weights_proj without its quantization state).
    Kept unquantized, the layer stays fp32 as the model asks and the store's copy loads like the original."""
    import torch

    if dtype not in (torch.float16, torch.bfloat16):
        return []
    names = {n for cls in model_classes for n in getattr(cls, "_keep_in_fp32_modules_strict", None) or ()}
    return sorted(n for n in names if n.replace("_", "").replace(".", "").isalnum())


def fp32_modules(model, dtype):
    """Whether a parameter (by qualified name) stays fp32 when the model loads in `dtype`, by transformers' own rule
    (PreTrainedModel._get_dtype_plan, matched as core_model_loading does): `_keep_in_fp32_modules` under fp16,
    `_keep_in_fp32_modules_strict` under fp16 and bf16, each entry searched in the name with `*` for any text."""
    import re

    import torch

    names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype in (
        torch.float16, torch.bfloat16) else set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if not names:
        return lambda name: False
    pattern = re.compile("|".join(n.replace("*", ".*") for n in sorted(names)))
    return lambda name: bool(pattern.search(name))


def keep_4bit_layout_stable(model) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit layer for a bf16 kernel at its first no-grad forward,
    rounding its scales to bf16 on the way (and again at each repack). Turn that off: evaluating must neither
    change the weights being trained nor compute in bf16 when fp32 was asked for."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def keep_weights_unscaled_at_eval(model) -> None:
    """RWKV halves some layers' weights when it switches to eval (`rescale_every`, an fp16 overflow guard for
    inference) and doubles them back for training: the adapters beside those layers would not be halved with them
    (wrong outputs), and a 4-bit weight cannot be halved in place (generation fails in transformers). Off for
    fine-tuning, and in a merged model's config; bf16 needs no guard, fp16 evaluation of a deep RWKV may overflow
    (the log says so)."""
    every = getattr(model.config, "rescale_every", 0)
    if model.config.model_type == "rwkv" and every:
        model.config.rescale_every = 0
        logger.info("rwkv: rescale_every=%s set to 0 (its eval-time halving of weights would leave the adapters "
                    "out and cannot halve 4-bit weights)%s", every,
                    "; in float16 a deep RWKV may overflow when evaluated: bf16 has no such limit"
                    if model.dtype == torch.float16 else "")


def materialize_gguf(plan: LoadPlan, store_root) -> LoadPlan:
    from fastload.load.gguf import convert_gguf

    directory = convert_gguf(Path(plan.location) / plan.gguf_file, store_root)
    return replace(plan, location=str(directory), gguf_file=None)


def load_tokenizer(plan: LoadPlan, opts: LoadOptions, padding_side: str = "right"):
    from transformers import AutoTokenizer

    from fastload.sources.checkpoint_files import check_tokenizer_files

    check_reachable(plan, local_files_only=opts.local_files_only, token=opts.token)
    if Path(plan.location).is_dir():
        check_tokenizer_files(Path(plan.location))
    kw = hub_kwargs(plan, cache_dir=opts.cache_dir, token=opts.token, trust_remote_code=opts.trust_remote_code)
    with translated_errors(plan, "tokenizer"), hub_stays_local(plan):
        tok = AutoTokenizer.from_pretrained(plan.location, **kw)
    if tok.pad_token is None:
        # a pad distinct from eos keeps eos learnable; fall back to eos/unk when the vocabulary has no spare token
        for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>"):
            if candidate in tok.get_vocab() and candidate != tok.eos_token:
                tok.pad_token = candidate
                break
        else:
            tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = padding_side
    return tok


def extra_layer_keys(model, unexpected) -> list[str]:
    """Unexpected weights shaped like the model's own layer weights: the config asks for fewer layers than were saved.

    transformers drops them with a notice; silently, a checkpoint would load as a different, shallower model.
    """
    import re

    def template(name: str) -> str:
        return re.sub(r"\.\d+\.", ".#.", name)

    own = {template(n) for n, _ in model.named_parameters()}
    return sorted(k for k in unexpected if template(k) in own)


def check_weight_shapes(plan: LoadPlan, model, weight_files) -> None:
    """Refuse saved tensors whose shapes differ from the model config.json builds, before any weight is read.

    transformers checks shapes only for 16-bit loads: with bitsandbytes it quantizes a 512-row weight into a layer
    declared 1024 rows wide without a word. `model` is a build of config.json whose weights are not read yet (a meta
    model, or the direct load's skeleton: its 4-bit layers still declare the 16-bit shapes). Tensors under other
    names (checkpoint key conversions) are left to transformers.
    """
    from fastload.sources.checkpoint_files import read_safetensors_header

    saved = {name: meta["shape"] for f in weight_files for name, meta in read_safetensors_header(f).items()
             if name != "__metadata__"}
    wanted = {name: list(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for name in transposed_weights(model):  # GPT-2's Conv1D keeps (in, out): saved so, built (out, in) in 4-bit
        if name in wanted:
            wanted[name] = wanted[name][::-1]
    wrong = sorted(f"{name}: saved {saved[name]}, config.json builds {wanted[name]}"
                   for name in saved.keys() & wanted.keys() if saved[name] != wanted[name])
    if wrong:
        raise CheckpointIncomplete(f"Loading {plan.name!r} from {plan.location}",
                                   found=f"the weights do not match config.json: {len(wrong)} weight(s) of the wrong "
                                         f"shape ({'; '.join(wrong[:3])})",
                                   fix="use the config.json that belongs to these weights, "
                                       "or re-download the checkpoint")


def transposed_weights(model) -> list[str]:
    """Weight names the checkpoint stores transposed against the built module: transformers' Conv1D layers (GPT-2,
    (in, out)) that bitsandbytes replaced with a Linear4bit (out, in); transformers transposes them as it quantizes."""
    from fastload.structure import stored_transposed

    return [f"{name}.weight" for name, module in model.named_modules() if stored_transposed(module)]


def local_files_of(plan: LoadPlan, opts: LoadOptions) -> Path | None:
    """The folder a plan's files are read from, when they are on this machine already (a directory or the HF cache)."""
    if Path(plan.location).is_dir():
        return Path(plan.location)
    if plan.source in (P.HUB_CACHE, P.HUB_DOWNLOAD):  # a download is in the HF cache once loaded
        return cached_snapshot(plan.location, plan.revision, hub_cache_dir(opts.cache_dir))
    return None


def prepare_direct_load(plan: LoadPlan, opts: LoadOptions, config, dtype, device_map, info, quantization_config):
    """fastload's direct 4-bit load (fastload.load.fast_4bit), its skeleton built, when it covers the plan, else
    None."""
    from fastload.load.task import CAUSAL_LM

    if opts.task != CAUSAL_LM:
        logger.info("task %s: transformers' loader (fastload's direct 4-bit load builds causal LMs only)", opts.task)
        return None
    if info is None or not info.safetensors or not (plan.prequantized or plan.quant.quantized):
        return None
    from fastload.load.fast_4bit import prepare_direct

    with translated_errors(plan):
        return prepare_direct(plan, opts, config, dtype, device_map, info.weight_files, quantization_config)


def load_weights(plan: LoadPlan, opts: LoadOptions, before_reading=None, skeleton_hook=None, injection=None):
    """from_pretrained as the plan says; returns the model on its device, before LoRA (or with the adapters
    `injection` put in, still empty). The direct load calls before_reading() once its modules are built, just before
    it reads the weights (the tokenizer starts then), and skeleton_hook(skeleton, device) before that (the LoRA init's
    draws start then: train.adapter_draws.EarlyDraws); `injection` (train.early_injection.EarlyInjection) injects
    LoRA into the skeleton as the readers start, where it can."""
    from fastload.sources.checkpoint_files import headers_read_once

    with headers_read_once():
        return _load_weights(plan, opts, before_reading, skeleton_hook, injection)


def _load_weights(plan: LoadPlan, opts: LoadOptions, before_reading=None, skeleton_hook=None, injection=None):
    from fastload.load.experts import arrival_settings, quantized_on_arrival
    from fastload.load.memory import check_fits, check_weights_floor, meta_model
    from fastload.load.task import CAUSAL_LM, concrete_classes, model_class, text_model_only
    from fastload.sources.checkpoint_files import check_tokenizer_files, inspect_checkpoint

    device_map = resolve_device_map(opts.device_map)
    device = main_device(device_map)
    if device == "cuda":
        use_expandable_segments()  # before the weights arrive, so they too sit in growable segments
        release_cached_memory()  # and not in what an earlier model or buffer left cached (it could not be released)
    dtype = choose_dtype(plan, opts, device)
    with phase("config"):
        config = load_config(plan, opts)
    from fastload.load.attention.choice import choose_attn_implementation

    with phase("attention_choice"):  # imports the architecture's modeling module the first time
        attention = choose_attn_implementation(config, device, dtype, opts.attn_implementation)
    text_only = text_model_only(config, opts.task)
    if text_only:
        logger.info("an image-text checkpoint: %s loads its text model only (the vision tower's weights are not "
                    "read; a text fine-tune)", text_only)
    max_seq_length = check_max_seq_length(config, opts.max_seq_length, opts.rope_scaling)
    check_transformers_floor(config.model_type, dtype, plan.name)
    bits = 4 if plan.prequantized and plan.quant.bits == 16 else plan.quant.bits
    other_bytes = torch.tensor([], dtype=dtype).element_size()
    with phase("checkpoint_checks"):
        local = local_files_of(plan, opts)
        info = inspect_checkpoint(local, allow_pickle=opts.allow_pickle) if local is not None else None
        if info is not None:
            check_tokenizer_files(local)
        check_weights_floor(plan.name, config, bits, device, other_bytes)  # before any model of absurd sizes is built
        experts_4bit = arrival_settings(plan, config)  # MoE experts quantized as they are read, or after the load
    kw = dict(hub_kwargs(plan, cache_dir=opts.cache_dir, token=opts.token, trust_remote_code=opts.trust_remote_code),
              dtype=dtype, device_map=device_map, output_loading_info=True,
              attn_implementation=attention, **opts.model_kwargs)
    if not opts.allow_pickle:
        kw["use_safetensors"] = True
    if opts.rope_scaling:
        kw["rope_scaling"] = opts.rope_scaling
    if not plan.prequantized and plan.quant.quantized:
        kw["quantization_config"] = bnb_config(plan, dtype, config.model_type, concrete_classes(opts.task, config))
    if kw.get("local_files_only"):
        # transformers looks for adapter_config.json without the model's local_files_only/cache_dir: without this,
        # a load from the cache would still try the network (and retry for ~20 s when there is none)
        kw["adapter_kwargs"] = {"local_files_only": True, "cache_dir": kw.get("cache_dir")}
    if opts.task != CAUSAL_LM:
        kw["num_labels"] = opts.num_labels
    with phase("module_construction"):  # one build of the config per load: the direct load's skeleton if it has one
        direct = prepare_direct_load(plan, replace(opts, attn_implementation=attention), config, dtype, device_map,
                                     info, kw.get("quantization_config"))
        structure = direct.model if direct is not None else meta_model(config)
    with phase("checkpoint_checks"):
        check_fits(plan.name, config, bits, plan.quant.bnb_4bit_use_double_quant, device, other_bytes=other_bytes,
                   max_seq_length=max_seq_length, model=structure, experts_4bit=experts_4bit is not None)
        if info is not None and info.safetensors and not plan.prequantized:
            check_weight_shapes(plan, structure, info.weight_files)
    del structure  # a direct load that cannot finish must not hold its weights while transformers reads them again
    model = None
    if direct is not None:
        if skeleton_hook is not None:
            skeleton_hook(direct.model, direct.device)
        during = None
        if injection is not None:
            why_not = injection.why_not(plan, direct.model, direct.device)
            if why_not is None:
                during = injection.inject
            else:
                logger.debug("LoRA injected after the load: %s", why_not)
        try:
            with translated_errors(plan), quantized_on_arrival(experts_4bit):
                model = direct.read(before_reading, during)
        except BaseException:
            if injection is not None:  # its skeleton must not stay alive while the source is read again
                injection.drop()
            raise
        del direct
        if model is None:  # its 4-bit weights point back at their layers (cycles), and the collector is paused
            if injection is not None:
                injection.drop()
            gc.collect()   # during a load: freed here, before transformers reads the checkpoint a second time
    if model is not None:
        info = {}  # the direct load took every tensor by its own name: nothing missing, mismatched or extra
    else:
        if plan.prequantized and info is not None and info.safetensors and not opts.trust_remote_code:
            refuse_experts_stored_one_by_one(plan, config, info.weight_files)  # remote code may keep Linear experts
        quantizes = (not plan.prequantized and plan.quant.quantized) or experts_4bit is not None
        from fastload.load.global_patches import PATCHING_GLOBALS

        with translated_errors(plan), hub_stays_local(plan), phase("from_pretrained"), \
                quantized_on_arrival(experts_4bit), reads_in_turn(quantizes), PATCHING_GLOBALS:
            model, info = model_class(opts.task).from_pretrained(plan.location, **kw)
    missing = sorted(k for k in info.get("missing_keys", []) if ("lm_head" not in k or not config.tie_word_embeddings)
                     and not new_head(k, opts.task))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    extra = extra_layer_keys(model, info.get("unexpected_keys", []))
    if missing or mismatched or extra:
        problems = [f"{len(keys)} {what} ({keys[:3]})" for keys, what in (
            (missing, "weight(s) missing"), (mismatched, "weight(s) of the wrong shape"),
            (extra, "weight(s) of layers the config does not have")) if keys]
        raise CheckpointIncomplete(f"Loading {plan.name!r} from {plan.location}",
                                   found="the weights do not match config.json: " + "; ".join(problems),
                                   fix="use the config.json that belongs to these weights, "
                                       "or re-download the checkpoint")
    if plan.prequantized:
        check_quant_states(plan, model)
        set_compute_dtype(model, dtype)
        if cast_unquantized(model, dtype):
            logger.info("cast the unquantized weights of %s to %s", plan.name, str(dtype).replace("torch.", ""))
    keep_4bit_layout_stable(model)
    keep_weights_unscaled_at_eval(model)
    model.config.use_cache = False
    model.max_seq_length = max_seq_length
    state_of(model).task = opts.task
    return model, dtype, device


def refuse_experts_stored_one_by_one(plan: LoadPlan, config, weight_files) -> None:
    """transformers 5 cannot read a transformers 4 bnb-4bit MoE checkpoint (each expert 4-bit on its own; it fuses
    the experts): it fails on the sizes, which would read as a damaged checkpoint. Only the direct load reads it."""
    from fastload.load.fast_4bit import experts_stored_4bit_one_by_one

    if experts_stored_4bit_one_by_one(config.model_type, weight_files):
        raise CheckpointError(f"Loading {plan.name!r} from {plan.location}",
                              found="its experts are stored 4-bit one by one (a transformers 4 bitsandbytes "
                                    "checkpoint), which transformers 5 cannot read; fastload's direct 4-bit load "
                                    "stacks them, but does not cover this load (the log says why)",
                              fix="load it on one device, without rope_scaling or extra model arguments (and "
                                  "without FASTLOAD_DIRECT_LOAD=0); or load the 16-bit original, which fastload "
                                  "quantizes as it loads")


def check_quant_states(plan: LoadPlan, model) -> None:
    """A 4-bit layer whose absmax and quant map transformers did not read (it reports them as unexpected keys) holds
    packed bytes it cannot multiply by: its first forward would fail deep inside bitsandbytes, or a forward that
    skips it would train a model that is not the checkpoint's."""
    import transformers

    from fastload.structure import is_linear4bit

    stateless = [name for name, module in model.named_modules()
                 if is_linear4bit(module) and getattr(module.weight, "quant_state", None) is None]
    if stateless:
        raise CheckpointIncomplete(
            f"Loading {plan.name!r} from {plan.location}",
            found=f"{len(stateless)} 4-bit layer(s) came back without their quantization state ({stateless[:3]}): "
                  f"transformers {transformers.__version__} did not read the absmax and quant map saved beside them",
            fix="load the 16-bit checkpoint (fastload quantizes it as it loads), or the transformers version that "
                "wrote this one")


def new_head(key: str, task: str) -> bool:
    """A classifier's head is new: a language model's checkpoint never has it."""
    from fastload.load.task import CAUSAL_LM, HEAD_NAMES

    return task != CAUSAL_LM and key.split(".")[0] in HEAD_NAMES
