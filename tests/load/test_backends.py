"""Backend selection and attention plugins on the CPU: every refusal is a clear fastload error; `auto` falls back."""

from __future__ import annotations

import sys

import pytest

from fastload import FastModel
from fastload.backends import choose_backend
from fastload.errors import BackendUnavailable, InvalidOption
from fastload.load.loader import LoadOptions


@pytest.fixture
def placeholder_unsloth(tmp_path, monkeypatch):
    """An importable `unsloth` package that is never imported: selection must decide from metadata alone."""
    site = tmp_path / "site"
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text("raise RuntimeError('fastload imported unsloth while choosing')\n")
    dist = site / "unsloth-2026.10.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: unsloth\nVersion: 2026.10.9\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def not_installed(monkeypatch, package: str) -> None:
    """Make `package` look absent to fastload's find_spec checks."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


@pytest.mark.parametrize("package, option", [("unsloth", {"backend": "unsloth"}),
                                             ("xformers", {"attn_implementation": "xformers"})])
def test_a_missing_optional_package_is_a_clear_error(tiny_llama, monkeypatch, package, option):
    not_installed(monkeypatch, package)
    with pytest.raises(BackendUnavailable) as err:
        FastModel.from_pretrained(tiny_llama, **option)
    assert f"{package} is not installed" in err.value.found and f"fastload[{package}]" in err.value.fix


def test_unsloth_without_gpu_is_refused_and_auto_falls_back(tiny_llama, placeholder_unsloth, caplog):
    with pytest.raises(BackendUnavailable) as err:
        FastModel.from_pretrained(tiny_llama, backend="unsloth")
    assert "CUDA GPU" in err.value.found and "native" in err.value.fix
    with caplog.at_level("INFO", logger="fastload"):
        model, _ = FastModel.from_pretrained(tiny_llama, backend="auto")
    assert model.fastload.backend == "native"
    assert "backend auto: native, because Unsloth needs a CUDA GPU" in caplog.text
    assert "unsloth" not in sys.modules


def test_unsloth_too_old_is_refused(tiny_llama, placeholder_unsloth):
    meta = next(placeholder_unsloth.glob("unsloth-*.dist-info")) / "METADATA"
    meta.write_text("Metadata-Version: 2.1\nName: unsloth\nVersion: 2024.1\n")
    with pytest.raises(BackendUnavailable, match="older than"):
        FastModel.from_pretrained(tiny_llama, backend="unsloth")


def test_unsupported_family_and_quant_settings_are_named(tiny_llama, tmp_path, placeholder_unsloth, monkeypatch):
    import torch

    import fastload
    from fastload.backends import unsloth_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # selection logic only; nothing runs on a GPU
    plan = fastload.resolve(tiny_llama)
    from dataclasses import replace

    phi = replace(plan, config={"model_type": "phi3"})
    assert "phi3" in unsloth_backend.unsloth_unavailable_reason(phi, LoadOptions()).found
    fp4 = fastload.resolve(tiny_llama, bnb_4bit_quant_type="fp4")
    assert "nf4" in unsloth_backend.unsloth_unavailable_reason(fp4, LoadOptions()).found
    assert unsloth_backend.unsloth_unavailable_reason(plan, LoadOptions()) is None
    assert "device_map" in unsloth_backend.unsloth_unavailable_reason(plan, LoadOptions(device_map="cpu")).found
    adapter = replace(plan, adapter=str(tmp_path / "my-adapter"))
    assert "saved LoRA adapter" in unsloth_backend.unsloth_unavailable_reason(adapter, LoadOptions()).found
    assert "unsloth" not in sys.modules  # every refusal so far was decided without importing it


def test_unsloth_that_fails_to_import_is_explained_and_auto_falls_back(tiny_llama, placeholder_unsloth, monkeypatch,
                                                                        caplog):
    """All checks pass (a 'GPU', a Llama); only then is unsloth imported, and this one breaks like a version clash."""
    import torch

    import fastload

    init = placeholder_unsloth / "unsloth" / "__init__.py"
    init.write_text("raise ImportError('cannot import name X from torch')\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = fastload.resolve(tiny_llama)
    with pytest.raises(BackendUnavailable) as err:
        choose_backend("unsloth", plan, LoadOptions())
    assert "does not import (ImportError: cannot import name X" in err.value.found and "unsloth_zoo" in err.value.fix
    with caplog.at_level("INFO", logger="fastload"):
        assert choose_backend("auto", plan, LoadOptions()).name == "native"
    assert "backend auto: native, because unsloth is installed but does not import" in caplog.text


def test_unknown_backend():
    with pytest.raises(InvalidOption, match="known backends"):
        FastModel.from_pretrained("whatever", backend="vllm")


def test_xformers_without_a_gpu_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    """xformers installed (a placeholder that must not even be imported) on a machine without CUDA."""
    import torch

    site = tmp_path / "site"
    (site / "xformers").mkdir(parents=True)
    (site / "xformers" / "__init__.py").write_text("raise RuntimeError('imported on a machine without CUDA')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable) as err:
        FastModel.from_pretrained(tiny_llama, attn_implementation="xformers")
    assert "need a CUDA GPU" in err.value.found and "attn_implementation unset" in err.value.fix
    assert "xformers" not in sys.modules
