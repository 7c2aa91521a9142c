"""Micro-batching: requests from many client tasks are queued and handled by one worker thread, in batches.

The model and the index scan are much cheaper per item in a batch than one by one, and running them on a single
thread keeps the event loop free (it only awaits futures) and avoids oversubscribing the cores. The worker takes
the first waiting request, then collects more for at most ``max_wait_s`` or until ``max_batch`` are in hand.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class MicroBatcher:
    """Run ``handle(items) -> results`` on batches of submitted items in one worker thread.

    ``handle`` returns one result per item, in order; an exception instance in that list fails only its own
    request. When ``handle`` raises, the batch is retried one item at a time so that one bad item fails alone.
    Nothing a request does can stop the worker.
    """

    def __init__(
        self,
        handle: Callable[[Sequence[Any]], Sequence[Any]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.004,
        setup: Callable[[], None] | None = None,
        name: str = "hihpq-batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._handle, self._setup = handle, setup
        self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_s)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._name = name
        self.batch_sizes: list[int] = []  # the last sizes handled, for /health and tests (bounded)

    def submit(self, item: Any) -> Future:
        """Queue ``item``; the future gets its result (or exception). Starts the worker on first use."""
        fut: Future = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((item, fut))
        return fut

    def close(self, timeout: float | None = 5.0) -> None:
        """Let the worker finish what is queued, then stop it."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)

    def _collect(self, first) -> tuple[list, bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            wait = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    def _run(self) -> None:
        if self._setup is not None:
            self._setup()
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if batch:
                self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list) -> None:
        self.batch_sizes = [*self.batch_sizes[-99:], len(batch)]
        items = [item for item, _ in batch]
        try:
            results = list(self._handle(items))
            if len(results) != len(items):
                raise RuntimeError(f"batch handler returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("a batch of %d failed (%s); retrying its items one by one", len(batch), exc)
            for one in batch:
                self._run_batch([one])
            return
        for (_, fut), res in zip(batch, results, strict=True):
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
