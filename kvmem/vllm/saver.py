"""Saves in the background, so a vLLM step never waits for kvmem.

The worker copies a save's KV out of the paged buffers during the step (vLLM reuses blocks
afterwards) and hands it here; one thread sends the saves in order (a request's later save
builds on its earlier one). KV waiting here is bounded in bytes: past the bound a save is
dropped and logged, a future cache miss rather than a stall or unbounded memory.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("vllm.kvmem")  # under vLLM's logger: its handler and format, INFO included


@dataclass
class SaveTask:
    """layers: per layer (keys, values) [H, end - start, D] for tokens [start, end) of token_ids."""

    session_id: str
    token_ids: list[int]
    start: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


class BackgroundSaver:
    """One thread that runs ``send(task)`` for each submitted task, in submission order."""

    def __init__(self, send: Callable[[SaveTask], Any], max_pending_bytes: int):
        self._send = send
        self._max_pending = max_pending_bytes
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: "queue.Queue[SaveTask | None]" = queue.Queue()
        self.saved = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="kvmem-saver", daemon=True)
        self._thread.start()

    def submit(self, task: SaveTask) -> bool:
        """Queue a save; False (and logged) when the pending bound would be exceeded."""
        size = task.nbytes
        with self._lock:
            if self._pending and self._pending + size > self._max_pending:
                self.dropped += 1
                log.warning("kvmem: dropped the save of %s (%d tokens): %d bytes already wait to be saved (kvmem_max_pending_save_bytes=%d)",
                            task.session_id, len(task.token_ids), self._pending, self._max_pending)
                return False
            self._pending += size
        self._queue.put(task)
        return True

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                self._send(task)
                self.saved += 1
            except Exception as exc:  # a failed save is a future miss; it must not kill the engine
                self.failed += 1
                log.warning("kvmem: saving %s (%d tokens) failed: %s", task.session_id, len(task.token_ids), exc)
            finally:
                with self._lock:
                    self._pending -= task.nbytes
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted save has been sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending or not self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float) -> None:
        self.wait_idle(timeout)
        self._queue.put(None)
        self._thread.join(timeout=1.0)
