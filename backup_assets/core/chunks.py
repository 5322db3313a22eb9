"""Bytes handed from one thread to another as a stream: below both artifact.py (reading ahead) and crypto.py
(pyrage's reader and writer threads), which share it."""

from __future__ import annotations

from typing import Callable


class ChunkQueue:
    """Chunks handed from one thread to another through a bounded queue and read back as a
    stream: `put` waits while the queue is full for as long as `waiting()` says the other side
    is still there (BrokenPipeError when it is not); `read` serves the chunks' bytes, ends at a
    None or b"" item, and raises an exception item where the stream would have failed; `drain`
    unblocks a writer after the reader failed."""

    def __init__(self, depth: int = 8):
        import queue

        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._buf = b""
        self._pos = 0
        self._done = False

    def put(self, item, waiting: Callable[[], bool], *, poll_s: float = 0.5) -> None:
        import queue

        while True:
            try:
                self._q.put(item, timeout=poll_s)
                return
            except queue.Full:
                if not waiting():
                    raise BrokenPipeError("the other side of the chunk queue stopped") from None

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._buf):
            if self._done:
                return b""
            item = self._q.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._buf, self._pos = item, 0
        end = len(self._buf) if size is None or size < 0 else self._pos + size
        out = self._buf[self._pos:end]
        self._pos += len(out)
        return out

    def drain(self) -> None:
        import queue

        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
