"""llama.cpp as a test client for exported GGUF files: greedy tokens with next-token log-probabilities, tokenizing.

Two bindings, the first installed wins (FASTLOAD_TEST_LLAMA_CPP=xllamacpp|llama-cpp-python picks one):
- xllamacpp: a prebuilt manylinux wheel of llama.cpp (its native server, driven in-process). What
  scripts/setup.sh installs, so CI runs these checks. It reports the log-probabilities of the top tokens at each
  generated step (computed by llama.cpp from its logits, before sampling), not raw logits.
- llama-cpp-python: an sdist that compiles llama.cpp on install (minutes); also fastload's k-quant quantizer.
Both run llama.cpp's own GGUF reader and graph. The tests compare log-probabilities (logits less their
log-sum-exp, so a bound on logits bounds them twice over) with transformers' on the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_THREADS = min(2, os.cpu_count() or 1)
BINDINGS = {"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}  # pip name -> module


def binding() -> str | None:
    """The llama.cpp binding these tests use (pip name), or None when none is installed."""
    asked = os.environ.get("FASTLOAD_TEST_LLAMA_CPP")
    for name, module in BINDINGS.items():
        if asked and name != asked:
            continue
        try:
            __import__(module)
        except ImportError:
            continue
        return name
    return None


@dataclass
class Step:
    """One generated token and llama.cpp's log-probabilities of the most likely tokens at that step."""

    token: int
    logprobs: dict[int, float]


@contextlib.contextmanager
def llama_cpp(gguf_file: Path, lora: Path | None = None, n_ctx: int = 256) -> Iterator[object]:
    """The GGUF loaded in llama.cpp on the CPU (with a LoRA adapter file applied at scale 1 when given)."""
    client = _XLlamaCpp(gguf_file, lora, n_ctx) if binding() == "xllamacpp" else _LlamaCppPython(gguf_file, lora,
                                                                                               n_ctx)
    try:
        yield client
    finally:
        client.close()


class _XLlamaCpp:
    """llama.cpp's server engine in this process (xllamacpp); /tokenize through its loopback HTTP listener."""

    def __init__(self, gguf_file: Path, lora: Path | None, n_ctx: int):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_file)
        params.n_ctx, params.n_parallel, params.warmup, params.verbosity = n_ctx, 1, False, -1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = N_THREADS
        if lora is not None:
            adapter = xllamacpp.CommonAdapterLoraInfo()
            adapter.path, adapter.scale = str(lora), 1.0
            params.lora_adapters = [adapter]
        self.server = xllamacpp.Server(params)

    def greedy(self, token_ids: list[int], n: int, top: int = 20, banned: list[int] = ()) -> list[Step]:
        """Up to n tokens by llama.cpp's greedy sampler after the prompt (stops after an end-of-generation token).

        banned: tokens never chosen (their log-probabilities are still reported). The server reports the
        log-probabilities of a token that is not whole UTF-8 (a byte piece) together with the next one's, so a
        test on a byte-level vocabulary bans those to keep one report per token.
        """
        request = {"prompt": token_ids, "n_predict": n, "temperature": 0.0, "n_probs": top, "cache_prompt": False,
                   "post_sampling_probs": False, "logit_bias": [[t, False] for t in banned]}
        reply = self.server.handle_completions(request)
        assert "choices" in reply, reply
        steps = [Step(c["id"], {t["id"]: t["logprob"] for t in c["top_logprobs"]})
                 for c in reply["choices"][0]["logprobs"]["content"]]
        assert len(steps) == reply["usage"]["completion_tokens"], "a byte-piece token was generated: ban it"
        return steps

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenizer from the file's vocabulary, special tokens parsed, no BOS added."""
        body = json.dumps({"content": text, "add_special": False, "parse_special": True}).encode()
        request = urllib.request.Request(self.server.listening_address.rstrip("/") + "/tokenize", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["tokens"]

    def close(self) -> None:
        del self.server  # its destructor stops the engine's loop


class _LlamaCppPython:
    """llama-cpp-python's Llama: logits of every evaluated token; greedy is their argmax, as its sampler at temp 0."""

    def __init__(self, gguf_file: Path, lora: Path | None, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_file), lora_path=str(lora) if lora else None, logits_all=True,
                         n_ctx=n_ctx, n_threads=N_THREADS, verbose=False, seed=0)

    def greedy(self, token_ids: list[int], n: int, top: int = 20, banned: list[int] = ()) -> list[Step]:
        self.llm.reset()
        self.llm.eval(token_ids)
        steps: list[Step] = []
        while len(steps) < n:
            logits = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)
            logprobs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            best = np.argsort(-logprobs)[:top]
            choice = int(np.argmax(np.where(np.isin(np.arange(len(logits)), banned), -np.inf, logits)))
            steps.append(Step(choice, {int(i): float(logprobs[i]) for i in best}))
            if self.llm.token_eos() == steps[-1].token:
                break
            self.llm.eval([steps[-1].token])
        return steps

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()
