"""Write one .gguf file (llama.cpp, Ollama, LM Studio) from a fastload LoRA model or a merged 16-bit folder.

A LoRA model is first merged as `save_merged` merges it (into the 16-bit source when it is on this machine, else
into the dequantized 4-bit weights; one line says which) into a temporary folder beside the output. The GGUF is
then written tensor by tensor from that folder's safetensors, so no more than one 16-bit tensor is in memory at a
time. F16, BF16 and Q8_0 are written by fastload through the `gguf` package; the k-quants (Q4_K_M, ...) by
llama.cpp's own quantizer from llama-cpp-python, run on a temporary F16 file. The file appears under its name only
once complete: it is written to a temporary sibling and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastload._log import logger
from fastload.atomic import atomic_file, scratch_folder
from fastload.errors import (
    BackendUnavailable,
    CheckpointIncomplete,
    FastloadError,
    InvalidOption,
)
from fastload.export.families import (
    Family,
    add_hyperparameters,
    family_for,
    llama3_rope_factors,
    skipped,
    transform,
)

# fastload's own writers; the k-quants go through llama.cpp's quantizer (name -> llama_ftype value)
OWN_TYPES = ("f16", "bf16", "q8_0", "f32")
LLAMA_CPP_TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14,
                   "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
Q8_BLOCK = 32


@dataclass
class _Plan:
    """What the writer needs from one checkpoint tensor: where it is, its GGUF name, how it is stored."""

    key: str
    shard: Path
    name: str
    shape: tuple[int, ...]
    kind: str  # "f32", "f16", "bf16" or "q8_0"


def save_gguf(model_or_folder: Any, path: str | os.PathLike, tokenizer=None, quantization: str = "q8_0",
              source: str = "auto", modelfile: bool = True, verify: bool = True, probe_texts=None) -> Path:
    """Write the model as one GGUF file with its tokenizer and chat template, and an Ollama Modelfile beside it.

    Args:
        model_or_folder: a fastload model with LoRA adapters (merged first), or a folder of a merged 16-bit
            checkpoint (config.json + safetensors + tokenizer files).
        path: the .gguf file to write; an existing file there is replaced only once the new one is complete.
        tokenizer: the tokenizer trained with (needed when the folder or model location holds none).
        quantization: "f16", "bf16", "q8_0" (fastload's own writers; 1-D tensors stay F32) or a llama.cpp
            k-quant such as "q4_k_m" / "q5_k_m" (needs `pip install llama-cpp-python`).
        source: for a model, which weights the adapter is merged into: "auto", "16bit" or "dequantized".
        modelfile: also write an Ollama `Modelfile` next to the GGUF.
        verify: for a model, report what the merge cost on a probe batch (see fastload.export.verify).
        probe_texts: held-out texts for that report (default: a chat from the tokenizer's template).

    Returns:
        The path of the written .gguf file.

    Raises:
        UnsupportedArchitecture: the family, its rope scaling or its tokenizer cannot be written (checked first).
        InvalidOption: an unknown quantization name.
        BackendUnavailable: a k-quant was asked for without llama-cpp-python installed.
        AdapterError / SaveError: the merge or the write failed; no partial .gguf is left behind.
    """
    quantization = _check_quantization(quantization)
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise InvalidOption(f"Writing the GGUF to {path}", found="a folder with that name",
                            fix="give a file name ending in .gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder).expanduser()
        family_for(_read_config(folder))
        with _tokenizer_folder(folder, tokenizer, path) as tok_dir:
            write_gguf(folder, path, quantization, tok_dir)
    else:
        family_for(model_or_folder.config.to_dict())
        with _merged_folder(model_or_folder, path, tokenizer, source, verify, probe_texts) as folder:
            write_gguf(folder, path, quantization, folder)
    if modelfile:
        from fastload.export.ollama import write_modelfile

        write_modelfile(path)
    return path


def _check_quantization(quantization: str) -> str:
    name = str(quantization).lower()
    if name not in OWN_TYPES and name not in LLAMA_CPP_TYPES:
        raise InvalidOption(f"quantization={quantization!r}", found=f"choices: {', '.join(OWN_TYPES)}, "
                            f"{', '.join(LLAMA_CPP_TYPES)}", fix="use 'q8_0' (default), 'f16' or 'q4_k_m'")
    if name in LLAMA_CPP_TYPES:
        _llama_cpp()  # refused before any merge when the quantizer is missing
    return name


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise BackendUnavailable("Writing a llama.cpp k-quant GGUF", found="llama-cpp-python is not installed",
                                 fix="pip install 'fastload[llamacpp]' (llama-cpp-python), or use quantization='q8_0' "
                                     "or 'f16', which fastload writes itself") from e
    return llama_cpp


def _read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointIncomplete(f"Writing a GGUF of {folder}", found="no config.json there",
                                   fix="pass a merged 16-bit folder (FastModel.save_merged) or the model itself")
    config = json.loads(config_file.read_text())
    if config.get("quantization_config"):
        raise InvalidOption(f"Writing a GGUF of {folder}", found="a quantized checkpoint (quantization_config)",
                            fix="export from the 16-bit merged folder, or pass the loaded model")
    return config


@contextlib.contextmanager
def _tokenizer_folder(folder: Path, tokenizer, near: Path) -> Iterator[Path]:
    """The folder's own tokenizer files, or the given tokenizer saved into a temporary folder."""
    if tokenizer is None:
        yield folder
        return
    with scratch_folder(near) as tmp:
        tokenizer.save_pretrained(str(tmp))
        yield tmp


@contextlib.contextmanager
def _merged_folder(model, near: Path, tokenizer, source: str, verify: bool, probe_texts) -> Iterator[Path]:
    """The model merged into a temporary 16-bit folder beside the output, removed afterwards."""
    from fastload.save.merged import save_merged

    with scratch_folder(near) as tmp:
        # merged in float32: rounding to the source's bf16 first, then to F16/Q8_0, would round twice
        merged = save_merged(model, tmp / "model", tokenizer=tokenizer, source=source, dtype="float32",
                             verify=verify, probe_texts=probe_texts)
        yield merged


# -- the writer ---------------------------------------------------------------------------------------------------

def write_gguf(folder: Path, path: Path, quantization: str, tokenizer_dir: Path) -> Path:
    """Convert a 16-bit safetensors folder to `path` atomically; k-quants via a temporary F16 file."""
    if quantization in LLAMA_CPP_TYPES:
        with scratch_folder(path) as tmp:
            f16 = tmp / "model-f16.gguf"
            _write_own(folder, f16, "f16", tokenizer_dir)
            with _atomic_file(path) as out:
                _quantize_with_llama_cpp(f16, out, quantization)
        return path
    with _atomic_file(path) as out:
        _write_own(folder, out, quantization, tokenizer_dir)
    return path


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """fastload's atomic file (a temporary sibling renamed over `path`, removed on any error or Ctrl-C), an OSError
    reported as a SaveError."""
    try:
        with atomic_file(path) as tmp:
            yield tmp
    except OSError as e:
        if isinstance(e, FastloadError):
            raise
        from fastload.save.folders import save_error

        raise save_error(path, e) from e
        raise


def _write_own(folder: Path, out: Path, quantization: str, tokenizer_dir: Path) -> None:
    import gguf
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from fastload.export.vocab import add_tokenizer

    config = _read_config(folder)
    family = family_for(config)
    plans = _tensor_plans(folder, family, config, quantization)
    writer = gguf.GGUFWriter(str(out), family.arch)
    try:
        _add_metadata(writer, folder, family, config, quantization)
        add_tokenizer(writer, tokenizer_dir, config["vocab_size"])
        rope_factors = llama3_rope_factors(config)
        if rope_factors is not None:
            writer.add_tensor_info("rope_freqs.weight", rope_factors.shape, np.dtype(np.float32), rope_factors.nbytes)
        for p in plans:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p), raw_dtype=_ggml_type(p.kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if rope_factors is not None:
            writer.write_tensor_data(rope_factors)
        by_shard: dict[Path, Any] = {}
        for p in tqdm(plans, desc=f"writing GGUF ({quantization})", unit="tensor"):
            if p.shard not in by_shard:
                by_shard.clear()  # one shard open at a time; tensors are read one by one
                by_shard[p.shard] = safe_open(str(p.shard), framework="pt")
            array = _as_stored(p, transform(family, config, p.key, _read_f32(by_shard[p.shard], p.key)))
            writer.write_tensor_data(array)
        writer.flush()
    finally:
        writer.close()
    logger.info("GGUF written: %s architecture, %s, %d tensors", family.arch, quantization, len(plans))


def _add_metadata(writer, folder: Path, family: Family, config: dict, quantization: str) -> None:
    import gguf

    from fastload import __version__

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(config.get("_name_or_path") or folder.name)
    writer.add_string("general.quantized_by", f"fastload {__version__}")
    add_hyperparameters(writer, family, config)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensor_plans(folder: Path, family: Family, config: dict, quantization: str) -> list[_Plan]:
    """Every tensor to write, named and typed, from the safetensors headers alone (no weight read yet)."""
    import gguf

    from fastload.sources.checkpoint_files import find_weight_files, read_safetensors_header

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family.arch)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    shards, _ = find_weight_files(folder, allow_pickle=False)
    plans = []
    for shard in shards:
        for key, info in read_safetensors_header(shard).items():
            if key == "__metadata__" or skipped(family, config, key):
                continue
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                from fastload.errors import UnsupportedArchitecture

                raise UnsupportedArchitecture(f"Writing a GGUF of a {config.get('model_type')} model",
                                              found=f"the tensor {key} has no llama.cpp name",
                                              fix="convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
            shape = tuple(info["shape"])
            plans.append(_Plan(key, shard, name, shape, _stored_kind(name, shape, quantization)))
    fallback = [p.name for p in plans if quantization == "q8_0" and p.kind == "f16"]
    if fallback:
        logger.info("GGUF q8_0: %d tensor(s) with rows not a multiple of 32 written as F16 (%s...)",
                    len(fallback), fallback[0])
    return plans


def _stored_kind(name: str, shape: tuple[int, ...], quantization: str) -> str:
    """llama.cpp keeps 1-D tensors (norms, biases) in F32; Q8_0 needs rows that are whole 32-value blocks."""
    if len(shape) < 2 or quantization == "f32":
        return "f32"
    if quantization == "q8_0":
        return "q8_0" if shape[-1] % Q8_BLOCK == 0 else "f16"
    return quantization


def _ggml_type(kind: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]


def _nbytes(p: _Plan) -> int:
    n = int(np.prod(p.shape))
    if p.kind == "q8_0":
        return n // Q8_BLOCK * (2 + Q8_BLOCK)  # per block: an f16 scale and 32 int8 values
    return n * (4 if p.kind == "f32" else 2)


def _read_f32(shard, key: str) -> np.ndarray:
    import torch

    return shard.get_tensor(key).to(torch.float32).numpy()


def _as_stored(p: _Plan, array: np.ndarray) -> np.ndarray:
    import gguf
    import torch

    if p.kind == "f32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if p.kind == "f16":
        return np.ascontiguousarray(array, dtype=np.float16)
    if p.kind == "bf16":
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(np.ascontiguousarray(array), gguf.GGMLQuantizationType.Q8_0)


def _quantize_with_llama_cpp(f16: Path, out: Path, quantization: str) -> None:
    import ctypes

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES[quantization]
    params.nthread = os.cpu_count() or 1
    logger.info("quantizing the GGUF to %s with llama.cpp's quantizer (llama-cpp-python)", quantization.upper())
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        from fastload.errors import SaveError

        raise SaveError(f"Quantizing the GGUF to {quantization}", found=f"llama_model_quantize returned {rc}",
                        fix="try quantization='q8_0', or update llama-cpp-python")
