"""The command line's options for the methods beyond SFT: --reward loads a module:function before any loading,
--embedding-lr and --new-token go to continued pretraining, each refused with the wrong method."""

from __future__ import annotations

import argparse

import pytest

from fastload.cli.train import add_arguments, method_options
from fastload.errors import InvalidOption


def parsed(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["data.jsonl", "--model", "m", "--out", "o", *argv])


def test_reward_is_loaded_from_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                            "    return [-len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    options = method_options("grpo", parsed("--reward", "my_rewards:short"))
    (func,) = options["reward_funcs"]
    assert func(prompts=["p", "p"], completions=["ab", "a"]) == [-2, -1]
    with pytest.raises(InvalidOption, match="no callable 'long'"):
        method_options("grpo", parsed("--reward", "my_rewards:long"))
    with pytest.raises(InvalidOption, match="--reward"):
        method_options("grpo", parsed())


def test_pretrain_options_and_misplaced_flags():
    options = method_options("pretrain", parsed("--embedding-lr", "5e-5", "--new-token", "<a>", "--new-token", "<b>"))
    assert options == {"new_tokens": ["<a>", "<b>"], "train_embeddings": True, "embedding_learning_rate": 5e-5}
    with pytest.raises(InvalidOption, match="--method pretrain"):
        method_options("sft", parsed("--embedding-lr", "1e-5"))
    with pytest.raises(InvalidOption, match="--method grpo"):
        method_options("pretrain", parsed("--reward", "x:y"))
