"""The default optimizer: bitsandbytes 8-bit AdamW over exactly the trainable parameters (without its per-parameter
device synchronization: adamw8bit.py)."""

from __future__ import annotations

import torch

from fastload.errors import InvalidOption

DEFAULT_LR = 2e-4
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
TRAINER_OPTIM = "adamw_8bit"  # transformers' name for bitsandbytes AdamW8bit


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


# transformers' Trainer.get_decay_parameter_names: no weight decay inside LayerNorm modules or on these names
_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """The trained parameters in transformers' two groups, by its own rule (the second may be empty, as in
    transformers, so that checkpoints of either optimizer load into the other): no weight decay on biases and
    norms, weight decay on all else."""
    from transformers.trainer_pt_utils import get_parameter_names

    decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], list(_NO_DECAY_PATTERNS)))
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in decayed else exempt).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def trained_embeddings(model) -> list:
    """Trained embedding weights: they get 32-bit optimizer state, as transformers' adamw_8bit gives them (8-bit
    state is unstable for embeddings: bitsandbytes' advice)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad]


def get_optimizer(model, lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                  betas: tuple[float, float] = DEFAULT_BETAS, eps: float = DEFAULT_EPS, **kwargs):
    """bitsandbytes' AdamW8bit over the trainable (LoRA) parameters, grouped and configured as transformers'
    adamw_8bit does (no weight decay on biases and norms, 32-bit state for trained embeddings); extra kwargs go to
    AdamW8bit."""
    from fastload.train.adamw8bit import AdamW8bitNoSync

    if not trainable_parameters(model):
        raise InvalidOption("Building the optimizer", found="the model has no trainable parameters",
                            fix="load with LoRA (the default) or call FastModel.get_peft_model(model) first")
    try:
        optimizer = AdamW8bitNoSync(parameter_groups(model, weight_decay), lr=lr, weight_decay=weight_decay,
                                    betas=betas, eps=eps, full_precision=trained_embeddings(model), **kwargs)
    except (TypeError, ValueError) as e:  # bitsandbytes' own checks: a negative lr, betas outside [0, 1), a typo
        options = ", ".join(f"{k}={v!r}" for k, v in dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                                            **kwargs).items())
        raise InvalidOption(f"Building the optimizer with {options}", found=f"bitsandbytes refused it: {e}",
                            fix="lr and eps >= 0, betas in [0, 1), and only AdamW8bit's keyword arguments") from e
    return optimizer
