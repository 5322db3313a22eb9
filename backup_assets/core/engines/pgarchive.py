"""Reading pg_dump's custom-format archive by structure, as a stream.

`pg_restore --list` prints names unquoted and space-separated, so a table called "Order Items" or
"dotted.name" cannot be told apart from its neighbours there. The archive itself is exact: a
header, then one record per TOC entry (dump id, type, schema, name, owner, dependencies, ...),
then the data blocks. This module reads that layout (src/bin/pg_dump/pg_backup_archiver.c,
ReadHead/ReadToc, and pg_backup_custom.c for the blocks) from any readable stream, in one pass:
the TOC, and for every data block its raw COPY text, handed to a callback in pieces.

We write our dumps with `--compress=0` (compression is ours, zstd), so data blocks are plain
length-prefixed chunks of COPY text. A compressed archive is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from backup_assets.core import BackupError

MAGIC = b"PGDMP"
SECTION_NAMES = {1: "none", 2: "pre-data", 3: "data", 4: "post-data"}
BLK_DATA, BLK_BLOBS = 1, 3
# archive format versions we read: pg_dump 12 writes 1.14, 16 and 17 write 1.15, 18 writes 1.16
MIN_VERSION = (1, 12, 0)


class ArchiveFormatError(BackupError):
    """The stream is not a readable custom-format archive (or is damaged)."""


@dataclass(frozen=True)
class TocEntry:
    dump_id: int
    had_dumper: bool
    desc: str  # "TABLE", "TABLE DATA", "SEQUENCE", "INDEX", ...
    namespace: str | None
    tag: str
    owner: str | None
    section: str
    deps: tuple[int, ...]
    relkind: str | None = None
    # the SQL of the entries about the database itself (kept for those only: see DATABASE_LEVEL)
    defn: str | None = None

    @property
    def database_level(self) -> bool:
        return is_database_level(self.desc, self.tag)


# entries about the database itself, which pg_restore applies only with --create: its owner and
# properties (settings, connection limit), its comment, security labels and privileges
DATABASE_LEVEL = {"DATABASE", "DATABASE PROPERTIES"}


def is_database_level(desc: str, tag: str) -> bool:
    return desc in DATABASE_LEVEL or (desc in ("COMMENT", "ACL", "SECURITY LABEL") and tag.startswith("DATABASE "))



@dataclass
class ArchiveHeader:
    version: tuple[int, int, int]
    int_size: int
    off_size: int
    compression: int
    dbname: str | None
    server_version: str | None
    dump_version: str | None


@dataclass
class Archive:
    header: ArchiveHeader
    entries: list[TocEntry]
    by_id: dict[int, TocEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {e.dump_id: e for e in self.entries}

    def tables(self) -> dict[tuple[str, str], TocEntry]:
        return {(e.namespace or "", e.tag): e for e in self.entries if e.desc == "TABLE"}

    def table_data(self) -> dict[tuple[str, str], TocEntry]:
        return {(e.namespace or "", e.tag): e for e in self.entries if e.desc == "TABLE DATA"}



class _Reader:
    """Exact-size reads from a stream, with the archive's integer and string encodings."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self.offset = 0
        self.int_size = 4
        self.off_size = 8

    def read(self, n: int) -> bytes:
        end = self._pos + n
        if end <= len(self._buf):  # the common case: a small read inside the buffer, no copy of the rest
            data = self._buf[self._pos:end]
            self._pos = end
            self.offset += n
            return data
        parts = [self._buf[self._pos:]]
        have = len(parts[0])
        while have < n:
            chunk = self._stream.read(max(n - have, 1 << 20))
            if not chunk:
                raise ArchiveFormatError(f"archive ends early (at byte {self.offset + have}, {n - have} byte(s) short)")
            parts.append(chunk)
            have += len(chunk)
        joined = b"".join(parts)
        self._buf, self._pos = joined, n
        self.offset += n
        return joined[:n]

    def at_end(self) -> bool:
        if self._pos < len(self._buf):
            return False
        chunk = self._stream.read(1 << 20)
        if not chunk:
            return True
        self._buf, self._pos = chunk, 0
        return False

    def byte(self) -> int:
        return self.read(1)[0]

    def int_(self) -> int:
        raw = self.read(1 + self.int_size)
        value = int.from_bytes(raw[1:], "little")
        return -value if raw[0] else value

    def str_(self) -> str | None:
        length = self.int_()
        if length < 0:
            return None
        if length > 1 << 30:
            raise ArchiveFormatError(f"string of {length} bytes at byte {self.offset}: the TOC is damaged")
        return self.read(length).decode("utf-8", errors="surrogateescape")

    def offset_(self) -> tuple[int, int]:
        flag = self.byte()
        raw = self.read(self.off_size)
        return flag, int.from_bytes(raw, "little")


def _read_header(r: _Reader) -> ArchiveHeader:
    if r.read(5) != MAGIC:
        raise ArchiveFormatError("not a pg_dump custom-format archive (no PGDMP header)")
    version = (r.byte(), r.byte(), r.byte())
    if version < MIN_VERSION:
        raise ArchiveFormatError(f"archive format {'.'.join(map(str, version))} is older than this reader supports")
    r.int_size = r.byte()
    r.off_size = r.byte()
    if not (1 <= r.int_size <= 8 and 1 <= r.off_size <= 16):
        raise ArchiveFormatError("archive header is damaged (integer sizes)")
    fmt = r.byte()
    if fmt != 1:
        raise ArchiveFormatError(f"archive format {fmt} is not the custom format (1)")
    if version >= (1, 15, 0):
        compression = r.byte()
    else:
        compression = r.int_()
    for _ in range(7):  # creation time: sec, min, hour, mday, mon, year, isdst
        r.int_()
    dbname = r.str_()
    server_version = r.str_()
    dump_version = r.str_()
    return ArchiveHeader(version, r.int_size, r.off_size, compression, dbname, server_version, dump_version)


def _read_toc(r: _Reader, header: ArchiveHeader) -> list[TocEntry]:
    count = r.int_()
    if count < 0 or count > 10_000_000:
        raise ArchiveFormatError(f"TOC claims {count} entries: the archive is damaged")
    entries = []
    for _ in range(count):
        dump_id = r.int_()
        if dump_id <= 0:
            raise ArchiveFormatError(f"TOC entry id {dump_id} out of range: the archive is damaged")
        had_dumper = bool(r.int_())
        r.str_()  # table oid
        r.str_()  # oid
        tag = r.str_() or ""
        desc = r.str_() or ""
        section = SECTION_NAMES.get(r.int_(), "none")
        defn = r.str_()
        if not is_database_level(desc, tag):
            defn = None
        r.str_()  # drop statement
        r.str_()  # COPY statement
        namespace = r.str_()
        r.str_()  # tablespace
        r.str_()  # table access method
        relkind = None
        if header.version >= (1, 16, 0):
            kind = r.int_()
            relkind = chr(kind) if kind else None
        owner = r.str_()
        r.str_()  # "with oids" (always false now)
        deps = []
        while (dep := r.str_()) is not None:
            deps.append(int(dep))
        r.offset_()  # data position: not set when pg_dump wrote to a pipe
        entries.append(TocEntry(dump_id, had_dumper, desc, namespace or None, tag, owner or None, section,
                                tuple(deps), relkind, defn))
    return entries


DataSink = Callable[[TocEntry], Callable[[bytes], object] | None]


def read_archive(stream: BinaryIO, on_data: DataSink | None = None,
                 on_end: Callable[[TocEntry], None] | None = None,
                 on_toc: Callable[[Archive], None] | None = None,
                 blobs: "LargeObjectFingerprint | None" = None) -> Archive:
    """Read header, TOC and every data block. `on_toc(archive)` is called once the TOC is read;
    for each data block, `on_data(entry)` may return a function that receives the block's bytes
    in pieces (None: skip them, still read); `on_end(entry)` is called when a block is complete."""
    r = _Reader(stream)
    header = _read_header(r)
    if header.compression not in (0, -1):
        raise ArchiveFormatError("archive data is compressed inside the archive (pg_dump -Z); "
                                 "backup_assets writes --compress=0 archives")
    entries = _read_toc(r, header)
    archive = Archive(header, entries)
    if on_toc is not None:
        on_toc(archive)
    seen: set[int] = set()
    while not r.at_end():
        kind = r.byte()
        dump_id = r.int_()
        entry = archive.by_id.get(dump_id)
        if kind not in (BLK_DATA, BLK_BLOBS) or entry is None:
            raise ArchiveFormatError(f"data block of unknown kind {kind} or entry {dump_id} at byte {r.offset}: "
                                     "the archive is damaged")
        if dump_id in seen:
            raise ArchiveFormatError(f"two data blocks for TOC entry {dump_id}: the archive is damaged")
        seen.add(dump_id)
        sink = on_data(entry) if (on_data and kind == BLK_DATA) else None
        if kind == BLK_BLOBS:  # large objects: each is an oid and its chunks, up to a zero oid
            while (oid := r.int_()) != 0:
                if blobs is not None:
                    blobs.start(oid)
                _read_chunks(r, blobs.feed if blobs is not None else None)
                if blobs is not None:
                    blobs.end()
        else:
            _read_chunks(r, sink)
        if on_end is not None and kind == BLK_DATA:
            on_end(entry)
    missing = [e for e in entries if e.had_dumper and e.dump_id not in seen]
    if missing:
        first = missing[0]
        raise ArchiveFormatError(f"archive has no data block for {first.desc} {first.namespace}.{first.tag} "
                                 f"(and {len(missing) - 1} more): the archive is incomplete")
    return archive


BATCH = 1 << 20


def _read_chunks(r: _Reader, sink: Callable[[bytes], None] | None) -> None:
    """A data block's chunks (pg_dump writes one per row), handed on in batches of about 1 MB.

    The chunks that lie whole in the reader's buffer are cut out of it in a tight loop (a row
    costs a header unpack and a slice, not three method calls); a chunk that crosses the buffer's
    end goes through the reader."""
    batch: list[bytes] = []
    size = 0
    header = struct.Struct("<B" + {4: "I", 8: "Q"}.get(r.int_size, "I")) if r.int_size in (4, 8) else None
    hsize = 1 + r.int_size
    while True:
        if header is not None:
            buf, pos, end = r._buf, r._pos, len(r._buf)
            unpack = header.unpack_from
            while pos + hsize <= end:
                sign, length = unpack(buf, pos)
                if sign:
                    length = -length
                if length <= 0 or length > 1 << 31 or pos + hsize + length > end:
                    break
                start = pos + hsize
                pos = start + length
                if sink is not None:
                    batch.append(buf[start:pos])
                    size += length
                    if size >= BATCH:
                        sink(b"".join(batch))
                        batch, size = [], 0
            r.offset += pos - r._pos
            r._pos = pos
        length = r.int_()
        if length == 0:
            break
        if length < 0 or length > 1 << 31:
            raise ArchiveFormatError(f"data chunk of {length} bytes at byte {r.offset}: the archive is damaged")
        data = r.read(length)
        if sink is not None:
            batch.append(data)
            size += length
            if size >= BATCH:
                sink(b"".join(batch))
                batch, size = [], 0
    if sink is not None and batch:
        sink(b"".join(batch))


# -- content fingerprints -------------------------------------------------------------------------

MASK64 = (1 << 64) - 1

try:  # CPython's own MD5: the same digest, but a third less time per row than OpenSSL's, whose per-object
    # set-up outweighs the hashing of a line of a few dozen bytes (0.74 -> 0.48 µs per row with its sum here)
    from _md5 import md5 as row_md5
except ImportError:  # a Python built without it
    row_md5 = hashlib.md5
# the average row length above which OpenSSL's MD5 is the faster one (its per-byte speed wins from about 1 KB)
LONG_ROW = 1024


class CopyFingerprint:
    """Row count and an order-independent fingerprint of COPY text: the sum, modulo 2**64, of the
    first 8 bytes of each row's MD5 (its COPY text line, without the newline). The same value is
    computed by PostgreSQL over a restored table (see `fingerprint_sql`), so a changed, missing or
    extra row shows, whatever order the rows come in."""

    def __init__(self) -> None:
        self.rows = 0
        self.total = 0
        self._tail = b""
        self._ended = False

    def feed(self, data: bytes) -> bytes:
        """Account for a piece of a data block. Returns the complete row lines it finishes (a
        partial last line is held back until its newline comes), never the end marker, for a
        caller that also loads the rows."""
        if self._tail:
            data, self._tail = self._tail + data, b""
        return data[:self.account(data)]

    def account(self, data: bytes) -> int:
        """`feed` for a caller that only counts and fingerprints: no copy of the rows is made. Returns how
        many bytes of the held-back partial line and `data` are complete rows."""
        if self._ended:
            if data.strip(b"\n"):
                raise ArchiveFormatError("data after the end of a table's rows (\\.): the archive is damaged")
            return 0
        lines = data.split(b"\n")
        held = len(self._tail)
        if held:
            lines[0] = self._tail + lines[0]
        self._tail = lines.pop()
        complete = held + len(data) - len(self._tail)
        try:  # pg_dump ends a table's rows with a line "\." (a row never is: COPY escapes backslashes)
            end = lines.index(b"\\.")
        except ValueError:
            pass
        else:
            if any(lines[end + 1:]) or self._tail:
                raise ArchiveFormatError("data after the end of a table's rows (\\.): the archive is damaged")
            complete = sum(len(line) + 1 for line in lines[:end])
            lines = lines[:end]
            self._tail = b""
            self._ended = True
        # OpenSSL's MD5 hashes long lines faster, CPython's short ones (its set-up per object is cheaper)
        md5 = hashlib.md5 if complete > LONG_ROW * len(lines) else row_md5
        unpack = struct.Struct(">Q").unpack_from
        total = self.total
        for line in lines:
            total += unpack(md5(line).digest())[0]
        self.total = total & MASK64
        self.rows += len(lines)
        return complete

    def finish(self) -> "CopyFingerprint":
        if self._tail:
            # pg_dump ends every row with a newline; a dangling piece means a damaged block
            raise ArchiveFormatError("a data block ends in the middle of a row")
        self._tail = b""
        return self

    @property
    def hex(self) -> str:
        return f"{self.total:016x}"


def combine(fingerprints: list[str]) -> str:
    """The fingerprint of a table whose rows are spread over several (partitions)."""
    return f"{sum(int(f, 16) for f in fingerprints) & MASK64:016x}"


class LargeObjectFingerprint:
    """Count, bytes and an order-free fingerprint of large objects: the sum, modulo 2**64, of the first
    8 bytes of MD5("<oid>:<MD5 hex of its content>") per object; `schema_compare.large_objects` computes
    the same over a restored database."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.total = 0
        self._md5 = None
        self._oid: int | None = None

    def start(self, oid: int) -> None:
        self._oid, self._md5 = oid & 0xFFFFFFFF, hashlib.md5()  # pg_dump writes an oid as a signed int

    def feed(self, data: bytes) -> None:
        self._md5.update(data)
        self.bytes += len(data)

    def end(self) -> None:
        digest = hashlib.md5(f"{self._oid}:{self._md5.hexdigest()}".encode()).digest()
        self.total = (self.total + struct.unpack(">Q", digest[:8])[0]) & MASK64
        self.count += 1

    @property
    def hex(self) -> str:
        return f"{self.total:016x}"
