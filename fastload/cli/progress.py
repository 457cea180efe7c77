"""The training progress bar of `fastload train`: one tqdm bar of steps with ETA, loss, tokens/s and peak memory."""

from __future__ import annotations

import sys
import time

from fastload.cli.output import GIB


def peak_memory() -> str:
    """Peak memory of this run: the GPU's allocations on CUDA, the process's resident set on the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / GIB:.1f}G gpu"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.1f}G rss"  # Linux: KiB
    except ImportError:  # Windows
        return "?"


def progress_callback(quiet: bool):
    """A transformers TrainerCallback drawing the bar on stderr (none with --quiet)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.loss = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            disable=quiet, file=sys.stderr, dynamic_ncols=True)
            self.started, self.tokens_at_start = time.perf_counter(), state.num_input_tokens_seen or 0
            self.first_step = state.global_step  # > 0 when resumed from a checkpoint

        def on_log(self, args, state, control, logs=None, **kwargs):
            # transformers logs after on_step_end: show the new loss now, not one step late
            if logs and "loss" in logs:
                self.loss = logs["loss"]
                self._show(state)

        def on_step_end(self, args, state, control, **kwargs):
            self._show(state)

        def _show(self, state):
            if self.bar is None:
                return
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            tokens = (state.num_input_tokens_seen or 0) - self.tokens_at_start
            postfix = {"tok/s": f"{tokens / elapsed:.0f}", "mem": peak_memory()}
            if self.loss is not None:
                postfix = {"loss": f"{self.loss:.4f}", **postfix}
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Progress()
