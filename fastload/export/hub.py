"""Push a trained model to the Hugging Face Hub: the folder is built locally (adapter, merged 16-bit, merged 4-bit
or GGUF) with a generated model card, then uploaded in one commit by huggingface_hub. The token is passed to
huggingface_hub only, never logged or written into the folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastload._log import logger
from fastload.errors import InvalidOption, SaveError
from fastload.model_state import state_of

WHAT = ("adapter", "merged", "merged-4bit", "gguf")


def push_to_hub(model, repo_id: str, tokenizer=None, what: str = "adapter", private: bool = True,
                token: str | None = None, quantization: str = "q8_0", training: dict | None = None,
                commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Build the folder `what` names and upload it to `repo_id` in one commit.

    Args:
        model: the fastload model with LoRA adapters.
        repo_id: "user/name" on the Hub (created if missing, private by default).
        tokenizer: saved with the weights (needed for the GGUF and for a usable merged model).
        what: "adapter" (small; needs the base), "merged" (16-bit, for transformers/vLLM), "merged-4bit"
            (bitsandbytes) or "gguf" (one file for llama.cpp/Ollama, `quantization` as in save_gguf).
        private: create the repository private.
        token: a Hugging Face token (default: the logged-in one); never logged.
        training: facts for the model card, e.g. {"examples": 1000, "train_loss": 1.23, "steps": 60}.
        commit_message: default "Upload <what> trained with fastload".
        endpoint: another Hub (default: huggingface_hub's, HF_ENDPOINT).

    Returns:
        The URL of the commit.

    Raises:
        InvalidOption: an unknown `what` or a malformed repo_id.
        SaveError: building the folder or the upload failed (the Hub's reason in `found`).
    """
    if what not in WHAT:
        raise InvalidOption(f"what={what!r}", found=f"choices: {', '.join(WHAT)}", fix="use 'adapter' (default)")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InvalidOption(f"repo_id={repo_id!r}", found="not of the form 'user/name'", fix="e.g. 'me/my-model'")
    with tempfile.TemporaryDirectory(prefix="fastload-push-") as tmp:
        folder = build_folder(model, Path(tmp) / "repo", tokenizer, what, quantization)
        (folder / "README.md").write_text(model_card(model, repo_id, what, training))
        return _upload(folder, repo_id, private, token, commit_message or f"Upload {what} trained with fastload",
                       endpoint)


def build_folder(model, folder: Path, tokenizer, what: str, quantization: str = "q8_0") -> Path:
    """The files `what` names, written by fastload's own savers into `folder`."""
    from fastload.save.adapters import save_adapter
    from fastload.save.merged import save_merged

    if what == "adapter":
        return save_adapter(model, folder, tokenizer=tokenizer)
    if what in ("merged", "merged-4bit"):
        return save_merged(model, folder, tokenizer=tokenizer, quantize=what == "merged-4bit")
    from fastload.export.gguf import save_gguf

    folder.mkdir(parents=True)
    save_gguf(model, folder / f"model-{quantization}.gguf", tokenizer, quantization=quantization)
    return folder


def model_card(model, repo_id: str, what: str, training: dict | None = None) -> str:
    """A README.md with the Hub's YAML header: base model, LoRA settings, training facts, fastload version."""
    from fastload import __version__
    from fastload.save.adapters import active_adapter, base_model_id

    base = base_model_id(state_of(model, create=False).plan) or getattr(model.config, "_name_or_path", "")
    config = (getattr(model, "peft_config", None) or {}).get(active_adapter(model))
    library = "peft" if what == "adapter" else "gguf" if what == "gguf" else "transformers"
    header = ["---", f"base_model: {base}", f"library_name: {library}", "tags:", "- fastload", "- lora", "---"]
    summary = (f"Fine-tuned from `{base}` with LoRA using fastload {__version__}; this repository holds the "
               f"{_describe(what)}.")
    lines = [f"# {repo_id.split('/')[1]}", "", summary, ""]
    if config is not None:
        targets = ", ".join(sorted(config.target_modules)) if not isinstance(config.target_modules, str) \
            else config.target_modules
        lines += ["## LoRA", "", f"- rank r: {config.r}", f"- alpha: {config.lora_alpha}",
                  f"- dropout: {config.lora_dropout}", f"- target modules: {targets}", ""]
    if training:
        lines += ["## Training", ""] + [f"- {k.replace('_', ' ')}: {v}" for k, v in training.items()] + [""]
    return "\n".join(header + lines)


def _describe(what: str) -> str:
    return {"adapter": "LoRA adapter alone (load it on the base model)",
            "merged": "merged 16-bit model (transformers, vLLM, SGLang, TGI)",
            "merged-4bit": "merged model quantized to bitsandbytes 4-bit",
            "gguf": "model as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile"}[what]


def _upload(folder: Path, repo_id: str, private: bool, token: str | None, message: str,
            endpoint: str | None) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except (HfHubHTTPError, OSError) as e:
        reason = str(e).splitlines()[0][:300]
        if token:
            reason = reason.replace(token, "***")
        raise SaveError(f"Uploading to {repo_id}", found=f"{type(e).__name__}: {reason}",
                        fix="check the token's write access and the network; nothing partial is committed") from e
    logger.info("pushed %s to %s (%s)", folder.name, repo_id, info.commit_url)
    return info.commit_url
