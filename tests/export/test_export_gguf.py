"""GGUF export (fastload.export): files that transformers' own GGUF loader and llama.cpp (xllamacpp from the test
extra, or llama-cpp-python: llamacpp_client.py) read back to the same model, the tokenizer and chat template
inside, an Ollama Modelfile beside it, refusals up front, and no partial file after a failure. The real-model
checks run on SmolLM2 fine-tuned by the README's main job (conftest.py).

Tolerances, on logits of magnitude ~1-1.5 (tiny random models) compared with the float32 checkpoint the file was
written from: F16 rounds every weight to 11 significant bits (max logit difference measured 7e-4 -> bound 5e-3);
BF16 to 8 bits (measured 5e-3 -> 2e-2); Q8_0 to 8-bit integers per 32-value block (measured 1.5e-2 -> 6e-2).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import llamacpp_client
import numpy as np
import pytest
import torch

from fastload.errors import (
    BackendUnavailable,
    FastloadError,
    InvalidOption,
    UnsupportedArchitecture,
)
from fastload.export.gguf import save_gguf
from tiny import CHATML, SHAPES, make_checkpoint, nonzero_lora_b

TOLERANCE = {"f16": 5e-3, "bf16": 2e-2, "q8_0": 6e-2}
TEXT = "hello world, the quick brown fox jumps over the lazy dog"


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def read_back(gguf_file: Path):
    """The GGUF as transformers' own GGUF loader reads it: model (float32) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return model.eval(), tok


def reference(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def gguf_fields(gguf_file: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    keep = ("general.architecture", "general.file_type", "tokenizer.chat_template", "tokenizer.ggml.model",
            "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id")
    fields = {k: reader.fields[k].contents() for k in keep if k in reader.fields}
    fields["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


@pytest.fixture(scope="module")
def fp32_checkpoints(tmp_path_factory):
    """float32 tiny checkpoints (the exact reference), one per family, built when first asked for."""
    root, built = tmp_path_factory.mktemp("gguf-src"), {}

    def get(family: str) -> Path:
        if family not in built:
            # readers guess from general.name (the folder's name): transformers takes a model named "mistral" for
            # its mistral class, llama.cpp one named "...phi3..." for Phi-3's own vocabulary: names that say neither
            built[family] = make_checkpoint(root / f"tiny-{sorted(SHAPES).index(family)}", family, dtype="float32")
        return built[family]

    return get


# -- the file matches the model it was written from ---------------------------------------------------------------

@pytest.mark.parametrize("family,quantization", [
    ("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"), ("qwen2", "f16"), ("qwen2", "q8_0"),
    ("mistral", "f16"), ("qwen3", "f16"), ("gemma2", "f16"), ("gemma3_text", "f16"), ("phi3", "f16")])
def test_transformers_reads_the_gguf_back_to_the_same_logits_and_tokens(fp32_checkpoints, tmp_path, family,
                                                                        quantization):
    src = fp32_checkpoints(family)
    out = save_gguf(src, tmp_path / "out" / "model.gguf", quantization=quantization)
    ref, ref_tok = reference(src)
    model, tok = read_back(out)
    ids = ref_tok(TEXT, return_tensors="pt").input_ids
    assert tok(TEXT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert max_logit_diff(ref, model, ids) < TOLERANCE[quantization]
    fields = gguf_fields(out)
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.ggml.eos_token_id"] == ref_tok.eos_token_id
    assert fields["tokenizer.ggml.model"] == "gpt2"
    weight_type = fields["tensor_types"]["blk.0.ffn_down.weight"]
    assert weight_type == quantization.upper() and fields["tensor_types"]["blk.0.attn_norm.weight"] == "F32"


def test_a_sentencepiece_style_tokenizer_reads_back_to_the_same_tokens(tmp_path):
    """Llama-2/Mistral/Gemma tokenizers (BPE with byte fallback) go in as llama.cpp's SentencePiece vocab."""
    from tiny import make_sentencepiece_style_tokenizer

    tok = make_sentencepiece_style_tokenizer()
    src = make_checkpoint(tmp_path / "spm", "llama", dtype="float32", tokenizer=tok)
    out = save_gguf(src, tmp_path / "out" / "spm.gguf", quantization="f16")
    _, gguf_tok = read_back(out)
    for text in (TEXT, "a stitch in time saves nine: é ñ 0123"):  # é, ñ: not in the vocab, so byte pieces
        assert gguf_tok(text).input_ids == tok(text).input_ids, text
    assert gguf_fields(out)["tokenizer.ggml.model"] == "llama"


def test_a_lora_model_is_merged_into_its_16bit_source_and_written(tiny_llama, tmp_path, caplog):
    """The 4-bit LoRA model exported: its GGUF equals save_merged's folder (the merge transformers already trusts)."""
    from fastload import FastModel

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    with caplog.at_level(logging.INFO, logger="fastload"):
        out = FastModel.save_gguf(model, tmp_path / "gguf" / "tuned.gguf", tok, quantization="f16")
    assert "merging the LoRA adapter into the 16-bit source" in caplog.text
    assert "merge check on" in caplog.text  # the merge's cost is reported on the way
    merged = FastModel.save_merged(model, tmp_path / "merged", tok, dtype=torch.float32, verify=False)
    ref, ref_tok = reference(merged)
    ids = ref_tok(TEXT, return_tensors="pt").input_ids
    gguf_model, _ = read_back(out)
    assert max_logit_diff(ref, gguf_model, ids) < TOLERANCE["f16"]
    base, _ = reference(tiny_llama)
    assert max_logit_diff(base, gguf_model, ids) > 10 * TOLERANCE["f16"], "the adapter is not in the GGUF"
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "tuned.gguf"]  # no temporary folder left


# -- Ollama -------------------------------------------------------------------------------------------------------

def test_modelfile_has_the_chat_format_and_stop_tokens(fp32_checkpoints, tmp_path):
    out = save_gguf(fp32_checkpoints("llama"), tmp_path / "model.gguf", quantization="q8_0")
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./model.gguf" in text
    assert "{{ range .Messages }}<|im_start|>{{ .Role }}" in text.replace("{{-", "{{")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert out.is_file()


def test_modelfile_for_an_unknown_chat_format_says_it_is_plain():
    from fastload.export.ollama import modelfile_text

    text = modelfile_text("m.gguf", "{{ bos_token }}{% for m in messages %}### {{ m.content }}{% endfor %}", "</s>")
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "could not be translated" in text
    assert 'PARAMETER stop "</s>"' in text


# -- refusals and failures ----------------------------------------------------------------------------------------

def test_an_unsupported_family_is_refused_before_anything_is_written(tmp_path):
    from transformers import AutoConfig

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(AutoConfig.for_model("gpt2").to_dict()))
    with pytest.raises(UnsupportedArchitecture) as caught:
        save_gguf(folder, tmp_path / "out" / "gpt2.gguf")
    assert "'gpt2'" in caught.value.asked and "llama" in caught.value.found and "convert_hf_to_gguf" in caught.value.fix
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_unknown_quantization_is_refused(fp32_checkpoints, tmp_path):
    with pytest.raises(InvalidOption, match="q4_k_m"):
        save_gguf(fp32_checkpoints("llama"), tmp_path / "m.gguf", quantization="q3_x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(has_llama_cpp(), reason="llama-cpp-python is installed: the k-quant is written instead")
def test_a_kquant_without_llama_cpp_names_the_extra(fp32_checkpoints, tmp_path):
    with pytest.raises(BackendUnavailable) as caught:
        save_gguf(fp32_checkpoints("llama"), tmp_path / "m.gguf", quantization="q4_k_m")
    assert "llama-cpp-python" in caught.value.found and "q8_0" in caught.value.fix
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python is not installed: it holds the k-quant quantizer "
                    "(pip install 'fastload[llamacpp]' compiles llama.cpp, minutes)")
def test_a_kquant_is_written_by_llama_cpps_quantizer_and_reads_back_close(fp32_checkpoints, tmp_path):
    """Q4_K_M: the file says so, transformers reads it back to the same tokens and to logits within 4-bit
    rounding (logits of ~1-1.5; measured 0.21, bound 0.5), and the temporary F16 file is gone."""
    src = fp32_checkpoints("llama")
    out = save_gguf(src, tmp_path / "out" / "model.gguf", quantization="q4_k_m")
    fields = gguf_fields(out)
    assert fields["general.file_type"] == 15  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert fields["tensor_types"]["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    ref, ref_tok = reference(src)
    model, tok = read_back(out)
    ids = ref_tok(TEXT, return_tensors="pt").input_ids
    assert tok(TEXT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    diff = max_logit_diff(ref, model, ids)
    print(f"Q4_K_M read back by transformers: max logit difference {diff:.3f}")
    assert diff < 0.5
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "model.gguf"]


def test_a_write_cut_short_leaves_the_previous_file_and_no_partial_one(fp32_checkpoints, tmp_path):
    """A real fault: the process may not write more than 1 MB (RLIMIT_FSIZE), the GGUF needs ~2.7 MB."""
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from fastload.errors import SaveError
        from fastload.export.gguf import save_gguf
        try:
            save_gguf({str(fp32_checkpoints("llama"))!r}, {str(out)!r}, quantization="f16")
        except SaveError as e:
            print("SaveError", e.found)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert "SaveError" in result.stdout, result.stderr[-2000:]
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_a_quantized_folder_is_refused(tiny_llama, tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(FastloadError, match="quantized checkpoint"):
        save_gguf(folder, tmp_path / "m.gguf", quantization="f16")


# -- the command line ---------------------------------------------------------------------------------------------

def test_cli_exports_a_trained_adapter(tiny_llama, tmp_path, capsys):
    from fastload import FastModel
    from fastload.cli import main

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    adapter = FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    merged = FastModel.save_merged(model, tmp_path / "merged", tok, dtype=torch.float32, verify=False)
    capsys.readouterr()
    out = tmp_path / "gguf" / "tuned.gguf"
    assert main(["export", "gguf", str(adapter), "--out", str(out), "--quant", "f16", "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["out"] == str(out) and Path(data["modelfile"]).is_file()
    ref, ref_tok = reference(merged)
    ids = ref_tok(TEXT, return_tensors="pt").input_ids
    assert max_logit_diff(ref, read_back(out)[0], ids) < TOLERANCE["f16"]


def test_cli_refuses_an_unsupported_family_with_fastloads_message(tmp_path, capsys):
    from transformers import AutoConfig

    from fastload.cli import main

    folder = tmp_path / "opt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(AutoConfig.for_model("opt").to_dict()))
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "o.gguf")]) == 1
    assert "families fastload writes" in capsys.readouterr().err


# -- the adapter alone for llama.cpp --lora -----------------------------------------------------------------------

def gguf_tensors(gguf_file: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(str(gguf_file)).tensors}


def test_lora_adapter_file_adds_up_to_the_merged_gguf(tiny_llama, tmp_path):
    """base GGUF + alpha/r * lora_b @ lora_a (llama.cpp's arithmetic) == the merged model's GGUF, tensor by tensor:
    the adapter's names, shapes, q/k row order and scaling are those of the base file."""
    from gguf import GGUFReader

    from fastload import FastModel
    from fastload.export.lora_gguf import save_lora_gguf

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    adapter = save_lora_gguf(model, tmp_path / "adapter.gguf")
    base = gguf_tensors(save_gguf(tiny_llama, tmp_path / "base" / "base.gguf", quantization="f32"))
    merged = gguf_tensors(save_gguf(model, tmp_path / "merged" / "merged.gguf", tok, quantization="f32",
                                    verify=False))
    reader = GGUFReader(str(adapter))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    lora = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    adapted = sorted({n.rsplit(".", 1)[0] for n in lora})
    assert len(adapted) == 2 * 7  # 2 layers x 7 projections
    for name in adapted:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        delta = alpha / a.shape[0] * (b @ a)
        assert np.abs(delta).max() > 1e-3, name
        # the merged file holds bf16 values (the source's dtype): apart by one bf16 rounding (8 bits: 2^-8 relative)
        assert np.all(np.abs(base[name] + delta - merged[name]) <= 2.0 ** -8 * np.abs(merged[name]) + 1e-7), name


# -- the real SmolLM2-135M ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_export(main_job, smollm2_dir, tmp_path_factory):
    """SmolLM2 fine-tuned by the README's main job, its adapter loaded back as a user would, exported as F16 GGUF,
    Q8_0 GGUF and a merged float32 folder; also the adapter alone as a GGUF LoRA file and the base as F16 GGUF."""
    from fastload import FastModel
    from fastload.export.lora_gguf import save_lora_gguf

    root = tmp_path_factory.mktemp("smollm2-gguf")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test isolation: isolate here too
        mp.setenv("FASTLOAD_HOME", str(root / "home"))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        model, tok = FastModel.from_pretrained(main_job.adapter, store=False, dtype=torch.float32)
        merged = FastModel.save_merged(model, root / "merged", tok, dtype=torch.float32, verify=False)
        f16 = FastModel.save_gguf(model, root / "f16" / "smollm2.gguf", tok, quantization="f16", verify=False)
        q8 = FastModel.save_gguf(model, root / "q8" / "smollm2.gguf", tok, quantization="q8_0", verify=False)
        adapter = save_lora_gguf(model, root / "adapter" / "adapter.gguf")
        base = save_gguf(smollm2_dir, root / "base" / "base.gguf", quantization="f16")
    # held-out questions of the main job: the fine-tune answers them with its Answer/Reason card
    prompts = [r["messages"][0]["content"] for r in main_job.heldout[:3]]
    return {"merged": merged, "f16": f16, "q8": q8, "tok": tok, "adapter": adapter, "base": base, "prompts": prompts}


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"][0].tolist()


def greedy(model, tok, prompt: str, n: int = 16) -> list[int]:
    ids = torch.tensor([chat_ids(tok, prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def rounded_to_f16(model):
    """The model with its matrices rounded to float16 as the F16 GGUF stores them (1-D tensors stay float32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return model


@pytest.mark.slow
def test_smollm2_gguf_generates_like_the_merged_model_in_transformers(smollm2_export):
    """Logits of SmolLM2 reach ~20-30. Against the merged float32 model with its matrices rounded to float16 (what
    F16 stores), the F16 file differs by float32 round-off only (< 1e-2); against the unrounded model F16's rounding
    costs up to ~0.3 (measured 0.26, bound 0.5) and Q8_0's more (measured 1.6, bound 2.5)."""
    ref, tok = reference(smollm2_export["merged"])
    f16, gguf_tok = read_back(smollm2_export["f16"])
    q8, _ = read_back(smollm2_export["q8"])
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert gguf_tok(TEXT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert max_logit_diff(ref, f16, ids) < 0.5
    assert max_logit_diff(ref, q8, ids) < 2.5
    ref16 = rounded_to_f16(ref)
    assert max_logit_diff(ref16, f16, ids) < 1e-2
    for prompt in smollm2_export["prompts"]:
        assert greedy(f16, tok, prompt) == greedy(ref16, tok, prompt), prompt


def logprob_gap(ref, prompt_ids: list[int], steps) -> float:
    """Largest |llama.cpp log-probability - transformers log-probability| over the top tokens llama.cpp reported at
    each greedy step, transformers evaluating the same sequence (the prompt, then llama.cpp's tokens)."""
    sequence = torch.tensor([prompt_ids + [s.token for s in steps]])
    with torch.no_grad():
        logprobs = torch.log_softmax(ref(sequence).logits[0].double(), dim=-1)[len(prompt_ids) - 1:]
    return max(abs(logprobs[i, token].item() - value)
               for i, step in enumerate(steps) for token, value in step.logprobs.items())


needs_llama_cpp = pytest.mark.skipif(llamacpp_client.binding() is None, reason="no llama.cpp binding installed "
                                     "(xllamacpp: `bash scripts/setup.sh` installs it; or llama-cpp-python)")


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_llama_cpp_computes_each_family_like_transformers(fp32_checkpoints, tmp_path, family):
    """llama.cpp's graph for the architecture the file names, on its hyperparameters and tensor layout (q/k rows,
    Gemma's norms, Phi-3's fused projections): F32 file, next-token log-probabilities of the 50 likeliest tokens at
    4 greedy steps, float32 round-off only (< 2e-3)."""
    src = fp32_checkpoints(family)
    out = save_gguf(src, tmp_path / f"{family}.gguf", quantization="f32", modelfile=False)
    ref, tok = reference(src)
    ids = tok(TEXT).input_ids
    byte_pieces = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]  # random weights pick any token
    with llamacpp_client.llama_cpp(out) as llm:
        steps = llm.greedy(ids, 4, top=50, banned=byte_pieces)
    assert len(steps) == 4
    assert logprob_gap(ref, ids, steps) < 2e-3


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_runs_the_fine_tuned_smollm2_gguf_like_transformers(smollm2_export):
    """The main job's fine-tune exported and run by llama.cpp: its tokenizer gives transformers' tokens, its
    next-token log-probabilities (20 likeliest tokens, every greedy step) match the merged float32 transformers
    model on logits of ~20-30: F16 (llama.cpp also rounds activations to f16 in its matmuls; measured 0.024)
    < 0.25, Q8_0 (activations to 8 bits too; measured 0.45-0.63) < 1.5; greedy generation (F16) picks a best token of
    the float32 model at every step, up to near-ties within 1.0 on logits, and answers with the card the
    fine-tune taught."""
    ref, tok = reference(smollm2_export["merged"])
    for prompt in smollm2_export["prompts"]:
        ids = chat_ids(tok, prompt)
        expected_tokens = greedy(ref, tok, prompt)  # up to 16 tokens, fewer when it ends with eos
        with llamacpp_client.llama_cpp(smollm2_export["f16"]) as llm:
            assert llm.tokenize(tok.decode(ids)) == ids
            steps = llm.greedy(ids, len(expected_tokens))
        with llamacpp_client.llama_cpp(smollm2_export["q8"]) as llm:
            q8_steps = llm.greedy(ids, len(expected_tokens))
        f16, q8 = logprob_gap(ref, ids, steps), logprob_gap(ref, ids, q8_steps)
        print(f"llama.cpp vs transformers, max log-probability difference: F16 {f16:.3f}, Q8_0 {q8:.3f}")
        assert f16 < 0.25 and q8 < 1.5
        tokens = [s.token for s in steps]
        print(f"{prompt!r} -> llama.cpp {tok.decode(tokens)!r}, transformers {tok.decode(expected_tokens)!r}")
        assert tok.decode(tokens).startswith("Answer:"), "the fine-tune did not survive the export"
        # greedy agrees up to near-ties: F16 rounding may pick the runner-up where the two best logits are closer
        # than F16's rounding of the logits (up to ~0.4); every token llama.cpp chose must be a best token of the
        # float32 model on llama.cpp's own sequence within 1.0
        assert tokens[0] == expected_tokens[0], prompt
        with torch.no_grad():
            scores = ref(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
        chosen = scores.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        assert (scores.max(dim=1).values - chosen).max() < 1.0, (prompt, tokens, expected_tokens)


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_applies_the_lora_adapter_file_like_the_merged_model(smollm2_export):
    """F16 base + F32 adapter (llama.cpp's --lora) against the merged float32 model, log-probabilities as above:
    F16 rounding apart (measured 0.015, bound 0.25 as for the F16 merged file), while the base alone is far from it
    (measured 13.8): the adapter is applied, with llama.cpp's scaling and q/k row order."""
    ref, tok = reference(smollm2_export["merged"])
    ids = chat_ids(tok, smollm2_export["prompts"][0])
    with llamacpp_client.llama_cpp(smollm2_export["base"], lora=smollm2_export["adapter"]) as llm:
        with_lora = logprob_gap(ref, ids, llm.greedy(ids, 8))
    with llamacpp_client.llama_cpp(smollm2_export["base"]) as llm:
        without = logprob_gap(ref, ids, llm.greedy(ids, 8))
    print(f"llama.cpp --lora vs merged: {with_lora:.3f}; base alone vs merged: {without:.3f}")
    assert with_lora < 0.25
    assert without > 5 * with_lora, "the adapter changes little: the test would not see a bad one"
