"""A process-wide setting that loads on several threads change together: made by the first one in, put back by the
last one out (also on errors). Used for huggingface_hub's offline switch, transformers' read-in-turn switch and the
interpreter's switch interval."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any


class SharedSetting:
    """`apply()` makes the change and returns what `restore(token)` needs to undo it."""

    def __init__(self, apply: Callable[[], Any], restore: Callable[[Any], None]):
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._users = 0
        self._token = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._token = self._apply()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    token, self._token = self._token, None
                    self._restore(token)
