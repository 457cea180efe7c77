"""The benchmark that keeps fastload honest: load time, training tokens/s and peak memory against the plain
transformers + peft + bitsandbytes QLoRA recipe and unsloth, each measurement in a fresh process.

`python -m fastload.bench --help`, `fastload bench ...`, or `fastload.bench.main([...])`; see benchmarks/README.md.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments; returns the exit code (0: all measured, losses agree)."""
    from fastload.bench.driver import main as run

    return run(argv)


__all__ = ["main"]
