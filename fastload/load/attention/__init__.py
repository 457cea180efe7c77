"""Attention implementations fastload can register with transformers' attention interface."""
