"""What a user sees around load, train and save: fastload's own lines and progress bars, not other libraries'
deprecation notes about calls fastload makes; and a saved adapter's card names a base the user can find."""

from __future__ import annotations

import logging
import warnings

import pytest

from fastload import FastModel

# Python's default filters hide these outside __main__: a user never sees them from library code
HIDDEN_BY_PYTHON = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
RECORDS = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world is big"}]}] * 4


def foreign(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records
            if r.levelno >= logging.WARNING and not r.name.startswith("fastload")]


def test_load_train_save_generate_print_no_foreign_warnings(tiny_llama, tmp_path, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        FastModel.from_pretrained(tiny_llama, max_seq_length=64)  # quantized on the fly, then stored
        model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=64)  # from the store
        FastModel.get_trainer(model, tok, RECORDS, max_steps=2, output_dir=str(tmp_path / "run"),
                              disable_tqdm=True).train()
        FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
        FastModel.generate(model, tok, "hello", max_new_tokens=3)
        FastModel.from_pretrained(tmp_path / "adapter", max_seq_length=64)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN_BY_PYTHON)]
    assert not shown, "\n".join(shown)
    assert not foreign(caplog.records), "\n".join(foreign(caplog.records))


def test_trl_configs_fastload_builds_or_offers_say_nothing_of_checkpointing_names(tmp_path):
    """TRL sets gradient_checkpointing=True on its configs, which transformers 5.2x calls a deprecated name: the DPO
    and GRPO configs fastload builds and the drop-in SFTConfig must not pass that note on, and checkpointing stays
    on, non-reentrant where fastload asks."""
    import dataclasses

    from fastload.compat.trl_compat import SFTConfig
    from fastload.train.methods import grpo
    from fastload.train.methods.preference import PREFERENCE_METHODS, preference_arguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = [SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none"),
                preference_arguments(PREFERENCE_METHODS["dpo"], tmp_path / "dpo"),
                grpo.grpo_config(None, tmp_path / "grpo")]
    shown = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not shown, shown
    import torch

    # on a machine without a GPU nothing is pinned (torch would warn at every DataLoader that it cannot)
    assert all(args.dataloader_pin_memory is torch.cuda.is_available() for args in made)
    for args in made:
        assert args.gradient_checkpointing is True
        if "activation_checkpointing" in {f.name for f in dataclasses.fields(args)}:
            assert args.activation_checkpointing is True
    assert made[1].gradient_checkpointing_kwargs["use_reentrant"] is False


def test_the_users_own_deprecated_calls_still_warn(tiny_llama):
    """fastload silences the notes about its own calls only, never a filter that would hide the user's."""
    model, _ = FastModel.from_pretrained(tiny_llama, max_seq_length=64, store=False)
    base = model.get_base_model()
    if not hasattr(type(base), "is_activation_checkpointing"):
        pytest.skip("this transformers has no renamed checkpointing property to be deprecated")
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        assert base.is_gradient_checkpointing


def test_an_adapter_loaded_from_the_store_names_its_source_in_the_card(tiny_llama, tmp_path, isolated_env):
    FastModel.from_pretrained(tiny_llama, max_seq_length=64)
    model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=64)
    assert model.fastload.plan.source == "store"
    card = FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok) / "README.md"
    text = card.read_text()
    assert f"base_model: {tiny_llama}" in text
    assert str(isolated_env) not in text, "the card names fastload's store, not the model the user loaded"
