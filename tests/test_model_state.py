"""fastload's state on a loaded model (fastload/model_state.py): one object, found through peft wrappers, kept
through get_peft_model / merge / save and reload; nothing written onto other libraries' objects; the engine applied
twice is the engine applied once; print(model) names what the engine patched."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from fastload import FastModel
from fastload.model_state import ModelState, state_of
from tiny import nonzero_lora_b

PACKAGE = Path(__file__).resolve().parents[1] / "fastload"


def _train_step(model, tok) -> None:
    enc = tok(["hello world, hello state"], return_tensors="pt")
    model.train()
    model(**enc, labels=enc["input_ids"]).loss.backward()


def test_the_state_is_one_object_found_through_the_peft_wrapper(tiny_llama):
    model, _ = FastModel.from_pretrained(tiny_llama, store=False)
    state = model.fastload
    assert isinstance(state, ModelState) and state is state_of(model) is model.get_base_model().fastload
    assert state.plan.location and state.backend == "native" and state.checkpointing is True
    assert model.fastload_engine is state.engine  # the one alias, the same report object


def test_the_state_survives_get_peft_model_merge_and_a_save_reload(tiny_llama, tmp_path):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False, lora=None, dtype=torch.float32)
    state, report = model.fastload, model.fastload_engine
    peft_model = FastModel.get_peft_model(model, r=8)
    assert peft_model.fastload is state and peft_model.fastload_engine is report  # updated in place, not replaced
    assert "fused_lora" in report and state.plan.location
    nonzero_lora_b(peft_model)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = peft_model.merge_and_unload()
    assert merged.fastload is state and merged.fastload.plan is state.plan
    again, _ = FastModel.from_pretrained(tmp_path / "adapter", store=False, dtype=torch.float32)
    assert again.fastload.plan.adapter == str(tmp_path / "adapter") and again.fastload.backend == "native"
    assert again.fastload is not state and "fused_lora" in again.fastload_engine


def test_the_adapter_replacing_the_default_one_keeps_the_state(tiny_llama):
    """get_peft_model on a model whose default adapter nobody trained unloads it: the state stays."""
    model, _ = FastModel.from_pretrained(tiny_llama, store=False)
    state = model.fastload
    replaced = FastModel.get_peft_model(model, r=4)
    assert replaced.fastload is state and state.checkpointing is True
    assert replaced.get_base_model().is_gradient_checkpointing


def _fastload_names(obj) -> set[str]:
    return {name for name in getattr(obj, "__dict__", {}) if "fastload" in name}


def test_nothing_fastload_is_written_on_modules_quant_states_or_checkpoint_functions(tiny_llama):
    """After a load, adapters and a training step with every lever: the base model holds `fastload` and its alias
    `fastload_engine`; no module, bitsandbytes QuantState, checkpoint partial or optimizer holds anything else."""
    model, tok = FastModel.from_pretrained(tiny_llama, store=False, lora=None)
    model = FastModel.get_peft_model(model, r=8)
    optimizer = FastModel.get_optimizer(model)
    _train_step(model, tok)
    optimizer.step()
    base = model.get_base_model()
    assert _fastload_names(base) == {"fastload", "fastload_engine"}
    others, quant_states = {}, set()
    for name, module in model.named_modules():
        if module is not base:
            others.update({f"{name}.{attr}": 1 for attr in _fastload_names(module)})
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is not None:
            quant_states.add(id(quant_state))  # (a LoRA layer's .weight is its base layer's)
            others.update({f"{name}.weight.quant_state.{a}": 1 for a in _fastload_names(quant_state)})
        function = getattr(module, "_gradient_checkpointing_func", None)
        others.update({f"{name}._gradient_checkpointing_func.{a}": 1 for a in _fastload_names(function)})
    others.update({f"optimizer.{a}": 1 for a in _fastload_names(optimizer)})
    assert len(quant_states) == 14 and not others, sorted(others)  # 7 projections x 2 layers, all 4-bit


def test_apply_engine_twice_changes_nothing_and_returns_the_same_report(tiny_llama):
    from fastload.engine import EngineSettings, apply_engine

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    report, shown = model.fastload_engine, str(model)
    forwards = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
    nonzero_lora_b(model)
    enc = tok(["twice the same"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        before = model(**enc).logits
    again = apply_engine(model, EngineSettings(), gradient_checkpointing=True)
    assert again is report and list(again) == ["fused_lora", "fused_loss"] and again.skipped == report.skipped
    assert {name: module.__dict__.get("forward") for name, module in model.named_modules()} == forwards
    assert str(model) == shown
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)


def test_print_model_shows_the_patched_modules(tiny_llama):
    fast, _ = FastModel.from_pretrained(tiny_llama, store=False)
    plain, _ = FastModel.from_pretrained(tiny_llama, store=False, engine=False)
    shown = str(fast)
    assert "fastload: fused_lora" in shown and shown.count("fastload: fused_loss") == 1
    projections = [m for m in fast.modules() if "lora_A" in m._modules]
    assert len(projections) == 14 and all("fastload: fused_lora" in repr(m) for m in projections)  # 7 x 2 layers
    assert "fastload:" not in str(plain)
    q_proj = fast.get_base_model().model.layers[0].self_attn.q_proj
    assert "fastload: fused_lora" in repr(q_proj) and repr(q_proj).startswith("lora.Linear4bit(")


def _function_level_fastload_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(function):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(n.startswith("fastload") for n in names):
                found.append(f"{path.name}:{node.lineno} {names}")
    return found


def test_checkpointing_and_the_engine_import_each_other_one_way_only_at_the_top():
    """train/checkpointing.py never imports the engine (the engine registers its function on the model's state),
    and neither they nor the state module hide a fastload import inside a function."""
    modules = [PACKAGE / "train" / "checkpointing.py", PACKAGE / "engine" / "__init__.py",
               PACKAGE / "engine" / "offloaded_checkpoint.py", PACKAGE / "model_state.py"]
    assert [found for path in modules for found in _function_level_fastload_imports(path)] == []
    checkpointing = ast.parse(modules[0].read_text())
    imported = {n.module for n in ast.walk(checkpointing) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and m.startswith("fastload.engine")}
