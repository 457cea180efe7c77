"""The merged 16-bit folder is what vLLM, SGLang and TGI load: a fresh Python with plain transformers (fastload
never imported) reads it in bfloat16, with the chat template intact, and computes what the LoRA model computed.

Tolerance: the tiny model's logits are ~1-1.5; bfloat16 keeps 8 significant bits (weights and activations),
measured 8e-3 against the float32 merge -> bound 5e-2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from fastload import FastModel
from tiny import CHATML, nonzero_lora_b

PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sys.argv[1]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    print(json.dumps({"fastload_imported": any(m.split(".")[0] == "fastload" for m in sys.modules),
                      "dtype": str(model.dtype), "template": tok.chat_template, "ids": ids[0].tolist(),
                      "logits": logits.tolist()}))
""")


def test_the_merged_folder_loads_in_plain_transformers_in_bfloat16_with_its_chat_template(tiny_llama, tmp_path):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    merged = FastModel.save_merged(model, tmp_path / "merged", tok, verify=False)  # the source's dtype: bfloat16
    reference = FastModel.save_merged(model, tmp_path / "merged-f32", tok, dtype=torch.float32, verify=False)
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(merged)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.splitlines()[-1])
    assert not served["fastload_imported"]
    assert served["dtype"] == "torch.bfloat16"
    assert served["template"] == CHATML
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([served["ids"]])).logits[0]
    diff = (torch.tensor(served["logits"]) - expected).abs().max().item()
    print(f"bfloat16 in plain transformers vs the float32 merge: max logit difference {diff:.4f}")
    assert diff < 5e-2
