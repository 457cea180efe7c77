"""bitsandbytes imported through fastload: torch's compiler stays out of the process until a kernel needs it, and the
kernels give the same results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.nn as nn

from fastload.load.bitsandbytes_import import _deferring

NF4_ROUND_TRIP = """
import json, sys, time
import torch
{importer}
import bitsandbytes.functional as F
w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64)
back = F.dequantize_4bit(packed, state)
print(json.dumps({{
    "compiler_imported": "torch._inductor.compile_fx" in sys.modules,
    "compile_restored": torch.compile.__module__ == "torch",
    "packed": packed.flatten().tolist()[:512],
    "back": back.float().flatten().tolist()[:512],
}}))
"""


def _run(importer: str) -> dict:
    out = subprocess.run([sys.executable, "-c", NF4_ROUND_TRIP.format(importer=importer)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_compiler_is_not_imported_and_nf4_round_trips_alike():
    deferred = _run("from fastload.load.bitsandbytes_import import import_bitsandbytes; import_bitsandbytes()")
    plain = _run("import bitsandbytes")
    assert plain["compiler_imported"], "bitsandbytes no longer imports torch's compiler: this module is not needed"
    assert not deferred["compiler_imported"]
    assert deferred["compile_restored"]
    assert deferred["packed"] == plain["packed"] and deferred["back"] == plain["back"]


def test_a_function_is_compiled_once_at_its_first_call():
    compiled = []

    def fake_compile(fn, **options):
        compiled.append(options)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    deferring = _deferring(fake_compile)

    @deferring(dynamic=False)
    def double(x):
        return 2 * x

    assert compiled == [] and double.__name__ == "double"
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert compiled == [{"dynamic": False}]


def test_a_module_is_compiled_at_once_as_torch_would():
    seen = []
    deferring = _deferring(lambda m, **o: seen.append(m) or "optimized module")
    layer = nn.Linear(2, 2)
    assert deferring(layer) == "optimized module" and seen == [layer]


def test_a_function_torch_cannot_compile_runs_as_it_is():
    attempts = []

    def refusing_compile(fn, **options):
        attempts.append(fn)
        raise RuntimeError("no compiler on this platform")

    @_deferring(refusing_compile)
    def halve(x):
        return x / 2

    assert halve(8) == 4 and halve(2) == 1
    assert len(attempts) == 1


HUB_KERNEL_PROBE = """
import json, sys
{importer}
from bitsandbytes.functional import has_avx512bf16
print(json.dumps({{"kernels_imported": "kernels" in sys.modules, "avx512bf16": bool(has_avx512bf16())}}))
import kernels  # still importable afterwards, for transformers or the user
"""


def test_bitsandbytes_fetches_no_hub_kernel_and_prints_no_warning_about_it():
    """On an AVX512-BF16 CPU, a plain `import bitsandbytes` asks the Hub for kernels-community code and warns when it
    cannot have it (offline, or refused by the publisher check); through fastload neither the request nor the
    warning happens."""
    pytest.importorskip("kernels", reason="bitsandbytes asks the Hub only through the kernels package")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def probe(importer: str):
        out = subprocess.run([sys.executable, "-c", HUB_KERNEL_PROBE.format(importer=importer)], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr

    ours, our_stderr = probe("from fastload.load.bitsandbytes_import import import_bitsandbytes; "
                             "import_bitsandbytes()")
    plain, plain_stderr = probe("import bitsandbytes")
    assert "kernels-community" not in our_stderr
    assert not ours["kernels_imported"]
    # the plain import is what this guards against: it asks and warns wherever the CPU has AVX512-BF16
    assert plain["kernels_imported"] == plain["avx512bf16"]
    assert ("kernels-community" in plain_stderr) == plain["avx512bf16"]
