"""The host_embedding lever: a frozen, untied input embedding leaves the GPU for pinned host memory and no number
changes; where it cannot move, the engine report says why."""

from __future__ import annotations

import gc

import pytest
import torch

from fastload import FastModel
from fastload.engine import levers_on, reapply_engine
from fastload.engine.host_embedding import host_embedding_blocker, install_host_embedding
from tiny import make_checkpoint, nonzero_lora_b


def test_a_model_without_a_known_input_embedding_is_declined_not_failed(tiny_llama):
    model, _ = FastModel.from_pretrained(tiny_llama, store=False)
    base = model.get_base_model()
    base.get_input_embeddings = lambda: (_ for _ in ()).throw(NotImplementedError("no embedding"))
    assert "does not say which module is its input embedding" in host_embedding_blocker(base)
    assert install_host_embedding(base) is False


def test_an_embedding_that_must_stay_says_why(tiny_llama, tmp_path):
    model, _ = FastModel.from_pretrained(tiny_llama, store=False)
    base = model.get_base_model()
    table = base.get_input_embeddings().weight
    assert host_embedding_blocker(base) == "the input embedding is not on a GPU"
    assert install_host_embedding(base) is False and base.get_input_embeddings().weight is table
    table.requires_grad_(True)
    assert host_embedding_blocker(base) == "the input embedding is trained"
    tied, _ = FastModel.from_pretrained(make_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True),
                                        store=False)
    assert "tied to lm_head" in host_embedding_blocker(tied.get_base_model())
    assert "host_embedding" not in tied.fastload_engine and "host_embedding" not in tied.fastload_engine.skipped
    adapted, _ = FastModel.from_pretrained(tiny_llama, store=False,
                                          lora={"target_modules": ["q_proj", "embed_tokens"]})
    assert "peft wraps the input embedding" in host_embedding_blocker(adapted.get_base_model())


@pytest.fixture(scope="module")
def gpu_llama_untied(tmp_path_factory):
    # a table over 1 MiB: smaller ones share the GPU buffer their neighbours were read into at load
    return make_checkpoint(tmp_path_factory.mktemp("host") / "llama", "llama", hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                           max_position_embeddings=2048)


def _in_cuda_allocator(pointer: int) -> bool:
    return any(s["address"] <= pointer < s["address"] + s["total_size"] for s in torch.cuda.memory_snapshot())


@pytest.mark.gpu
def test_the_table_leaves_the_gpu_and_no_number_changes(gpu_llama_untied):
    plain, tokenizer = FastModel.from_pretrained(gpu_llama_untied, engine={"host_embedding": False}, store=False,
                                                 random_state=1)
    host, _ = FastModel.from_pretrained(gpu_llama_untied, store=False, random_state=1)
    assert "host_embedding" in host.fastload_engine and "host_embedding" not in plain.fastload_engine
    table, reference = host.get_input_embeddings().weight, plain.get_input_embeddings().weight
    assert table.is_cuda and host.device.type == "cuda"  # torch, generate and the Trainer still see the GPU
    assert not _in_cuda_allocator(table.data_ptr()) and _in_cuda_allocator(reference.data_ptr())
    assert torch.equal(table.cpu(), reference.cpu()) and torch.equal(table.clone(), reference)

    for model in (plain, host):
        nonzero_lora_b(model)
    ids = torch.randint(8, len(tokenizer) - 8, (2, 512), generator=torch.Generator().manual_seed(0)).cuda()
    assert torch.equal(host.get_input_embeddings()(ids), plain.get_input_embeddings()(ids))
    results = []
    for model in (plain, host):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain_grads), (host_loss, host_grads) = results
    assert host_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        assert grad.norm() > 0 and torch.allclose(host_grads[name], grad, rtol=1e-3, atol=1e-6), name

    prompt = ids[:1, :16]
    for model in (plain, host):
        FastModel.for_inference(model)
    assert torch.equal(host.generate(input_ids=prompt, max_new_tokens=8, do_sample=False),
                       plain.generate(input_ids=prompt, max_new_tokens=8, do_sample=False))

    rows = reference.shape[0]
    base = host.get_base_model()
    base.resize_token_embeddings(rows + 8)  # transformers copies the old rows into a new table on the GPU
    grown = host.get_input_embeddings().weight
    assert grown.shape[0] == rows + 8 and torch.equal(grown[:rows], reference)
    assert _in_cuda_allocator(grown.data_ptr()) and "host_embedding" not in levers_on(base)
    reapply_engine(host)  # what fastload's add_tokens does after its resize
    moved = host.get_input_embeddings().weight
    assert not _in_cuda_allocator(moved.data_ptr()) and torch.equal(moved[:rows], reference)
    assert "host_embedding" in host.fastload_engine


@pytest.mark.gpu
def test_moving_the_table_frees_its_gpu_memory(gpu_llama_untied):
    model, _ = FastModel.from_pretrained(gpu_llama_untied, engine={"host_embedding": False}, store=False)
    base = model.get_base_model()
    table = base.get_input_embeddings().weight
    size = table.numel() * table.element_size()
    del table
    gc.collect()
    before = torch.cuda.memory_allocated()
    assert install_host_embedding(base) is True
    gc.collect()
    assert before - torch.cuda.memory_allocated() == size


@pytest.mark.gpu
def test_a_tied_table_stays_on_the_gpu_and_the_report_says_why(tmp_path):
    path = make_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model, _ = FastModel.from_pretrained(path, store=False)
    assert "host_embedding" not in model.fastload_engine
    assert "tied to lm_head" in model.fastload_engine.skipped["host_embedding"]
    assert _in_cuda_allocator(model.get_input_embeddings().weight.data_ptr())
