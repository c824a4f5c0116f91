"""Dynamic batching: requests that arrive together run as one batch on one worker thread.

The worker takes the first waiting request, waits a few milliseconds for others (up to the batch size),
and runs them all in one `Engine.generate`. The waiting queue has a hard limit: a request that finds it
full is refused at once (the server answers 503) rather than queued without bound. Every request ends
with exactly one `on_finish` or `on_error` call, whatever happens to its batch; an exception in a batch
fails that batch's requests and the worker goes on with the next one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from deltatune.serve.engine import Engine, GenRequest


class QueueFull(Exception):
    """The waiting queue cannot take these requests."""


class UnknownAdapter(Exception):
    """The adapter a queued request names was unloaded before its batch ran."""


class Batcher:
    def __init__(
        self,
        engine: Engine,
        lock: threading.Lock,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        wait_s: float = 0.005,
    ) -> None:
        self.engine, self.lock = engine, lock
        self.max_batch_size, self.max_queue, self.wait_s = max_batch_size, max_queue, wait_s
        self._queue: queue.Queue[GenRequest] = queue.Queue()
        self._admit = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deltatune-batcher", daemon=True)
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, requests: list[GenRequest]) -> None:
        """Queue all of `requests` or none of them (QueueFull)."""
        with self._admit:
            if self._queue.qsize() + len(requests) > self.max_queue:
                raise QueueFull(f"the server is busy: {self._queue.qsize()} requests wait (limit {self.max_queue})")
            for r in requests:
                self._queue.put(r)

    def _take(self) -> list[GenRequest]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            with self.lock:
                runnable = []
                for r in batch:
                    if r.cancelled:
                        _fail(r, UnknownAdapter("cancelled"))
                    elif r.adapter is not None and r.adapter not in self.engine.adapters.adapters:
                        _fail(r, UnknownAdapter(r.adapter))
                    else:
                        try:
                            self.engine.check(r)  # a request that cannot run fails alone, not its whole batch
                        except ValueError as exc:
                            _fail(r, exc)
                        else:
                            runnable.append(r)
                if runnable:
                    self._run(runnable)
            self.batches += 1

    def _run(self, batch: list[GenRequest]) -> None:
        finished: set[int] = set()
        wrapped = []
        for r in batch:
            inner, inner_error = r.on_finish, r.on_error

            def done(result, r=r, inner=inner) -> None:
                finished.add(id(r))
                if inner is not None:
                    inner(result)

            def failed(exc, r=r, inner_error=inner_error) -> None:  # a row the engine failed alone
                finished.add(id(r))
                _report(inner_error, exc)

            r.on_finish, r.on_error = done, failed
            wrapped.append(r)
        try:
            self.engine.generate(wrapped)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the server
            for r in wrapped:
                if id(r) not in finished:
                    _fail(r, exc)


def _fail(request: GenRequest, exc: Exception) -> None:
    _report(request.on_error, exc)


def _report(on_error: Callable[[Exception], None] | None, exc: Exception) -> None:
    if on_error is not None:
        try:
            on_error(exc)
        except Exception:  # noqa: BLE001 - a dead client must not stop the worker
            pass
