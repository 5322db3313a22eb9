"""One pass over a PostgreSQL artifact: decode, read the archive by structure, fingerprint every
table's rows, and (when asked) write the plain archive for `pg_restore --jobs` at the same time.

What a check, a drill or a restore needs to know about an archive comes from here, never from
`pg_restore --list` text: which TOC entries hold which table (by schema and name, exactly), the
rows and content fingerprint of each table of the manifest (a partitioned table's rows are those
of its leaf partitions), and which entries a group restore needs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard

from . import BackupError
from .artifact import CHUNK, open_decompressed
from .engines.pgarchive import Archive, ArchiveFormatError, CopyFingerprint, TocEntry, combine, read_archive
from .manifest import Manifest
from .names import TableName


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

    def fingerprints(self) -> dict[str, dict]:
        return {k: v.to_json() for k, v in sorted(self.tables.items())}


class _Tee:
    """A readable stream over the decoded artifact that also copies what it reads to a file
    and/or a process's stdin (the latter may stop reading early: pg_restore --list does)."""

    def __init__(self, reader, out: BinaryIO | None, pipe: BinaryIO | None,
                 on_progress: Callable[[int], None] | None):
        self._reader = reader
        self._out = out
        self._pipe = pipe
        self._on_progress = on_progress
        self._last = time.monotonic()
        self.decoded = 0

    def read(self, size: int = CHUNK) -> bytes:
        data = self._reader.read(max(size, CHUNK))
        if data:
            self.decoded += len(data)
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


def scan(artifact: Path, manifest: Manifest, *, copy_to: Path | None = None, pipe: BinaryIO | None = None,
         on_progress: Callable[[int], None] | None = None, identities=None, sha256=None) -> ArchiveScan:
    """Read the whole artifact once. Raises BackupError naming the artifact when it does not
    decode, is not a readable archive, or ends early. Given a hashlib object as `sha256`, the
    artifact's bytes are hashed into it in the same pass."""
    started = time.monotonic()
    per_entry: dict[tuple[str, str], CopyFingerprint] = {}

    def on_data(entry: TocEntry):
        fp = CopyFingerprint()
        per_entry[(entry.namespace or "", entry.tag)] = fp
        return fp.feed

    out = os.fdopen(os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") if copy_to is not None else None
    try:
        with open_decompressed(artifact, manifest.raw_size_bytes, identities, sha256) as reader:
            tee = _Tee(reader, out, pipe, on_progress)
            archive = read_archive(tee, on_data)
            while tee.read(CHUNK):  # anything after the last block still has to decode (and is counted)
                pass
    except zstandard.ZstdError as exc:
        raise BackupError(f"{artifact}: the zstd stream cannot be decoded: {exc}") from None
    except ArchiveFormatError as exc:
        raise BackupError(f"{artifact}: {exc}") from None
    finally:
        if out is not None:
            out.close()
    for fp in per_entry.values():
        try:
            fp.finish()
        except ArchiveFormatError as exc:
            raise BackupError(f"{artifact}: {exc}") from None
    result = ArchiveScan(archive, decoded_bytes=tee.decoded, seconds=round(time.monotonic() - started, 3))
    for key in manifest.row_counts:
        table = TableName.parse(key)
        parts = manifest.partitions.get(key)
        members = [TableName.parse(p) for p in parts] if parts is not None else [table]
        found = [per_entry.get((m.schema, m.name)) for m in members]
        if all(f is not None for f in found):
            result.tables[key] = TableContent(sum(f.rows for f in found), combine([f.hex for f in found]))
    return result


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


# -- which TOC entries a restore of a table group needs -------------------------------------------

# entries that are a table (or hold one's data); other kinds (schemas, types, functions, sequences,
# extensions) are pulled in by whatever depends on them
RELATION_KINDS = {"TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE"}
NEVER = {"DATABASE", "DATABASE PROPERTIES", "ENCODING", "STDSTRINGS", "SEARCHPATH"}


def group_entries(archive: Archive, tables: list[TableName], partitions: dict[str, list[str]]) -> list[TocEntry]:
    """The TOC entries that restore `tables` into an empty database: the tables (with their
    partitions and partition parents), everything they depend on (schemas, types, domains,
    functions, sequences, extensions), and everything that depends only on what is selected
    (defaults, owned sequences and their values, data, constraints, indexes, triggers, comments,
    grants; a foreign key only when the table it references is selected too)."""
    by_name = archive.tables()
    start: set[int] = set()
    for table in tables:
        members = [table] + [TableName.parse(p) for p in partitions.get(str(table), [])]
        for m in members:
            entry = by_name.get((m.schema, m.name))
            if entry is None:
                raise BackupError(f"the archive has no table {m}")
            start.add(entry.dump_id)
    selected: set[int] = set()

    def pull(dump_id: int) -> None:
        if dump_id in selected or dump_id not in archive.by_id:
            return
        entry = archive.by_id[dump_id]
        if entry.desc in NEVER:
            return
        selected.add(dump_id)
        for dep in entry.deps:
            dep_entry = archive.by_id.get(dep)
            # a table's own dependencies on other tables are its partition or inheritance parents
            if dep_entry is not None and (dep_entry.desc not in RELATION_KINDS or entry.desc == "TABLE"):
                pull(dep)

    for dump_id in start:
        pull(dump_id)
    changed = True
    while changed:
        changed = False
        for entry in archive.entries:
            if entry.dump_id in selected or entry.desc in NEVER or entry.desc in RELATION_KINDS or not entry.deps:
                continue
            if all(d in selected for d in entry.deps):
                selected.add(entry.dump_id)
                changed = True
    return [e for e in archive.entries if e.dump_id in selected]


def write_list_file(entries: list[TocEntry], path: Path) -> Path:
    """A pg_restore --use-list file: one dump id a line (pg_restore reads only the id)."""
    path.write_text("".join(f"{e.dump_id};\n" for e in entries))
    return path


def roles_needed(archive: Archive, entries: list[TocEntry] | None = None) -> set[str]:
    """The roles that own what will be restored (each entry's owner field)."""
    return {e.owner for e in (entries if entries is not None else archive.entries) if e.owner}
