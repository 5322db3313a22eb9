"""The WAL archive of a PostgreSQL source: `archive_command` and `restore_command`.

    archive_command = 'backup-assets --catalog /etc/backup-assets/catalog.yaml wal-push --source app %p'
    restore_command = 'backup-assets --catalog /etc/backup-assets/catalog.yaml wal-fetch --source app %f %p'

Layout: `<repository>/wal/<source>/<file name>.zst` (`.zst.age` when the catalog encrypts the source)
with `<file name>.json` beside it: the original's size and SHA-256, the stored file's SHA-256, when it was
pushed. The stored file is written to a partial name, fsynced and renamed, then the JSON the same way: a file
without its JSON (a push killed between the two) is not in the archive, and the next push of that name
replaces it. Pushing a name that is archived succeeds when the bytes are identical (PostgreSQL retries after a
crash) and fails loudly when they differ. Every failure exits non-zero, so PostgreSQL keeps the segment and
retries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from backup_assets.core import BackupError, failpoints
from backup_assets.core.artifact import (ArtifactWriter, ensure_dir, fsync_dir, open_decompressed, partial_path,
                                         write_json_atomic)

if TYPE_CHECKING:
    from backup_assets.catalog import Catalog

SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
# segments, timeline history files, backup history files, a promoted standby's last partial segment
ARCHIVABLE = re.compile(r"^[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?$|^[0-9A-F]{8}\.history$")
CHUNK = 1 << 20


def wal_dir(catalog: Catalog, source: str) -> Path:
    src = catalog.sources.get(source)
    if src is None or src.engine != "postgres":
        raise BackupError(f"source {source!r} is not a postgres source in the catalog")
    return catalog.repository_root / "wal" / source


def _check_name(name: str) -> str:
    if not ARCHIVABLE.match(name):
        raise BackupError(f"{name!r} is not a WAL file name (a segment, .history, .backup or .partial file)")
    return name


def _meta_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.json"


def read_meta(folder: Path, name: str) -> dict | None:
    try:
        meta = json.loads(_meta_path(folder, name).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise BackupError(f"{_meta_path(folder, name)} is damaged: move it away to push {name} again") from None
    stored = folder / meta.get("stored", "")
    if not stored.is_file() or stored.stat().st_size != meta.get("stored_size"):
        return None  # the stored file is gone or incomplete: not archived
    return meta


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass
class Pushed:
    name: str
    stored: Path
    raw_size: int
    already: bool


def push(catalog: Catalog, source: str, path: str) -> Pushed:
    """Archive one WAL file (the %p PostgreSQL passes, relative to its data directory)."""
    wal = Path(path)
    name = _check_name(wal.name)
    folder = ensure_dir(wal_dir(catalog, source))
    try:
        raw_sha, raw_size = _hash_file(wal)
    except OSError as exc:
        raise BackupError(f"cannot read {wal}: {exc.strerror}") from None
    meta = read_meta(folder, name)
    if meta is not None:
        if meta["raw_sha256"] == raw_sha and meta["raw_size"] == raw_size:
            _second_copy(catalog, source, folder, name, meta)  # a retry after the replica failed
            return Pushed(name, folder / meta["stored"], raw_size, already=True)
        raise BackupError(f"{name} is archived already with different content (archived sha256 "
                          f"{meta['raw_sha256'][:16]}…, this one {raw_sha[:16]}…): refusing to overwrite it; two "
                          "servers may be archiving into the same place")
    encryption = catalog.encryption_for(source)
    stored = folder / (f"{name}.zst.age" if encryption else f"{name}.zst")
    for leftover in (folder / f"{name}.zst", folder / f"{name}.zst.age"):  # a push killed before its JSON
        leftover.unlink(missing_ok=True)
    with ArtifactWriter(stored, level=1, threads=1, recipients=encryption.recipients if encryption else None) as writer:
        with open(wal, "rb") as fh:
            writer.copy_from(fh)
        if writer.raw_size != raw_size:
            raise BackupError(f"{wal} changed while it was archived ({raw_size} then {writer.raw_size} bytes)")
        written = writer.commit()
    failpoints.point("wal.before_meta")
    meta = {
        "name": name, "stored": stored.name, "stored_size": written.size_bytes, "sha256": written.sha256,
        "raw_size": raw_size, "raw_sha256": raw_sha, "encrypted": encryption is not None,
        "identity_file_env": encryption.identity_file_env if encryption else None,
        "pushed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(_meta_path(folder, name), meta)
    _second_copy(catalog, source, folder, name, meta)
    return Pushed(name, stored, raw_size, already=False)


def _second_copy(catalog: Catalog, source: str, folder: Path, name: str, meta: dict) -> None:
    """With pitr.wal_push_s3 the segment is on every replica too before PostgreSQL hears it is archived
    (a failure exits non-zero: PostgreSQL keeps the segment and retries; the local copy is kept as is)."""
    cfg = catalog.sources[source].pitr
    if cfg is None or not cfg.wal_push_s3 or not catalog.replication.replicas():
        return
    from backup_assets.core.pitr.locations import push_wal, replica_storages

    for storage in replica_storages(catalog):
        push_wal(catalog, source, folder, name, meta, storage)


def fetch(catalog: Catalog, source: str, name: str, dest: str, *, durable: bool = True) -> int:
    """Restore one archived WAL file to `dest` (the %p of restore_command); returns its size. A name that is
    not archived raises BackupError (PostgreSQL asks for files that may not exist, e.g. the next timeline's
    history file)."""
    folder = wal_dir(catalog, source)
    _check_name(name)
    meta = read_meta(folder, name)
    stored = folder / meta["stored"] if meta is not None else None
    scratch = None
    target = Path(dest)
    tmp = partial_path(target)
    try:
        replicas = list(catalog.replication.replicas())
        if meta is None and replicas:  # the local archive is gone or behind: the replicas, in the catalog's order
            import tempfile

            from backup_assets.core.pitr.locations import fetch_wal, replica_storage

            scratch = Path(tempfile.mkdtemp(prefix="backup-assets-wal-"))
            for replica in replicas:
                found = fetch_wal(catalog, source, name, replica_storage(catalog, replica=replica), scratch)
                if found is not None:
                    stored, meta = found
                    break
        if meta is None:
            where = f"{folder}" + (f" nor on the {', '.join(replicas)} replica" if replicas else "")
            raise BackupError(f"{name} is not in the WAL archive of {source} ({where})")
        from backup_assets.core.crypto import identities_for_record

        identities = identities_for_record(catalog, source, meta, what=name)
        digest = hashlib.sha256()
        with open_decompressed(stored, meta["raw_size"], identities) as reader, open(tmp, "wb") as out:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            if durable:
                os.fsync(out.fileno())
        if digest.hexdigest() != meta["raw_sha256"]:
            raise BackupError(f"{name}: the archived copy does not match its checksum; not restored")
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return meta["raw_size"]


@dataclass
class Continuity:
    segments: int
    first: str | None
    last: str | None
    gaps: list[tuple[str, str]]  # (last before the gap, first after it)
    newest_pushed_at: str | None

    @property
    def ok(self) -> bool:
        return self.segments > 0 and not self.gaps


def _next(name: str, per_log: int) -> str:
    tli, log, seg = (int(x, 16) for x in SEGMENT.match(name).groups())
    seg += 1
    if seg == per_log:
        log, seg = log + 1, 0
    return f"{tli:08X}{log:08X}{seg:08X}"


def segment_names(catalog: Catalog, source: str, *, since: str | None = None,
                  timeline: str | None = None) -> list[str]:
    """The archived segments of a source (by their JSON descriptions), in order: from `since`'s
    position in the WAL on (a segment name; any timeline), and only on `timeline` when given."""
    folder = wal_dir(catalog, source)
    if not folder.is_dir():
        return []
    return sorted(name for name in (p.name[:-5] for p in folder.glob("*.json"))
                  if SEGMENT.match(name) and (since is None or name[8:] >= since[8:])
                  and (timeline is None or name[:8] == timeline))


def verify(catalog: Catalog, source: str, *, since: str | None = None) -> Continuity:
    """Every segment from the oldest archived one (or `since`) to the newest is there, per timeline
    (a later timeline continues from its switch point, so each timeline is checked on its own)."""
    folder = wal_dir(catalog, source)
    metas = {}
    for name in segment_names(catalog, source, since=since):
        meta = read_meta(folder, name)
        if meta is not None:
            metas[name] = meta
    names = sorted(metas)
    gaps: list[tuple[str, str]] = []
    for tli in sorted({n[:8] for n in names}):
        on_tli = [n for n in names if n[:8] == tli]
        per_log = (1 << 32) // metas[on_tli[0]]["raw_size"]
        for before, after in zip(on_tli, on_tli[1:]):
            if _next(before, per_log) != after:
                gaps.append((before, after))
    newest = max((m["pushed_at"] for m in metas.values()), default=None)
    return Continuity(len(names), names[0] if names else None, names[-1] if names else None, gaps, newest)
