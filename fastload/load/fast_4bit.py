"""The direct 4-bit load: a meta-device skeleton whose bitsandbytes layers are filled straight from safetensors.

transformers' from_pretrained goes through a per-tensor conversion pipeline built for every quantization method and
sharding layout; for the common case (one device, safetensors whose names are the model's own, bitsandbytes NF4/FP4)
fastload builds the same modules with transformers' own quantizer, then reads each shard once, with several reader
threads (onto a GPU through pinned buffers: fastload.load.pinned_reads), and hands every tensor to the same
bitsandbytes constructor transformers uses (Params4bit for on-the-fly
quantization, Params4bit.from_prequantized for a stored entry). The result is the model from_pretrained returns, bit
for bit (tests/load/test_fast_load.py). Anything else returns None with the reason, and the caller takes the general
path.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import json
import os
import queue
import re
import threading
import time
from pathlib import Path

import torch

from fastload._log import logger
from fastload.load.expert_layouts import expert_sources, layout_of, renamed, stacked
from fastload.load.global_patches import PATCHING_GLOBALS
from fastload.load.memory import skipped_init
from fastload.load.on_the_fly import quantized_params4bit
from fastload.load.phases import add as add_phase
from fastload.load.phases import phase
from fastload.load.pinned_reads import Span, Staging, data_start, runs_of, span_of
from fastload.load.prequantized import is_packed_state, params4bit
from fastload.model_state import state_of
from fastload.settings import env_switch
from fastload.structure import stored_transposed

QUANT_STAT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                       "quant_state.bitsandbytes__fp4")
STAT_ENDINGS = tuple(f".{suffix}" for suffix in QUANT_STAT_SUFFIXES)  # a statistic's name: its weight's, then these
SWITCH = "FASTLOAD_DIRECT_LOAD"  # =0 takes transformers' from_pretrained for every load
READERS = min(8, os.cpu_count() or 1)  # reader threads over all shards, each on a run of neighbouring tensors
READ_AHEAD = 16  # tensors read but not yet placed: bounds the device memory the readers can get ahead by
TRIM_EVERY_BYTES = 8 << 20  # host quantization: checkpoint bytes quantized between two trims of the heap
TURN_BYTES = 2 << 20  # a reader's turn: its tensors (one at least) of about this many bytes


class NotCovered(Exception):
    """The direct load does not cover this checkpoint; the message says why (logged once, general path taken)."""


class InjectionFailed(Exception):
    """Raised by a while_reading callback whose LoRA injection failed after peft may have wrapped part of the
    skeleton: the direct load gives the skeleton up (the general path loads the model again, and apply_lora raises
    the error where it always has). Never read as a damaged checkpoint."""


def why_not_covered(plan, opts, device_map, weight_files) -> str | None:
    """None when the direct load can serve this plan, else the reason it cannot (one log line)."""
    quant = plan.quant
    if env_switch(SWITCH) is False:
        return f"{SWITCH} turns it off"
    if not plan.prequantized and not (quant.load_in_4bit and not quant.load_in_8bit):
        return "only 4-bit quantization is covered"
    if plan.prequantized and plan.quant.load_in_8bit:
        return "8-bit checkpoints are not covered"
    if opts.trust_remote_code or opts.model_kwargs or opts.rope_scaling:
        return "remote code, rope_scaling and extra model arguments take the general path"
    if quant.llm_int8_enable_fp32_cpu_offload:
        return "CPU offload takes the general path"
    if not weight_files or any(Path(f).suffix != ".safetensors" for f in weight_files):
        return "the checkpoint is not in safetensors files"
    devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if len(devices) != 1 or "disk" in devices:
        return "the model is spread over several devices"
    return None


def device_of(device_map) -> torch.device:
    value = next(iter(device_map.values())) if isinstance(device_map, dict) else device_map
    return torch.device(f"cuda:{value}" if isinstance(value, int) else value)


def build_skeleton(config, dtype, quantization_config, attn_implementation, device_map, files):
    """The model with every weight on the meta device and transformers' bitsandbytes layers in place.

    Buffers (rotary frequencies) are made for real, as from_pretrained's initialization makes them.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import get_hf_quantizer

    config = copy.deepcopy(config)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    try:
        hf_quantizer, config, device_map = get_hf_quantizer(config, quantization_config, device_map, True, {})
    except TypeError as e:  # another transformers version: its own from_pretrained knows its quantizer's calls
        raise NotCovered(f"transformers' quantizer API differs ({e})") from e
    if hf_quantizer is None or type(hf_quantizer).__name__ != "Bnb4BitHfQuantizer":
        raise NotCovered("the checkpoint is not bitsandbytes 4-bit")
    try:
        with PATCHING_GLOBALS, init_empty_weights(include_buffers=False), skipped_init():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (RuntimeError, ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError,
            AssertionError) as e:  # the load's meta model builds it again and says what is wrong
        raise NotCovered(f"transformers cannot build the model: {type(e).__name__}") from e
    if getattr(model, "_get_dtype_plan", None) is None and (
            getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None)):
        raise NotCovered(f"{type(model).__name__} keeps some modules in fp32 (this transformers has no dtype plan)")
    # from_pretrained swaps the layers inside its dtype context (their biases take it); the new layers' weights are
    # on meta and read afterwards: their init draws are skipped too
    with PATCHING_GLOBALS, default_dtype(dtype), skipped_init():
        hf_quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map, checkpoint_files=files,
                                      use_kernels=False)
    return model, hf_quantizer


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def read_headers(files) -> tuple[dict[str, Path], dict[str, Span]]:
    """Tensor name -> the file it is in, and -> where its bytes are in that file (headers only)."""
    from fastload.sources.checkpoint_files import read_safetensors_header

    where, spans = {}, {}
    for f in files:
        start = data_start(Path(f))
        for name, meta in read_safetensors_header(Path(f)).items():
            if name != "__metadata__":
                where[name] = Path(f)
                spans[name] = span_of(meta, start)
    return where, spans


def fp32_pattern(model, dtype) -> re.Pattern | None:
    """The names transformers loads in fp32 at this dtype (its dtype plan: _keep_in_fp32_modules in fp16,
    _keep_in_fp32_modules_strict in fp16 and bf16, e.g. DeepSeek-V3's router weight and bias), matched as it matches
    them; None when there are none."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    names = [name for name, kept in plan.items() if kept == torch.float32]
    return re.compile("|".join(f"(?:{name.replace('*', '.*')})" for name in names)) if names else None


def ignored_on_load(model, name: str) -> bool:
    """A checkpoint tensor the model's class declares it does not read (its `_keys_to_ignore_on_load_unexpected`:
    Qwen3.5's vision tower and multi-token-prediction weights under its text model), as transformers skips it."""
    patterns = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or ()
    return any(re.search(pattern, name) for pattern in patterns)


def plan_tensors(model, where: dict[str, Path], prequantized: bool, spans: dict | None = None) -> dict[str, list[str]]:
    """Each module's parameter or buffer -> the checkpoint tensors it is made of; NotCovered unless they match exactly.

    A checkpoint may name its 16-bit tensors as transformers' conversion expects them (per-expert tensors stacked
    into fused experts, renamed layers: fastload.load.expert_layouts). A missing, extra or otherwise renamed tensor is
    left to the general path, which reports it as fastload always has.
    """
    import bitsandbytes as bnb

    layout = layout_of(getattr(model.config, "model_type", None))
    source_of = renamed(where, layout)  # model name -> checkpoint name
    wanted: dict[str, list[str]] = {}
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            key = prefix + name
            parts = [source_of.get(key, key)]
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight" and prequantized:
                # a stored weight and its statistics, under the model's names or as the layout renames them (Gemma-3's
                # store entry: transformers saves its pre-5 names, language_model.model.*)
                stored = source_of.get(key, key)
                parts = [stored] + [f"{stored}.{s}" for s in QUANT_STAT_SUFFIXES if f"{stored}.{s}" in where]
            elif key not in source_of and param.dim() == 3:
                experts = expert_sources(key, param.shape[0], layout)
                parts = [source_of.get(n, n) for n in experts] if experts else parts
            if prequantized and not isinstance(module, bnb.nn.Linear4bit) and param.is_floating_point():
                # weights transformers 4 stored 4-bit (each expert, a router: Linear layers then) that transformers 5
                # holds as plain parameters
                parts += [f"{part}.{s}" for part in parts for s in QUANT_STAT_SUFFIXES if f"{part}.{s}" in where]
            if key not in source_of and key in tied and parts == [key]:
                continue  # tied to another weight: tie_weights fills it
            if parts[0] != key and spans is not None and not any(p.endswith(STAT_ENDINGS) for p in parts):
                _check_converted_shapes(key, param, parts, spans)
            wanted[key] = parts
        persistent = set(getattr(module, "_buffers", {})) - set(getattr(module, "_non_persistent_buffers_set", ()))
        for name in persistent:
            if getattr(module, name, None) is not None and prefix + name in source_of:
                wanted[prefix + name] = [source_of[prefix + name]]
    used = {part for parts in wanted.values() for part in parts}
    missing = sorted(k for k, parts in wanted.items() if any(p not in where for p in parts))
    extra = sorted(set(where) - used)
    if missing or extra:
        raise NotCovered(f"checkpoint names differ from the model's ({(missing + extra)[:3]})")
    return wanted


def experts_stored_4bit_one_by_one(model_type: str | None, weight_files) -> bool:
    """Whether a pre-quantized checkpoint of a family whose experts transformers 5 fuses holds them as 4-bit weights
    of their own (transformers 4's bnb-4bit layout): transformers 5 cannot read them, the direct load stacks them."""
    from fastload.sources.checkpoint_files import read_safetensors_header

    layout = layout_of(model_type)
    if not layout or not layout.get("stacks"):
        return False
    names = [n for f in weight_files if Path(f).suffix == ".safetensors" for n in read_safetensors_header(Path(f))]
    pieces = [re.escape(piece).replace(re.escape("{e}"), r"\d+") for parts in layout["stacks"].values()
              for piece in parts]
    statistics = re.compile(rf"\.(?:{'|'.join(pieces)})\.absmax$")
    return any(statistics.search(name) for name in renamed(names, layout))


def _check_converted_shapes(key: str, param, parts: list[str], spans: dict) -> None:
    """A renamed tensor has its parameter's shape, and each per-expert tensor its slice of the fused one (the checks
    of the load compare the model's own names only): NotCovered otherwise, and the general path says what is wrong."""
    shape = tuple(param.shape)
    if len(parts) == 1:
        expected = {parts[0]: shape}
    else:
        pieces = len(parts) // shape[0]
        expected = {part: (shape[1] // pieces, *shape[2:]) for part in parts}
        if shape[1] % pieces:
            expected = {}
    found = {part: tuple(spans[part].shape) for part in parts if part in spans and spans[part] is not None}
    wrong = sorted(part for part in found if found[part] != expected.get(part))
    if wrong or not expected:
        raise NotCovered(f"{key} does not fit its checkpoint tensors ({wrong[:1] or parts[:1]})")


def gathered(slot: tuple, key: str, arrived: dict[str, torch.Tensor], sources: list[str]):
    """The arrived tensors as place() takes them, under the model's names: a renamed tensor under its own name,
    per-expert tensors stacked into their fused parameter (fastload.load.expert_layouts)."""
    import bitsandbytes as bnb

    module, name = slot
    weights = [s for s in sources if not s.endswith(STAT_ENDINGS)]
    if len(weights) < len(sources) and not isinstance(module, bnb.nn.Linear4bit):
        return {key: _from_4bit(key, getattr(module, name), weights, arrived)}
    if sources[0] == key:  # its own name (a stored 4-bit weight's statistics follow it)
        return arrived
    if isinstance(module, bnb.nn.Linear4bit):  # a stored 4-bit weight renamed: its statistics under the new name too
        return {key + name[len(sources[0]):]: tensor for name, tensor in arrived.items()}
    if len(sources) == 1:
        return {key: arrived[sources[0]]}
    return {key: stacked([arrived.pop(s) for s in sources], getattr(module, name).shape[0])}


def _from_4bit(key: str, skeleton, weights: list[str], arrived: dict[str, torch.Tensor]):
    """A plain parameter from weights transformers 4 stored 4-bit when they were Linear layers (Mixtral's and
    Qwen-MoE's bnb-4bit uploads: each expert, and their routers): each dequantized as bitsandbytes does, into the
    skeleton parameter's dtype, and stacked where they are experts. The load stores an expert stack 4-bit again
    (fastload.load.experts): re-quantizing the dequantized values in the same blocks of 64 gives back the same
    values (NF4: the same codes) and block scales (each block's largest value is its scale; with double quantization the
    scales are quantized again). Experts stored in other blocks are refused rather than quantized twice."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    from fastload.errors import CheckpointError, CheckpointIncomplete
    from fastload.load.nf4_experts import BLOCKSIZE
    from fastload.load.prequantized import quant_state

    dense = []
    for weight in weights:
        packed = arrived.pop(weight)
        stats = {k[len(weight) + 1:]: arrived.pop(k) for k in [k for k in arrived if k.startswith(weight + ".")]}
        if not stats:  # a 16-bit expert among 4-bit ones
            dense.append(packed)
            continue
        state = quant_state(stats, packed.device) or QuantState.from_dict(stats, packed.device)
        if skeleton.ndim == 3 and state.blocksize != BLOCKSIZE:  # a stack re-quantized at 64 would change its codes
            raise CheckpointError(f"Loading {weight}", found=f"the experts are stored 4-bit in blocks of "
                                  f"{state.blocksize} values; fastload stores expert stacks in bitsandbytes' blocks of "
                                  f"{BLOCKSIZE}, which would quantize them a second time",
                                  fix="load the 16-bit original, which fastload quantizes as it loads")
        state.dtype = skeleton.dtype  # the values it was stored from, not rounded to the dtype it was stored in
        dense.append(dequantize_4bit(packed, state))
    shape = skeleton.shape
    if len(weights) == 1:
        expected = {weights[0]: tuple(shape)}
    else:
        pieces = len(weights) // shape[0]
        expected = {w: (shape[1] // pieces, *shape[2:]) for w in weights} if shape[1] % pieces == 0 else {}
    wrong = [w for w, d in zip(weights, dense) if tuple(d.shape) != expected.get(w)]
    if wrong:
        found = dict(zip(weights, dense))[wrong[0]].shape
        raise CheckpointIncomplete(f"Loading {key}", found=f"{wrong[0]} holds a {tuple(found)} weight, not its part "
                                   f"of the model's {tuple(shape)} {key.rpartition('.')[2]}",
                                   fix="use the config.json that belongs to these weights")
    return dense[0] if len(dense) == 1 else stacked(dense, shape[0])


def reader_chunks(where: dict[str, Path], spans: dict[str, Span], readers: int,
                  chunk_bytes: int = TURN_BYTES):
    """(file, names) chunks in file order, each a run of neighbouring tensors of about `chunk_bytes` (smaller where
    `readers` would otherwise go without), taken by the reader threads in turn. Small chunks keep the readers
    side by side: a weight built from many tensors (a layer's experts, stored one per expert) waits for its last
    one with its others held on the device, and readers each on their own stretch of the file would hold that
    for several layers at once (one per reader: eight layers of bf16 experts on a 16-core host)."""
    by_file: dict[Path, list[str]] = {}
    for name, f in where.items():
        by_file.setdefault(f, []).append(name)
    total = sum(s.end - s.start for s in spans.values()) or 1
    target = max(1, min(chunk_bytes, total // max(1, readers)))
    chunks = []
    for f, names in by_file.items():
        names.sort(key=lambda n: spans[n].start)
        chunk, filled = [], 0
        for name in names:
            chunk.append(name)
            filled += spans[name].end - spans[name].start
            if filled >= target:
                chunks.append((f, chunk))
                chunk, filled = [], 0
        if chunk:
            chunks.append((f, chunk))
    return chunks


def stream_tensors(where, spans, device: torch.device, out: queue.Queue, stop: threading.Event):
    """Reader threads (at most READERS, each taking runs of neighbouring tensors in turn: however many shards, never
    more threads or pinned buffers) put (name, tensor, event) on `out`: the tensor is on `device` once `event` has
    run on the consumer's stream (None: at once). A reader's error is put there too. A set `stop` ends them at
    their next tensor."""
    chunks: queue.Queue = queue.Queue()
    for chunk in reader_chunks(where, spans, READERS):
        chunks.put(chunk)
    # the readers allocate on the consumer's stream (a thread's own current stream is the default one): memory the
    # consumer frees is then reused only after its own queued kernels, whichever stream the user loads under
    consumer = torch.cuda.current_stream(device) if device.type == "cuda" else None
    threads = [threading.Thread(target=_reader, args=(chunks, spans, device, out, stop, consumer), daemon=True,
                                name=f"fastload-read-{i}")
               for i in range(min(READERS, chunks.qsize()))]
    for t in threads:
        t.start()
    return threads


def _reader(chunks: queue.Queue, spans, device: torch.device, out: queue.Queue, stop: threading.Event,
            consumer=None) -> None:
    """One reader thread: its staging (onto a GPU) made once, then chunk after chunk until none is left, all on the
    consumer's stream (None: the CPU)."""
    with torch.cuda.stream(consumer), contextlib.ExitStack() as opened:  # None: no stream to set
        staging = None
        try:
            if device.type == "cuda":
                staging = _staging(device)
                if staging is not None:
                    opened.callback(staging.finish)  # no copy may still write into memory handed out again
            files = OpenFile(device)
            opened.callback(files.close)  # before the staging's finish: the reads into its buffers are done
            while not stop.is_set():
                try:
                    f, names = chunks.get_nowait()
                except queue.Empty:
                    return
                _read_run(files, f, names, spans, device, staging, out, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            _put_unless_stopped(out, (None, e, None), stop)


class OpenFile:
    """A reader's open shard: safetensors' mapping of it (and a reader onto the GPU, or a descriptor for the pinned
    reads), kept across the reader's turns in that shard. Turns come in file order, so a reader never goes back to
    a shard it left: each is closed when the next one opens, and a reader holds one descriptor however many shards
    there are (a checkpoint of a hundred shards would otherwise hold eight hundred, past many hosts' limit). Tensors
    read on the host keep their mapping alive on their own."""

    def __init__(self, device: torch.device):
        self._device = device
        self._key: tuple[Path, bool] | None = None
        self._handles: tuple = ()
        self._opened = contextlib.ExitStack()

    def get(self, f: Path, staged: bool) -> tuple:
        """(mapping on the host, source of reads no staged read covers, descriptor or None)."""
        from safetensors import safe_open

        if self._key != (f, staged):
            self.close()
            mapped = self._opened.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            direct, fd = mapped, None
            if self._device.type == "cuda" and not staged:
                direct = self._opened.enter_context(safe_open(str(f), framework="pt", device=str(self._device)))
            elif staged:
                fd = os.open(f, os.O_RDONLY)
                self._opened.callback(os.close, fd)
            self._key, self._handles = (f, staged), (mapped, direct, fd)
        return self._handles

    def close(self) -> None:
        self._key, self._handles = None, ()
        self._opened.close()


def _read_run(files: OpenFile, f: Path, names: list[str], spans, device: torch.device, staging, out: queue.Queue,
              stop: threading.Event) -> None:
    """One chunk's tensors: onto a GPU through the reader's pinned buffers and stream (fastload.load.pinned_reads),
    or where those cannot be had, safetensors' own reads onto the device; on the CPU the mapped file's tensors as
    they are (no copy at all). A packed quantization state is decoded on the host: it is read from the mapping."""
    mapped, direct, fd = files.get(f, staging is not None)
    if staging is None:
        runs = [[name] for name in names]
    else:
        staged = [n for n in names if spans[n] is not None and not is_packed_state(n)]
        runs = list(runs_of(staged, spans)) + [[n] for n in names if spans[n] is None or is_packed_state(n)]
    for run in runs:
        if stop.is_set():
            return
        if staging is not None and spans[run[0]] is not None and not is_packed_state(run[0]):
            read, arrived = staging.read(fd, [spans[n] for n in run])
        else:
            source = mapped if is_packed_state(run[0]) else direct
            read, arrived = [source.get_tensor(run[0])], None
        for name, tensor in zip(run, read):
            _put_unless_stopped(out, (name, tensor, arrived), stop)


def _staging(device: torch.device) -> Staging | None:
    """A reader's pinned buffers and stream, or None (said once) where the platform or the driver has none to give:
    no positioned reads (Windows), or page-locked memory refused (a container's locked-memory limit)."""
    if not hasattr(os, "preadv"):
        _say_once("this platform has no os.preadv: the direct load reads through safetensors onto the GPU")
        return None
    try:
        return Staging(device)
    except RuntimeError as e:  # cudaHostAlloc refused
        _say_once(f"pinned host buffers could not be had ({e}): the direct load reads through safetensors instead")
        return None


@functools.cache
def _say_once(message: str) -> None:
    logger.info(message)


def _put_unless_stopped(out: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def slots_of(model, keys) -> dict[str, tuple]:
    """key -> (module, attribute name) for every weight the load fills, found before anything can wrap the modules
    (peft's injection while the weights are read puts a wrapper where the layer was; the layer itself stays)."""
    return {key: (model.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2]) for key in keys}


def place(slot: tuple, key: str, parts: dict[str, torch.Tensor], dtype, device, prequantized: bool,
          fp32: bool = False) -> None:
    """Put one parameter or buffer in place as transformers' loading would: the same casts, the same bnb calls
    (`fp32`: one its dtype plan keeps in fp32)."""
    import bitsandbytes as bnb

    module, name = slot
    value = parts[key]
    if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
        if prequantized:
            stats = {k[len(key) + 1:]: v for k, v in parts.items() if k != key}
            with phase("host_to_device"):
                value = value.to(device)
            with phase("quantization"):  # the stored states wrapped, nothing computed
                param = params4bit(value, stats, device, module)
        else:
            old = module.weight
            if stored_transposed(module):  # GPT-2's Conv1D stores (in, out), as transformers' quantizer knows
                value = value.t()
            with phase("host_to_device"):
                value = value.to(device=device, dtype=dtype)
            with phase("quantization"):  # bnb's quantization, without its blocking copy per weight
                param = quantized_params4bit(value, old, device)
        module._parameters["weight"] = param
        return
    current = getattr(module, name)
    target_dtype = dtype if value.is_floating_point() and (prequantized or current.dtype == dtype) else current.dtype
    if fp32 and value.is_floating_point():
        target_dtype = torch.float32
    with phase("host_to_device"):
        value = value.to(device=device, dtype=target_dtype if value.is_floating_point() else value.dtype)
    if name in module._parameters:
        # registered, as transformers does: a load storing fused experts 4-bit does so as each one arrives
        # (fastload.load.experts.quantized_on_arrival's hook); never while another thread's load has
        # register_parameter swapped for its meta version
        with PATCHING_GLOBALS:
            module.register_parameter(name, torch.nn.Parameter(value, requires_grad=current.requires_grad))
    else:
        module._buffers[name] = value


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim from the running process, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_host_memory() -> None:
    """Give the pages of freed temporaries back to the OS. glibc raises its mmap threshold with each large block
    freed, so the per-tensor temporaries of a CPU quantization stay in its heap and add up to about a 16-bit copy
    of the model (measured in benchmarks/README.md); a trim every TRIM_EVERY_BYTES of quantized weights keeps a few
    tensors' worth."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class TrimmedHeap:
    """Counts the checkpoint bytes quantized on the host and trims the heap after every TRIM_EVERY_BYTES of them: one
    trim per weight cost 1.2 ms each, 0.33 s of SmolLM2-135M's 2.8 s load on a CI core."""

    def __init__(self, every: int = TRIM_EVERY_BYTES):
        self.every, self.since = every, 0

    def quantized(self, nbytes: int) -> None:
        self.since += nbytes
        if self.since >= self.every:
            release_freed_host_memory()
            self.since = 0

    def close(self) -> None:
        if self.since:
            release_freed_host_memory()
            self.since = 0


def fill(model, wanted: dict[str, list[str]], where: dict[str, Path], spans, dtype, device, prequantized: bool,
         while_reading=None, fp32: re.Pattern | None = None) -> None:
    """Read every shard (READERS threads) and place each weight as soon as all of its tensors have arrived.
    `while_reading`: called once on this thread right after the readers start; they read on meanwhile without the
    READ_AHEAD bound, which only a pre-quantized checkpoint may drop (its tensors are the model's own storage)."""
    owner = {part: key for key, parts in wanted.items() for part in parts}
    slots = slots_of(model, wanted)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    out: queue.Queue = queue.Queue(maxsize=0 if while_reading is not None and prequantized else READ_AHEAD)
    stop = threading.Event()
    threads = stream_tensors(where, spans, device, out, stop)
    waited = 0.0
    heap = TrimmedHeap() if device.type == "cpu" and not prequantized else None
    try:
        if while_reading is not None:
            while_reading()
        for _ in range(len(owner)):
            started = time.perf_counter()
            name, tensor, arrived = out.get()
            waited += time.perf_counter() - started
            if name is None:
                raise tensor
            if arrived is not None:
                torch.cuda.current_stream(device).wait_event(arrived)
            key = owner[name]
            pending.setdefault(key, {})[name] = tensor
            if len(pending[key]) == len(wanted[key]):
                parts = gathered(slots[key], key, pending.pop(key), wanted[key])
                place(slots[key], key, parts, dtype, device, prequantized, fp32 is not None and bool(fp32.search(key)))
                if heap is not None:
                    heap.quantized(sum(t.numel() * t.element_size() for t in parts.values()))
                del parts
    finally:
        stop.set()  # on an error: the readers end at their next tensor instead of waiting on a full queue
        for t in threads:
            t.join()
        if heap is not None:
            heap.close()
    add_phase("read_wait", waited)


def finish(model, hf_quantizer, device, location: str, adapters_in: bool = False) -> None:
    """What from_pretrained does after the weights: buffers on the device, ties, eval mode, generation config.
    `adapters_in`: peft injected the (still empty) adapters while the weights were read, into a model in eval mode
    already: they are neither weights left unfilled nor switched to eval (the late injection leaves them in train)."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.device.type == "meta" and not (adapters_in and ".lora_" in n)]
    if left:
        raise NotCovered(f"weights left unfilled: {left[:3]}")
    model.config.name_or_path = location
    if not adapters_in:
        model.eval()
    model.hf_quantizer = hf_quantizer
    hf_quantizer.postprocess_model(model)
    generation = Path(location) / "generation_config.json"
    if model.can_generate() and generation.is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(location)
        except (OSError, ValueError, json.JSONDecodeError):
            pass  # from_pretrained keeps the config-derived one as well when the file cannot be read


class DirectLoad:
    """A direct load between its two halves: the skeleton built and the checkpoint's names matched to it (the load's
    checks count and compare shapes against this skeleton: no second model of the config is built), then `read`."""

    def __init__(self, plan, model, hf_quantizer, where, spans, wanted, dtype, device, built_in: float):
        self.plan, self.model, self.hf_quantizer, self.dtype, self.device = plan, model, hf_quantizer, dtype, device
        self.where, self.spans, self.wanted, self.built_in = where, spans, wanted, built_in

    def read(self, before_reading=None, while_reading=None):
        """Fill the skeleton from the checkpoint; returns the model as from_pretrained would, or None (reason
        logged) when it cannot be finished.

        Args:
            before_reading: called once, just before the weights are read (or None).
            while_reading: called once with the skeleton and device as the readers start (or None); True when it
                injected the LoRA adapters into the skeleton (fastload.train.early_injection).
        """
        plan, model, device = self.plan, self.model, self.device
        if before_reading is not None:
            before_reading()
        started = time.perf_counter()
        injected = []
        during = None if while_reading is None else (lambda: injected.append(while_reading(model, device)))
        try:
            fill(model, self.wanted, self.where, self.spans, self.dtype, device, plan.prequantized, during,
                 fp32_pattern(model, self.dtype))
        except InjectionFailed as e:
            # the LoRA injection, not the checkpoint, failed: never a reason to discard a store entry
            logger.info("direct 4-bit load not used (LoRA injection while reading failed: %s): loading through "
                        "transformers", str(e))
            return None
        if device.type == "cuda":
            with phase("device_sync"):
                torch.cuda.synchronize(device)
        filled = time.perf_counter()
        try:
            with phase("finish"):
                finish(model, self.hf_quantizer, device, plan.location, adapters_in=any(injected))
        except NotCovered as e:  # the reason as text: a kept log record must not keep the read model (traceback)
            logger.info("direct 4-bit load not used (%s): loading through transformers", str(e))
            return None
        except Exception as e:  # noqa: BLE001 - with adapters in, what fails is the injection's, not the checkpoint's
            if not any(injected):
                raise
            logger.info("direct 4-bit load not used (finishing the skeleton with its LoRA adapters failed: %s: %s): "
                        "loading through transformers", type(e).__name__, str(e))
            return None
        state_of(model).direct_load = True
        logger.info("direct 4-bit load: skeleton %.2f s, %d tensors read and %s %.2f s, finish %.2f s",
                    self.built_in, len(self.where), "placed" if plan.prequantized else "quantized",
                    filled - started, time.perf_counter() - filled)
        return model


def prepare_direct(plan, opts, config, dtype, device_map, weight_files, quantization_config) -> DirectLoad | None:
    """The first half of the direct load (skeleton, names matched), or None (reason logged) when it does not cover
    the plan. A config transformers fails to build also gives None: the caller's own checks then build it and say
    what is wrong exactly as they would without the direct load.

    Args:
        plan: the LoadPlan (a local directory or store entry: plan.location holds the files).
        opts: the LoadOptions of this load.
        config: the transformers config read from plan.location.
        dtype: the compute dtype; weights that are not quantized are cast to it, as from_pretrained does.
        device_map: the resolved device map (one device).
        weight_files: the checkpoint's safetensors files.
        quantization_config: the BitsAndBytesConfig to quantize with, or None for a pre-quantized checkpoint.

    Returns:
        A DirectLoad whose `read()` gives the model, or None.
    """
    reason = why_not_covered(plan, opts, device_map, weight_files)
    try:
        if reason is None:
            started = time.perf_counter()
            with phase("module_construction"):
                model, hf_quantizer = build_skeleton(config, dtype, quantization_config, opts.attn_implementation,
                                                     device_map, [str(f) for f in weight_files])
            with phase("checkpoint_checks"):
                where, spans = read_headers(weight_files)
                where = {name: f for name, f in where.items() if not ignored_on_load(model, name)}  # never read
                wanted = plan_tensors(model, where, plan.prequantized, spans)
            return DirectLoad(plan, model, hf_quantizer, where, spans, wanted, dtype, device_of(device_map),
                              time.perf_counter() - started)
    except NotCovered as e:
        reason = str(e)
    logger.info("direct 4-bit load not used (%s): loading through transformers", reason)
    return None
