"""Model -> trained: LoRA adapters, gradient checkpointing, the 8-bit optimizer, trainers and generation."""
