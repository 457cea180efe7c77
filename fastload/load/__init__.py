"""LoadPlan -> model and tokenizer: quantizing on the fly or reading a pre-quantized checkpoint, on the right device."""
