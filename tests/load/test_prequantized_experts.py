"""Pre-quantized MoE checkpoints made by transformers 4, whose experts were Linear layers: each expert stored 4-bit
with its own statistics (the bnb-4bit uploads of Mixtral and Qwen-MoE the registry points to). transformers 5 fuses
the experts into 3-D weights and cannot read them (a size mismatch); the direct load stacks them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastload import FastModel
from tiny import train_steps

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from family_shapes import make_family_checkpoint  # noqa: E402

EXPERT_NAMES = {"mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                            "block_sparse_moe.experts.{e}.w2"),
                "qwen3_moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")}
ROUTERS = ("block_sparse_moe.gate.", "mlp.gate.")


def transformers4_bnb_checkpoint(directory: Path, family: str, double_quant: bool,
                                 blocksize: int = 64) -> tuple[Path, Path]:
    """(the 4-bit checkpoint, a 16-bit one of its dequantized values under the same names): every projection and
    expert quantized on its own as transformers 4 + bitsandbytes saved them; the routers too with `double_quant`
    (transformers 4's default), 16-bit without (a skip list, as some uploads have)."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file, save_file

    source = make_family_checkpoint(directory / "bf16", family)
    tensors = {}
    for f in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(f))
    quantized, dequantized = {}, {}
    for name, value in tensors.items():
        router = any(r in name for r in ROUTERS)
        if value.ndim != 2 or not name.endswith("proj.weight") and ".experts." not in name and not router or (
                router and not double_quant):  # transformers 4 quantized the routers unless told to skip them
            quantized[name] = dequantized[name] = value
            continue
        packed, state = bnbf.quantize_4bit(value.to(torch.bfloat16), quant_type="nf4", blocksize=blocksize,
                                           compress_statistics=double_quant)
        quantized[name] = packed
        quantized.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
        dequantized[name] = bnbf.dequantize_4bit(packed, state)  # in bf16, as bitsandbytes computes each layer
    config = json.loads((source / "config.json").read_text())
    four_bit, sixteen_bit = directory / "bnb-4bit", directory / "dequantized"
    for folder, weights in ((four_bit, quantized), (sixteen_bit, dequantized)):
        folder.mkdir(parents=True)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        for f in source.iterdir():
            if f.suffix != ".safetensors" and f.name != "config.json":
                (folder / f.name).write_bytes(f.read_bytes())
    (sixteen_bit / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": ["lm_head"] + ([] if double_quant else ["gate"])}
    (four_bit / "config.json").write_text(json.dumps(config))
    return four_bit, sixteen_bit


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_stored_4bit_one_by_one_load_with_their_own_codes_and_train(family, double_quant, tmp_path,
                                                                           isolated_env):
    """Each fused stack holds the experts' stored 4-bit codes unchanged; the model computes as the checkpoint's
    dequantized weights do (within bf16 rounding); the experts carry LoRA, and it trains."""
    from transformers import AutoModelForCausalLM

    four_bit, sixteen_bit = transformers4_bnb_checkpoint(tmp_path, family, double_quant)
    model, tokenizer = FastModel.from_pretrained(str(four_bit), dtype=torch.float32)
    assert_stacks_hold_the_stored_codes(model, four_bit, family)
    reference = AutoModelForCausalLM.from_pretrained(sixteen_bit, dtype=torch.float32).eval()
    batch = tokenizer(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        ours, truth = model(**batch).logits.float(), reference(**batch).logits
    error = ((ours - truth).norm() / truth.norm()).item()
    assert error < 5e-3, error  # bf16 rounding of the values, and of the block scales quantized again

    assert_trains(model, batch)


def assert_stacks_hold_the_stored_codes(model, four_bit: Path, family: str) -> None:
    """Layer 0's fused stacks hold the stored per-expert codes in order (gate then up per expert), and the experts
    carry LoRA."""
    from safetensors.torch import load_file

    stored = load_file(four_bit / "model.safetensors")
    experts = model.get_base_model().model.layers[0].mlp.experts.get_base_layer()  # under peft's wrappers
    names, count = EXPERT_NAMES[family], experts.num_experts
    codes = {"gate_up_proj": [stored[f"model.layers.0.{n.format(e=e)}.weight"].flatten()
                              for e in range(count) for n in names[:2]],
             "down_proj": [stored[f"model.layers.0.{names[2].format(e=e)}.weight"].flatten() for e in range(count)]}
    for name, pieces in codes.items():
        stack = experts._parameters[name]
        assert type(stack).__name__ == "NF4ExpertStack", type(stack)
        assert torch.equal(stack.packed.flatten().cpu(), torch.cat(pieces)), name
    assert set(model.peft_config["default"].target_parameters) == {"experts.gate_up_proj", "experts.down_proj"}


def assert_trains(model, batch) -> None:
    losses = train_steps(model, batch, lr=1e-2)
    assert losses[-1] < losses[0], losses


def test_experts_stored_in_other_blocks_are_refused_rather_than_quantized_twice(tmp_path, isolated_env):
    """Blocks of 128 (older ROCm bitsandbytes builds): a stack re-quantized in blocks of 64 would change the stored
    values; the load says so, and what to load instead."""
    from fastload.errors import CheckpointError

    four_bit, _ = transformers4_bnb_checkpoint(tmp_path, "mixtral", double_quant=True, blocksize=128)
    with pytest.raises(CheckpointError, match="(?s)blocks of 128.*16-bit original"):
        FastModel.from_pretrained(str(four_bit))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_stored_4bit_one_by_one_load_onto_the_gpu_and_train(family, tmp_path, isolated_env):
    """The same on CUDA in bf16: the packed experts arrive on the GPU through the readers, their states on the host."""
    four_bit, _ = transformers4_bnb_checkpoint(tmp_path, family, double_quant=True)
    model, tokenizer = FastModel.from_pretrained(str(four_bit), device_map="cuda", dtype=torch.bfloat16)
    assert_stacks_hold_the_stored_codes(model, four_bit, family)
    assert_trains(model, tokenizer(["the quick brown fox jumps over the lazy dog"], return_tensors="pt").to("cuda"))



def test_a_load_the_direct_path_does_not_cover_says_what_the_checkpoint_is_and_what_to_do(tmp_path, monkeypatch,
                                                                                           isolated_env):
    """transformers 5 fails on such a checkpoint with a size mismatch, which reads as a damaged one: fastload names
    the layout and the loads that read it (FASTLOAD_DIRECT_LOAD=0 stands for any load the direct path leaves)."""
    from fastload.errors import CheckpointError, CheckpointIncomplete

    four_bit, _ = transformers4_bnb_checkpoint(tmp_path, "mixtral", double_quant=True)
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "0")
    with pytest.raises(CheckpointError) as raised:
        FastModel.from_pretrained(str(four_bit))
    assert not isinstance(raised.value, CheckpointIncomplete)
    message = str(raised.value)
    assert "stored 4-bit one by one" in message and "one device" in message and "FASTLOAD_DIRECT_LOAD" in message
