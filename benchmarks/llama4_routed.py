"""Llama-4's MoE layer: transformers + peft (every token through every expert) against fastload's routed layer.

A Llama-4-shaped text model (by default 2 layers, hidden 512, 16 experts with one chosen per token, as Scout),
LoRA r=16 on attention and on the experts' fused weights, one sequence of --tokens; each variant in its own process,
four forward + backward passes, their times and the rise of the process's peak resident memory (and the GPU's peak
allocated). Runs on the CPU (fp32) or on CUDA (bf16) with --device cuda; --scout gives one layer of Scout's own
widths (hidden 5,120, experts 8,192 wide, 4,096 tokens), the size where the expert work, not launches, decides.

    python benchmarks/llama4_routed.py dense
    python benchmarks/llama4_routed.py routed
    python benchmarks/llama4_routed.py routed --device cuda --scout
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

SMALL = dict(hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, head_dim=64, no_rope_layers=[1, 1])
SCOUT = dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=1,
             num_attention_heads=40, num_key_value_heads=8, head_dim=128, no_rope_layers=[1])


def build(device: str, shape: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama4_text", vocab_size=1024, num_local_experts=16, num_experts_per_tok=1,
                                  interleave_moe_layer_step=1, attention_chunk_size=8192, pad_token_id=0, **shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    with torch.no_grad():  # transformers starts gate_up_proj at zero: every expert's output would be zero
        for module in model.modules():
            if type(module).__name__ == "Llama4TextExperts":
                module.gate_up_proj.normal_(0, 0.02)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    return get_peft_model(model, lora).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=["dense", "routed"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scout", action="store_true", help="one layer of Llama-4 Scout's widths, 4,096 tokens")
    parser.add_argument("--tokens", type=int, default=None, help="sequence length (default 1,024; 4,096 with --scout)")
    args = parser.parse_args()
    tokens = args.tokens or (4096 if args.scout else 1024)
    model = build(args.device, SCOUT if args.scout else SMALL)
    if args.variant == "routed":
        from fastload.engine.llama4_moe import install_llama4_moe

        install_llama4_moe(model)
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(4):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        model.zero_grad()
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device == "cuda" else ""
    print(f"{args.variant}: loss {loss.item():.6f}, s per step {', '.join(f'{t:.2f}' for t in times)}, "
          f"peak RSS rise {rise:.2f} GiB{gpu}")


if __name__ == "__main__":
    main()
