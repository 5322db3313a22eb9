"""Backup repositories: a layout and manifests over one storage (local filesystem, S3).

Layout (the Miyabi runbook's): `<root>/{postgres,sqlite}/{daily,weekly,monthly}/`
`<source>-<group>-<partition>-<timestamp>.<ext>.zst[.age]` with `<artifact>.meta` beside it.
The key of a file relative to the root is the same in every repository. A backup is complete
when its manifest is there (the manifest is always written last); an artifact without one is
never a backup.

What a listing must tell (source, group, tier, partition, time, complete or not) is in the names,
so walking a repository costs one listing, not a request per object. A *replica* receives only
backups that verified (replication refuses the others), so every complete backup in it counts as
verified; the local repository keeps each backup's check record beside it.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from backup_assets.catalog import GLOBALS_GROUP
from backup_assets.core import BackupError
from backup_assets.core.artifact import PARTIAL_MARK, ensure_dir, human_size, partial_owner
from backup_assets.core.manifest import MANIFEST_SUFFIX, Manifest, manifest_path_for, parse_manifest, read_manifest
from backup_assets.core.owner import Owner, age_of
from backup_assets.core.storage import Storage
from backup_assets.core.storage.local import SCRATCH, LocalStorage

TIERS = ("hourly", "daily", "weekly", "monthly")
STAMP = "%Y%m%dT%H%M%S%fZ"
ARTIFACT_NAME = re.compile(r"^(?P<source>[A-Za-z_][A-Za-z0-9_]*)-(?P<group>[A-Za-z_][A-Za-z0-9_]*)-"
                           r"(?P<partition>\d{4}-\d{2}-\d{2}(?:T\d{2})?)-(?P<stamp>\d{8}T\d{12}Z)\.(?P<ext>dump|db|json)\.zst"
                           r"(?P<age>\.age)?$")
CHECKS_SUFFIX = ".checks.json"


def verified_by(status: dict) -> bool:
    """Whether a check record (`<artifact>.checks.json`) says the backup counts: intact, and no blocking check
    failed (size_anomaly only warns)."""
    blocking = {k: v for k, v in status.items() if k != "size_anomaly"}
    return bool(status.get("artifact_intact", {}).get("passed")) and all(v.get("passed") for v in blocking.values())


EXTENSIONS = {"postgres": "dump", "sqlite": "db"}


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)
RESERVE_BYTES = 64 * 1024 * 1024  # left free for the backups being written beside a check's copy (at most 10%)


def _room_for(root: Path, need: int, what: str) -> None:
    usage = shutil.disk_usage(root)
    keep = min(RESERVE_BYTES, usage.total // 10)
    if usage.free - need < keep:
        raise BackupError(f"no space left in the scratch folder {root} ({human_size(usage.free)} free of "
                          f"{human_size(usage.total)}) for the {what}'s temporary copy: it needs {human_size(need)}, "
                          f"and {human_size(keep)} stay free for the backups; free space there (or move the "
                          "repository) and run it again")


def scratch_error(exc: OSError, root: Path, what: str, written: Path | None = None) -> BackupError | None:
    """A full volume, an exceeded quota or an I/O error in the scratch folder, as one line naming
    the folder, its free space and what had been written when it ran out; None for any other OSError."""
    if exc.errno not in SPACE_ERRNOS:
        return None
    try:
        usage = shutil.disk_usage(root if root.exists() else root.parent)
        room = f"{human_size(usage.free)} free of {human_size(usage.total)}"
    except OSError:
        room = "free space unknown"
    if written is not None:
        size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file())
        room += f", after writing {human_size(size)}"
    problem = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
               errno.EIO: "I/O error"}[exc.errno]
    return BackupError(f"{problem} in the scratch folder {root} ({room}) for the {what}'s temporary copy; "
                       "free space there (or move the repository) and run it again")


def utc_stamp(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime(STAMP)


def parse_artifact_name(name: str) -> dict | None:
    match = ARTIFACT_NAME.match(name)
    return match.groupdict() if match else None


@dataclass(frozen=True)
class BackupRef:
    """A backup as a listing shows it: its artifact's key, what the name says, its size."""
    key: str
    engine: str
    tier: str
    source: str
    group: str
    partition: str
    stamp: str
    size: int
    complete: bool  # its manifest is beside it

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def manifest_key(self) -> str:
        return self.key + MANIFEST_SUFFIX

    @property
    def checks_key(self) -> str:
        return self.key + CHECKS_SUFFIX

    @property
    def created(self) -> dt.datetime:
        return dt.datetime.strptime(self.stamp, STAMP).replace(tzinfo=dt.timezone.utc)


class Repository:
    """Backups in one storage. Everything that walks backups goes through here, whatever the storage."""

    def __init__(self, storage: Storage, *, name: str, replica: bool):
        self.storage = storage
        self.name = name
        self.replica = replica

    def refs(self, *, source: str | None = None, group: str | None = None, tier: str | None = None,
             partition: str | None = None, complete: bool = True) -> list[BackupRef]:
        """Backups matching the filters (complete ones unless `complete=False`), oldest first, from
        one listing."""
        listing = dict(self.storage.list(""))
        found = []
        for key, size in listing.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[1] not in TIERS:
                continue
            parsed = parse_artifact_name(parts[2])
            if not parsed:
                continue
            ref = BackupRef(key, parts[0], parts[1], parsed["source"], parsed["group"], parsed["partition"],
                            parsed["stamp"], size, key + MANIFEST_SUFFIX in listing)
            if (complete and not ref.complete) or (source and ref.source != source) or (group and ref.group != group) \
                    or (tier and ref.tier != tier) or (partition and ref.partition != partition):
                continue
            found.append(ref)
        found.sort(key=lambda r: (r.partition, r.stamp))
        return found

    def manifest(self, ref: BackupRef) -> Manifest:
        return parse_manifest(self.storage.get_bytes(ref.manifest_key), where=self.storage.uri(ref.manifest_key))

    def check_record(self, ref: BackupRef) -> dict:
        try:
            data = json.loads(self.storage.get_bytes(ref.checks_key))
        except (OSError, ValueError, BackupError):
            return {}
        return data if isinstance(data, dict) else {}

    def verified(self, ref: BackupRef) -> bool:
        if self.replica:
            return ref.complete
        return verified_by(self.check_record(ref))

    def untrusted(self) -> set[str]:
        """Keys of artifacts whose manifest cannot be trusted: never counted, never deleted."""
        return set()

    def orphan_keys(self, *, min_age_s: float = 0) -> list[str]:
        """Artifacts without a manifest, in any storage: never a backup. With `min_age_s`, only those
        stored at least that long ago (an upload in progress has its artifact before its manifest)."""
        found = []
        for ref in self.refs(complete=False):
            if ref.complete:
                continue
            if min_age_s:
                info = self.storage.head(ref.key)
                if info is None or info.modified is None or \
                        (dt.datetime.now(dt.timezone.utc) - info.modified).total_seconds() < min_age_s:
                    continue
            found.append(ref.key)
        return found

    def delete(self, ref: BackupRef) -> list:
        """Delete a backup; returns what a lock keeps (S3 Object Lock: (key, until); then nothing was deleted)."""
        # the manifest first: from then on the artifact no longer counts as a backup (S3: one request for all,
        # so a kill cannot leave the artifact behind its deleted manifest)
        return self.storage.delete([ref.manifest_key, ref.key, ref.checks_key]) or []


@dataclass(frozen=True)
class StoredBackup:
    manifest: Manifest
    manifest_path: Path

    @property
    def artifact_path(self) -> Path:
        return self.manifest_path.with_name(self.manifest.artifact)


class LocalRepository(Repository):
    def __init__(self, root: Path):
        self.root = Path(root)
        super().__init__(LocalStorage(self.root), name="local", replica=False)

    def stored(self, ref: BackupRef) -> StoredBackup:
        path = self.root / ref.manifest_key
        return StoredBackup(read_manifest(path), path)

    def untrusted(self) -> set[str]:
        return {self.key_of(path)[: -len(MANIFEST_SUFFIX)] for path, _ in self.unreadable()}

    def folder(self, engine: str, tier: str) -> Path:
        return self.root / engine / tier

    def new_artifact_path(self, engine: str, tier: str, source: str, group: str, partition: str, *,
                          encrypted: bool = False) -> Path:
        ext = "json" if (engine, group) == ("postgres", GLOBALS_GROUP) else EXTENSIONS[engine]  # the roles backup
        name = f"{source}-{group}-{partition}-{utc_stamp()}.{ext}.zst" + (".age" if encrypted else "")
        return self.folder(engine, tier) / name

    def scratch_root(self) -> Path:
        return ensure_dir(self.root / SCRATCH)

    @contextmanager
    def scratch(self, what: str, *, need_bytes: int = 0) -> Iterator[Path]:
        """A 0700 folder for one operation's temporary files (decoded archives are plaintext
        copies of a database), named after its owner and removed on every way out; a kill -9
        leaves it to the next operation's sweep. A full volume (or quota, or an I/O error) while it
        is in use is a BackupError naming the folder and its free space, not a bare OSError: the
        checks record it as their failure, a restore says it in one line."""
        root = self.root / SCRATCH
        try:
            folder = self.scratch_root() / f"{what}-{Owner.me().token}-{secrets.token_hex(4)}"
            if need_bytes:  # a copy that cannot fit is refused before it fills the volume the backups write to
                _room_for(root, need_bytes, what)
            folder.mkdir(mode=0o700)
        except OSError as exc:
            raise scratch_error(exc, root, what) or exc from None
        try:
            yield folder
        except OSError as exc:
            raise scratch_error(exc, root, what, written=folder) or exc from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def key_of(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def manifests(self) -> Iterator[Path]:
        for engine in EXTENSIONS:
            for tier in TIERS:
                folder = self.folder(engine, tier)
                if folder.is_dir():
                    for path in sorted(folder.iterdir()):
                        if path.name.endswith(MANIFEST_SUFFIX) and PARTIAL_MARK not in path.name:
                            yield path

    def backups(self, *, source: str | None = None, group: str | None = None, tier: str | None = None,
                partition: str | None = None, strict: bool = False) -> list[StoredBackup]:
        """Stored backups matching the filters, oldest first. Unreadable manifests are skipped
        (or raised with strict=True): a backup without a good manifest never counts."""
        found = []
        for path in self.manifests():
            try:
                manifest = read_manifest(path)
            except BackupError:
                if strict:
                    raise
                continue
            if source and manifest.source != source:
                continue
            if group and manifest.group != group:
                continue
            if tier and manifest.tier != tier:
                continue
            if partition and manifest.partition != partition:
                continue
            found.append(StoredBackup(manifest, path))
        found.sort(key=lambda b: (b.manifest.partition, b.manifest.timestamp))
        return found

    def latest(self, source: str, group: str, tier: str, partition: str | None = None) -> StoredBackup | None:
        matches = self.backups(source=source, group=group, tier=tier, partition=partition)
        return matches[-1] if matches else None

    def sweep(self, *, legacy_age_s: float = 6 * 3600) -> list[Path]:
        """Remove what dead operations left: partial files and scratch folders whose owner process
        is gone (at once), never one of a live process. Leftovers named without an owner (older
        versions) go once older than `legacy_age_s`."""
        removed: list[Path] = []
        if not self.root.exists():
            return removed
        scratch = self.root / SCRATCH
        if scratch.is_dir():
            for folder in scratch.iterdir():
                token = folder.name.split("-", 1)[1].rsplit("-", 1)[0] if "-" in folder.name else ""
                owner = Owner.from_token(token)
                age = age_of(folder)
                dead = (not owner.is_alive(age_s=age)) if owner else (age is not None and age > legacy_age_s)
                if dead:
                    shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink(missing_ok=True)
                    removed.append(folder)
        for dirpath, _dirs, files in os.walk(self.root):
            if Path(dirpath) == scratch or scratch in Path(dirpath).parents:
                continue
            for name in files:
                if PARTIAL_MARK not in name:
                    continue
                path = Path(dirpath) / name
                owner = partial_owner(name)
                age = age_of(path)
                dead = (not owner.is_alive(age_s=age)) if owner else (age is not None and age > legacy_age_s)
                if dead:
                    path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def unreadable(self) -> list[tuple[Path, str]]:
        """Manifests that cannot be trusted (damaged, edited, or written before format 2): their
        backups never count, so they are reported for an operator to look at, never deleted."""
        found = []
        for path in self.manifests():
            try:
                read_manifest(path)
            except BackupError as exc:
                found.append((path, str(exc)))
        return found

    def orphans(self, *, min_age_s: float = 0) -> list[Path]:
        """Artifacts without a manifest (a crash between the artifact's rename and the manifest's
        write): never a backup, reported and swept."""
        found = []
        for engine in EXTENSIONS:
            for tier in TIERS:
                folder = self.folder(engine, tier)
                if not folder.is_dir():
                    continue
                for path in folder.iterdir():
                    if path.name.endswith((".zst", ".zst.age")) and not path.name.startswith(".") \
                            and not manifest_path_for(path).exists() and (age_of(path) or 0) >= min_age_s:
                        found.append(path)
        return sorted(found)


__all__ = ["BackupRef", "LocalRepository", "Repository", "StoredBackup", "manifest_path_for", "parse_artifact_name",
           "utc_stamp"]
