"""A merged model plain transformers loads: the LoRA deltas added to 16-bit base weights, or re-quantized to 4-bit.

Merging adds each adapter's delta (peft's get_delta_weight: B @ A * scaling, where scaling already accounts for
rslora and rank/alpha patterns) to the base weights. The base is the 16-bit source when it is on this machine
(the original the 4-bit model was made from), else the 4-bit weights dequantized; one line says which. Merges
go shard by shard into a temporary folder renamed into place (save.folders), so an interrupted save leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fastload._log import logger
from fastload.atomic import refuse_source
from fastload.errors import AdapterError, InvalidOption
from fastload.model_state import base_model, state_of
from fastload.save.adapters import active_adapter, base_model_id, checkpoint_key, require_adapters
from fastload.save.folders import atomic_directory
from fastload.sources.checkpoint_files import SAFETENSORS_INDEX

SOURCES = ("auto", "16bit", "dequantized")
DEFAULT_SHARD_SIZE = "5GB"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


# -- the LoRA deltas ----------------------------------------------------------------------------------------------

class Deltas:
    """What merging adds or replaces, by checkpoint key; deltas are computed one at a time, when asked for."""

    def __init__(self, model):
        from peft.tuners.lora import LoraLayer

        require_adapters(model, "Merging the LoRA adapter")
        self.adapter = active_adapter(model)
        config = model.peft_config[self.adapter]
        if getattr(config, "use_dora", False):
            raise AdapterError("Merging the LoRA adapter", found="it is a DoRA adapter (use_dora=True)",
                               fix="merge with peft (model.merge_and_unload()) or save the adapter alone")
        if getattr(config, "lora_bias", False):
            raise AdapterError("Merging the LoRA adapter", found="it has LoRA biases (lora_bias=True)",
                               fix="merge with peft (model.merge_and_unload()) or save the adapter alone")
        self.modules: dict[str, Any] = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and self.adapter in getattr(module, "lora_A", {}):
                # LoRA on a bare parameter (MoE experts) names it; on a Linear it is the weight
                parameter = getattr(module, "parameter_name", "weight")
                self.modules[f"{checkpoint_key(name, self.adapter)}.{parameter}"] = module
        from fastload.structure import stored_transposed

        # GPT-2's Conv1D weights are (in, out) in every checkpoint; their 4-bit layers and deltas are (out, in)
        self.transposed = {key for key, module in self.modules.items() if stored_transposed(module.get_base_layer())}
        # trained tensors that replace the base's: modules_to_save copies, biases trained with bias="all"/"lora_only"
        self.replaced: dict[str, Any] = {}
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in name and "original_module" not in name:
                self.replaced[checkpoint_key(name, self.adapter)] = p
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.modules or key in self.replaced

    def apply(self, key: str, tensor):
        """The merged value of this checkpoint tensor, computed in fp32 and returned in the tensor's dtype."""
        import torch

        if key in self.replaced:
            self.used.add(key)
            return self.replaced[key].detach().to("cpu", tensor.dtype)
        if key not in self.modules:
            return tensor
        self.used.add(key)
        with torch.no_grad():
            delta = self.modules[key].get_delta_weight(self.adapter).to("cpu", torch.float32)
        if key in self.transposed:  # the tensor is in the checkpoint's (in, out) orientation
            delta = delta.t()
        if delta.shape != tensor.shape:
            raise AdapterError(f"Merging the LoRA delta into {key}", found=f"delta {tuple(delta.shape)} vs weight "
                               f"{tuple(tensor.shape)}", fix="merge into the base the adapter was trained on")
        return (tensor.to(torch.float32) + delta).to(tensor.dtype)

    @property
    def keys(self) -> set[str]:
        return set(self.modules) | set(self.replaced)

    def check_all_used(self, where: str) -> None:
        missing = sorted((set(self.modules) | set(self.replaced)) - self.used)
        if missing:
            raise AdapterError(f"Merging the LoRA adapter into {where}", found=f"{len(missing)} adapted weight(s) "
                               f"have no counterpart there: {missing[:3]}",
                               fix="use source='dequantized' (the loaded model's own weights)")


# -- the 16-bit source --------------------------------------------------------------------------------------------

def find_16bit_source(plan) -> Path | None:
    """The local folder of the 16-bit weights the 4-bit model was made from, or None when none is on this machine.

    A local checkpoint folder, the HF-cache snapshot of the original repo, or the 16-bit conversion fastload made
    of a GGUF file.
    """
    if plan is None or not plan.original:
        return None
    from fastload.errors import CheckpointError
    from fastload.sources.checkpoint_files import inspect_checkpoint

    candidates: list[Path] = []
    original = Path(plan.original).expanduser()
    if original.is_dir():
        candidates.append(original)
    elif original.suffix == ".gguf" and original.is_file():
        candidates.append(_converted_gguf(original))
    else:
        from fastload.sources.registry import REPO_ID

        if REPO_ID.match(plan.original):
            from fastload.sources.hub import cached_snapshot, hub_cache_dir

            revision = plan.revision if plan.location == plan.original else None
            snapshot = cached_snapshot(plan.original, revision, hub_cache_dir(None))
            if snapshot is not None:
                candidates.append(snapshot)
        spec = plan.registry_entry.packaged_gguf if plan.registry_entry is not None else None
        if spec:
            from fastload.sources.resolve import packaged_gguf_path

            gguf = packaged_gguf_path(spec)
            if gguf is not None:
                candidates.append(_converted_gguf(gguf))
    for path in candidates:
        try:
            info = inspect_checkpoint(path)
        except CheckpointError:
            continue
        if info.safetensors and not info.bnb_quantized:
            return path
    return None


def _converted_gguf(gguf: Path) -> Path:
    from fastload.load.gguf import converted_dir
    from fastload.sources.store import default_root

    return converted_dir(gguf, default_root())


# -- merging ------------------------------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise InvalidOption(f"max_shard_size={size!r}", found="not a size", fix="use e.g. '5GB', '500MB' or bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _stored_as(model) -> str:
    """How the model holds the weights a merge without the 16-bit source starts from, in the log's words."""
    from fastload.structure import is_linear4bit, is_linear8bit

    modules = list(model.modules())
    if any(is_linear4bit(m) for m in modules):
        return "dequantized 4-bit"
    return "dequantized 8-bit" if any(is_linear8bit(m) for m in modules) else "16-bit"


def _dtype(value):
    import torch

    from fastload.settings import dtype_name

    name = dtype_name(value, "dtype")
    return getattr(torch, name) if name else None


def save_merged(model, directory: str | os.PathLike, tokenizer=None, source: str = "auto", quantize: bool = False,
                dtype: Any = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE, verify: bool = True,
                probe_texts=None) -> Path:
    """Merge the LoRA adapter into 16-bit weights and save a checkpoint plain transformers loads.

    source: "16bit" merges into the 16-bit original (must be on this machine), "dequantized" into the loaded 4-bit
    weights dequantized, "auto" the first when available. dtype: of the written weights (default: the source's
    16-bit dtype; bfloat16 for dequantized weights). quantize=True writes a bitsandbytes 4-bit checkpoint of the
    merged model instead (fastload loads it pre-quantized). verify: evaluate the LoRA model and the merged 16-bit
    result on a probe batch (probe_texts, else a chat in the tokenizer's template) and log the loss/perplexity
    delta and the max logit difference (fastload.export.verify); False skips it.

    Args:
        model: the peft model with its LoRA adapters.
        directory: the folder to write, whole or not at all.
        tokenizer: saved beside the weights (default: the source's tokenizer files, copied).
        source: "auto", "16bit" or "dequantized".
        quantize: write a bitsandbytes 4-bit checkpoint of the merged model.
        dtype: the dtype of the written weights.
        max_shard_size: the largest safetensors shard, in bytes or as "5GB", "500MB"...
        verify: report what the merge cost on a probe batch.
        probe_texts: held-out texts for that report.

    Returns:
        The folder's Path.

    Raises:
        AdapterError: no adapters, DoRA or LoRA biases, source="16bit" without the original here, or adapted
            weights the source does not hold, or a merged checkpoint that does not load back (verify).
        InvalidOption: an unknown source or dtype, a bad max_shard_size, or a folder holding files fastload did not
            write (or the model's own source).
        SaveError: the disk is full or the folder cannot be written; nothing is left half-written.
    """
    if source not in SOURCES:
        raise InvalidOption(f"source={source!r}", found=f"choices: {', '.join(SOURCES)}",
                            fix="use 'auto' (default), '16bit' or 'dequantized'")
    shard_bytes = parse_size(max_shard_size)
    out_dtype = _dtype(dtype)
    deltas = Deltas(model)
    plan = state_of(model, create=False).plan
    src = find_16bit_source(plan) if source in ("auto", "16bit") else None
    _refuse_own_source(directory, plan, src)
    if source == "16bit" and src is None:
        raise AdapterError("Merging into the 16-bit source (source='16bit')",
                           found=f"the 16-bit weights of {base_model_id(plan)!r} are not on this machine",
                           fix="download the original (huggingface-cli download ...), or use source='dequantized'")
    fallback = None  # why the 16-bit source found is not merged into
    experts = None  # the fused experts' deltas, split for a source that keeps one tensor per expert
    if src is not None:
        from fastload.save.expert_merge import ExpertDeltas

        names = source_keys(src)
        experts = ExpertDeltas(deltas, _model_type(model), names)
    if src is not None and not deltas.keys <= names | experts.fused_keys:
        unmatched = sorted(deltas.keys - names - experts.fused_keys)
        if source == "16bit":
            raise AdapterError(f"Merging into the 16-bit source {src}", found=f"{len(unmatched)} adapted weight(s) "
                               f"are not in it under the model's names, nor as per-expert tensors of a layout "
                               f"fastload knows (fastload/load/expert_layouts.toml): {unmatched[:3]}",
                               fix="use source='dequantized'")
        fallback = f"the 16-bit source {src} names its weights differently ({unmatched[0]}...)"
        src = None
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        target = tmp / ".merged-16bit" if quantize else tmp
        target.mkdir(exist_ok=True)
        if src is not None:
            logger.info("merging the LoRA adapter into the 16-bit source %s", src)
            _merge_into_source(deltas, src, target, out_dtype, shard_bytes, experts)
            _set_config_vocab(target / "config.json", model.get_input_embeddings().weight.shape[0])
        else:
            why = ("asked for" if source == "dequantized"
                   else fallback or f"no 16-bit source of {base_model_id(plan)!r} on this machine")
            logger.info("merging the LoRA adapter into the model's %s weights (%s)", _stored_as(model), why)
            _merge_into_model(model, deltas, target, out_dtype, shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(target))
        elif not _has_tokenizer(target):
            _copy_tokenizer_files(plan, target)
        if verify:
            from fastload.export.verify import report_merge

            report_merge(model, target, tokenizer, probe_texts)  # AdapterError if it does not load back
        if quantize:
            _quantize_into(target, tmp, plan)
            shutil.rmtree(target)
    logger.info("saved the merged model in %s%s", directory, " (bitsandbytes 4-bit)" if quantize else "")
    return directory


def _refuse_own_source(directory, plan, src: Path | None) -> None:
    """Every folder the merge reads from (the 16-bit source, the loaded location, the original a store entry was
    made from, the adapter) holds config files that could pass for a previous save: saving over one, or into it,
    would destroy what this merge and every later one starts from."""
    sources = [src] + ([plan.location, plan.original, plan.adapter] if plan is not None else [])
    refuse_source(directory, sources, f"Saving the merged model to {Path(directory).expanduser().absolute()}",
                  found="that folder holds the model it is merged from (or lies inside or around it); replacing it "
                  "would lose the original weights")


def source_keys(src: Path) -> set[str]:
    """Every tensor name of a safetensors checkpoint, from the headers only."""
    from fastload.sources.checkpoint_files import find_weight_files, read_safetensors_header

    shards, _ = find_weight_files(src, allow_pickle=False)
    return {k for shard in shards for k in read_safetensors_header(shard) if k != "__metadata__"}


def _model_type(model) -> str | None:
    config = base_model(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None) or getattr(config, "model_type", None)


def _merge_into_source(deltas: Deltas, src: Path, out: Path, out_dtype, shard_bytes: int,
                       experts=None) -> None:
    """Read each source shard, add the deltas to its weights, write them re-sharded: one source shard in memory.
    A source keeping one tensor per expert gets each expert's slice of the fused experts' deltas (expert_merge)."""
    import torch
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from fastload.sources.checkpoint_files import find_weight_files

    shards, _ = find_weight_files(src, allow_pickle=False)
    writer = ShardWriter(out, shard_bytes)
    for shard in tqdm(shards, desc="merging LoRA into shards", unit="shard"):
        tensors = load_file(str(shard))
        for key in list(tensors):
            tensor = tensors.pop(key)
            if not tensor.is_floating_point():
                writer.add(key, tensor)
                continue
            # added in fp32 and rounded once, to the dtype asked for: rounding to the source's bf16 first would
            # throw away what dtype=torch.float32 was asked to keep
            if experts is not None and key in experts:
                merged = experts.apply(key, tensor.to(torch.float32))
            else:
                merged = deltas.apply(key, tensor.to(torch.float32))
            writer.add(key, merged.to(out_dtype or tensor.dtype))
        del tensors
    deltas.check_all_used(str(src))
    writer.close()
    for f in src.iterdir():  # config, generation config, tokenizer, chat template: everything but weights
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != SAFETENSORS_INDEX:
            shutil.copy2(f, out / f.name)
    if out_dtype is not None:
        _set_config_dtype(out / "config.json", out_dtype)


class ShardWriter:
    """Safetensors shards of at most max_bytes each (a larger tensor gets a shard of its own), named as transformers
    names them, with model.safetensors.index.json when there is more than one: the layout any loader reads."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.files: list[tuple[str, list[str]]] = []
        self.current: dict[str, Any] = {}
        self.size = self.total = 0

    def add(self, key: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self._flush()
        self.current[key] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.current:
            # numbered provisionally: the final names carry the shard count, known only at the end
            name = f".shard-{len(self.files):05d}.safetensors"
            save_file(self.current, str(self.out / name), metadata={"format": "pt"})
            self.files.append((name, list(self.current)))
            self.current, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.files) == 1:
            os.rename(self.out / self.files[0][0], self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (name, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.rename(self.out / name, self.out / final)
            weight_map.update({k: final for k in keys})
        _write_index(self.out, weight_map, self.total)


def _merge_into_model(model, deltas: Deltas, out: Path, out_dtype, shard_bytes: int) -> None:
    """Dequantize the loaded weights tensor by tensor, add the deltas, write shards of at most shard_bytes."""
    import torch
    from tqdm.auto import tqdm

    base = model.get_base_model()
    out_dtype = out_dtype or _source_dtype(model) or torch.bfloat16
    items = list(_model_tensors(base, deltas.adapter))
    writer = ShardWriter(out, shard_bytes)
    for key, read in tqdm(items, desc="merging LoRA into dequantized weights", unit="tensor"):
        tensor = read()
        merged = deltas.apply(key, tensor.to(torch.float32) if tensor.is_floating_point() else tensor)
        writer.add(key, merged.to(out_dtype) if merged.is_floating_point() else merged)
    deltas.check_all_used("the loaded model")
    writer.close()
    config = base.config.__class__.from_dict(base.config.to_dict())
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.use_cache = True
    config.save_pretrained(str(out))
    _set_config_dtype(out / "config.json", out_dtype)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(str(out))


def _model_tensors(base, adapter: str):
    """(checkpoint key, reader) for every weight of the loaded model: 4/8-bit weights dequantized, ties written once."""
    from fastload.load.nf4_experts import is_stack
    from fastload.structure import is_linear4bit, is_linear8bit

    seen: set[int] = set()
    for mname, module in base.named_modules():
        if ".lora_" in f".{mname}" or "original_module" in mname:
            continue
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for pname, tensor in tensors:
            key = checkpoint_key(f"{mname}.{pname}" if mname else pname, adapter)
            if ".lora_" in key:
                continue
            ptr = (tensor.packed if is_stack(tensor) else tensor).data_ptr()
            if ptr in seen:  # tied weights (lm_head = embed_tokens): the checkpoint holds them once
                continue
            seen.add(ptr)
            if is_stack(tensor):  # MoE experts stored 4-bit by fastload
                yield key, (lambda t=tensor: t.dequantize().to("cpu"))
            elif pname == "weight" and is_linear4bit(module):
                yield key, _in_checkpoint_orientation(module, lambda t=tensor: _dequantize_4bit(t))
            elif pname == "weight" and is_linear8bit(module):
                yield key, _in_checkpoint_orientation(module, lambda t=tensor, m=module: _dequantize_8bit(t, m))
            else:
                yield key, (lambda t=tensor: t.detach().to("cpu"))


def _in_checkpoint_orientation(module, read):
    """`read`, its result transposed where the checkpoint stores the weight (in, out): GPT-2's Conv1D layers, which
    bitsandbytes replaced with (out, in) layers."""
    from fastload.structure import stored_transposed

    return (lambda: read().t().contiguous()) if stored_transposed(module) else read


def _dequantize_4bit(weight):
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its inference kernel after the first
    no-grad forward; dequantizing that layout as if it were the standard one yields garbage, so undo it first."""
    import bitsandbytes.functional as F

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
        weight.data, weight.quant_state = data, state  # bitsandbytes repacks on its next inference forward
    return F.dequantize_4bit(data, state).to("cpu")


def _dequantize_8bit(weight, module):
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(weight, state=module.state).to("cpu")


def _source_dtype(model):
    """The 16-bit dtype the model was published in (the plan's config.json), if it was 16-bit."""
    import torch

    plan = state_of(model, create=False).plan
    config = (plan.config if plan is not None else None) or {}
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _write_index(out: Path, weight_map: dict, total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def _set_config_vocab(config_file: Path, rows: int) -> None:
    """The source's config.json with the vocabulary the merged embeddings have: tokens added before training grew
    them (fastload.train.methods.pretrain.add_tokens), and a config naming the old size makes transformers refuse
    the checkpoint."""
    config = json.loads(config_file.read_text())
    holder = config["text_config"] if "vocab_size" in config.get("text_config", {}) else config
    if holder.get("vocab_size") != rows:
        holder["vocab_size"] = rows
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _set_config_dtype(config_file: Path, dtype) -> None:
    config = json.loads(config_file.read_text())
    name = str(dtype).replace("torch.", "")
    config["dtype"] = name
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()


def _copy_tokenizer_files(plan, out: Path) -> None:
    location = Path(plan.location) if plan is not None else None
    if location is None or not location.is_dir() or not _has_tokenizer(location):
        logger.warning("no tokenizer written next to the merged model: pass tokenizer=... to save_merged")
        return
    for f in location.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges"))
                            or f.suffix == ".model"):
            shutil.copy2(f, out / f.name)


def _quantize_into(merged: Path, out: Path, plan) -> None:
    """Load the merged 16-bit checkpoint through fastload's 4-bit quantization and save it as a bnb-4bit checkpoint."""
    import dataclasses

    from fastload.load.loader import LoadOptions, load_weights
    from fastload.settings import QuantSettings
    from fastload.sources.resolve import resolve

    quant = plan.quant if plan is not None and plan.quant.load_in_4bit else QuantSettings()
    # a bitsandbytes checkpoint holds no 4-bit experts: the merged 16-bit experts are written as they are
    options = {**dataclasses.asdict(quant), "quantize_experts": False}
    qplan = resolve(str(merged), store=False, **options)
    logger.info("quantizing the merged model (%s)", quant.describe())
    # quantized in the merged weights' 16-bit dtype: the tensors that stay unquantized (embeddings, norms, lm_head) are
    # then written in 16 bits, not in this CPU's fp32 compute dtype (which would double their size); the compute
    # dtype recorded in the checkpoint does not bind: a pre-quantized load sets the loading device's own
    config = json.loads((merged / "config.json").read_text())
    try:
        model, _, _ = load_weights(qplan, LoadOptions(max_seq_length=None,
                                                      dtype=config.get("dtype") or config.get("torch_dtype")))
    except InvalidOption:  # a GPU without bf16 arithmetic: quantize in its own compute dtype
        model, _, _ = load_weights(qplan, LoadOptions(max_seq_length=None))
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    written = {f.name for f in out.iterdir()}
    for f in merged.iterdir():  # tokenizer and chat template files
        is_weights = f.name.endswith(WEIGHT_SUFFIXES) or f.name == SAFETENSORS_INDEX
        if f.is_file() and f.name not in written and not is_weights:
            shutil.copy2(f, out / f.name)
