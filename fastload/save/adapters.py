"""The LoRA adapter alone: saved (reloadable by fastload, its config naming the 16-bit base), checked and loaded
back onto a base model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fastload._log import logger, quiet_foreign_deprecations
from fastload.distributed import rank_zero_only
from fastload.errors import AdapterError, FastloadError
from fastload.model_state import state_of
from fastload.save.folders import atomic_directory
from fastload.sources.hub import hub_calls_off
from fastload.train.fsdp import full_state_dict, save_gathered_adapter
from fastload.train.peft_conversion import keep_targets_as_written

# -- where the adapter's base lives -------------------------------------------------------------------------------

def base_model_id(plan) -> str | None:
    """The name a later load finds the base by: the 16-bit original (registry id, repo or path), else the location."""
    if plan is None:
        return None
    if plan.original:
        return plan.original
    if plan.registry_entry is not None:
        return plan.registry_entry.id
    return plan.location


def name_base_model(model, plan) -> None:
    """Point every adapter config at the 16-bit source, so adapter_config.json names something resolvable."""
    name = base_model_id(plan)
    for config in (getattr(model, "peft_config", None) or {}).values():
        if name:
            config.base_model_name_or_path = name


def name_base_in_card(folder: Path, model) -> None:
    """peft's model card names the loaded weights' folder as base_model (a store path when the base came from the
    store); name the same base as adapter_config.json does, the hub id or original source a reader can find."""
    card_path = folder / "README.md"
    configs = getattr(model, "peft_config", None) or {}
    name = next((c.base_model_name_or_path for c in configs.values()), None)
    if not name or not card_path.is_file():
        return
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    tags = [f"base_model:adapter:{name}" if str(t).startswith("base_model:adapter:") else t
            for t in (card.data.tags or [])]
    if card.data.base_model != name or tags != (card.data.tags or []):
        card.data.base_model = name
        card.data.tags = tags or None
        card.save(card_path)


def check_adapter_files(adapter_dir: Path) -> None:
    """The adapter's rank and weights are sound, checked before peft: it compares a rank given as text with numbers
    (TypeError), falls back to a hub download for a missing weights file, raises safetensors' own damaged-file error."""
    from fastload.sources.checkpoint_files import read_safetensors_header

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError, RecursionError):
        config = None  # resolve read it already; peft reports what is left
    for key in ("r", "lora_alpha"):
        value = config.get(key) if isinstance(config, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise AdapterError(f"Loading the LoRA adapter in {adapter_dir}", found=f"adapter_config.json has "
                               f"{key}={value!r}; it must be a positive number", fix="restore adapter_config.json "
                               "from the save that wrote the weights")

    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        try:
            read_safetensors_header(weights)
        except FastloadError as e:
            raise AdapterError(f"Loading the LoRA adapter in {adapter_dir}", found=f"adapter_model.safetensors is "
                               f"damaged: {e.found}", fix="save the adapter again (FastModel.save_adapter)") from e
    elif not any(adapter_dir.glob("adapter_model.*")):
        raise AdapterError(f"Loading the LoRA adapter in {adapter_dir}", found="no adapter_model.safetensors (the "
                           "weights) beside adapter_config.json", fix="copy the adapter's weights file there, or save "
                           "the adapter again (FastModel.save_adapter)")


def grow_embeddings_for(model, weights: Path) -> None:
    """Give the base as many embedding rows as the adapter's trained embedding has (tokens added before training:
    fastload.train.methods.pretrain.add_tokens), so its saved copy loads."""
    from fastload.sources.checkpoint_files import read_safetensors_header

    embed = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embed), None)
    if not name or not weights.is_file():
        return
    rows = [v["shape"][0] for k, v in read_safetensors_header(weights).items()
            if k.endswith(f"{name}.weight") and isinstance(v, dict) and v.get("shape")]
    if rows and max(rows) > embed.weight.shape[0]:
        logger.info("embeddings resized %d -> %d rows for the adapter's added tokens", embed.weight.shape[0], max(rows))
        model.resize_token_embeddings(max(rows), mean_resizing=False)


def load_adapter(model, adapter_dir: str | os.PathLike):
    """Put a saved LoRA adapter on the loaded base, trainable, adapters in fp32 like fresh ones.

    Args:
        model: the base model, loaded without adapters.
        adapter_dir: the folder save_adapter wrote (adapter_config.json + adapter_model.safetensors).

    Returns:
        The peft model with the adapter trainable.

    Raises:
        AdapterError: the adapter's files are missing or damaged, or do not fit this base.
    """
    import torch
    from peft import PeftModel

    check_adapter_files(Path(adapter_dir))
    keep_targets_as_written()  # an adapter saved for this model keeps its dense and shared-expert layers
    grow_embeddings_for(model, Path(adapter_dir) / "adapter_model.safetensors")
    from fastload.load.global_patches import PATCHING_GLOBALS

    try:
        with PATCHING_GLOBALS, quiet_foreign_deprecations():  # registers parameters: never inside another's swap
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    except (ValueError, RuntimeError, KeyError, OSError, TypeError) as e:  # TypeError: a field of the wrong type
        raise AdapterError(f"Loading the LoRA adapter in {adapter_dir}", found=f"{type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]}",
                           fix="check that adapter_config.json names the base model the adapter was trained on") from e
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    _trained_copies_as_saved(peft_model, Path(adapter_dir) / "adapter_model.safetensors")
    from fastload.train.methods.pretrain import trained_copies_in_compute_dtype

    trained_copies_in_compute_dtype(peft_model)  # trained embedding copies, upcast just above
    if state_of(model, create=False).task == "sequence-classification":
        from fastload.load.task import head_in_full_precision

        head_in_full_precision(peft_model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA adapter loaded from %s: %s trainable parameters", adapter_dir, f"{trainable:,}")
    return peft_model


def _trained_copies_as_saved(peft_model, weights: Path) -> None:
    """Trained full copies (modules_to_save: embeddings, a classifier's head) with the values saved, not rounded:
    peft loads them into a copy of the 16-bit original, so fp32-trained rows came back rounded to bf16 (updates of
    a small learning rate lost, logits no longer the trained model's)."""
    from safetensors import safe_open

    copies = {name: p for name, p in peft_model.named_parameters() if p.requires_grad and ".modules_to_save." in name}
    if not copies:
        return
    with safe_open(str(weights), "pt") as saved:
        keys = set(saved.keys())
        for name, p in copies.items():
            key = re.sub(r"\.modules_to_save\.[^.]+", "", name)
            if key in keys:
                value = saved.get_tensor(key)
                if value.shape == p.shape and value.dtype == p.dtype:
                    p.data.copy_(value)


def save_adapter(model, directory: str | os.PathLike, tokenizer=None) -> Path:
    """The adapter alone (safetensors + adapter_config.json naming the 16-bit base), and the tokenizer if given.

    Args:
        model: the peft model with its LoRA adapters.
        directory: the folder to write, whole or not at all.
        tokenizer: saved beside the adapter when given.

    Returns:
        The folder's Path.

    Raises:
        AdapterError: the model has no LoRA adapters.
        InvalidOption: the folder holds files fastload did not write.
        SaveError: the disk is full or the folder cannot be written.
    """
    require_adapters(model, "Saving the LoRA adapter")
    directory = Path(directory)
    write_adapter(model, tokenizer, directory, into_existing=False)
    logger.info("saved the LoRA adapter in %s (base: %s)", directory,
                next(iter(model.peft_config.values())).base_model_name_or_path)
    return directory


def save_adapter_into(model, tokenizer, out: str | os.PathLike) -> None:
    """Write the adapter into a training folder beside the trainer's checkpoints, as one folder swap.

    Unlike save_adapter it writes into a folder it did not create (`fastload train --out`): a kill leaves the
    previous adapter or the new one, whole; checkpoint-N folders and the user's own files stay.

    Args:
        model: the trained model with its LoRA adapters.
        tokenizer: its tokenizer, saved beside the adapter.
        out: the training folder.
    Raises:
        InvalidOption: the adapter would overwrite files fastload did not write (nothing is written then).
        SaveError: the disk is full or the folder cannot be written.
    """
    write_adapter(model, tokenizer, Path(out), into_existing=True)


def write_adapter(model, tokenizer, folder: Path, into_existing: bool) -> None:
    """The one adapter writer: adapter_config.json naming the 16-bit base, the weights (gathered to rank 0 under
    FSDP, where every rank takes part), the card, the tokenizer; one folder swap on rank 0, no hub call."""
    name_base_model(model, state_of(model, create=False).plan)
    state = full_state_dict(model)

    embeddings = embedding_layers_to_save(model)

    def write() -> None:
        with atomic_directory(folder, marker="adapter_config.json", into_existing=into_existing) as tmp, \
                hub_calls_off():  # peft would look up the base repo on the hub
            if state is not None:
                save_gathered_adapter(model, tmp, state, save_embedding_layers=embeddings)
            else:
                model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=embeddings)
                name_base_in_card(tmp, model)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))

    rank_zero_only(f"Saving the LoRA adapter in {folder}", write)


def embedding_layers_to_save(model) -> bool | str:
    """peft's save_embedding_layers for this model: False where the embeddings train as copies (modules_to_save),
    which the adapter holds under the embeddings' own names anyway; peft's "auto" would add the original matrix and
    the copy again under two more names (three copies of a vocabulary-sized matrix, the extra two reported by peft
    0.22 as unexpected keys on load). Else "auto": embeddings resized for added tokens but not trained are saved
    whole, their new rows with them."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    layers = [m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None]
    return False if layers and all(hasattr(m, "modules_to_save") for m in layers) else "auto"


# -- the adapter's names, in peft and in a checkpoint -------------------------------------------------------------

def require_adapters(model, asked: str) -> None:
    if not getattr(model, "peft_config", None):
        raise AdapterError(asked, found="the model has no LoRA adapters",
                           fix="load with LoRA (the default) or add them with FastModel.get_peft_model(model)")


def active_adapter(model) -> str:
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def checkpoint_key(name: str, adapter: str) -> str:
    """A peft module/parameter name -> the name the weight has in a transformers checkpoint."""
    name = re.sub(r"^base_model\.model\.", "", name)
    name = name.replace(".base_layer", "").replace(f".modules_to_save.{adapter}", "")
    return name
