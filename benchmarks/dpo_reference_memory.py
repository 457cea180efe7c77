"""What DPO's reference model costs: fastload's (the same 4-bit base, adapter off) against a second 4-bit copy.

Run:  python benchmarks/dpo_reference_memory.py [MODEL]   (default: SmolLM2-135M-Instruct; CPU or GPU)

Prints, as JSON: the policy's parameter bytes; the parameter bytes the reference adds with fastload's DPO (0: the
adapter is switched off); a second 4-bit copy's parameter bytes (what TRL loads as reference otherwise); and the
same measured (RSS on the CPU, where freed and mapped pages blur it; CUDA memory on a GPU, exact).
"""

from __future__ import annotations

import gc
import json
import sys


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def used_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    gc.collect()
    return rss_bytes()


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def main(name: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> dict:
    import trl  # noqa: F401  imported before measuring: the libraries' own memory is not the reference's

    from fastload import FastModel

    pairs = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}] * 2
    model, tok = FastModel.from_pretrained(name, max_seq_length=64)
    policy = parameter_bytes(model)
    before = used_bytes()
    trainer = FastModel.get_trainer(model, tok, pairs, method="dpo", output_dir="/tmp/dpo-memory", max_steps=1,
                                    save_strategy="no", report_to="none")
    with_trainer = used_bytes()
    reference = parameter_bytes(model) - policy + (parameter_bytes(trainer.ref_model) if trainer.ref_model else 0)
    second, _ = FastModel.from_pretrained(name, max_seq_length=64, lora=None)
    with_copy = used_bytes()
    result = {"model": name, "policy_parameter_bytes": policy,
              "reference_parameter_bytes": reference,
              "trainer_ref_model": None if trainer.ref_model is None else type(trainer.ref_model).__name__,
              "adapters": list(model.peft_config),
              "second_copy_parameter_bytes": parameter_bytes(second),
              "measured_by": "cuda.memory_allocated" if "cuda" in str(next(model.parameters()).device) else "RSS",
              "measured_trainer_build_bytes": with_trainer - before,
              "measured_second_copy_bytes": with_copy - with_trainer}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(*sys.argv[1:2])
