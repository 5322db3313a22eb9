"""Unpacking a base backup: the tar stream pg_basebackup writes (ustar headers, read with `tarfile`'s own header
parser) into a new data directory, durable when it returns.

Written here rather than by `tarfile.extractall` or GNU tar because the restore's time is mostly this step:
`tarfile`'s stream mode copies every member in 10 KB pieces (about 5× slower than GNU tar on a 300 MB data
directory), GNU tar writes 10 KB at a time and sets owner and times per file, and either leaves 300 MB of dirty
pages for the server's start-up sync to flush while nothing else runs. Here each file is read in 1 MiB pieces,
written in 64 KiB ones (`artifact.PAGE_WRITE`: the server's recovery writes pages into these files, and into
page-cache folios as large as 1 MiB writes make them its writes cost three times the system time) and handed,
still open, to two threads that fsync it while the next ones are written, so the flush overlaps the unpacking and
the server's own sync at start finds the files clean.

Only what pg_basebackup writes is accepted: directories and regular files whose names stay inside the target.
A link, a device, an extended header or a name with `..` is refused, naming the member; so is a stream that ends
before its end-of-archive blocks. Permissions come from the archive without set-id and sticky bits."""

from __future__ import annotations

import os
import posixpath
import queue
import tarfile
import threading
from pathlib import Path
from typing import BinaryIO

from backup_assets.core import BackupError
from backup_assets.core.artifact import write_pieces

BLOCK = 512
PIECE = 1 << 20
SYNCERS = 2
OPEN_FILES = 64  # at most this many written files wait for their fsync


class _Exact:
    def __init__(self, reader: BinaryIO, what: str):
        self._reader, self._what = reader, what

    def read(self, n: int) -> bytes:
        out = self._reader.read(n)
        if len(out) == n:
            return out
        parts = [out]
        got = len(out)
        while got < n:
            more = self._reader.read(n - got)
            if not more:
                raise BackupError(f"{self._what} ends in the middle of its tar stream (after a member's "
                                  f"{got} of {n} bytes): incomplete")
            parts.append(more)
            got += len(more)
        return b"".join(parts)


class _Syncer:
    """fsync (then close) of the files handed to it, in threads; the first error is raised by `finish`."""

    def __init__(self, durable: bool):
        self.durable = durable
        self._queue: queue.Queue = queue.Queue(OPEN_FILES)
        self._error: BaseException | None = None
        self._abandoned = False
        self._threads = [threading.Thread(target=self._run, name="unpack-fsync", daemon=True)
                         for _ in range(SYNCERS if durable else 0)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, name = item
            try:
                if self._error is None and not self._abandoned:
                    os.fsync(fd)
            except OSError as exc:
                self._error = self._error or OSError(exc.errno, f"fsync of {name}: {exc.strerror}")
            finally:
                os.close(fd)

    def hand(self, fd: int, name: str) -> None:
        if not self.durable:
            os.close(fd)
            return
        if self._error is not None:
            os.close(fd)
            raise self._error
        self._queue.put((fd, name))

    def finish(self, quiet: bool = False) -> None:
        self._abandoned = quiet  # what failed is removed: its files need no flush
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        if self._error is not None and not quiet:
            raise self._error


def _target(dest: Path, member: tarfile.TarInfo, what: str) -> str:
    name = member.name
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm == ".." or norm.startswith("../") or "\0" in name:
        raise BackupError(f"{what}: member {name!r} would be written outside the data directory; refused")
    return os.path.join(dest, norm)


def unpack_tar(reader: BinaryIO, dest: Path, *, what: str, durable: bool = True) -> int:
    """Unpack the tar stream `reader` into the folder `dest` (which exists); returns the number of files. With
    `durable`, every file and folder written is fsynced before it returns. The stream is read to its end
    (past the end-of-archive blocks), so a reader that checks the stream's size sees all of it."""
    src = _Exact(reader, what)
    syncer = _Syncer(durable)
    folders: list[tuple[str, int]] = []
    files = 0
    try:
        while True:
            header = src.read(BLOCK)
            if header == bytes(BLOCK):
                break  # end of archive (a second zero block and padding follow)
            try:
                member = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise BackupError(f"{what}: not a readable tar stream ({exc})") from None
            path = _target(dest, member, what)
            padding = -member.size % BLOCK
            if member.isdir():
                os.makedirs(path, mode=0o700, exist_ok=True)
                folders.append((path, member.mode & 0o777))
                src.read(member.size + padding)
            elif member.isreg():
                parent = os.path.dirname(path)
                if not os.path.isdir(parent):
                    os.makedirs(parent, mode=0o700, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    os.fchmod(fd, member.mode & 0o777)  # never a set-id or sticky bit from an archive
                    left = member.size
                    while left:
                        piece = src.read(min(left, PIECE))
                        write_pieces(fd, piece)
                        left -= len(piece)
                except BaseException:
                    os.close(fd)
                    raise
                syncer.hand(fd, member.name)
                files += 1
                if padding:
                    src.read(padding)
            else:
                raise BackupError(f"{what}: member {member.name!r} is not a file or a folder (tar type "
                                  f"{member.type!r}); pg_basebackup writes none, refused")
        while reader.read(PIECE):  # the rest of the stream: zero blocks to the record's end
            pass
    except BaseException as exc:
        syncer.finish(quiet=True)  # the open files closed; the first error is the one told
        if isinstance(exc, OSError):
            raise BackupError(f"unpacking {what} into {dest} failed: {exc}") from None
        raise
    try:
        syncer.finish()
    except OSError as exc:
        raise BackupError(f"unpacking {what} into {dest} failed: {exc}") from None
    for path, mode in reversed(folders):  # deepest first: a folder's own mode last, once it is filled
        os.chmod(path, mode)
    if durable:
        for path in [*(p for p, _m in reversed(folders)), str(dest)]:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return files


class TarPicker:
    """The contents of a few named members of a tar stream, picked out as the stream passes by (`feed` it every
    piece in order, then `finish`): how a base backup's backup_label and backup_manifest are read while
    pg_basebackup's stream is compressed and written, without reading the artifact back (which would take the
    private key on a host that only encrypts). `finish` refuses a stream that did not reach its end-of-archive
    block, or lacks a wanted member."""

    def __init__(self, wanted: set[str], *, what: str):
        self.wanted, self.what = wanted, what
        self.found: dict[str, bytes] = {}
        self._header = b""
        self._data_left = self._pad_left = 0
        self._name: str | None = None
        self._parts: list[bytes] = []
        self._ended = False

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._ended:
            if self._data_left:
                piece = view[:self._data_left]
                if self._name is not None:
                    self._parts.append(bytes(piece))
                self._data_left -= len(piece)
                view = view[len(piece):]
                if not self._data_left and self._name is not None:
                    self.found[self._name] = b"".join(self._parts)
                    self._name, self._parts = None, []
            elif self._pad_left:
                piece = view[:self._pad_left]
                self._pad_left -= len(piece)
                view = view[len(piece):]
            else:
                need = BLOCK - len(self._header)
                self._header += bytes(view[:need])
                view = view[need:]
                if len(self._header) == BLOCK:
                    self._next_member(self._header)
                    self._header = b""

    def _next_member(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._ended = True  # what follows is the end-of-archive padding
            return
        try:
            member = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise BackupError(f"{self.what}: not a readable tar stream ({exc})") from None
        name = member.name.removeprefix("./")
        self._name = name if member.isreg() and name in self.wanted else None
        self._data_left, self._pad_left = member.size, -member.size % BLOCK
        if not member.size and self._name is not None:
            self.found[self._name] = b""
            self._name = None

    def finish(self) -> dict[str, bytes]:
        if not self._ended:
            raise BackupError(f"{self.what}: the tar stream ended before its end-of-archive block: incomplete")
        missing = sorted(self.wanted - set(self.found))
        if missing:
            raise BackupError(f"{self.what} holds no {' and no '.join(missing)}: not a base backup")
        return self.found
