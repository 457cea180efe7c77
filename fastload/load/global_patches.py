"""One lock for the work that patches process-wide state while it builds modules.

Building a model's skeleton (accelerate's init_empty_weights, transformers' no_init_weights, the default dtype),
peft's injection (its own init_empty_weights) and transformers' from_pretrained all swap process-wide functions for
as long as they run: nn.Module.register_parameter, torch.nn.init's initialisers, torch's default dtype. Two loads on
two threads would see each other's swaps (a weight registered on the meta device, an adapter left uninitialised) and
could restore them in the wrong order, leaving torch.nn.init a no-op for the rest of the process. Each such section
holds this lock, as does every parameter a load registers meanwhile; one load's sections nest (re-entrant).
"""

from __future__ import annotations

import threading

PATCHING_GLOBALS = threading.RLock()
