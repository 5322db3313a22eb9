"""Copying complete backups between repositories: replication to S3, and back for a restore.

One function moves a backup from any repository to any other: the artifact first (verified by
its SHA-256), the manifest last, as on disk, so an artifact without its manifest is never taken
for a backup. Promotions (a weekly that is the same file as a daily) become server-side copies.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from ..catalog import Catalog
from . import BackupError
from .artifact import partial_path, sha256_file
from .backup import repository_for
from .manifest import MANIFEST_SUFFIX, Manifest
from .repository import BackupRef, Repository, StoredBackup
from .storage.local import LocalStorage
from .storage.s3 import S3Storage, with_retries
from .verification import is_verified, read_status, record
from .verify import Outcome, artifact_intact

__all__ = ["ReplicaResult", "copy_backup", "ensure_replicable", "fetch_from_s3",
           "replica_intact", "replica_repository", "replicate", "storage_for"]


def storage_for(catalog: Catalog, client=None) -> S3Storage:
    if catalog.replication.s3 is None:
        raise BackupError("the catalog has no replication.s3 section")
    return S3Storage(catalog.replication.s3, client)


def replica_repository(catalog: Catalog, client=None) -> Repository:
    """The catalog's S3 replica as a repository."""
    return Repository(storage_for(catalog, client), name="s3", replica=True)


def _as_repository(target) -> Repository:
    return target if isinstance(target, Repository) else Repository(target, name=target.where, replica=True)


@dataclass
class ReplicaResult:
    uri: str
    mode: str  # upload, copy, download or already-replicated
    size_bytes: int
    duration_s: float


def _holds(repo: Repository, key: str, size: int, sha256: str) -> bool:
    info = repo.storage.head(key)
    if info is None or info.size != size:
        return False
    if info.sha256 is None:  # a local file: read it
        path = repo.storage.local_path(key)
        return path is not None and sha256_file(path) == sha256
    return info.sha256 == sha256


def copy_backup(m: Manifest, key: str, src: Repository, dst: Repository, *, metadata: dict[str, str] | None = None,
                say=lambda _m: None) -> str:
    """Put the backup `key` (described by `m`) of `src` into `dst`; says how (upload, copy, download,
    already-replicated). The artifact's SHA-256 is checked on arrival."""
    meta = {"partition": m.partition, "asset-key": m.asset_key, **(metadata or {})}
    if _holds(dst, key, m.size_bytes, m.sha256):
        mode = "already-replicated"
    elif m.promoted_from and _holds(dst, m.promoted_from, m.size_bytes, m.sha256):
        say(f"server-side copy of {m.promoted_from} to {dst.storage.uri(key)}")
        with_retries(lambda: dst.storage.copy(m.promoted_from, key, size=m.size_bytes, sha256=m.sha256, metadata=meta))
        mode = "copy"
    elif (path := src.storage.local_path(key)) is not None:
        say(f"uploading {key.rsplit('/', 1)[-1]} ({m.size_human}) to {dst.storage.uri(key)}")
        with_retries(lambda: dst.storage.put_file(path, key, sha256=m.sha256, metadata=meta))
        mode = "upload"
    elif isinstance(dst.storage, LocalStorage):
        say(f"downloading {src.storage.uri(key)}")
        tmp = partial_path(dst.storage.local_path(key))
        tmp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            with_retries(lambda: src.storage.get_file(key, tmp))
            digest = sha256_file(tmp)
            if digest != m.sha256:
                raise BackupError(f"{src.storage.uri(key)}: downloaded sha256 {digest} differs from the manifest's "
                                  f"{m.sha256}")
            dst.storage.put_file(tmp, key, sha256=m.sha256, move=True)
        finally:
            tmp.unlink(missing_ok=True)
        mode = "download"
    else:
        raise BackupError(f"{src.storage.uri(key)} to {dst.storage.uri(key)}: one side must be local")
    # the manifest goes last: an object without its manifest is not a backup
    data = src.storage.get_bytes(key + MANIFEST_SUFFIX)
    if not _holds(dst, key + MANIFEST_SUFFIX, len(data), hashlib.sha256(data).hexdigest()):
        with_retries(lambda: dst.storage.put_bytes(data, key + MANIFEST_SUFFIX))
    return mode


def ensure_replicable(backup: StoredBackup) -> None:
    """Only good backups go off-site: refuse one whose blocking checks failed, and verify one that
    nobody has checked yet (a run without its checks, such as an asset backfill)."""
    status = read_status(backup)
    if "artifact_intact" not in status:
        outcome = artifact_intact(backup)
        record(backup, "artifact_intact", outcome.passed, outcome.message, outcome.metadata)
        status = read_status(backup)
    failed = sorted(n for n, s in status.items() if not s.get("passed") and n != "size_anomaly")
    if failed:
        raise BackupError(f"{backup.artifact_path.name}: not replicated, its check(s) {', '.join(failed)} failed")


def replicate(catalog: Catalog, backup: StoredBackup, target, *, say=lambda _m: None) -> ReplicaResult:
    """Put a good local backup into a replica repository (an S3Storage is taken as one)."""
    ensure_replicable(backup)
    target = _as_repository(target)
    local = repository_for(catalog)
    key = local.key_of(backup.artifact_path)
    started = time.monotonic()
    mode = copy_backup(backup.manifest, key, local, target, say=say,
                       metadata={"verified": "true" if is_verified(backup) else "unknown"})
    return ReplicaResult(target.storage.uri(key), mode, backup.manifest.size_bytes, round(time.monotonic() - started, 3))


def replica_intact(catalog: Catalog, backup: StoredBackup, target) -> Outcome:
    target = _as_repository(target)
    m = backup.manifest
    key = repository_for(catalog).key_of(backup.artifact_path)
    uri = target.storage.uri(key)
    info = target.storage.head(key)
    if info is None:
        return Outcome(False, f"{uri}: replica is missing")
    if info.size != m.size_bytes:
        return Outcome(False, f"{uri}: size {info.size} differs from the manifest's {m.size_bytes}")
    if info.sha256 is not None and info.sha256 != m.sha256:
        return Outcome(False, f"{uri}: sha256 {info.sha256} differs from the manifest's {m.sha256}")
    if target.storage.head(key + MANIFEST_SUFFIX) is None:
        return Outcome(False, f"{uri}: its manifest is missing in the replica")
    return Outcome(True, f"{uri}: size and sha256 match the manifest",
                   {"uri": uri, "size_bytes": info.size, "sse": info.server_side_encryption or "none",
                    "storage_class": info.storage_class or "STANDARD"})


def newest(repo: Repository, *, engine: str, source: str, group: str, tier: str | None = None,
           partition: str | None = None) -> BackupRef | None:
    refs = [r for r in repo.refs(source=source, group=group, tier=tier, partition=partition) if r.engine == engine]
    return max(refs, key=lambda r: r.stamp) if refs else None


def fetch_from_s3(catalog: Catalog, *, source: str, group: str, tier: str | None = None, partition: str | None = None,
                  storage=None, say=lambda _m, progress=False: None) -> StoredBackup:
    """Copy the newest (or the named) complete replica into the local repository, checksum verified."""
    if source not in catalog.sources:
        raise BackupError(f"unknown source {source!r}")
    remote = _as_repository(storage) if storage is not None else replica_repository(catalog)
    ref = newest(remote, engine=catalog.sources[source].engine, source=source, group=group, tier=tier,
                 partition=partition)
    if ref is None:
        raise BackupError(f"no replica of {source}/{group}{' for ' + partition if partition else ''} "
                          f"in {remote.storage.uri('')}")
    local = repository_for(catalog)
    copy_backup(remote.manifest(ref), ref.key, remote, local, say=say)
    backup = local.stored(ref)
    say(f"downloaded and verified {backup.artifact_path.name}")
    return backup
