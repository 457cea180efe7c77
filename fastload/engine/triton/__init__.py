"""Every Triton kernel of the engine, apart from the wiring that installs them on a model instance."""
