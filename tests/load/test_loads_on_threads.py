"""Two loads on two threads of one process (a notebook loading a model while another loads): each swaps
process-wide functions while it builds modules (register_parameter, torch.nn.init, the default dtype). Without the
lock in fastload.load.global_patches one load registered weights on the meta device while the other built its
skeleton, and their swaps could be restored in the wrong order, leaving torch.nn.init a no-op for good."""

from __future__ import annotations

import threading

import pytest

from fastload import FastModel
from tiny import make_checkpoint

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("early", ["0", "1"])
def test_two_loads_on_two_threads_each_get_a_whole_model_and_leave_torch_init_alone(tmp_path, monkeypatch, early):
    import torch

    from fastload.load.background_store import wait_for_store_writes

    monkeypatch.setenv("FASTLOAD_EARLY_LORA", early)
    a = make_checkpoint(tmp_path / "a", "llama", **SHAPE)
    b = make_checkpoint(tmp_path / "b", "llama", seed=1, **SHAPE)
    FastModel.from_pretrained(str(a))
    FastModel.from_pretrained(str(b), lora=None)
    wait_for_store_writes()
    initialisers = {name: getattr(torch.nn.init, name) for name in ("kaiming_uniform_", "normal_", "uniform_")}
    for _ in range(3):
        out = {}

        def load(key, path, **options):
            try:
                out[key] = FastModel.from_pretrained(str(path), **options)[0]
            except Exception as e:  # noqa: BLE001 - reported below
                out[key] = e

        threads = [threading.Thread(target=load, args=("a", a)),
                   threading.Thread(target=load, args=("b", b), kwargs={"lora": None})]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for key, model in out.items():
            assert not isinstance(model, Exception), (key, model)
            assert not [n for n, p in model.named_parameters() if p.device.type == "meta"], key
        assert {name: getattr(torch.nn.init, name) for name in initialisers} == initialisers


def test_a_moe_load_on_another_thread_leaves_this_load_s_experts_as_asked(tmp_path):
    """Storing experts 4-bit as they arrive uses a process-wide registration hook: another thread's load with
    quantize_experts=False kept getting 4-bit experts (17 of 20 runs before the hook looked at its thread)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from family_shapes import make_family_checkpoint

    from fastload.load.nf4_experts import is_stack

    moe = make_family_checkpoint(tmp_path / "moe", "qwen3_moe")

    def load(**options):
        return FastModel.from_pretrained(str(moe), store=False, lora=None, engine=False, gradient_checkpointing=False,
                                         **options)[0]

    stop, errors = threading.Event(), []

    def other():
        while not stop.is_set():
            try:
                assert any(is_stack(p) for p in load().parameters())  # the default: experts 4-bit
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    thread = threading.Thread(target=other)
    thread.start()
    try:
        runs = [[n for n, p in load(quantize_experts=False).named_parameters() if is_stack(p)] for _ in range(8)]
    finally:
        stop.set()
        thread.join()
    assert not errors and runs == [[]] * 8, (errors, [r[:1] for r in runs])
