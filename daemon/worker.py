"""The one thread that owns all MLX work.

MLX arrays and the model are not shared across threads: every model call and cache
mutation runs here, one job at a time, and its result or exception travels back as a
concurrent Future the asyncio side can await.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger("agentd.worker")

_STOP = object()


class Worker:
    def __init__(self, name: str = "mlx-worker"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.pending = 0

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        self.pending += 1
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                self.pending -= 1
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # travels back to the requester, never kills the thread
                fut.set_exception(e)
            finally:
                self.pending -= 1

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued jobs, then end the thread."""
        self._jobs.put(_STOP)
        self._thread.join(timeout)
