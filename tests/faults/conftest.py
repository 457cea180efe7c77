"""Fixtures of the fault suite: warm fork servers (offline, and online against a local fake hub), the tiny model
saved once as a 16-bit checkpoint and as an adapter, and the folders each case may damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from faults.faultkit import FakeHub, Worker

OFFLINE = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="session")
def fault_scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-scratch")


@pytest.fixture(scope="session")
def worker(fault_scratch):
    """Children of this server run offline (HF_HUB_OFFLINE=1), as the rest of the suite does."""
    w = Worker({**OFFLINE, "HF_HOME": str(fault_scratch / "hf-home-offline")}, fault_scratch / "offline")
    yield w
    w.close()


@pytest.fixture(scope="session")
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope="session")
def online_worker(fault_scratch, hub):
    """Children of this server are online, and the hub they reach is `hub` on 127.0.0.1."""
    # bitsandbytes' CPU backend asks the hub for a kernel while it is imported on CPUs with AVX512-BF16 (through
    # transformers' `kernels`): the server's warm imports get a refused connection, not the stall, which has no
    # timeout there; the tests then start from a stalling hub that has seen no connection
    hub.mode = "reset"
    w = Worker({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(fault_scratch / "hf-home-online"),
                "HF_TOKEN": "hf_faultSuiteSecretToken0123456789"}, fault_scratch / "online")
    hub.mode = "stall"
    hub.reset_count()
    yield w
    w.close()


@pytest.fixture(autouse=True)
def quiet_hub(request):
    """Each case starts with a hub that stalls and has seen no connection."""
    if "hub" in request.fixturenames:
        server = request.getfixturevalue("hub")
        server.mode = "stall"
        server.reset_count()
    yield


@pytest.fixture(scope="session")
def saved_adapter(worker, tiny_llama, fault_scratch) -> Path:
    """An adapter of the tiny model (base: the tiny 16-bit checkpoint), saved by fastload."""
    out = fault_scratch / "adapter"
    outcome = worker.run(f"import ops\nm, t = ops.load({str(tiny_llama)!r}, store=False)\nops.perturb_lora(m, 1)\n"
                         f"from fastload import FastModel\nFastModel.save_adapter(m, {str(out)!r}, tokenizer=t)\n",
                         timeout=120, env={"FASTLOAD_HOME": str(fault_scratch / "home-adapter")})
    assert outcome.ok, outcome.explain() + outcome.log
    return out


@pytest.fixture
def case_dir(tmp_path) -> Path:
    """A folder for this case; FASTLOAD_HOME and the user's folders go below it."""
    return tmp_path


@pytest.fixture
def model_copy(tiny_llama, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


@pytest.fixture
def adapter_copy(saved_adapter, tmp_path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(saved_adapter, dst)
    return dst
