"""Every causal-LM family the installed transformers knows, beyond the test matrix, tried as a new user would: a tiny
random checkpoint, `FastModel.from_pretrained` with the defaults, three optimizer steps, the adapter saved and
reloaded, generation. Each family in its own process; a markdown table of outcomes.

A failure is then checked on the plain path (transformers + bitsandbytes NF4 + peft LoRA): where that fails the same
way, the family (or its tiny shape) is transformers' problem, not fastload's.

    python benchmarks/family_sweep.py --out sweep.md [--families a,b] [--max-params 3e7] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "train"), str(ROOT / "tests"), str(ROOT)]


def tiny_config(family: str, tokenizer):
    from family_shapes import COMMON, FAMILIES, family_config
    from transformers import AutoConfig

    if family in FAMILIES:
        return family_config(family, tokenizer)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(family, **COMMON, head_dim=16, **ids)
    if "kv_lora_rank" in config.to_dict():  # multi-head latent attention: its own head sizes, rotary on 8 of them
        for name, value in MLA_SIZES.items():
            setattr(config, name, value)
    return config


MLA_SIZES = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16,
                 v_head_dim=16, head_dim=8, num_key_value_heads=4, index_head_dim=16, index_n_heads=2, index_topk=8)


def try_family(family: str, folder: Path, max_params: float) -> dict:
    """One family, in this process: the stage it reached and the error that stopped it."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastload import FastModel
    from fastload.errors import FastloadError
    from tiny import make_tokenizer

    result = {"family": family, "stage": "config"}
    tokenizer = make_tokenizer()
    try:
        config = tiny_config(family, tokenizer)
        result["stage"] = "build"
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > max_params:
            return dict(result, stage="skipped", note=f"{size / 1e6:.0f}M parameters at the tiny shape")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    except Exception as e:  # noqa: BLE001 - the tiny shape is not one transformers builds: no verdict on fastload
        return dict(result, stage=f"not built ({result['stage']})", note=f"{type(e).__name__}: {str(e)[:200]}")
    try:
        result["stage"] = "load"
        model, tok = FastModel.from_pretrained(str(folder / "model"))
        result.update(stage="train", engine=repr(model.fastload_engine)[:300],
                      experts=model.peft_config["default"].target_parameters or [])
        batch = tok(["hello world, this is a test of the family"] * 2, return_tensors="pt")
        batch["labels"] = batch["input_ids"].clone()
        optimizer, losses = FastModel.get_optimizer(model, lr=1e-3), []
        model.train()
        for _ in range(3):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(loss.item(), 4))
        result.update(stage="reload", losses=losses)
        FastModel.save_adapter(model, folder / "adapter", tokenizer=tok)
        reloaded, _ = FastModel.from_pretrained(str(folder / "adapter"))
        result["stage"] = "generate"
        FastModel.for_inference(reloaded)
        FastModel.generate(reloaded, tok, "hello", max_new_tokens=3)
        return dict(result, stage="ok")
    except FastloadError as e:
        return dict(result, error=f"{type(e).__name__}: {str(e)[:300]}", fastload_error=True)
    except Exception as e:  # noqa: BLE001 - what this sweep is for: a raw error a user would see
        result.update(error=f"{type(e).__name__}: {str(e)[:300]}", trace=traceback.format_exc()[-1500:])
        result["plain"] = plain_outcome(folder / "model")
        return result


def plain_outcome(model_dir: Path) -> str:
    """'ok' or where the plain transformers + bitsandbytes + peft path fails on the same checkpoint."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    stage = "load"
    try:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
        tok = AutoTokenizer.from_pretrained(model_dir)
        stage = "train"
        batch = tok(["hello world, this is a test of the family"] * 2, return_tensors="pt")
        model(**batch, labels=batch["input_ids"]).loss.backward()
        stage = "generate"
        model.eval()
        model.generate(**tok(["hello"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"fails at {stage}: {type(e).__name__}: {str(e)[:120]}"


def families_to_try(matrix: bool) -> list[str]:
    from family_shapes import FAMILIES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(f for f in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if matrix or f not in FAMILIES)


def run_one(family: str, max_params: float, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, FASTLOAD_HOME=str(Path(tmp) / "home"), HF_HUB_OFFLINE="1")
        cmd = [sys.executable, __file__, "--one", family, "--result", str(out), "--max-params", str(max_params)]
        try:
            subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, check=False)
        except subprocess.TimeoutExpired:
            return {"family": family, "stage": "timeout", "note": f"over {timeout} s"}
        if not out.exists():
            return {"family": family, "stage": "crashed", "note": "no result written"}
        return json.loads(out.read_text())


def table(results: list[dict]) -> str:
    lines = ["| family | outcome | losses | experts adapted | engine / error | plain path |",
             "|---|---|---|---|---|---|"]
    for r in results:
        outcome = r["stage"] if "error" not in r else ("fastload error" if r.get("fastload_error")
                                                        else f"raw error at {r['stage']}")
        detail = r.get("error") or r.get("note") or r.get("engine", "")
        lines.append(f"| {r['family']} | {outcome} | {r.get('losses', '')} | {', '.join(r.get('experts', []))} | "
                     f"{detail.replace('|', '/').replace(chr(10), ' ')} | {r.get('plain', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="family-sweep.md")
    parser.add_argument("--families", help="comma-separated model types (default: every causal LM not in the matrix)")
    parser.add_argument("--with-matrix", action="store_true", help="the test matrix's families too")
    parser.add_argument("--max-params", type=float, default=3e7)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            result = try_family(args.one, Path(tmp), args.max_params)
        Path(args.result).write_text(json.dumps(result))
        return
    families = args.families.split(",") if args.families else families_to_try(args.with_matrix)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda f: run_one(f, args.max_params, args.timeout), families))
    Path(args.out).write_text(table(results))
    counts: dict[str, int] = {}
    for r in results:
        key = r["stage"] if "error" not in r else ("fastload error" if r.get("fastload_error") else "raw error")
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(results)} families: {counts}; table in {args.out}")


if __name__ == "__main__":
    main()
