"""The rows of an archive being read, counted and fingerprinted in a second process.

Reading an archive is decoding (zstd, in its own thread), cutting the data blocks out of the stream, and an
MD5 of every row (`pgarchive.CopyFingerprint`): the last is most of the CPU, and all of it holds one
interpreter's GIL. `RowHasher` hands each data block's bytes, in the pieces the reader cuts, to a child process
(`python -m backup_assets.core.verify.row_hasher`) that does the counting and hashing, so that reading and
hashing take a core each. The result is the same `CopyFingerprint` per block (the child runs that very class);
a damaged block is refused with the same message, at the end of the pass instead of where it was read.

On one core there is nothing to gain, and for a small archive the child's start costs more than it saves:
`wanted` says when to use it (`beside_a_dump` for a stream read while it is written).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from typing import Callable

from backup_assets.core import BackupError
from backup_assets.core.engines.pgarchive import ArchiveFormatError, CopyFingerprint

# a piece's header: the block's number, the piece's length
HEADER = struct.Struct("<IQ")
# decoded archives below this are hashed in the reading process (the child's start is about 70 ms; at 30 MB of
# pgbench rows the pass took 0.22 s with it, 0.26 s without)
MIN_BYTES = 16 << 20
PIPE_BYTES = 1 << 20


class HasherFailed(BackupError):
    """The second process itself failed (not the archive): the pass proves nothing."""


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def wanted(decoded_bytes: int) -> bool:
    """Worth a second process: a core to spare and an archive big enough."""
    return cores() >= 2 and decoded_bytes >= MIN_BYTES


def beside_a_dump() -> bool:
    """Worth a second process for a stream read while it is written (`StreamCheck`): the database server,
    pg_dump and zstd keep about two cores busy, the reader a third, the hashing wants a fourth."""
    return cores() >= 4


class RowHasher:
    """The reading side: `sink()` is the next data block's sink (what `read_archive`'s `on_data` returns),
    `finish()` the rows and fingerprint of every block, in the order of the `sink()` calls. Raises ArchiveFormatError where a block is damaged (as the
    inline fingerprint would), HasherFailed when the child itself failed."""

    def __init__(self) -> None:
        self._err = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self._err, bufsize=0)
        except OSError:
            self._err.close()
            raise
        try:  # a deeper pipe: the reader does not wait on the child for every piece
            import fcntl

            fcntl.fcntl(self._proc.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
        except OSError:
            pass
        self._fd = self._proc.stdin.fileno()
        self._stopped = False  # the child stopped reading (a damaged block): it says why at the end
        self._blocks = 0

    def sink(self) -> Callable[[bytes], None]:
        """A new block's sink."""
        number = self._blocks
        self._blocks += 1

        def send(data: bytes) -> None:
            if self._stopped or not data:
                return
            try:
                _write_all(self._fd, HEADER.pack(number, len(data)))
                _write_all(self._fd, data)
            except (BrokenPipeError, OSError):
                self._stopped = True
        return send

    def finish(self) -> list[CopyFingerprint]:
        """Every block's CopyFingerprint, in the order of `sink`'s calls."""
        self._close_stdin()
        out = self._proc.stdout.read()
        rc = self._proc.wait()
        self._proc.stdout.close()
        try:
            got = json.loads(out)
        except ValueError:
            self._err.seek(0)
            why = self._err.read().decode(errors="replace").strip().splitlines()
            raise HasherFailed(f"the process fingerprinting the rows ended with exit code {rc}: "
                              f"{why[-1] if why else 'no output'}") from None
        finally:
            self._err.close()
        if got.get("error"):
            raise ArchiveFormatError(got["error"])
        blocks = {int(n): (rows, total) for n, rows, total in got["blocks"]}
        out_ = []
        for n in range(self._blocks):
            fp = CopyFingerprint()
            fp.rows, fp.total = blocks.get(n, (0, 0))
            out_.append(fp)
        return out_

    def close(self) -> None:
        """Stop the child (a pass that ended early)."""
        if self._proc.returncode is None:
            self._proc.kill()
            self._close_stdin()
            self._proc.wait()
            self._proc.stdout.close()
        if not self._err.closed:
            self._err.close()

    def _close_stdin(self) -> None:
        if self._proc.stdin is not None:
            stdin, self._proc.stdin = self._proc.stdin, None
            try:
                stdin.close()
            except (BrokenPipeError, OSError):
                pass


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def main() -> int:
    """The child: pieces on stdin, one JSON line on stdout ({"blocks": [[n, rows, total], ...]} or {"error": ...})."""
    stdin = sys.stdin.buffer
    fps: dict[int, CopyFingerprint] = {}
    error = None
    try:
        while header := stdin.read(HEADER.size):
            number, length = HEADER.unpack(header) if len(header) == HEADER.size else (None, 0)
            if number is None:
                raise EOFError
            fp = fps.get(number)
            if fp is None:
                fp = fps[number] = CopyFingerprint()
            fp.account(_read_exact(stdin, length))
        for fp in fps.values():
            fp.finish()
    except ArchiveFormatError as exc:
        error = str(exc)
    except EOFError:
        error = "the pieces of the archive's rows ended early"
    if error is not None:
        print(json.dumps({"error": error}))
        return 0
    print(json.dumps({"blocks": [[n, fp.rows, fp.total] for n, fp in fps.items()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
