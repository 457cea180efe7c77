"""The default optimizer: bitsandbytes 8-bit AdamW over exactly the trainable parameters (without its per-parameter
device synchronization: adamw8bit.py)."""

from __future__ import annotations

from .errors import InvalidOption

DEFAULT_LR = 2e-4
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
TRAINER_OPTIM = "adamw_8bit"  # transformers' name for bitsandbytes AdamW8bit


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def get_optimizer(model, lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                  betas: tuple[float, float] = DEFAULT_BETAS, eps: float = DEFAULT_EPS, **kwargs):
    """bitsandbytes' AdamW8bit over the trainable (LoRA) parameters; extra kwargs go to AdamW8bit."""
    from .adamw8bit import AdamW8bitNoSync

    params = trainable_parameters(model)
    if not params:
        raise InvalidOption("Building the optimizer", found="the model has no trainable parameters",
                            fix="load with LoRA (the default) or call FastModel.get_peft_model(model) first")
    try:
        return AdamW8bitNoSync(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **kwargs)
    except (TypeError, ValueError) as e:  # bitsandbytes' own checks: a negative lr, betas outside [0, 1), a typo
        options = ", ".join(f"{k}={v!r}" for k, v in dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                                                            **kwargs).items())
        raise InvalidOption(f"Building the optimizer with {options}", found=f"bitsandbytes refused it: {e}",
                            fix="lr and eps >= 0, betas in [0, 1), and only AdamW8bit's keyword arguments") from e
