"""One pass over a PostgreSQL artifact: decode, read the archive by structure, fingerprint every
table's rows, and (when asked) write the plain archive for `pg_restore --jobs` at the same time.

What a check, a drill or a restore needs to know about an archive comes from here, never from
`pg_restore --list` text: which TOC entries hold which table (by schema and name, exactly), the
rows and content fingerprint of each table of the manifest (a partitioned table's rows are those
of its leaf partitions); which entries a group restore needs is toc_selection's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard

from backup_assets.core import BackupError
from backup_assets.core.artifact import CHUNK, open_decompressed
from backup_assets.core.engines.pgarchive import (Archive, ArchiveFormatError, ArchiveHeader, CopyFingerprint, LargeObjectFingerprint,
                               TocEntry, combine, read_archive)
from backup_assets.core.manifest import Manifest
from backup_assets.core.names import TableName
from backup_assets.core.verify import row_hasher


@dataclass
class TableContent:
    rows: int
    fingerprint: str

    def to_json(self) -> dict:
        return {"rows": self.rows, "fingerprint": self.fingerprint}


@dataclass
class ArchiveScan:
    archive: Archive
    # manifest table key -> rows and fingerprint in the archive
    tables: dict[str, TableContent] = field(default_factory=dict)
    decoded_bytes: int = 0
    seconds: float = 0.0
    # (count, bytes, fingerprint) of the archive's large objects
    large_objects: tuple[int, int, str] = (0, 0, "0000000000000000")

    def fingerprints(self) -> dict[str, dict]:
        return {k: v.to_json() for k, v in sorted(self.tables.items())}


class _Tee:
    """A readable stream over the decoded artifact that also copies what it reads to a file
    and/or a process's stdin (the latter may stop reading early: pg_restore --list does), and
    keeps what it read until `head_done` is set (the archive's header and TOC)."""

    def __init__(self, reader, out: BinaryIO | None, pipe: BinaryIO | None,
                 on_progress: Callable[[int], None] | None, *, keep_head: bool = False):
        self._reader = reader
        self._out = out
        self._pipe = pipe
        self._on_progress = on_progress
        self._last = time.monotonic()
        self.decoded = 0
        self.head = bytearray() if keep_head else None
        self.head_done = False

    def read(self, size: int = CHUNK) -> bytes:
        data = self._reader.read(max(size, CHUNK))
        if data:
            self.decoded += len(data)
            if self.head is not None and not self.head_done:
                self.head += data
            if self._out is not None:
                self._out.write(data)
            if self._pipe is not None:
                try:
                    self._pipe.write(data)
                except (BrokenPipeError, OSError):
                    self._pipe = None
            if self._on_progress and time.monotonic() - self._last > 1:
                self._on_progress(self.decoded)
                self._last = time.monotonic()
        return data


class _Blocks:
    """The data blocks of an archive being read: a row count and fingerprint per TOC entry, computed here or,
    given a `RowHasher`, in its process."""

    def __init__(self, hasher: row_hasher.RowHasher | None = None) -> None:
        self.per_entry: dict[tuple[str, str], CopyFingerprint] = {}
        self.large_objects = LargeObjectFingerprint()
        self._hasher = hasher
        self._keys: list[tuple[str, str]] = []

    def on_data(self, entry: TocEntry):
        key = (entry.namespace or "", entry.tag)
        if self._hasher is not None:
            self._keys.append(key)
            return self._hasher.sink()
        fp = CopyFingerprint()
        self.per_entry[key] = fp
        return fp.account

    def finish(self) -> None:
        if self._hasher is not None:
            for key, fp in zip(self._keys, self._hasher.finish()):
                self.per_entry[key] = fp
            return
        for fp in self.per_entry.values():
            fp.finish()

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.close()

    def as_blocks(self) -> dict[tuple[str, str], tuple[int, str]]:
        """(rows, fingerprint) per data block, and the large objects under LARGE_OBJECTS as
        (count, "<bytes>:<fingerprint>")."""
        lo = self.large_objects
        return {**{k: (fp.rows, fp.hex) for k, fp in self.per_entry.items()},
                LARGE_OBJECTS: (lo.count, f"{lo.bytes}:{lo.hex}")}

    def scan(self, archive: Archive, manifest: Manifest, decoded: int, seconds: float) -> ArchiveScan:
        return _tables(archive, self.as_blocks(), manifest, decoded, seconds)


# the key of the large objects among the data blocks (no table has an empty schema name)
LARGE_OBJECTS = ("", "\x00large objects")


def _tables(archive: Archive, blocks: dict[tuple[str, str], tuple[int, str]], manifest: Manifest, decoded: int,
            seconds: float) -> ArchiveScan:
    """What the manifest's tables hold in the archive (a partitioned table: its partitions), from
    the rows and fingerprint of each data block (by schema and name)."""
    result = ArchiveScan(archive, decoded_bytes=decoded, seconds=round(seconds, 3))
    if LARGE_OBJECTS in blocks:
        count, text = blocks[LARGE_OBJECTS]
        size, _, fp = text.partition(":")
        result.large_objects = (count, int(size), fp)
    for key in manifest.row_counts:
        table = TableName.parse(key)
        parts = manifest.partitions.get(key)
        members = [TableName.parse(p) for p in parts] if parts is not None else [table]
        found = [blocks.get((m.schema, m.name)) for m in members]
        if all(f is not None for f in found):
            result.tables[key] = TableContent(sum(f[0] for f in found), combine([f[1] for f in found]))
    return result


def stream_error(exc: BaseException, copy_to: Path | None = None) -> str:
    """The one line a failed read of an artifact's stream says, the same whether `scan` read the file or a
    StreamCheck read the stream as it was written."""
    if isinstance(exc, zstandard.ZstdError):
        return f"the zstd stream cannot be decoded: {exc}"
    if isinstance(exc, OSError):
        return f"writing the decoded copy to {copy_to} failed: {exc.strerror or exc}"
    return str(exc)  # ArchiveFormatError: what in the archive is wrong, and where


def _new_blocks(apart: bool) -> _Blocks:
    """The rows hashed in a second process when that pays (see row_hasher), else here."""
    if apart:
        try:
            return _Blocks(row_hasher.RowHasher())
        except OSError:
            pass
    return _Blocks()


def scan(artifact: Path, manifest: Manifest, *, copy_to: Path | None = None, pipe: BinaryIO | None = None,
         on_progress: Callable[[int], None] | None = None, identities=None, sha256=None) -> ArchiveScan:
    """Read the whole artifact once. Raises BackupError naming the artifact when it does not
    decode, is not a readable archive, or ends early. Given a hashlib object as `sha256`, the
    artifact's bytes are hashed into it in the same pass."""
    started = time.monotonic()
    out = os.fdopen(os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") if copy_to is not None else None
    blocks = _new_blocks(row_hasher.wanted(manifest.raw_size_bytes or 0))
    try:
        with open_decompressed(artifact, manifest.raw_size_bytes, identities, sha256) as reader:
            tee = _Tee(reader, out, pipe, on_progress)
            archive = read_archive(tee, blocks.on_data, blobs=blocks.large_objects)
            while tee.read(CHUNK):  # anything after the last block still has to decode (and is counted)
                pass
        blocks.finish()
    except (zstandard.ZstdError, ArchiveFormatError) as exc:
        raise BackupError(f"{artifact}: {stream_error(exc)}") from None
    except row_hasher.HasherFailed as exc:
        raise BackupError(f"{artifact}: {exc}") from None
    finally:
        blocks.close()
        if out is not None:
            out.close()
    return blocks.scan(archive, manifest, tee.decoded, time.monotonic() - started)


class StreamCheck:
    """The checks of a backup, read from its zstd stream while it is being written.

    `ArtifactWriter(tap=...)` hands it every compressed byte it writes to the file (before the
    file's own SHA-256, and before age encrypts it: the archive is read on a backup host that has
    no private key). A child process (`python -m backup_assets.core.verify.archive_scan`, so that
    its work never holds this process's GIL while the dump is being copied) decodes them (zstd
    verifies its frame checksum); of a PostgreSQL dump it reads the archive by structure,
    fingerprints every table's rows, keeps the header and TOC for `pg_restore --list`, and for a
    drill writes the plain archive; a `plain` stream (a SQLite copy, the roles' JSON) it decodes
    into a scratch file for the checks to read.
    Afterwards the artifact on disk only has to be hashed to prove it holds exactly the bytes
    that were read: the dump is not read a second time. Nothing here decides whether the backup
    is kept; that is the checks' business (`verify.evaluate(..., stream=...)`).
    """

    def __init__(self, folder: Path, *, copy: bool = False, encrypted: bool = False, plain: bool = False,
                 cleanup: Callable[[], None] | None = None):
        self.folder = folder
        # plain: not an archive (a SQLite file, the roles' JSON): only decoded, always into the copy
        self.plain = plain
        self.copy_to = folder / ("artifact.plain" if plain else "archive.dump") if copy or plain else None
        # the zstd stream as it went into age: what the ciphertext must decrypt to
        self.inner_sha256 = hashlib.sha256() if encrypted else None
        self._cleanup = cleanup
        self._proc: subprocess.Popen | None = None  # started by the first write
        self._err = None
        self._finished = False
        self.error: str | None = None
        self.archive: Archive | None = None
        self.artifact: Path | None = None  # set by the writer on commit
        self.decoded_bytes = 0
        self.head = b""
        self.seconds = 0.0
        self._started = 0.0
        self._blocks: dict[tuple[str, str], tuple[int, str]] = {}

    # -- the writer's side
    def write(self, data) -> None:
        if self._proc is None and self.error is None:
            try:
                self._start()
            except OSError as exc:  # never the backup's problem: its checks read the artifact afterwards
                self.error = f"the stream reader could not start: {exc.strerror or exc}"
        if self.inner_sha256 is not None:
            self.inner_sha256.update(data)
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.write(data)
            except (BrokenPipeError, OSError):  # the reader stopped (it says why at the end)
                self._close_stdin()

    def _start(self) -> None:
        self._started = time.monotonic()
        self._err = tempfile.TemporaryFile(dir=self.folder)
        mode = "plain" if self.plain else "archive-rows-apart" if row_hasher.beside_a_dump() else "archive"
        args = [sys.executable, "-m", __name__, mode, str(self.folder / "head")]
        if self.copy_to is not None:
            args.append(str(self.copy_to))
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                      bufsize=CHUNK)
        try:  # a deeper pipe: the dump and the reader do not wait on each other for every megabyte
            import fcntl

            fcntl.fcntl(self._proc.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 8 * CHUNK)
        except OSError:
            pass

    def _close_stdin(self) -> None:
        stdin, self._proc.stdin = self._proc.stdin, None
        try:
            stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def finish(self, artifact: Path) -> None:
        """The stream is complete (the writer committed `artifact`): collect what was read. Never
        raises: the artifact is in place by now, and a reader's trouble is not the backup's."""
        self.artifact = artifact
        try:
            self._end()
        except Exception as exc:  # noqa: BLE001 (reported through `error`, read by the checks)
            self.archive, self.error = None, f"the stream reader failed: {exc}"

    def abort(self) -> None:
        """The writer gave up: stop reading and remove the plain copy."""
        if self._proc is not None and not self._finished:
            self._proc.kill()
        self._end()
        self.discard()

    def _end(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._close_stdin()
        out = self._proc.stdout.read()
        rc = self._proc.wait()
        self.seconds = time.monotonic() - self._started
        try:
            got = json.loads(out)
        except ValueError:
            self._err.seek(0)
            why = self._err.read().decode(errors="replace").strip().splitlines()
            self.error = f"the stream reader ended with exit code {rc}: {why[-1] if why else 'no output'}"
            return
        finally:
            self._err.close()
        try:  # whatever goes wrong here is the checks' to report (they read the artifact), never the backup's
            self.error = got.get("error")
            self.decoded_bytes = got.get("decoded", 0)
            if self.error is None and not self.plain:
                self.archive = archive_from_json(got["archive"])
                self._blocks = {(ns, tag): (rows, fp) for ns, tag, rows, fp in got["blocks"]}
                self.head = (self.folder / "head").read_bytes()
        except (OSError, KeyError, TypeError, ValueError) as exc:
            self.archive, self.error = None, f"the stream reader's result cannot be read: {exc}"

    # -- afterwards
    def decoded(self, manifest: Manifest) -> bool:
        """The stream was read to its end and decoded to the size the manifest records."""
        if self.error is not None or self._proc is None or self.artifact is None:
            return False
        if self.decoded_bytes != manifest.raw_size_bytes:
            self.error = (f"the zstd stream decodes to {self.decoded_bytes} bytes, the manifest says "
                          f"{manifest.raw_size_bytes}")
            return False
        return True

    def result(self, manifest: Manifest) -> ArchiveScan | None:
        """The scan of the archive for `manifest` (None when it could not be read: see `error`)."""
        if self.plain or not self.decoded(manifest) or self.archive is None:
            return None
        return _tables(self.archive, self._blocks, manifest, self.decoded_bytes, self.seconds)

    def discard(self) -> None:
        if self.copy_to is not None:
            self.copy_to.unlink(missing_ok=True)

    def close(self) -> None:
        """Done with it: the reading ended, the plain copy and the scratch folder removed."""
        if not self._finished:
            self.abort()
        self.discard()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


def archive_to_json(archive: Archive) -> dict:
    return {"header": dataclasses.asdict(archive.header),
            "entries": [dataclasses.asdict(e) for e in archive.entries]}


def archive_from_json(data: dict) -> Archive:
    h = data["header"]
    header = ArchiveHeader(**{**h, "version": tuple(h["version"])})
    return Archive(header, [TocEntry(**{**e, "deps": tuple(e["deps"])}) for e in data["entries"]])


def _decode_stream(copy_to: Path) -> dict:
    """The child's side of a plain StreamCheck: the zstd stream on stdin decoded into `copy_to`."""
    source = sys.stdin.buffer
    decoded = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK, read_across_frames=True)
        with os.fdopen(os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            while chunk := reader.read(CHUNK):
                decoded += len(chunk)
                out.write(chunk)
    except (zstandard.ZstdError, OSError) as exc:
        return {"error": stream_error(exc, copy_to), "decoded": decoded}
    finally:
        while source.read(CHUNK):
            pass
    return {"decoded": decoded}


def _read_stream(head_to: Path, copy_to: Path | None, *, rows_apart: bool = False) -> dict:
    """The child's side of StreamCheck: the zstd stream on stdin, read as `scan` reads a file."""
    source = sys.stdin.buffer
    out = os.fdopen(os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") if copy_to else None
    blocks = _new_blocks(rows_apart)
    tee = None
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK, read_across_frames=True)
        tee = _Tee(reader, out, None, None, keep_head=True)

        def toc_read(_archive) -> None:
            tee.head_done = True

        archive = read_archive(tee, blocks.on_data, on_toc=toc_read, blobs=blocks.large_objects)
        while tee.read(CHUNK):
            pass
        blocks.finish()
    except (zstandard.ZstdError, ArchiveFormatError, OSError) as exc:
        return {"error": stream_error(exc, copy_to), "decoded": tee.decoded if tee else 0}
    except row_hasher.HasherFailed as exc:
        return {"error": str(exc), "decoded": tee.decoded if tee else 0}
    finally:
        blocks.close()
        if out is not None:
            out.close()
        while source.read(CHUNK):  # the writer never waits on a reader that stopped
            pass
    fd = os.open(head_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(tee.head)
    return {"decoded": tee.decoded, "archive": archive_to_json(archive),
            "blocks": [[ns, tag, rows, fp] for (ns, tag), (rows, fp) in blocks.as_blocks().items()]}


def archive_problems(scan_: ArchiveScan, manifest: Manifest) -> list[str]:
    """What the manifest says the archive holds and it does not: a table's definition, its data
    block (a partitioned table's are its partitions'), or the snapshot's row count."""
    problems = []
    tables = scan_.archive.tables()
    data = scan_.archive.table_data()
    for key in sorted(set(manifest.tables) | set(manifest.row_counts)):
        expected = manifest.row_counts.get(key)
        table = TableName.parse(key)
        if (table.schema, table.name) not in tables:
            problems.append(f"archive lacks table {key}")
            continue
        parts = manifest.partitions.get(key)
        members = [TableName.parse(p) for p in parts] if parts is not None else [table]
        no_data = [str(m) for m in members if (m.schema, m.name) not in data]
        if no_data:
            problems.append(f"archive lacks the data of {key}" + (f" (partition(s) {', '.join(no_data)})"
                                                                   if parts is not None else ""))
            continue
        got = scan_.tables.get(key)
        if got is not None and expected is not None and got.rows != expected:
            problems.append(f"archive holds {got.rows} rows of {key}, the manifest says {expected}")
    return problems


if __name__ == "__main__":  # StreamCheck's reader: archive|archive-rows-apart|plain head-file [copy]
    if sys.argv[1] == "plain":
        _result = _decode_stream(Path(sys.argv[3]))
    else:
        _result = _read_stream(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None,
                               rows_apart=sys.argv[1] == "archive-rows-apart")
    sys.stdout.write(json.dumps(_result))
