"""fastload's LoRA setup gives exactly the adapters plain peft gives for the same seed: speeding it up must not change
the weights a user's run starts from."""

from __future__ import annotations

import pytest
import torch

from fastload import FastModel
from fastload.settings import LoraSettings
from fastload.train.lora import apply_lora
from tests.tiny import EXPECTED_TARGETS, nonzero_lora_b

SEED = 3407


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _logits(model, ids) -> torch.Tensor:
    nonzero_lora_b(model)  # B starts at zero: give both the same B so the logits depend on every A
    model.eval()
    with torch.no_grad():  # on the model's device: the file also runs on the GPU machine (adapters drawn there too)
        return model(input_ids=ids.to(model.get_input_embeddings().weight.device)).logits


def test_apply_lora_matches_plain_peft_bit_for_bit(tiny_llama):
    assert_matches_plain_peft(tiny_llama)


def test_the_init_drawn_beside_peft_is_used_and_a_wrong_prediction_still_gives_peft_adapters(tiny_llama,
                                                                                              monkeypatch):
    """The adapters' values are drawn on a thread while peft builds them (fastload.train.adapter_draws): for the
    default LoRA the prediction holds and the thread's draws are used; when peft builds other adapters than
    predicted (here: one fewer predicted) the fill draws again and the adapters are still peft's."""
    from fastload.train import adapter_draws, lora

    used = []
    result = adapter_draws.AdapterDraws.result
    monkeypatch.setattr(adapter_draws.AdapterDraws, "result",
                        lambda self, built: used.append(result(self, built)) or used[-1])
    apply_lora(FastModel.from_pretrained(tiny_llama, lora=None)[0], LoraSettings(), SEED)
    assert len(used) == 1 and used[0] is not None and len(used[0][0]) == 7 * 2

    used.clear()
    predicted = lora.predicted_adapters
    monkeypatch.setattr(lora, "predicted_adapters", lambda *args: predicted(*args)[:-1])
    assert_matches_plain_peft(tiny_llama)
    assert len(used) == 1 and used[0] is None


@pytest.mark.parametrize("targets, filled", [
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),  # a notebook's list
    (["q_proj", "v_proj"], True),
    (["q_proj", "embed_tokens"], False),  # an embedding: peft's own init (zeros and normal draws), not filled
    (r".*\.(q|v)_proj", False),  # peft's pattern over full module names: peft's own init
])
def test_named_targets_match_plain_peft_bit_for_bit(tiny_llama, targets, filled, monkeypatch):
    """target_modules as users name them: where every named layer is linear the adapters are built empty and
    filled here (fast), else peft initialises them; either way they are plain peft's."""
    from fastload.train import lora

    fills = []
    fill = lora._fill_like_peft
    monkeypatch.setattr(lora, "_fill_like_peft", lambda *a: fills.append(1) or fill(*a))
    assert_matches_plain_peft(tiny_llama, targets)
    assert bool(fills) == filled


def assert_matches_plain_peft(tiny_llama, targets=None) -> None:
    from peft import LoraConfig, get_peft_model

    settings = LoraSettings() if targets is None else LoraSettings.from_user({"target_modules": targets})
    ours = apply_lora(FastModel.from_pretrained(tiny_llama, lora=None)[0], settings, SEED)
    ours_rng = torch.get_rng_state()
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                        target_modules=EXPECTED_TARGETS["llama"] if targets is None else targets,
                        task_type="CAUSAL_LM")
    torch.manual_seed(SEED)
    plain = get_peft_model(FastModel.from_pretrained(tiny_llama, lora=None)[0], config, autocast_adapter_dtype=True)
    assert torch.equal(ours_rng, torch.get_rng_state())  # later draws (dropout, shuffling) are the same too

    ours_lora, plain_lora = _adapters(ours), _adapters(plain)
    assert ours_lora.keys() == plain_lora.keys()
    assert targets is not None or len(ours_lora) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    for name, weight in plain_lora.items():
        assert ours_lora[name].dtype == torch.float32 and torch.equal(ours_lora[name], weight), name
    assert ({n for n, p in ours.named_parameters() if p.requires_grad}
            == {n for n, p in plain.named_parameters() if p.requires_grad} == set(plain_lora))
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    assert torch.equal(_logits(ours, ids), _logits(plain, ids))


def _plain_peft(tiny_llama):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                        target_modules=EXPECTED_TARGETS["llama"], task_type="CAUSAL_LM")
    return get_peft_model(FastModel.from_pretrained(tiny_llama, lora=None)[0], config, autocast_adapter_dtype=True)


def _spy_early(monkeypatch) -> list:
    from fastload.train import adapter_draws

    used = []
    for_adapters = adapter_draws.EarlyDraws.for_adapters
    monkeypatch.setattr(adapter_draws.EarlyDraws, "for_adapters",
                        lambda self, adapters: used.append(for_adapters(self, adapters)) or used[-1])
    return used


def test_the_init_drawn_while_the_weights_are_read_is_peft_init(tiny_llama, monkeypatch):
    """from_pretrained starts the LoRA draws from the direct load's skeleton, before the weights are read: they are
    used, and the adapters and the generator's state after them are plain peft's for the same seed."""
    used = _spy_early(monkeypatch)
    ours = FastModel.from_pretrained(tiny_llama, random_state=SEED)[0]
    ours_rng = torch.get_rng_state()
    assert len(used) == 1 and used[0] is not None, "the early draws were not used"
    torch.manual_seed(SEED)
    plain = _plain_peft(tiny_llama)
    assert torch.equal(ours_rng, torch.get_rng_state())
    ours_lora, plain_lora = _adapters(ours), _adapters(plain)
    assert ours_lora.keys() == plain_lora.keys()
    assert all(torch.equal(ours_lora[n], w) for n, w in plain_lora.items())


def test_a_draw_between_reading_and_lora_is_not_missed_by_the_early_init(tiny_llama, monkeypatch):
    """Without a seed the early draws start from the generator's state while the weights are read; anything that
    draws from it before peft does makes them wrong: they are dropped and the adapters are still peft's."""
    from fastload.load import experts

    settle = experts.settle_experts
    monkeypatch.setattr(experts, "settle_experts", lambda *a, **k: (torch.rand(1), settle(*a, **k))[1])
    used = _spy_early(monkeypatch)
    torch.manual_seed(5)
    ours = FastModel.from_pretrained(tiny_llama, random_state=None)[0]
    ours_rng = torch.get_rng_state()
    assert len(used) == 1 and used[0] is None, "early draws from a stale generator state were used"
    torch.manual_seed(5)
    plain = _plain_peft(tiny_llama)  # its load draws the same one number in settle_experts
    assert torch.equal(ours_rng, torch.get_rng_state())
    ours_lora, plain_lora = _adapters(ours), _adapters(plain)
    assert all(torch.equal(ours_lora[n], w) for n, w in plain_lora.items())


@pytest.mark.parametrize("pattern, says", [
    ("q_proj|v_proj", "no module's full name matches it"),  # peft matches the whole name, not a part of it
    ("(", "not a regular expression"),
    (r".*\.(q_proj|mlp)", "LoRA cannot adapt: model.layers.0.mlp (LlamaMLP)"),  # peft would refuse it midway
])
def test_a_pattern_that_adapts_nothing_is_refused_before_peft_touches_the_model(tiny_llama, pattern, says):
    from fastload.errors import AdapterError

    model = FastModel.from_pretrained(tiny_llama, lora=None)[0]
    with pytest.raises(AdapterError) as err:
        apply_lora(model, LoraSettings.from_user({"target_modules": pattern}), SEED)
    assert says in err.value.found and "q_proj" in err.value.fix
    assert not [n for n, _ in model.named_modules() if "lora_" in n]


def test_inference_mode_freezes_the_adapters_as_peft_does(tiny_llama):
    """lora={"inference_mode": True} was dropped as bookkeeping, leaving every adapter trainable; peft freezes them."""
    from peft import LoraConfig, get_peft_model

    ours = apply_lora(FastModel.from_pretrained(tiny_llama, lora=None)[0],
                      LoraSettings.from_user({"inference_mode": True}), SEED)
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=EXPECTED_TARGETS["llama"],
                        task_type="CAUSAL_LM", inference_mode=True)
    torch.manual_seed(SEED)
    plain = get_peft_model(FastModel.from_pretrained(tiny_llama, lora=None)[0], config, autocast_adapter_dtype=True)
    assert not [n for n, p in ours.named_parameters() if p.requires_grad]
    assert not [n for n, p in plain.named_parameters() if p.requires_grad]
    ours_lora, plain_lora = _adapters(ours), _adapters(plain)
    assert ours_lora.keys() == plain_lora.keys() and all(torch.equal(ours_lora[k], plain_lora[k]) for k in plain_lora)


def test_a_rank_past_every_layers_width_is_warned(tiny_llama, caplog):
    """r=512 on a model whose layers are at most 512 wide on their narrower side: LoRA that is no lower-rank than
    the layers is said, once; the default rank is not."""
    import logging

    with caplog.at_level(logging.WARNING, logger="fastload"):
        FastModel.from_pretrained(tiny_llama, store=False, lora={"r": 512})
    assert sum("no lower-rank than the layers" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastload"):
        FastModel.from_pretrained(tiny_llama, store=False)
    assert not any("no lower-rank" in r.getMessage() for r in caplog.records)
