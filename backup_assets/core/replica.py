"""Replicating backups to S3, checking replicas, and fetching them back for a restore."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..catalog import Catalog
from . import BackupError
from .artifact import ensure_dir, partial_path, sha256_file
from .backup import repository_for
from .manifest import MANIFEST_SUFFIX, manifest_path_for, read_manifest
from .repository import StoredBackup
from .storage.s3 import S3Storage, with_retries
from .verification import is_verified, read_status, record
from .verify import Outcome, artifact_intact

ARTIFACT_NAME = re.compile(r"^(?P<source>[A-Za-z_][A-Za-z0-9_]*)-(?P<group>[A-Za-z_][A-Za-z0-9_]*)-"
                           r"(?P<partition>\d{4}-\d{2}-\d{2})-(?P<stamp>\d{8}T\d{12}Z)\.(?P<ext>dump|db|json)\.zst(?P<age>\.age)?$")


def storage_for(catalog: Catalog, client=None) -> S3Storage:
    if catalog.replication.s3 is None:
        raise BackupError("the catalog has no replication.s3 section")
    return S3Storage(catalog.replication.s3, client)


@dataclass
class ReplicaResult:
    uri: str
    mode: str  # upload, copy or already-replicated
    size_bytes: int
    duration_s: float


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


def replicate(catalog: Catalog, backup: StoredBackup, storage: S3Storage, *, say=lambda _m: None) -> ReplicaResult:
    """Put a good artifact and its manifest in S3; promotions become server-side copies."""
    ensure_replicable(backup)
    repo = repository_for(catalog)
    m = backup.manifest
    key = storage.key(repo.key_of(backup.artifact_path))
    started = time.monotonic()
    meta = {"partition": m.partition, "asset-key": m.asset_key, "verified": "true" if is_verified(backup) else "unknown"}
    existing = storage.head(key)
    if existing and existing.size == m.size_bytes and existing.sha256 == m.sha256:
        mode = "already-replicated"
    elif m.promoted_from and (src := storage.head(storage.key(m.promoted_from))) and src.sha256 == m.sha256:
        say(f"server-side copy of {src.key} to {key}")
        with_retries(lambda: storage.copy(src.key, key, size=m.size_bytes, sha256=m.sha256, metadata=meta))
        mode = "copy"
    else:
        say(f"uploading {backup.artifact_path.name} ({m.size_human}) to {storage.uri(key)}")
        with_retries(lambda: storage.put_file(backup.artifact_path, key, sha256=m.sha256, metadata=meta))
        mode = "upload"
    # the manifest goes last, like on disk: an object without its manifest is not a replica
    manifest_key = key + MANIFEST_SUFFIX
    manifest_sha = sha256_file(backup.manifest_path)
    current = storage.head(manifest_key)
    if not (current and current.sha256 == manifest_sha):
        with_retries(lambda: storage.put_file(backup.manifest_path, manifest_key, sha256=manifest_sha))
    return ReplicaResult(storage.uri(key), mode, m.size_bytes, round(time.monotonic() - started, 3))


def replica_intact(catalog: Catalog, backup: StoredBackup, storage: S3Storage) -> Outcome:
    repo = repository_for(catalog)
    m = backup.manifest
    key = storage.key(repo.key_of(backup.artifact_path))
    info = storage.head(key)
    if info is None:
        return Outcome(False, f"{storage.uri(key)}: replica is missing")
    if info.size != m.size_bytes:
        return Outcome(False, f"{storage.uri(key)}: size {info.size} differs from the manifest's {m.size_bytes}")
    if info.sha256 != m.sha256:
        return Outcome(False, f"{storage.uri(key)}: sha256 {info.sha256} differs from the manifest's {m.sha256}")
    if storage.head(key + MANIFEST_SUFFIX) is None:
        return Outcome(False, f"{storage.uri(key)}: its manifest is missing in S3")
    return Outcome(True, f"{storage.uri(key)}: size and sha256 match the manifest",
                   {"uri": storage.uri(key), "size_bytes": info.size, "sse": info.server_side_encryption or "none",
                    "storage_class": info.storage_class or "STANDARD"})


def fetch_from_s3(catalog: Catalog, *, source: str, group: str, tier: str | None = None, partition: str | None = None,
                  storage: S3Storage | None = None, say=lambda _m, progress=False: None) -> StoredBackup:
    """Download the newest (or the named) replica into the local repository and verify its checksum."""
    storage = storage or storage_for(catalog)
    if source not in catalog.sources:
        raise BackupError(f"unknown source {source!r}")
    engine = catalog.sources[source].engine
    repo = repository_for(catalog)
    candidates = []
    for t in [tier] if tier else ["daily", "weekly", "monthly"]:
        for key, _size in storage.list(f"{engine}/{t}/"):
            match = ARTIFACT_NAME.match(key.rsplit("/", 1)[-1])
            if match and match["source"] == source and match["group"] == group and (
                    partition is None or match["partition"] == partition):
                candidates.append((match["stamp"], key))
    if not candidates:
        raise BackupError(f"no replica of {source}/{group}{' for ' + partition if partition else ''} "
                          f"in {storage.uri(storage.key(''))}")
    _stamp, key = max(candidates)
    local = repo.root / storage.repo_key(key)
    ensure_dir(local.parent)
    meta_tmp = partial_path(manifest_path_for(local))
    art_tmp = partial_path(local)
    try:
        say(f"downloading {storage.uri(key)}")
        storage.get_file(key + MANIFEST_SUFFIX, meta_tmp)
        manifest = read_manifest(meta_tmp)
        storage.get_file(key, art_tmp)
        digest = sha256_file(art_tmp)
        if digest != manifest.sha256:
            raise BackupError(f"{storage.uri(key)}: downloaded sha256 {digest} differs from the manifest's {manifest.sha256}")
        art_tmp.chmod(0o600)
        meta_tmp.chmod(0o600)
        art_tmp.replace(local)
        meta_tmp.replace(manifest_path_for(local))
    finally:
        art_tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
    say(f"downloaded and verified {local.name}")
    return StoredBackup(read_manifest(manifest_path_for(local)), manifest_path_for(local))


def parse_artifact_name(name: str) -> dict | None:
    match = ARTIFACT_NAME.match(name)
    return match.groupdict() if match else None

