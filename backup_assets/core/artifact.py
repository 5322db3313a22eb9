"""Artifacts on disk: stream → zstd → SHA-256 → temporary file → fsync → rename.

Nothing that is still being written has an artifact's name, and a manifest is written only after
its artifact is complete, so a crash at any point leaves nothing that looks like a good backup.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import zstandard

from backup_assets.core import failpoints
from backup_assets.core.chunks import ChunkQueue
from backup_assets.core.owner import Owner

CHUNK = 1 << 20
PARTIAL_MARK = ".partial-"
FILE_MODE = 0o600
DIR_MODE = 0o700
# Files a database server writes pages into after we wrote them (a base backup's data files, a restored SQLite
# store) are written in pieces of at most this size. Linux (6.x, ext4 with large folios) keeps a file in the page
# cache in folios as large as the writes that filled it, and the server's later 8 KiB writes into 1 MiB folios
# cost about three times the system time of writes into 64 KiB ones: a point-in-time restore's redo of 27
# segments took 6-7 s instead of 3.5 s after a base backup unpacked in 1 MiB writes (measured 2026-12-07).
PAGE_WRITE = 64 << 10


def write_pieces(fd: int, data: bytes) -> None:
    """All of `data` to the file descriptor `fd`, in writes of at most PAGE_WRITE bytes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:PAGE_WRITE]):]


def ensure_dir(path: Path) -> Path:
    """Create a folder (and parents) readable by its owner only."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        folder.chmod(DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(final: Path) -> Path:
    """Where `final` is written before it is complete: a hidden name that says who writes it
    (host, pid, process start), so a sweep can tell a dead writer's leftover from a live one."""
    return final.with_name(f".{final.name}{PARTIAL_MARK}{Owner.me().token}-{secrets.token_hex(4)}")


def partial_owner(name: str) -> Owner | None:
    """The writer of a partial file, from its name (None: not ours, or an older naming)."""
    if PARTIAL_MARK not in name:
        return None
    token = name.rsplit(PARTIAL_MARK, 1)[1].rsplit("-", 1)[0]
    return Owner.from_token(token)


def create_private(path: Path) -> None:
    """Create an empty file readable by its owner only (before another library writes it)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))


class _HashingSink:
    """A file-like sink that hashes and counts what it writes."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self._fh.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._fh.flush()


class _Tap:
    """Passes the compressed stream on and hands a copy of every piece to `tap.write`."""

    def __init__(self, inner, tap):
        self._inner = inner
        self._tap = tap

    def write(self, data) -> int:
        self._inner.write(data)
        self._tap.write(data)
        return len(data)

    def flush(self) -> None:
        self._inner.flush()


@dataclass
class WrittenArtifact:
    path: Path
    size_bytes: int
    raw_size_bytes: int
    sha256: str


class ArtifactWriter:
    """Compress a byte stream into `final` atomically. Use as a context manager.

    Feed it with `write()` or `copy_from()`, then `commit()`; leaving the block without a
    commit (an exception, a kill) removes the partial file. A `tap` (archive_scan.StreamCheck)
    is handed the zstd stream as it is written (before encryption), told `finish(final)` once
    the artifact is in place, or `abort()` when it never will be.
    """

    def __init__(self, final: Path, *, level: int = 3, threads: int = 0, recipients: list[str] | None = None,
                 tap=None):
        self.final = final
        self.tap = tap
        self.recipients = recipients or None
        self._enc = None
        self.level = level
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self._tmp = partial_path(final)
        self._fh: BinaryIO | None = None
        self._sink: _HashingSink | None = None
        self._zw = None
        self.raw_size = 0
        self.result: WrittenArtifact | None = None

    def __enter__(self) -> "ArtifactWriter":
        ensure_dir(self.final.parent)
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self._fh = os.fdopen(fd, "wb", buffering=CHUNK)
        self._sink = _HashingSink(self._fh)
        inner = self._sink
        if self.recipients:  # dump -> zstd -> age -> SHA-256 -> file
            from backup_assets.core.crypto import EncryptingWriter

            self._enc = inner = EncryptingWriter(self._sink, self.recipients)
        if self.tap is not None:
            inner = _Tap(inner, self.tap)
        cctx = zstandard.ZstdCompressor(level=self.level, threads=self.threads, write_checksum=True)
        self._zw = cctx.stream_writer(inner, closefd=False, write_size=CHUNK)
        return self

    def write(self, data: bytes) -> None:
        self.raw_size += len(data)
        self._zw.write(data)

    def copy_from(self, stream: BinaryIO) -> None:
        read = getattr(stream, "read1", stream.read)
        while True:
            chunk = read(CHUNK)
            if not chunk:
                break
            self.write(chunk)

    def commit(self) -> WrittenArtifact:
        self._zw.flush(zstandard.FLUSH_FRAME)
        self._zw.close()
        if self._enc is not None:
            self._enc.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        failpoints.point("artifact.before_rename")
        os.replace(self._tmp, self.final)
        fsync_dir(self.final.parent)
        failpoints.point("artifact.renamed")
        self.result = WrittenArtifact(self.final, self._sink.size, self.raw_size, self._sink.sha256.hexdigest())
        if self.tap is not None:
            self.tap.finish(self.final)
        return self.result

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.result is None:
            if self.tap is not None:
                self.tap.abort()
            try:
                if self._enc is not None:
                    try:
                        self._enc.close()
                    except Exception:  # the write already failed; the partial file goes below
                        pass
                if self._fh and not self._fh.closed:
                    self._fh.close()
            finally:
                try:
                    os.unlink(self._tmp)
                except FileNotFoundError:
                    pass


def write_json_atomic(path: Path, payload: dict) -> None:
    ensure_dir(path.parent)
    tmp = partial_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class TruncatedArtifact(zstandard.ZstdError):
    pass


class _CheckedReader:
    """The artifact's original bytes, in bounded pieces (zstandard's stream reader). That reader
    ends a truncated stream with a short read and no complaint, so the end is checked against
    the size the manifest recorded."""

    def __init__(self, fh: BinaryIO, expected_size: int | None):
        self._reader = zstandard.ZstdDecompressor().stream_reader(fh, read_size=CHUNK, read_across_frames=True)
        self.expected_size = expected_size
        self.decoded = 0

    def read(self, size: int = CHUNK) -> bytes:
        data = self._reader.read(size if size and size > 0 else CHUNK)
        self.decoded += len(data)
        if not data and self.expected_size is not None and self.decoded != self.expected_size:
            raise TruncatedArtifact(
                f"zstd stream ends before its last frame is complete (truncated): decodes to {self.decoded} bytes, "
                f"the manifest says {self.expected_size}")
        return data


class _ReadAhead:
    """Decodes ahead in a thread while the caller works on what came before: zstd releases the
    GIL, so on two cores decoding and the caller's parsing overlap instead of taking turns. Errors
    of the decoder (a damaged or truncated stream) are raised by `read`, where they would have
    been; a caller that stops early releases the thread on `close`."""

    def __init__(self, reader: _CheckedReader, depth: int = 4):
        import threading

        self._reader = reader
        self._chunks = ChunkQueue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def decoded(self) -> int:
        return self._reader.decoded

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._reader.read(CHUNK)
            except BaseException as exc:  # handed to the reader of this stream
                item = exc
            try:
                self._chunks.put(item, lambda: not self._stop.is_set(), poll_s=0.2)
            except BrokenPipeError:  # the caller closed the stream
                return
            if not isinstance(item, bytes) or not item:
                return

    def read(self, size: int = CHUNK) -> bytes:
        return self._chunks.read(size)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _plain_stream(fh: BinaryIO, path: Path, identities, wrap=None):
    """The zstd stream inside an artifact: the file itself, or decrypted on the fly when it is
    age-encrypted (which needs `identities`). `wrap` sees the file's bytes as they are read."""
    from backup_assets.core.crypto import MAGIC, DecryptingReader

    head = fh.read(len(MAGIC))
    fh.seek(0)
    src = wrap(fh) if wrap else fh
    if head != MAGIC:
        return src, None
    if identities is None:
        from backup_assets.core import BackupError

        raise BackupError(f"{path} is encrypted (age) and no identity was given to open it")
    reader = DecryptingReader(src, identities, what=str(path))
    return reader, reader


@contextmanager
def open_decompressed(path: Path, expected_size: int | None = None, identities=None,
                      sha256=None) -> Iterator[_ReadAhead]:
    """A streaming reader of the artifact's original bytes (decrypted first when it is encrypted);
    give the manifest's raw size to have a truncated stream raise. Given a hashlib object as
    `sha256`, the whole file's bytes are hashed into it in the same pass (once the reader is done
    without an error)."""
    with open(path, "rb") as fh:
        hashed = None

        def wrap(raw):
            nonlocal hashed
            hashed = _HashingReader(raw, sha256)
            return hashed

        stream, decrypting = _plain_stream(fh, path, identities, wrap if sha256 is not None else None)
        ahead = _ReadAhead(_CheckedReader(stream, expected_size))
        try:
            yield ahead
        finally:
            ahead.close()  # the decoding thread is done with the file before anything else reads it
            if decrypting is not None:
                decrypting.close()
        if hashed is not None:
            while hashed.read(CHUNK):  # whatever follows the stream's end counts too
                pass


def decompress_to(artifact: Path, dest: Path, *, expected_size: int | None = None,
                  on_progress: Callable[[int], None] | None = None, identities=None) -> None:
    """Decompress to a file (written in PAGE_WRITE pieces: a restored SQLite store is written into by its
    application); `on_progress(bytes_done)` at most once a second."""
    last = time.monotonic()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with open_decompressed(artifact, expected_size, identities) as reader:
            while chunk := reader.read(CHUNK):
                write_pieces(fd, chunk)
                if on_progress and time.monotonic() - last > 1:
                    on_progress(reader.decoded)
                    last = time.monotonic()
    finally:
        os.close(fd)


class _HashingReader:
    def __init__(self, fh: BinaryIO, sha256=None):
        self._fh = fh
        self.sha256 = sha256 if sha256 is not None else hashlib.sha256()

    def read(self, size: int = CHUNK) -> bytes:
        data = self._fh.read(size)
        self.sha256.update(data)
        return data


def scan_artifact(path: Path, expected_size: int, identities=None, *, encrypted: bool = False) -> tuple[str, str | None, bool]:
    """One pass over the file: its SHA-256, why its stream does not decrypt and decode to the
    expected size (None when it does), and whether it was decoded at all (an encrypted artifact
    without identities is only hashed)."""
    from backup_assets.core import BackupError
    from backup_assets.core.crypto import DecryptingReader

    error = None
    decoded = not encrypted or identities is not None
    with open(path, "rb") as fh:
        hashed = _HashingReader(fh)
        if decoded:
            decrypting = DecryptingReader(hashed, identities, what=str(path)) if encrypted else None
            reader = _CheckedReader(decrypting or hashed, expected_size)
            try:
                while reader.read(CHUNK):
                    pass
            except zstandard.ZstdError as exc:
                error = str(exc) if isinstance(exc, TruncatedArtifact) else \
                    f"zstd stream is corrupt after {reader.decoded} decoded bytes: {exc}"
            except BackupError as exc:
                error = str(exc).removeprefix(f"{path}: ")
            finally:
                if decrypting is not None:
                    decrypting.close()
        while hashed.read(CHUNK):  # the hash covers the whole file, also after a decode error
            pass
    return hashed.sha256.hexdigest(), error, decoded


def human_size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"
