"""The save and push methods an Unsloth notebook calls on the model, bound to the loaded model instance.

`model.save_pretrained_merged(dir, tokenizer, save_method=...)`, `model.save_pretrained_gguf(dir, tokenizer,
quantization_method=...)`, `model.push_to_hub_merged(repo_id, ...)` and `model.push_to_hub_gguf(repo_id, ...)` are
bound to each model fastload returns (never set on a class), and are built on fastload's own savers
(fastload.save.adapters, fastload.save.merged) and on the GGUF writer `fastload.export.gguf.save_gguf`.
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path
from typing import Any

from fastload.compat.options import log_once
from fastload.errors import BackendUnavailable, InvalidOption, SaveError

SAVE_METHODS = ("merged_16bit", "merged_4bit", "merged_4bit_forced", "lora")
# Unsloth's names for its GGUF presets -> the quantization they stand for
GGUF_ALIASES = {"fast_quantized": "q8_0", "quantized": "q4_k_m", "not_quantized": "f16", "None": "f16"}
DEFAULT_COMMIT_MESSAGE = "Trained with fastload"


def attach_save_methods(model):
    """Bind the four methods to this model instance (not its class: other models of that class stay as they are)."""
    for name, function in (("save_pretrained_merged", save_pretrained_merged),
                           ("save_pretrained_gguf", save_pretrained_gguf),
                           ("push_to_hub_merged", push_to_hub_merged), ("push_to_hub_gguf", push_to_hub_gguf)):
        setattr(model, name, types.MethodType(function, model))
    return model


def save_pretrained_merged(self, save_directory: str | os.PathLike, tokenizer=None, save_method: str = "merged_16bit",
                           push_to_hub: bool = False, token: str | bool | None = None,
                           max_shard_size: int | str = "5GB", **unused: Any) -> Path:
    """Save the trained model as Unsloth's save_method names it.

    Args:
        save_directory: the folder to write (replaced atomically), or the repo id when push_to_hub=True.
        tokenizer: saved beside the weights.
        save_method: "merged_16bit" (LoRA merged into 16-bit weights, for transformers / vLLM), "merged_4bit" (the
            merged model as a bitsandbytes 4-bit checkpoint) or "lora" (the adapter alone).
        push_to_hub: upload the result to the Hub repo `save_directory` instead of keeping it here.
        token: Hugging Face token for the upload (never logged).
        max_shard_size: largest safetensors shard of a merged save.

    Returns:
        The folder written (the temporary one is gone after a push).

    Raises:
        InvalidOption: an unknown save_method. AdapterError: the model has no LoRA adapters.
        SaveError: the folder cannot be written.
    """
    _log_unused("save_pretrained_merged", unused)
    if push_to_hub:
        return push_to_hub_merged(self, str(save_directory), tokenizer, save_method=save_method, token=token,
                                  max_shard_size=max_shard_size)
    return _save_merged(self, save_directory, tokenizer, save_method, max_shard_size)


def _save_merged(model, directory, tokenizer, save_method: str, max_shard_size) -> Path:
    from fastload.save.adapters import save_adapter
    from fastload.save.merged import save_merged

    if save_method not in SAVE_METHODS:
        raise InvalidOption(f"save_method={save_method!r}", found=f"known: {', '.join(SAVE_METHODS)}",
                            fix="use 'merged_16bit' (default), 'merged_4bit' or 'lora'")
    if save_method == "lora":
        return save_adapter(model, directory, tokenizer=tokenizer)
    return save_merged(model, directory, tokenizer=tokenizer, quantize=save_method != "merged_16bit",
                       max_shard_size=max_shard_size)


def save_pretrained_gguf(self, save_directory: str | os.PathLike, tokenizer=None,
                         quantization_method: str | list[str] = "fast_quantized", push_to_hub: bool = False,
                         token: str | bool | None = None, **unused: Any) -> Path:
    """Write the trained model (LoRA merged) as GGUF for llama.cpp / Ollama, through fastload's GGUF writer.

    Args:
        save_directory: the folder for the .gguf file(s), or the repo id when push_to_hub=True.
        tokenizer: written into the GGUF metadata.
        quantization_method: "q8_0", "f16", "bf16", "q4_k_m", ... or Unsloth's "fast_quantized" (q8_0),
            "quantized" (q4_k_m), "not_quantized" (f16); a list writes one file per method.
        push_to_hub: upload to the Hub repo `save_directory`.
        token: Hugging Face token for the upload (never logged).

    Returns:
        The folder written.

    Raises:
        BackendUnavailable: this fastload has no GGUF writer (fastload.export.gguf).
    """
    _log_unused("save_pretrained_gguf", unused)
    if push_to_hub:
        return push_to_hub_gguf(self, str(save_directory), tokenizer, quantization_method=quantization_method,
                                token=token)
    save_gguf = gguf_writer()
    directory = Path(save_directory)
    for method in _gguf_methods(quantization_method):  # one file per method in the folder, as Unsloth names them
        save_gguf(self, directory / f"model.{method.upper()}.gguf", tokenizer, quantization=method)
    return directory


def gguf_writer():
    """fastload.export.gguf.save_gguf, imported when asked for; its absence is said plainly, never faked."""
    try:
        from fastload.export.gguf import save_gguf
    except ImportError as e:
        raise BackendUnavailable("Saving as GGUF (save_pretrained_gguf / push_to_hub_gguf)",
                                 found=f"this fastload has no GGUF writer: fastload.export.gguf.save_gguf cannot be "
                                       f"imported ({e})",
                                 fix="save_pretrained_merged(dir, tokenizer, save_method='merged_16bit') and convert "
                                     "with llama.cpp's convert_hf_to_gguf.py, or update fastload") from e
    return save_gguf


def _gguf_methods(quantization_method) -> list[str]:
    methods = quantization_method if isinstance(quantization_method, (list, tuple)) else [quantization_method]
    if not methods:
        raise InvalidOption("quantization_method=[]", found="no GGUF type asked for", fix="use e.g. 'q8_0'")
    return [GGUF_ALIASES.get(str(m), str(m).lower()) for m in methods]


def push_to_hub_merged(self, repo_id: str, tokenizer=None, save_method: str = "merged_16bit",
                       commit_message: str | None = DEFAULT_COMMIT_MESSAGE, private: bool | None = None,
                       token: str | bool | None = None, max_shard_size: int | str = "5GB", create_pr: bool = False,
                       revision: str | None = None, **unused: Any) -> str:
    """Build the save_pretrained_merged folder in a temporary place and upload it to the Hub repo `repo_id`.

    Returns:
        The URL of the commit. Raises: SaveError when the upload fails (the token is never part of the message).
    """
    _log_unused("push_to_hub_merged", unused)
    with tempfile.TemporaryDirectory(prefix="fastload-push-") as tmp:
        folder = _save_merged(self, Path(tmp) / "model", tokenizer, save_method, max_shard_size)
        return upload_folder(folder, repo_id, token=token, private=private, commit_message=commit_message,
                             create_pr=create_pr, revision=revision)


def push_to_hub_gguf(self, repo_id: str, tokenizer=None, quantization_method: str | list[str] = "fast_quantized",
                     commit_message: str | None = DEFAULT_COMMIT_MESSAGE, private: bool | None = None,
                     token: str | bool | None = None, create_pr: bool = False, revision: str | None = None,
                     **unused: Any) -> str:
    """Write the GGUF file(s) in a temporary folder and upload them to the Hub repo `repo_id`."""
    _log_unused("push_to_hub_gguf", unused)
    save_gguf = gguf_writer()
    with tempfile.TemporaryDirectory(prefix="fastload-push-") as tmp:
        folder = Path(tmp) / "gguf"
        for method in _gguf_methods(quantization_method):
            save_gguf(self, folder / f"model.{method.upper()}.gguf", tokenizer, quantization=method)
        return upload_folder(folder, repo_id, token=token, private=private, commit_message=commit_message,
                             create_pr=create_pr, revision=revision)


def upload_folder(folder: Path, repo_id: str, token: str | bool | None = None, private: bool | None = None,
                  commit_message: str | None = DEFAULT_COMMIT_MESSAGE, create_pr: bool = False,
                  revision: str | None = None) -> str:
    """Create the repo if needed and upload the folder in one commit; errors name the repo, never the token."""
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InvalidOption(f"Uploading to {repo_id!r}", found="not a Hub repo id", fix="use 'your-name/model-name'")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                                   create_pr=create_pr, revision=revision)
    except Exception as e:  # HTTP status, connection (httpx's errors are not OSErrors), offline mode: all one failure
        found = str(e).splitlines()[0][:300] if e.args else type(e).__name__
        if isinstance(token, str) and token:
            found = found.replace(token, "***")
        raise SaveError(f"Uploading {folder.name} to the Hub repo {repo_id}", found=f"{type(e).__name__}: {found}",
                        fix="check the network, the repo id and that the token may write to it "
                            "(huggingface-cli login, or token=...)") from e
    return str(getattr(commit, "commit_url", commit))


def _log_unused(method: str, unused: dict) -> None:
    for name in sorted(unused):
        log_once("%s: Unsloth option %s accepted and not used here", method, name)
