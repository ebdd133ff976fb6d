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


class Worker:
    def __init__(self, name: str = "mlx-worker"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def _run(self) -> None:
        while True:
            fut, fn, args, kwargs = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # travels back to the requester, never kills the thread
                fut.set_exception(e)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run. The thread itself is left alive on purpose:
        an MLX thread that exits while the interpreter shuts down can abort the process
        ("terminate called without an active exception"), so it dies with the process."""
        return self.submit(lambda: None).exception(timeout) is None
