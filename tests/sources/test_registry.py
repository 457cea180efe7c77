"""The shipped registry data, its schema, and extension by users and plugins."""

from __future__ import annotations

import re
import tomllib

import pytest

from fastload.sources.registry import (
    REPO_ID,
    RegistryFormatError,
    get_registry,
    load_registry,
    parse_file,
    register,
    shipped_registry_dir,
)


def all_entries():
    files = sorted(shipped_registry_dir().glob("*.toml"))
    assert files, "no registry files found"
    return [e for f in files for e in parse_file(f)]


def test_shipped_registry_is_large_and_consistent():
    entries = all_entries()
    assert len(entries) >= 150
    ids = [e.id.lower() for e in entries] + [q.id.lower() for e in entries for q in e.quantized]
    assert len(ids) == len(set(ids)), "an id appears twice"
    aliases = [a.lower() for e in entries for a in e.aliases]
    assert len(aliases) == len(set(aliases)), "an alias is claimed twice"
    assert not set(aliases) & set(ids), "an alias equals a repo id"
    for e in entries:
        for q in e.quantized:
            assert REPO_ID.match(q.id) and q.id.endswith("-bnb-4bit"), q.id
            assert q.kind in ("bnb-4bit", "unsloth-bnb-4bit")


def test_families_users_expect_are_covered():
    reg = get_registry()
    for name in ("meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.3", "Qwen/Qwen2.5-7B-Instruct",
                 "google/gemma-2-9b", "microsoft/Phi-3-mini-4k-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                 "TinyLlama/TinyLlama-1.1B-Chat-v1.0"):
        match = reg.find(name)
        assert match is not None and match.entry.quantized, name


def test_both_directions_and_case_is_kept():
    reg = get_registry()
    forward = reg.find("META-LLAMA/meta-llama-3-8b")
    assert forward.entry.id == "meta-llama/Meta-Llama-3-8B"  # case as published, whatever was typed
    assert forward.entry.quantized[0].id == "unsloth/llama-3-8b-bnb-4bit"
    back = reg.find("unsloth/llama-3-8b-bnb-4bit")
    assert back.matched_as == "quantized" and back.entry.id == "meta-llama/Meta-Llama-3-8B"
    alias = reg.find("Llama-3-8B")
    assert alias.matched_as == "alias" and alias.entry.id == "meta-llama/Meta-Llama-3-8B"


def test_closest_names_for_typos():
    assert "meta-llama/Meta-Llama-3-8B" in get_registry().closest("meta-llama/Meta-Lama-3-8B")


def test_user_file_overrides_shipped_entry(tmp_path, monkeypatch, caplog):
    user = tmp_path / "mine.toml"
    user.write_text('schema = 1\nfamily = "llama"\n[[model]]\nid = "meta-llama/Meta-Llama-3-8B"\n'
                    'aliases = ["my-llama"]\n[[model.quantized]]\nid = "me/llama-3-8b-bnb-4bit"\n')
    monkeypatch.setenv("FASTLOAD_REGISTRY", str(user))
    with caplog.at_level("INFO", logger="fastload"):
        reg = load_registry()
    assert reg.find("meta-llama/Meta-Llama-3-8B").entry.quantized[0].id == "me/llama-3-8b-bnb-4bit"
    assert reg.find("my-llama") is not None
    assert "overrides" in caplog.text


def test_registry_toml_in_the_user_config_folder_is_read(tmp_path):
    """~/.config/fastload/registry.toml (XDG_CONFIG_HOME is a temporary folder in every test)."""
    import os
    from pathlib import Path

    folder = Path(os.environ["XDG_CONFIG_HOME"]) / "fastload"
    folder.mkdir(parents=True)
    (folder / "registry.toml").write_text('schema = 1\nfamily = "qwen2"\n[[model]]\nid = "acme/house-model"\n'
                                          'aliases = ["house"]\n[[model.quantized]]\n'
                                          'id = "acme/house-model-bnb-4bit"\n')
    match = load_registry().find("house")
    assert match is not None and match.entry.id == "acme/house-model"
    assert match.entry.quantized[0].id == "acme/house-model-bnb-4bit"


def test_a_user_entry_taking_a_shipped_alias_says_so(tmp_path, monkeypatch, caplog):
    user = tmp_path / "mine.toml"
    user.write_text('schema = 1\nfamily = "llama"\n[[model]]\nid = "me/my-8b"\naliases = ["llama-3-8b"]\n')
    monkeypatch.setenv("FASTLOAD_REGISTRY", str(user))
    with caplog.at_level("INFO", logger="fastload"):
        reg = load_registry()
    assert reg.find("llama-3-8b").entry.id == "me/my-8b"
    assert "'llama-3-8b' now names me/my-8b" in caplog.text and "no longer meta-llama/Meta-Llama-3-8B" in caplog.text


def test_register_at_run_time():
    register(id="acme/wonder-7b", family="llama", aliases=["wonder"], quantized=[{"id": "acme/wonder-7b-bnb-4bit"}])
    assert get_registry().find("WONDER").entry.id == "acme/wonder-7b"


@pytest.mark.parametrize("text, problem", [
    ('[[model]]\nid = "no-slash"\nfamily = "llama"\n', "owner/name"),
    ('[[model]]\nid = "a/b"\n', "family"),
    ('[[model]]\nid = "a/b"\nfamily = "llama"\ncolour = "red"\n', "unknown field"),
    ('[[model]]\nid = "a/b"\nfamily = "llama"\n[[model.quantized]]\nid = "a/b-4bit"\nkind = "gptq"\n', "kind"),
    ('schema = 9\n', "version"),
    ('[[model]\n', "TOML"),
])
def test_bad_registry_files_are_explained(tmp_path, text, problem):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(RegistryFormatError) as err:
        parse_file(f)
    assert problem in str(err.value) and "bad.toml" in str(err.value)


def test_plugin_entry_point(tmp_path, monkeypatch):
    """A third-party package declares entry point group 'fastload.registry'; its entries load."""
    site = tmp_path / "site"
    pkg = site / "acme_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def entries():\n    return [{'id': 'acme/plug-1b', 'family': 'llama'}]\n")
    dist = site / "acme_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fastload.registry]\nacme = acme_models:entries\n")
    monkeypatch.syspath_prepend(str(site))
    assert load_registry().find("acme/plug-1b").entry.origin.startswith("plugin acme")


def test_every_shipped_file_is_plain_toml_with_schema_1():
    for f in shipped_registry_dir().glob("*.toml"):
        data = tomllib.loads(f.read_text())
        assert data.get("schema") == 1 and re.match(r"^[a-z0-9_]+$", data["family"]), f.name
