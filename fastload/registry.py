"""Public path of the registry (`fastload.registry`); it lives in `fastload.sources.registry`."""

from fastload.sources.registry import *  # noqa: F401,F403
from fastload.sources.registry import REPO_ID, Match, Registry, RegistryEntry, get_registry, register  # noqa: F401
