"""Unsloth's `unsloth.chat_templates` names on fastload: `from fastload.chat_templates import get_chat_template,
train_on_responses_only` (implementation: fastload.compat.chat_templates, templates as data in
fastload/compat/chat_templates.toml)."""

from fastload.compat.chat_templates import (
                                    get_chat_template,
                                    standardize_sharegpt,
                                    template_names,
                                    train_on_responses_only,
)

__all__ = ["get_chat_template", "standardize_sharegpt", "template_names", "train_on_responses_only"]
