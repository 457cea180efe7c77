"""Trained -> saved: the adapter alone, or merged into a 16-bit or re-quantized checkpoint."""
