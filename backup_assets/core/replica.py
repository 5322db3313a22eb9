"""Copying complete backups between repositories: replication to the catalog's replicas (S3, Google Cloud
Storage, Azure Blob Storage: `replication.s3|gcs|azure`, each named by its kind), and back for a restore.

One function moves a backup from any repository to any other: the artifact first (verified by
its SHA-256), the manifest last, as on disk, so an artifact without its manifest is never taken
for a backup. Promotions (a weekly that is the same file as a daily) become server-side copies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError
from backup_assets.core.artifact import partial_path, sha256_file, write_json_atomic
from backup_assets.core.backup.take import repository_for
from backup_assets.core.manifest import MANIFEST_SUFFIX, Manifest
from backup_assets.core.repository import CHECKS_SUFFIX, BackupRef, Repository, StoredBackup
from backup_assets.core.storage import download_sha256
from backup_assets.core.storage.local import LocalStorage
from backup_assets.core.storage.s3 import S3Storage, b64_digest, with_retries
from backup_assets.core.verify.records import is_verified, read_status, record
from backup_assets.core.verify.checks import Outcome, artifact_intact

__all__ = ["AuditResult", "ReplicaResult", "audit_replicas", "copy_backup", "ensure_replicable",
           "fetch_from_replica", "replica_intact", "replica_repository", "replicate", "storage_for"]


def storage_for(catalog: Catalog, client=None, *, replica: str = "s3"):
    """The storage of one of the catalog's replicas (its SDK imported here, not before)."""
    cfg = catalog.replication.replicas().get(replica)
    if cfg is None:
        raise BackupError(f"the catalog has no replication.{replica} section")
    if replica == "gcs":
        from backup_assets.core.storage.gcs import GCSStorage

        return GCSStorage(cfg, client)
    if replica == "azure":
        from backup_assets.core.storage.azure import AzureStorage

        return AzureStorage(cfg, client)
    return S3Storage(cfg, client, lock_for=lock_policy(catalog))


def lock_policy(catalog: Catalog):
    """Until when an object written to the replica under a key stays locked (S3 Object Lock), or None: a backup,
    its manifest: its creation + its tier's S3 retention; a base backup: its start + the source's pitr window;
    a WAL segment: now + that window; each plus the catalog's margin. Check records (`.checks.json`) are
    rewritten whenever checks run again and prove nothing alone: never locked."""
    from backup_assets.catalog import Pitr
    from backup_assets.core.repository import ARTIFACT_NAME, STAMP

    cfg = catalog.replication.s3
    if cfg is None or cfg.object_lock is None:
        return None
    margin = dt.timedelta(days=cfg.object_lock.margin_days)

    def pitr_days(source: str) -> int:
        src = catalog.sources.get(source)
        return ((src.pitr if src is not None else None) or Pitr()).retention_days

    def until(key: str) -> dt.datetime | None:
        parts = key.split("/")
        if key.endswith(CHECKS_SUFFIX) or len(parts) != 3:
            return None
        head, mid, name = parts
        if head == "wal":
            return _now() + dt.timedelta(days=pitr_days(mid)) + margin
        if head == "base":
            try:
                stamp = dt.datetime.strptime(name[len("base-"):].split(".", 1)[0], STAMP).replace(tzinfo=dt.timezone.utc)
            except ValueError:
                stamp = _now()
            return stamp + dt.timedelta(days=pitr_days(mid)) + margin
        match = ARTIFACT_NAME.match(name.removesuffix(MANIFEST_SUFFIX))
        if match is None or mid not in catalog.tiers:
            return None
        created = dt.datetime.strptime(match.group("stamp"), STAMP).replace(tzinfo=dt.timezone.utc)
        return created + dt.timedelta(days=catalog.retention_days(mid, "s3")) + margin

    return until


def replica_repository(catalog: Catalog, client=None, *, replica: str = "s3") -> Repository:
    """One of the catalog's replicas as a repository."""
    return Repository(storage_for(catalog, client, replica=replica), name=replica, replica=True)


def _as_repository(target) -> Repository:
    return target if isinstance(target, Repository) else Repository(target, name=target.where, replica=True)


@dataclass
class ReplicaResult:
    uri: str
    mode: str  # upload, copy, download, relay (replica to replica) or already-replicated
    size_bytes: int
    duration_s: float


def _holds(repo: Repository, key: str, size: int, sha256: str, *, local=None, small: bool = False) -> bool:
    """Whether `repo` already holds these bytes under `key`, by the storage's own checksum where there is one (S3's
    SHA-256; GCS's or Azure's MD5 against the `local` artifact's, an Azure blob committed from blocks by its bytes),
    a `small` object (a manifest) by reading it, and only without a local artifact to compare with by the size and
    the SHA-256 in its metadata."""
    info = repo.storage.head(key)
    if info is None or info.size != size:
        return False
    if info.checksum_sha256 is not None and info.parts <= 1:  # the storage's own, not metadata anyone can set
        return info.checksum_sha256 == b64_digest(bytes.fromhex(sha256))
    if info.sha256 is None:  # a local file: read it
        path = repo.storage.local_path(key)
        return path is not None and sha256_file(path) == sha256
    if small:
        return hashlib.sha256(repo.storage.get_bytes(key)).hexdigest() == sha256
    if info.md5 is not None and local is not None:
        proven, _ = repo.storage.proof(key, info, sha256, local)
        if proven is None and info.sha256 == sha256:  # an Azure blob committed from blocks: its bytes decide
            return download_sha256(repo.storage, key) == sha256
        return bool(proven)
    return info.sha256 == sha256


def copy_backup(m: Manifest, key: str, src: Repository, dst: Repository, *, metadata: dict[str, str] | None = None,
                say=lambda _m: None, scratch: Repository | None = None) -> str:
    """Put the backup `key` (described by `m`) of `src` into `dst`; says how (upload, copy, download,
    already-replicated, relay). The artifact's SHA-256 is checked on arrival. Between two replicas the bytes pass
    through a scratch folder of `scratch` (the local repository: owned, 0700, swept after a kill, refused
    before it would fill the volume)."""
    meta = {"partition": m.partition, "asset-key": m.asset_key, **(metadata or {})}
    if _holds(dst, key, m.size_bytes, m.sha256, local=src.storage.local_path(key)):
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
    else:  # one replica to another (a rekey that reached a backup only the replicas hold): through a scratch file
        if scratch is None:
            raise BackupError(f"copying {src.storage.uri(key)} to {dst.storage.uri(key)} needs a local scratch folder")
        say(f"copying {src.storage.uri(key)} to {dst.storage.uri(key)} through this host")
        with scratch.scratch("relay", need_bytes=m.size_bytes) as folder:
            tmp = folder / "artifact"
            with_retries(lambda: src.storage.get_file(key, tmp))
            digest = sha256_file(tmp)
            if digest != m.sha256:
                raise BackupError(f"{src.storage.uri(key)}: downloaded sha256 {digest} differs from the manifest's "
                                  f"{m.sha256}")
            with_retries(lambda: dst.storage.put_file(tmp, key, sha256=m.sha256, metadata=meta))
        mode = "relay"
    # the manifest goes last: an object without its manifest is not a backup
    data = src.storage.get_bytes(key + MANIFEST_SUFFIX)
    if not _holds(dst, key + MANIFEST_SUFFIX, len(data), hashlib.sha256(data).hexdigest(), small=True):
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
    """Put a good local backup into a replica repository (a storage is taken as one)."""
    ensure_replicable(backup)
    target = _as_repository(target)
    local = repository_for(catalog)
    key = local.key_of(backup.artifact_path)
    started = time.monotonic()
    mode = copy_backup(backup.manifest, key, local, target, say=say,
                       metadata={"verified": "true" if is_verified(backup) else "unknown"})
    try:  # what the replica audit looks for later; a full volume must not undo a good replica
        _update_audit(catalog, {key: {"replicated_at": _now().isoformat(timespec="seconds")}},
                      target.storage.where)
    except OSError as exc:
        say(f"the replica audit's record could not be written ({exc.strerror}); the replica is listed instead")
    return ReplicaResult(target.storage.uri(key), mode, backup.manifest.size_bytes, round(time.monotonic() - started, 3))


def replica_intact(catalog: Catalog, backup: StoredBackup, target, *, deep: bool = False) -> Outcome:
    """The replica holds this backup's bytes: its size, the storage's own checksum of the stored bytes (S3's
    SHA-256, GCS's MD5, the MD5 Azure checked on a whole put: `storage.proof`) against the backup's, and, with
    `deep` or when there is no such checksum to compare, its bytes downloaded and hashed. Object metadata alone (which whoever writes an object
    sets at will) never makes a replica intact. The message says exactly what was compared."""
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
        return Outcome(False, f"{uri}: the sha256 in its metadata {info.sha256} differs from the manifest's {m.sha256}")
    if target.storage.head(key + MANIFEST_SUFFIX) is None:
        return Outcome(False, f"{uri}: its manifest is missing in the replica")
    lock = getattr(target.storage, "lock_for", None)
    wanted = lock(key) if lock is not None else None
    if wanted is not None:  # the catalog asks for Object Lock: the stored version is locked in its mode, long enough
        mode = catalog.replication.s3.object_lock.mode.upper()
        if info.lock_mode != mode or info.lock_until is None or info.lock_until < wanted - dt.timedelta(seconds=1):
            return Outcome(False, f"{uri}: not locked as the catalog asks ({mode} until {wanted:%Y-%m-%d %H:%M} UTC); "
                                  f"it is {info.lock_mode or 'unlocked'}"
                                  + (f" until {info.lock_until:%Y-%m-%d %H:%M} UTC" if info.lock_until else ""))
    proven, compared = target.storage.proof(key, info, m.sha256, backup.artifact_path)
    if proven is False:
        return Outcome(False, f"{uri}: {compared}")
    said = [f"size {info.size} equals the manifest's"]
    if wanted is not None:
        said.append(f"locked ({info.lock_mode}) until {info.lock_until:%Y-%m-%d %H:%M} UTC")
    if proven:
        said.append(compared)
    downloaded = None
    if deep or not proven:
        downloaded = download_sha256(target.storage, key)
        if downloaded != m.sha256:
            return Outcome(False, f"{uri}: its bytes, downloaded, hash to sha256 {downloaded}, not the manifest's "
                                  f"{m.sha256}" + ("" if proven else f" ({compared})"))
        said.append("its bytes, downloaded and hashed, equal the manifest's SHA-256"
                    + ("" if proven else f" ({compared})"))
    return Outcome(True, f"{uri}: {'; '.join(said)}",
                   {"uri": uri, "size_bytes": info.size, "sse": info.server_side_encryption or "none",
                    "storage_class": info.storage_class or "STANDARD",
                    "compared": "bytes" if downloaded else f"{target.storage.where}-checksum",
                    **({"s3_checksum_sha256": info.checksum_sha256} if info.checksum_sha256 else {}),
                    **({"locked_until": info.lock_until.isoformat(), "lock_mode": info.lock_mode} if wanted else {})})


AUDIT_STATE = ".replica_audit.json"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _audit_path(catalog: Catalog, replica: str = "s3"):
    name = AUDIT_STATE if replica == "s3" else AUDIT_STATE.replace(".json", f"-{replica}.json")
    return repository_for(catalog).root / name


def read_audit(catalog: Catalog, replica: str = "s3") -> dict[str, dict]:
    """Per artifact key, for one replica: when it was replicated, when its copy was last proven by its bytes,
    and how that went."""
    try:
        data = json.loads(_audit_path(catalog, replica).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _update_audit(catalog: Catalog, changes: dict[str, dict], replica: str = "s3") -> None:
    state = read_audit(catalog, replica)
    for key, change in changes.items():
        state[key] = {**state.get(key, {}), **change}
    write_json_atomic(_audit_path(catalog, replica), state)


@dataclass
class AuditResult:
    key: str
    source: str
    group: str
    tier: str
    partition: str
    outcome: Outcome


def audit_replicas(catalog: Catalog, target, *, every: bool = False, limit: int | None = None,
                   now: dt.datetime | None = None, say=lambda _m: None) -> list[AuditResult]:
    """Download and hash the replicas that are due (never proven by their bytes, or last more than
    `replication.<replica>.deep_verify_days` ago; `every`: all of them), the longest unproven first, at most
    `limit` (default the catalog's `deep_verify_per_run`). A replica this repository wrote that is gone
    while the replica's retention would still keep it is a failure too."""
    from backup_assets.core.retention.rules import entries, select

    target = _as_repository(target)
    where = target.storage.where
    cfg = catalog.replication.replicas().get(where)
    now = now or _now()
    days = cfg.deep_verify_days if cfg is not None else 7
    if not every and days == 0:
        return []
    limit = limit if limit is not None else (cfg.deep_verify_per_run if cfg is not None else None)
    repo = repository_for(catalog)
    state = read_audit(catalog, where)
    pairs = entries(repo)
    kept = {e.id for e in select([e for e, _ in pairs], {t: catalog.retention_days(t, where) for t in catalog.tiers},
                                 now).keep}
    present = {key for key, _ in target.storage.list("")}
    due = []
    for entry, ref in pairs:
        record_ = state.get(ref.key, {})
        if ref.key not in present and not (record_.get("replicated_at") and entry.id in kept):
            continue  # never replicated, or let go by the replica's retention
        last = record_.get("deep_at")
        if every or last is None or now - dt.datetime.fromisoformat(last) >= dt.timedelta(days=days):
            due.append((last or "", ref))
    due.sort(key=lambda d: d[0])
    results, changes = [], {}
    for _, ref in due[:limit] if limit else due:
        backup = repo.stored(ref)
        say(f"downloading and hashing {target.storage.uri(ref.key)}")
        try:
            outcome = replica_intact(catalog, backup, target, deep=True)
        except BackupError as exc:
            outcome = Outcome(False, str(exc))
        results.append(AuditResult(ref.key, ref.source, ref.group, ref.tier, ref.partition, outcome))
        changes[ref.key] = {"deep_at": now.isoformat(timespec="seconds"), "passed": outcome.passed,
                            "message": outcome.message}
    if changes:
        _update_audit(catalog, changes, where)
    return results


def newest(repo: Repository, *, engine: str, source: str, group: str, tier: str | None = None,
           partition: str | None = None) -> BackupRef | None:
    refs = [r for r in repo.refs(source=source, group=group, tier=tier, partition=partition) if r.engine == engine]
    return max(refs, key=lambda r: r.stamp) if refs else None


def fetch_from_replica(catalog: Catalog, *, source: str, group: str, tier: str | None = None,
                       partition: str | None = None, storage=None, replica: str = "s3",
                       say=lambda _m, progress=False: None) -> StoredBackup:
    """Copy the newest (or the named) complete backup of a replica into the local repository, checksum verified."""
    if source not in catalog.sources:
        raise BackupError(f"unknown source {source!r}")
    remote = _as_repository(storage) if storage is not None else replica_repository(catalog, replica=replica)
    ref = newest(remote, engine=catalog.sources[source].engine, source=source, group=group, tier=tier,
                 partition=partition)
    if ref is None:
        raise BackupError(f"no replica of {source}/{group}{' for ' + partition if partition else ''} "
                          f"in {remote.storage.uri('')}")
    local = repository_for(catalog)
    copy_backup(remote.manifest(ref), ref.key, remote, local, say=say)
    backup = local.stored(ref)
    replaced = sorted(k for k in getattr(remote.storage, "replaced", ()) if k.startswith(ref.key))
    if replaced:  # under Object Lock: the bucket's newest version of it is not what was replicated
        say(f"{', '.join(remote.storage.uri(k) for k in replaced)}: overwritten or deleted after replication; "
            "restoring the locked version the backup host wrote")
    say(f"downloaded and verified {backup.artifact_path.name}")
    return backup
