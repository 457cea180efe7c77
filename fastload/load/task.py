"""What head the loaded model carries: the language-model head (default) or a sequence-classification head.

A classifier is the same 4-bit body under transformers' AutoModelForSequenceClassification, its new `score` head
left unquantized, trained in full (peft's modules_to_save) in fp32, with LoRA on the body.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

from fastload.errors import InvalidOption

_HEADS_CAST: weakref.WeakSet = weakref.WeakSet()  # heads given the input cast

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)
PEFT_TASK_TYPES = {CAUSAL_LM: "CAUSAL_LM", SEQUENCE_CLASSIFICATION: "SEQ_CLS"}
HEAD_NAMES = ("score", "classifier")  # what transformers calls the classification head across architectures


def check_task(task: str | None, num_labels: int | None) -> str:
    """The task asked for, checked with its num_labels.

    Raises:
        InvalidOption: an unknown task, num_labels missing or not a positive integer for a classifier, or given
            for a causal LM.
    """
    task = CAUSAL_LM if task is None else task
    if task not in TASKS:
        raise InvalidOption(f"task={task!r}", found=f"the tasks are: {', '.join(TASKS)}",
                            fix="use task='sequence-classification' with num_labels=N for a classifier or reward "
                                "head, or leave task unset for a language model")
    if task == SEQUENCE_CLASSIFICATION and (not isinstance(num_labels, int) or isinstance(num_labels, bool)
                                           or num_labels < 1):
        raise InvalidOption(f"task={task!r}, num_labels={num_labels!r}", found="num_labels must be a positive "
                            "integer (the number of classes; 1 for a reward or regression head)",
                            fix="pass e.g. num_labels=2")
    if task == CAUSAL_LM and num_labels is not None:
        raise InvalidOption(f"num_labels={num_labels!r}", found="num_labels applies to task='sequence-classification'",
                            fix="add task='sequence-classification', or drop num_labels")
    return task


def saved_classifier(adapter_dir: str | None) -> int | None:
    """num_labels of a classifier adapter saved by fastload (peft task SEQ_CLS, its head's rows), else None."""
    if not adapter_dir:
        return None
    folder = Path(adapter_dir)
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable: the adapter checks report it, as for any adapter
        return None
    if not isinstance(config, dict) or config.get("task_type") != PEFT_TASK_TYPES[SEQUENCE_CLASSIFICATION]:
        return None
    from fastload.sources.checkpoint_files import read_safetensors_header

    weights = folder / "adapter_model.safetensors"
    header = read_safetensors_header(weights) if weights.is_file() else {}
    rows = [meta["shape"][0] for name, meta in header.items()
            if name != "__metadata__" and name.split(".")[-2:-1] and name.split(".")[-2] in HEAD_NAMES
            and name.endswith(".weight")]
    return rows[0] if rows else None


def model_class(task: str):
    """transformers' auto class for the task."""
    if task == SEQUENCE_CLASSIFICATION:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def loads_back(config, task: str) -> bool:
    """Whether a checkpoint saved with this config loads back as the task's model: a text model transformers builds
    from an image-text checkpoint may have a config of its own that its auto class does not map (Llama-3.2-Vision's
    MllamaTextConfig); remote code maps itself."""
    return bool(getattr(config, "auto_map", None)) or _mapped(model_class(task), config) is not None


def text_model_only(config, task: str) -> str | None:
    """The class name when transformers loads only the text model of this image-text checkpoint for the task
    (Qwen3.5's causal LM: its vision tower's weights are not read), else None (a text model, or a class that keeps
    the towers, as Gemma-3's and Gemma-4's do)."""
    if getattr(config, "vision_config", None) is None:
        return None
    classes = concrete_classes(task, config)
    if not classes or "ConditionalGeneration" in classes[0].__name__:
        return None
    return classes[0].__name__


def concrete_classes(task: str, config) -> list:
    """The model classes transformers builds for `config`: the task's and its base model's (an instance merges the
    base model's class attributes, such as the fp32 lists, into its own); none for an unregistered (remote-code)
    config, whose class is not known before it loads."""
    from transformers import AutoModel

    return [cls for auto in (model_class(task), AutoModel) if (cls := _mapped(auto, config)) is not None]


def _mapped(auto, config):
    """The class `auto` (an Auto* class) builds for this config, or None when it maps none."""
    try:
        return auto._model_mapping[type(config)]
    except (KeyError, AttributeError, ValueError):
        return None


def head_in_full_precision(model) -> int:
    """Run the classification head in its own dtype (fp32 when trained): the body's bf16 hidden states are cast to
    it on the way in. Returns how many heads were given the cast (0 when the model has none)."""
    import torch

    done = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in HEAD_NAMES or (
                isinstance(module, torch.nn.Linear) and ".modules_to_save." in name
                and name.split(".")[-3] in HEAD_NAMES):
            input_in_own_dtype(module)
            done += 1
    return done


def input_in_own_dtype(module) -> None:
    """Cast what reaches this layer to its weight's dtype on the way in (a trained fp32 head under a 16-bit body);
    once per module, nothing written onto it."""
    if module not in _HEADS_CAST:
        module.register_forward_pre_hook(_cast_input)
        _HEADS_CAST.add(module)


def _cast_input(module, args):
    import torch

    weight = getattr(module, "weight", None)
    if weight is None or not args or not torch.is_tensor(args[0]) or args[0].dtype == weight.dtype:
        return None
    return (args[0].to(weight.dtype), *args[1:])
