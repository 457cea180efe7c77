"""Loading: from a load plan to a model on its device."""
