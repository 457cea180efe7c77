"""Tiny in-process configs for every model family fastload names (registry/*.toml) and a few more users reach for.

Two layers, hidden 64, the tiny tokenizer's vocabulary: each family's own structure (softcaps, QK norms, sinks,
experts, convolutions, Mamba mixers) at a size that trains in a second on the CPU.
"""

from __future__ import annotations

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
EXPERTS = dict(num_experts_per_tok=2)
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
           num_key_value_heads=4)

FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "phi3": {},
    "granite": {},
    "olmo2": {},
    "cohere": {},
    "cohere2": {},
    "starcoder2": {},
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "gemma3": "multimodal",
    "gemma4": "multimodal",  # its vision tower's layers are clipping modules named q_proj...: never LoRA targets
    "qwen3_5": "multimodal",  # Qwen3.5 as released: image-text weights, loaded as its text model
    # Llama-4 (Scout, Maverick) as released: image-text, loaded as its text model; experts in its own layout (peft's
    # path), routers a Linear subclass (kept 16-bit, warned)
    "llama4": "multimodal",
    "lfm2": dict(block_dim=64, block_ff_dim=128, layer_types=["conv", "full_attention"]),
    "granitemoehybrid": dict(num_local_experts=4, **EXPERTS, shared_intermediate_size=128,
                             layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1,
                             mamba_d_state=16, mamba_expand=2, mamba_chunk_size=16),
    "mixtral": dict(num_local_experts=4, **EXPERTS),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=64, decoder_sparse_step=1, head_dim=16, **EXPERTS),
    "gpt_oss": dict(num_local_experts=4, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=32, **EXPERTS),
    # a shared expert (Linear gate/up/down_proj) and its scalar gate beside the routed experts
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      decoder_sparse_step=1, **EXPERTS),
    # DeepSeek-style: multi-head latent attention, a dense first layer, shared experts
    "deepseek_v3": dict(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        n_group=1, topk_group=1, num_key_value_heads=4, **EXPERTS),
    # a hybrid whose blocks are of two classes (Mamba and attention), experts on every other layer
    "jamba": dict(num_experts=4, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                  attn_layer_offset=1, mamba_d_state=8, mamba_expand=2, **EXPERTS),
    "smollm3": {},
    "phi": {},
    "olmoe": dict(num_experts=4, **EXPERTS),
    "deepseek_v2": dict(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        num_key_value_heads=4, **EXPERTS),
    "phimoe": dict(num_local_experts=4, router_jitter_noise=0.0, **EXPERTS),  # jitter: random routing when training
    "glm4": dict(head_dim=16),
    "gpt_neox": {},
    "stablelm": {},
    "exaone4": {},
    "ministral": dict(head_dim=16),
    "glm4_moe": dict(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64, first_k_dense_replace=1,
                     head_dim=16, n_group=1, topk_group=1, **EXPERTS),
    "olmo3": {},
    "seed_oss": dict(head_dim=16, attention_dropout=0.0, residual_dropout=0.0),  # its defaults drop 10%
    "helium": dict(head_dim=16),
    "nemotron": {},
    "falcon": {},  # projections of a Linear subclass, and `mlp_output += attention_output` on the MLP's output
    "gpt2": dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, max_position_embeddings=2048),  # Conv1D, stored
    # (in, out): transposed when quantized; its defaults drop 10%; learned positions: the GPU case's 1024-token call
    # needs more than 256 (else an out-of-range gather, a device-side assert that poisons every later CUDA case)
    "mamba": dict(state_size=8, expand=2),  # dt_proj's weight multiplied directly: kept 16-bit, no adapter
    "falcon_h1": dict(head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                      mamba_chunk_size=16),  # Mamba-2 beside attention in every layer: out_proj left alone
    "jetmoe": dict(num_local_experts=4, **EXPERTS, kv_channels=16),  # transformers cannot checkpoint it
    # Mamba-2 and hybrid blocks (two classes) in `layers`; its own per-block adapters are Linears named by index
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], num_mem_blocks=1, mamba_headdim=16,
                   mamba_d_state=8, n_mamba_heads=8),
    # AltUp (its prediction/correction coefficient layers clamped and read by weight: kept 16-bit, no adapter),
    # Laurel blocks, per-layer inputs, and an intermediate size given per layer
    "gemma3n_text": dict(head_dim=16, laurel_rank=8, altup_num_inputs=2, hidden_size_per_layer_input=16,
                         num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0], intermediate_size=[128, 128],
                         layer_types=["sliding_attention", "full_attention"], sliding_window=32),
    # per-layer head_dim (transformers' heterogeneous config: the global attribute refuses to be read), its wider
    # full-attention layers given by global_head_dim
    "gemma4_text": dict(head_dim=16, global_head_dim=32, hidden_size_per_layer_input=16,
                        layer_types=["sliding_attention", "full_attention"], sliding_window=32),
    # grouped output projection (o_a_proj: a Linear subclass multiplying per head group, kept 16-bit, no LoRA),
    # compressed attention with an indexer, hash-routed experts
    "deepseek_v4": dict(head_dim=16, n_routed_experts=4, moe_intermediate_size=64, o_groups=2, o_lora_rank=16,
                        q_lora_rank=32, index_n_heads=4, index_head_dim=16, index_topk=16, **EXPERTS),
    # Hunyuan-V4: MLA with an indexer, experts after a dense first layer, and an lm_head kept fp32 under a 16-bit
    # decoder (its input cast up, as the fused loss must too)
    "hy_v4": dict(n_routed_experts=4, moe_intermediate_size=64, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=8,
                  qk_rope_head_dim=8, v_head_dim=16, head_dim=16, num_key_value_heads=4, index_n_heads=4,
                  index_head_dim=16, index_topk=16, **EXPERTS),
    # Gated DeltaNet (linear attention) and full-attention layers; a tiny config needs one of each (all-linear has
    # no attention layer for generation's mask); Qwen3-Next adds experts
    "qwen3_5_text": dict(head_dim=16, layer_types=["linear_attention", "full_attention"]),
    "qwen3_next": dict(head_dim=16, layer_types=["linear_attention", "full_attention"], num_experts=4,
                       moe_intermediate_size=64, shared_expert_intermediate_size=64, **EXPERTS),
    "qwen3_5_moe_text": dict(head_dim=16, layer_types=["linear_attention", "full_attention"], num_experts=4,
                             moe_intermediate_size=64, shared_expert_intermediate_size=64, **EXPERTS),
    "hunyuan_v1_dense": dict(head_dim=16),
    "hunyuan_v1_moe": dict(head_dim=16, num_experts=4, moe_topk=2, moe_intermediate_size=64, num_shared_expert=1),
    "dots1": dict(head_dim=16, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,
                  first_k_dense_replace=1, n_group=1, topk_group=1, **EXPERTS),
    "lfm2_moe": dict(num_experts=4, moe_intermediate_size=64, num_dense_layers=1,
                     layer_types=["conv", "full_attention"], **EXPERTS),
    # Mamba-2 and attention layers (Granite-4's hybrid without experts)
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
                  mamba_expand=2, mamba_chunk_size=16),
    "zamba": dict(layers_block_type=["linear_attention", "hybrid"], attn_layer_period=2, attn_layer_offset=1,
                  mamba_d_state=8, mamba_expand=2, n_mamba_heads=2, attention_head_dim=16),
    # two sublayers per decoder layer (4 hidden layers: 2 layers; transformers 5.17 reads num_layers alone), MLA,
    # zero (identity) experts beside the routed ones; its router multiplies by its classifier's weight: kept 16-bit
    "longcat_flash": dict(num_hidden_layers=4, num_layers=2, n_routed_experts=4, moe_topk=2, expert_ffn_hidden_size=64,
                          ffn_hidden_size=128, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, head_dim=8,
                          qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16, num_key_value_heads=4, zero_expert_num=2),
    # Ergo: its layers cast their inputs to o_proj's weight dtype: o_proj stays 16-bit (layer_rules.toml)
    "ergo": dict(num_experts=4, moe_intermediate_size=64, shared_intermediate_size=64,
                 first_dense_intermediate_size=128, sliding_window=64, global_attention_every_n_layers=2, **EXPERTS),
    # RoCBert (a BERT as a decoder): its embeddings add to map_inputs_layer's output in place, kept 16-bit
    "roc_bert": dict(is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=4096),  # a learned position table: the GPU case feeds 2 x 1024+ tokens
    # GPT-J and CodeGen rotate part of each head (rotary_dim; their default is wider than a tiny head)
    # a fixed sin/cos table of max_position_embeddings rows: long enough for the GPU case's merged call (2 x 1024+)
    "gptj": dict(rotary_dim=8, max_position_embeddings=4096),
    "codegen": dict(rotary_dim=8, max_position_embeddings=4096),
    # multi-head latent attention (MLA) as DeepSeek-V2/V3 shape it; its key/value heads as many as its query heads
    "minicpm3": dict(**MLA, head_dim=16),
    "glm4_moe_lite": dict(**MLA, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64, n_group=1,
                          topk_group=1, mlp_layer_types=["dense", "sparse"], **EXPERTS),
    # DeepSeek-V3.2: MLA with a sparse-attention indexer (left without LoRA: no gradient reaches it)
    "deepseek_v32": dict(**MLA, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64, n_group=1,
                         topk_group=1, index_head_dim=16, index_n_heads=2, index_topk=8,
                         mlp_layer_types=["dense", "sparse"], **EXPERTS),
    # GLM-5: DeepSeek-V3.2's shape (MLA, an indexer, experts after a dense first layer)
    "glm_moe_dsa": dict(**MLA, head_dim=16, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,
                        first_k_dense_replace=1, n_group=1, topk_group=1, index_head_dim=16, index_n_heads=2,
                        index_topk=8, mlp_layer_types=["dense", "sparse"], **EXPERTS),
    "sarvam_mla": dict(**MLA, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,
                       first_k_dense_replace=1, n_group=1, topk_group=1, **EXPERTS),
    # linear-attention hybrids: one linear-attention layer and one full-attention layer (with none of the latter the
    # generic config did not build)
    "kimi_linear": dict(**MLA, num_local_experts=4, n_shared_experts=1, moe_intermediate_size=64,
                        first_k_dense_replace=1, n_group=1, topk_group=1, **EXPERTS,
                        linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "num_heads": 4,
                                            "head_dim": 16, "short_conv_kernel_size": 4}),
    "bailing_hybrid": dict(**MLA, num_local_experts=4, n_shared_experts=1, moe_intermediate_size=64, n_group=1,
                           topk_group=1, layer_group_size=2, head_dim=16, mlp_layer_types=["dense", "sparse"],
                           **EXPERTS),
    # RWKV halves layers' weights at eval every rescale_every blocks (an fp16 guard): every block here, so a missed
    # adapter or a 4-bit weight it cannot halve shows at generation
    "rwkv": dict(rescale_every=1, attention_hidden_size=64),
    # StarCoder (1) and BLOOM: the decoder at .transformer, as GPT-2's (the fused loss finds it by base_model_prefix)
    "gpt_bigcode": dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, max_position_embeddings=2048),
    "bloom": dict(n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
    # MPT (its decoder at .transformer, ALiBi) and Falcon-Mamba (at .backbone, as Mamba's)
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=2048),
    "falcon_mamba": dict(state_size=8, expand=2),
}
MOE = ("mixtral", "qwen3_moe", "gpt_oss", "granitemoehybrid", "qwen2_moe", "deepseek_v3", "jamba", "olmoe",
       "deepseek_v2", "phimoe", "glm4_moe", "jetmoe", "hunyuan_v1_moe", "dots1", "lfm2_moe",
       "longcat_flash", "deepseek_v4", "hy_v4", "qwen3_next", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa",
       "sarvam_mla", "kimi_linear", "bailing_hybrid", "ergo", "qwen3_5_moe_text", "llama4")
# experts the engine's low-rank path does not compute: adapted by peft, and the engine says why (family -> the why)
PEFT_EXPERTS = {"jetmoe": "not a transformers experts module",
                "ergo": "overrides transformers' experts forward"}  # its per-route norm around the experts


def family_config(family: str, tokenizer):
    """The tiny config of `family`, its special tokens those of `tokenizer`."""
    from transformers import AutoConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if FAMILIES[family] == "multimodal":
        return {"gemma3": _gemma3, "gemma4": _gemma4, "qwen3_5": _qwen3_5, "llama4": _llama4}[family](ids)
    if family in ("gemma3n_text", "gemma4_text"):  # their per-layer input embeddings span the vocabulary too
        ids["vocab_size_per_layer_input"] = len(tokenizer)
    return AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]}, **ids)


def _gemma3(ids: dict):
    """Gemma-3 (4B and up) is image-text: a tiny SigLIP tower beside the tiny text model; trained on text only."""
    from transformers import AutoConfig

    text = dict(model_type="gemma3_text", **COMMON, **ids, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                image_token_id=ids["vocab_size"] - 1, boi_token_index=ids["vocab_size"] - 2,
                                eoi_token_index=ids["vocab_size"] - 3, tie_word_embeddings=False)


def _gemma4(ids: dict):
    """Gemma-4 as released: image-text (a tiny vision tower, no audio one) around the gemma4_text decoder."""
    from transformers import AutoConfig

    text = dict(model_type="gemma4_text", **COMMON, **FAMILIES["gemma4_text"], **ids,
                vocab_size_per_layer_input=ids["vocab_size"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, global_head_dim=16, patch_size=14)
    return AutoConfig.for_model("gemma4", text_config=text, vision_config=vision, audio_config=None,
                                image_token_id=ids["vocab_size"] - 1, boi_token_id=ids["vocab_size"] - 2,
                                eoi_token_id=ids["vocab_size"] - 3, tie_word_embeddings=False)


def _qwen3_5(ids: dict):
    """Qwen3.5 as released: one image-text checkpoint (a tiny vision tower here) for a qwen3_5_text decoder."""
    from transformers import AutoConfig

    text = dict(model_type="qwen3_5_text", **COMMON, **FAMILIES["qwen3_5_text"], **ids)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=COMMON["hidden_size"],
                  num_position_embeddings=64)
    top = ids["vocab_size"]
    return AutoConfig.for_model("qwen3_5", text_config=text, vision_config=vision, image_token_id=top - 1,
                                video_token_id=top - 2, vision_start_token_id=top - 3, vision_end_token_id=top - 4,
                                tie_word_embeddings=False)


def _llama4(ids: dict):
    """Llama-4 as released: image-text (a tiny vision tower) around a text model whose every layer has experts."""
    from transformers import AutoConfig

    text = dict(**COMMON, **ids, intermediate_size_mlp=128, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64)
    return AutoConfig.for_model("llama4", text_config=text, vision_config=vision,
                                image_token_index=ids["vocab_size"] - 1, tie_word_embeddings=False)


def mllama_config(ids: dict):
    """Llama-3.2-Vision as released: a tiny vision tower beside a text model whose second layer is cross-attention
    (not in the matrix: its merged text model's config is one transformers' auto classes do not load)."""
    from transformers import AutoConfig

    text = dict(**COMMON, **ids, cross_attention_layers=[1])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                  image_size=28, patch_size=14, vision_output_dim=64, intermediate_layers_indices=[0])
    return AutoConfig.for_model("mllama", text_config=text, vision_config=vision,
                                image_token_index=ids["vocab_size"] - 1)


# parameters that transformers initializes to zero but a trained checkpoint holds nonzero: left zero, they cut a path
# out of the tiny model (Gemma-3n's AltUp scales the per-layer input gate's input by correct_output_scale, so every
# per_layer_input_gate / per_layer_projection gradient was 0 with and without the engine)
TRAINED_NONZERO = {"gemma3n_text": ("correct_output_scale",)}


def make_family_checkpoint(directory, family: str, seed: int = 0, config: dict | None = None):
    """A random fp32 checkpoint of `family` (or of `config`, a config dict) saved as real safetensors with the tiny
    tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from tiny import make_tokenizer

    tok = make_tokenizer()
    config = AutoConfig.for_model(**config) if config else family_config(family, tok)
    torch.manual_seed(seed)
    # an image-text config is saved whole, towers included, as its checkpoints are released
    builder = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = builder.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in TRAINED_NONZERO.get(config.model_type, ()):
                param.fill_(1.0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
