"""Memory estimates from a config alone, before any weight is read."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from fastload.errors import CheckpointCorrupt, FastloadError, NotEnoughMemory, UnsupportedArchitecture
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH

GIB = 1024 ** 3
NF4_BLOCK = 64            # weights per absmax block
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level block


@dataclass(frozen=True)
class ParamCounts:
    projections: int   # linear layers inside decoder layers: the ones quantized
    other: int         # embeddings, norms, lm_head: kept in 16 (or 32) bit
    hidden: int
    layers: int
    intermediate: int  # MLP width a token passes through (for MoE: the experts it is routed to, all together)
    vocab: int
    kv_dim: int
    experts: int = 0     # fused 3-D expert weights of MoE models: 16-bit as loaded, then 4-bit (load.experts)
    lora_width: int = 0  # sum of (in + out) over the default LoRA's targets, per unit of rank; 0: Llama-shaped guess

    @property
    def total(self) -> int:
        return self.projections + self.experts + self.other


def config_of_dict(cfg: dict):
    """The transformers config of a config.json's dict (its quantization left out)."""
    from transformers import AutoConfig

    cfg = dict(cfg)
    cfg.pop("quantization_config", None)
    try:
        return AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as e:
        raise UnsupportedArchitecture(f"Reading a config of model_type {cfg.get('model_type')!r}",
                                      found=f"transformers does not know it ({e})",
                                      fix="upgrade transformers, "
                                          "or pass trust_remote_code=True if you trust the repo") from e


def meta_model(config):
    """The causal LM a config describes, on the meta device: no memory, no random initialization.

    Raises:
        CheckpointCorrupt: transformers cannot build a model of this config.
    """
    # torch here, not at the top: an estimate from a registry parameter count (`fastload estimate`) stays light
    import torch
    from transformers import AutoModelForCausalLM

    from fastload.load.global_patches import PATCHING_GLOBALS

    with building_errors(config), PATCHING_GLOBALS, torch.device("meta"), skipped_init():
        return AutoModelForCausalLM.from_config(config)


def skipped_init():
    """transformers' switch for skipping random initialization (weights on the meta device need none, and drawing
    into them still runs torch's reference kernels per tensor); a no-op where transformers has none."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


@contextlib.contextmanager
def building_errors(config):
    """Turn what transformers raises for a config it cannot build into CheckpointCorrupt."""
    try:
        yield
    except FastloadError:
        raise
    # AssertionError: torch's own argument checks (an out-of-vocabulary pad_token_id fails nn.Embedding's)
    except (RuntimeError, ValueError, TypeError, OverflowError, KeyError, IndexError, AttributeError,
            AssertionError) as e:
        raise CheckpointCorrupt(f"Building the model a config of model_type {getattr(config, 'model_type', '?')!r} "
                                "describes", found=f"transformers cannot build it: {type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:300]}",
                                fix="restore config.json from the original checkpoint") from e


def count_params(config, model=None) -> ParamCounts:
    """Count parameters by kind in `model` (any build of the config: meta, a load's skeleton), or in the model the
    config describes, instantiated on the meta device (no memory)."""
    from fastload.structure import decoder_layers

    if isinstance(config, dict):
        config = config_of_dict(config)
    if model is None:
        model = meta_model(config)
    layers = list(decoder_layers(model) or [])
    proj, experts, lora_width = _layer_counts(layers, config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # once, tied yet (meta model) or not (skeleton)
    total = sum(p.numel() for name, p in model.named_parameters() if name not in tied)
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = tc.hidden_size
    heads = widest_size(tc, "num_attention_heads")
    kv = widest_size(tc, "num_key_value_heads") or heads
    head_dim = widest_size(tc, "head_dim") or hidden // heads
    return ParamCounts(projections=proj, other=total - proj - experts, hidden=hidden, layers=tc.num_hidden_layers,
                       intermediate=_active_intermediate(tc, bool(experts)), vocab=tc.vocab_size,
                       kv_dim=kv * head_dim, experts=experts, lora_width=lora_width)


def _layer_counts(layers, config) -> tuple[int, int, int]:
    """(linear weights, fused expert weights, LoRA width) of the decoder layers; the LoRA width is what fastload's
    default LoRA adapts: every projection but the routers, and each expert's fused weights."""
    from fastload.load.experts import expert_weights
    from fastload.structure import is_linear, is_router, router_widths

    routers = router_widths(config.get_text_config() if hasattr(config, "get_text_config") else config)
    linears = [(path, m) for layer in layers for path, m in layer.named_modules() if is_linear(m)]
    experts = expert_weights(layers, config)
    width = sum(m.in_features + m.out_features for path, m in linears if not is_router(path, m, routers))
    width += sum(p.shape[0] * (p.shape[1] + p.shape[2]) for p in experts)  # peft: one rank-r pair per expert
    return sum(m.weight.numel() for _, m in linears), sum(p.numel() for p in experts), width


def _active_intermediate(tc, moe: bool) -> int:
    """The MLP width one token's activations span: the routed experts' (plus a shared expert's) for MoE."""
    dense = widest_size(tc, "intermediate_size") or 4 * tc.hidden_size
    if not moe:
        return dense
    per_expert = widest_size(tc, "moe_intermediate_size") or dense
    routed = getattr(tc, "num_experts_per_tok", None) or 1
    shared = widest_size(tc, "shared_intermediate_size") or 0
    return per_expert * routed + shared


def widest_size(config, name: str) -> int | None:
    """A size the config gives once, per layer as a list (Gemma-3n's intermediate_size, OpenELM's heads), or per
    layer in transformers' heterogeneous configs (Gemma-4's head_dim, wider on its full-attention layers, where the
    global attribute refuses to be read): the largest, since the layer that needs the most memory sets the estimate.
    None when the config has no such size."""
    if name in (getattr(config, "per_layer_attributes", None) or ()):
        sizes = [_widest(getattr(layer, name, None) or 0) for layer in config.per_layer_config]
        return max(sizes, default=0) or None
    return _widest(getattr(config, name, None))


def _widest(size) -> int:
    """A size the config gives per layer (Gemma-3n's intermediate_size, OpenELM's heads) as its largest: the layer
    that needs the most memory sets the estimate."""
    return max(size) if isinstance(size, (list, tuple)) else size


def weight_bytes(counts: ParamCounts, bits: int, double_quant: bool = True, other_bytes: int = 2,
                 experts_4bit: bool = True) -> int:
    """Bytes of the loaded weights: quantized projections plus 16-bit (or fp32 on CPU) everything else. MoE experts
    count 4-bit in a 4-bit load when experts_4bit (fastload quantizes them), else 16-bit (8-bit loads,
    quantize_experts=False, and a load that writes a store entry, which reads them all 16-bit first)."""
    experts_quantized = bits == 4 and experts_4bit
    if bits == 4:
        four_bit = counts.projections + (counts.experts if experts_quantized else 0)
        absmax = four_bit / NF4_BLOCK * (1 + 4 / DOUBLE_QUANT_BLOCK if double_quant else 4)
        proj = four_bit / 2 + absmax
    elif bits == 8:
        proj = counts.projections + counts.projections / counts.hidden * 4  # int8 + one fp32 scale per row
    else:
        proj = counts.projections * other_bytes
    return int(proj + (counts.other + (0 if experts_quantized else counts.experts)) * other_bytes)


def lora_params(counts: ParamCounts, r: int) -> int:
    """LoRA A and B of the default targets, r x (in + out) each; without a counted model, the seven Llama-style
    projections of each layer."""
    if counts.lora_width:
        return r * counts.lora_width
    h, i, kv = counts.hidden, counts.intermediate, counts.kv_dim
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    return per_layer * counts.layers


def activation_bytes(counts: ParamCounts, seq: int, batch: int, checkpointing: bool, act_bytes: int = 2) -> int:
    """Activations kept for backward: per-layer inputs with checkpointing (plus one layer recomputed), else all."""
    tokens = seq * batch
    per_layer_full = tokens * (10 * counts.hidden + 3 * counts.intermediate) * act_bytes
    logits = tokens * counts.vocab * (act_bytes + 4)  # bf16 logits plus the fp32 copy the loss makes
    if checkpointing:
        return counts.layers * tokens * counts.hidden * act_bytes + per_layer_full + logits
    return counts.layers * per_layer_full + logits


@dataclass(frozen=True)
class MemoryEstimate:
    counts: ParamCounts
    weights_16bit: int
    weights_8bit: int
    weights_4bit: int
    weights_4bit_no_dq: int
    lora: int
    optimizer_8bit: int
    activations: int
    activations_no_ckpt: int
    seq: int
    batch: int
    basis: str = ""  # where the shape came from, shown in the table (an approximation says so)

    def training_total(self, bits: int = 4, checkpointing: bool = True) -> int:
        w = {4: self.weights_4bit, 8: self.weights_8bit, 16: self.weights_16bit}[bits]
        grads = self.lora  # fp32 LoRA gradients are as large as the LoRA weights
        activations = self.activations if checkpointing else self.activations_no_ckpt
        return w + self.lora + grads + self.optimizer_8bit + activations

    def table(self) -> str:
        rows = [("weights 16-bit", self.weights_16bit), ("weights 8-bit (LLM.int8)", self.weights_8bit),
                ("weights 4-bit NF4 + double quant", self.weights_4bit), ("weights 4-bit NF4", self.weights_4bit_no_dq),
                *([("  of which MoE experts (4-bit)",
                    weight_bytes(replace(self.counts, projections=0, other=0), 4))] if self.counts.experts else []),
                ("LoRA weights + grads (fp32)", 2 * self.lora), ("8-bit AdamW state", self.optimizer_8bit),
                (f"activations {self.seq}x{self.batch}, checkpointing", self.activations),
                (f"activations {self.seq}x{self.batch}, no checkpointing", self.activations_no_ckpt),
                ("QLoRA training total (4-bit, checkpointing)", self.training_total(4, True)),
                ("LoRA training total (16-bit, checkpointing)", self.training_total(16, True))]
        width = max(len(r[0]) for r in rows)
        head = f"{self.counts.total / 1e9:.2f}B parameters ({self.counts.projections / 1e9:.2f}B in projections"
        head += f", {self.counts.experts / 1e9:.2f}B in MoE experts)" if self.counts.experts else ")"
        if self.basis:
            head += f"\n  from {self.basis}"
        return "\n".join([head] + [f"  {name:<{width}}  {b / GIB:8.2f} GiB" for name, b in rows])

    def as_dict(self) -> dict:
        return {"params": self.counts.total, "projection_params": self.counts.projections,
                "expert_params": self.counts.experts,
                "weights_16bit": self.weights_16bit, "weights_8bit": self.weights_8bit,
                "weights_4bit": self.weights_4bit, "weights_4bit_no_double_quant": self.weights_4bit_no_dq,
                "lora": self.lora, "optimizer_8bit": self.optimizer_8bit, "activations": self.activations,
                "activations_no_checkpointing": self.activations_no_ckpt, "seq": self.seq, "batch": self.batch,
                "training_total_4bit": self.training_total(4, True),
                "training_total_16bit": self.training_total(16, True), "basis": self.basis}


def estimate(config, seq: int = DEFAULT_MAX_SEQ_LENGTH, batch: int = 1, r: int = 16) -> MemoryEstimate:
    """Memory of loading and QLoRA-training the model a config describes (a transformers config or a dict).

    Args:
        config: a transformers config or its dict (config.json).
        seq: the training sequence length.
        batch: the training batch size.
        r: the LoRA rank.

    Returns:
        A MemoryEstimate: weights in 4/8/16 bits, LoRA, optimizer state, activations; `.table()` prints them.

    Raises:
        UnsupportedArchitecture: a model_type transformers does not know.
        CheckpointCorrupt: a config transformers cannot build a model from.
    """
    return estimate_counts(count_params(config), seq, batch, r)


def estimate_counts(counts: ParamCounts, seq: int = DEFAULT_MAX_SEQ_LENGTH, batch: int = 1, r: int = 16,
                    basis: str = "") -> MemoryEstimate:
    lora = lora_params(counts, r) * 4  # fp32 adapters
    return MemoryEstimate(counts=counts, weights_16bit=weight_bytes(counts, 16), weights_8bit=weight_bytes(counts, 8),
                          weights_4bit=weight_bytes(counts, 4, True), weights_4bit_no_dq=weight_bytes(counts, 4, False),
                          lora=lora, optimizer_8bit=lora // 4 * 2,
                          activations=activation_bytes(counts, seq, batch, True),
                          activations_no_ckpt=activation_bytes(counts, seq, batch, False), seq=seq, batch=batch,
                          basis=basis)


# A registry entry knows its parameter count but not its shape. The approximation assumes a Llama-shaped decoder:
# layers = hidden / 128 (Llama 2 7B: 4096/32, 13B: 5120/40), SwiGLU intermediate = 3.5 x hidden, grouped-query
# attention with a quarter of the heads for keys/values, and untied embeddings of a 100k vocabulary, capped at 30%
# of the parameters (small models spend a large share on embeddings, large ones a small one). 16-bit weights are
# exact (the count is); 4-bit weights land within ~20% of real Llama 2/3 configs (the 16-bit embedding share is
# the unknown); activations depend on the guessed shape and are rougher still.
APPROX_VOCAB = 100_000
APPROX_EMBEDDING_SHARE = 0.3
# Mixture-of-experts families: most of their weights are fused experts. Share of the parameters in experts, from the
# published configs: Mixtral 8x7B 97%, Qwen3-30B-A3B 95%, gpt-oss-20b 91%, Granite-4.0-H-Tiny ~85%; 0.9 is assumed.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "granitemoehybrid", "deepseek_v3", "olmoe")
APPROX_EXPERT_SHARE = 0.9


def approximate_counts(params: float, family: str | None = None) -> ParamCounts:
    """A plausible Llama-like ParamCounts for a model known only by its parameter count (and family: an MoE one
    keeps most of its parameters as experts)."""
    if not params or params <= 0:
        raise ValueError(f"a positive parameter count is needed, got {params!r}")
    if family in MOE_FAMILIES:
        dense = approximate_counts(params * (1 - APPROX_EXPERT_SHARE))
        return replace(dense, experts=int(params) - dense.total)
    per_layer_per_h2 = 2 + 2 * 0.25 + 3 * 3.5  # q,o + k,v (GQA) + gate, up, down, in units of hidden^2
    hidden = max(64, int(round((params * 128 / per_layer_per_h2) ** (1 / 3) / 64)) * 64)
    other = int(min(2 * APPROX_VOCAB * hidden, APPROX_EMBEDDING_SHARE * params))
    projections = int(params) - other
    layers = max(1, round(projections / (per_layer_per_h2 * hidden * hidden)))
    vocab = max(1, other // (2 * hidden))
    return ParamCounts(projections=projections, other=other, hidden=hidden, layers=layers,
                       intermediate=int(3.5 * hidden), vocab=vocab, kv_dim=hidden // 4)


def weights_floor_bytes(config, other_bytes: int) -> int | None:
    """Bytes no model of this config can weigh less than: its embedding, and a 4-bit hidden-wide row per layer."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    if isinstance(tc, dict):
        tc = tc.get("text_config") if isinstance(tc.get("text_config"), dict) else tc
        get = tc.get
    else:
        def get(key):
            return getattr(tc, key, None)
    hidden, layers, vocab = get("hidden_size"), get("num_hidden_layers"), get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, vocab)):
        return None
    return vocab * hidden * other_bytes + layers * hidden // 2


def check_weights_floor(name: str, config, bits: int, device: str, other_bytes: int) -> None:
    """Refuse a config whose weights cannot fit the device whatever its layers hold, before any model of it (even on
    the meta device) is built: absurd sizes would fail in transformers first, with a less useful error."""
    from fastload.load.devices import free_memory_bytes

    free = free_memory_bytes(device)
    floor = weights_floor_bytes(config, other_bytes)
    if floor is not None and floor > free:
        raise NotEnoughMemory(f"Loading {name} in {bits}-bit on the {device}",
                              found=f"its config describes weights of at least {floor / GIB:.1f} GiB, the {device} "
                                    f"has {free / GIB:.1f} GiB free",
                              fix="check config.json (hidden_size, num_hidden_layers, vocab_size), "
                                  "or use a smaller model")


def check_fits(name: str, config, bits: int, double_quant: bool, device: str, other_bytes: int,
               max_seq_length: int | None = None, model=None, experts_4bit: bool = False) -> int:
    """Refuse, before reading weights, a load whose weights alone cannot fit the device, saying what would fit.

    Weights that fit but leave too little for LoRA training at max_seq_length (batch 1, checkpointing) only warn:
    the training estimate is an upper bound (see docs/loading.md), and the user may only want to generate.
    `model`: a build of the config to count (the load's own skeleton), else a meta model is built once the floor
    check passed. experts_4bit: MoE experts are quantized as they are read (else they are all read 16-bit first).
    Returns the weights' estimate in bytes."""
    from fastload._log import logger
    from fastload.load.devices import free_memory_bytes

    if model is None:  # a caller that built the model has checked the floor before building it
        check_weights_floor(name, config, bits, device, other_bytes)
    free = free_memory_bytes(device)
    counts = count_params(config, model)
    need = weight_bytes(counts, bits, double_quant, other_bytes, experts_4bit)
    if need > free:
        smaller = [(b, weight_bytes(counts, b, True, other_bytes, experts_4bit)) for b in (8, 4) if b < bits]
        fitting = [f"load_in_{b}bit=True needs {size / GIB:.2f} GiB" for b, size in smaller if size <= free]
        experts = (f" ({counts.experts * other_bytes / GIB:.2f} GiB of them MoE experts, which are read 16-bit and "
                   "quantized after the load)" if counts.experts and bits < 16 and not experts_4bit else "")
        raise NotEnoughMemory(f"Loading {name} in {bits}-bit on the {device}",
                              found=f"its weights need about {need / GIB:.2f} GiB{experts}, the {device} has "
                                    f"{free / GIB:.2f} GiB free",
                              fix=(f"{fitting[-1]}, which fits; " if fitting else "no quantization makes it fit; ")
                                  + "free memory, or use a smaller model (`fastload estimate NAME` shows the sizes)")

    def training_need(seq: int) -> int:
        return estimate_counts(counts, seq=seq, batch=1).training_total(bits)

    seq = max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    if training_need(seq) > free:
        shorter = seq
        while shorter > 64 and training_need(shorter) > free:
            shorter //= 2
        advice = (f"try max_seq_length={shorter}, batch size 1 with gradient accumulation, and keep gradient "
                  "checkpointing on" if training_need(shorter) <= free else
                  "even max_seq_length=64 may not fit: free memory, or use a smaller model")
        logger.warning("%s fits in %s-bit (%.2f GiB of weights), but LoRA training at max_seq_length=%d may need "
                       "up to %.2f GiB of the %.2f GiB free: %s", name, bits, need / GIB, seq,
                       training_need(seq) / GIB, free / GIB, advice)
    return need


@dataclass(frozen=True)
class PerGpu:
    """Memory per GPU of QLoRA training on `gpus` GPUs (batch per GPU as estimated), the two ways fastload runs."""

    gpus: int
    ddp: int             # each GPU holds the whole 4-bit model, its adapter, optimizer state and activations
    fsdp: int            # projections, adapter and optimizer state sharded; embeddings/lm_head (FSDP's root unit)
                         # whole; two decoder layers gathered at once (the one computing, the one prefetched)
    fsdp_load_peak: int  # each rank loads the whole 4-bit model onto its GPU before FSDP shards it

    def table(self) -> str:
        rows = [(f"DDP, per GPU ({self.gpus} GPUs: the whole model on each)", self.ddp),
                (f"FSDP2-QLoRA, per GPU while training ({self.gpus} shards)", self.fsdp),
                ("FSDP2-QLoRA, per GPU while loading (whole 4-bit model, before sharding)", self.fsdp_load_peak)]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {name:<{width}}  {b / GIB:8.2f} GiB" for name, b in rows)

    def as_dict(self) -> dict:
        return {"gpus": self.gpus, "ddp_per_gpu": self.ddp, "fsdp_per_gpu": self.fsdp,
                "fsdp_load_peak_per_gpu": self.fsdp_load_peak}


def per_gpu(est: MemoryEstimate, gpus: int) -> PerGpu:
    """DDP and FSDP2 memory per GPU for QLoRA (4-bit, checkpointing) on `gpus` GPUs."""
    counts = est.counts
    other = counts.other * 2  # 16-bit embeddings, norms, lm_head
    projections = est.weights_4bit - other
    layer = projections / max(counts.layers, 1)
    sharded = (projections + 2 * est.lora + est.optimizer_8bit) / gpus
    return PerGpu(gpus=gpus, ddp=est.training_total(4, True),
                  fsdp=int(sharded + other + 2 * layer + est.activations), fsdp_load_peak=est.weights_4bit)
