"""What a merge cost: the LoRA model and its merged checkpoint evaluated on the same small probe batch.

Merging into dequantized 4-bit weights (rather than the 16-bit source) is where QLoRA users lose quality; the
numbers here show how much, on held-out texts when given, else on a chat written with the tokenizer's template.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastload._log import logger

PROBE_CHAT = [
    {"role": "user", "content": "What is the capital of France, and why is it famous?"},
    {"role": "assistant", "content": "Paris is the capital of France. It is known for the Eiffel Tower, the "
                                     "Louvre museum and its cafes along the Seine."},
]
PROBE_PLAIN = ["The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
               "In 1969, astronauts landed on the Moon and returned safely to Earth."]
MAX_PROBE_TOKENS = 128


@dataclass(frozen=True)
class MergeReport:
    """Loss and logits of the LoRA model (before) and the merged checkpoint (after) on the probe batch."""

    loss_before: float
    loss_after: float
    max_logit_diff: float
    n_tokens: int

    @property
    def perplexity_delta(self) -> float:
        return math.exp(self.loss_after) - math.exp(self.loss_before)

    def describe(self) -> str:
        return (f"merge check on {self.n_tokens} probe tokens: loss {self.loss_before:.4f} -> {self.loss_after:.4f} "
                f"(perplexity {self.perplexity_delta:+.3f}), max logit difference {self.max_logit_diff:.4f}")


def probe_texts(tokenizer, texts: Sequence[str] | None = None) -> list[str]:
    """The user's held-out texts, else one chat in the tokenizer's own template, else plain sentences."""
    if texts:
        return [str(t) for t in texts]
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            return [tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False)]
        except (TemplateError, ValueError, TypeError) as e:  # a template needing other roles: plain text measures too
            logger.info("merge check: the chat template did not render (%s); probing plain text", type(e).__name__)
    return list(PROBE_PLAIN)


def report_merge(model, merged_dir: str | Path, tokenizer=None,
                 texts: Sequence[str] | None = None) -> MergeReport | None:
    """Evaluate `model` (with its LoRA adapter) and the merged checkpoint in merged_dir on the probe batch; log it.

    Args:
        model: the peft model that was merged.
        merged_dir: the merged 16-bit checkpoint (loaded with plain transformers, on the model's device).
        tokenizer: tokenizer for the probe; default: the one saved in merged_dir.
        texts: held-out texts to probe with (default: a chat rendered with the tokenizer's template).

    Returns:
        The MergeReport, or None when no tokenizer is available (logged).
    """
    from transformers import AutoTokenizer

    merged_dir = Path(merged_dir)
    if tokenizer is None:
        if not (merged_dir / "tokenizer_config.json").is_file() and not (merged_dir / "tokenizer.json").is_file():
            logger.info("merge check skipped: no tokenizer (pass tokenizer=... to measure what the merge cost)")
            return None
        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    device = next(model.parameters()).device
    batch = _probe_batch(tokenizer, probe_texts(tokenizer, texts), device)
    before = _logits(model, batch)
    merged = _load_back(merged_dir, device)
    try:
        after = _logits(merged, batch)
    finally:
        del merged
    mask = batch["attention_mask"].bool().cpu()  # the logits come back on the CPU
    report = MergeReport(loss_before=_loss(before, batch), loss_after=_loss(after, batch),
                         max_logit_diff=float((before - after).abs()[mask].max()), n_tokens=int(mask.sum()))
    logger.info("%s", report.describe())
    return report


def _load_back(merged_dir: Path, device):
    """The merged checkpoint through plain transformers; one it refuses is fastload's error (out of memory stays
    torch's: the checkpoint may be fine)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastload.errors import AdapterError

    try:
        return AutoModelForCausalLM.from_pretrained(str(merged_dir), device_map={"": device})
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise AdapterError("Checking the merge by loading the merged checkpoint with plain transformers",
                           found=f"it does not load ({type(e).__name__}: {str(e).splitlines()[0][:300]}); nothing "
                           "was saved", fix="save the adapter alone (FastModel.save_adapter) and report this with "
                           "the model name, or try source='dequantized'") from e


def _probe_batch(tokenizer, texts: list[str], device):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=MAX_PROBE_TOKENS)["input_ids"]
            for t in texts]
    import torch

    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _logits(model, batch):
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**batch).logits.float().cpu()
    finally:
        model.train(was_training)


def _loss(logits, batch) -> float:
    import torch.nn.functional as F

    labels = batch["input_ids"].cpu().clone()
    labels[batch["attention_mask"].cpu() == 0] = -100
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100))
