"""Proving a backup: intact, readable, restorable to exactly what was dumped.

Each function returns an `Outcome` (passed, a one-line message naming the artifact and what
differs, and metadata) rather than raising, so the Dagster checks and the CLI report the same
thing. Restore drills go into scratch targets that are always removed, also after a failure; a
drill killed midway leaves a database marked as a drill, which the next drill removes first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path


from backup_assets.catalog import AUTO_STREAM_CPUS, Catalog
from backup_assets.core import BackupError, crypto
from backup_assets.core.verify import archive_scan
from backup_assets.core.backup import roles
from backup_assets.core.artifact import scan_artifact, sha256_file
from backup_assets.core.backup.take import repository_for
from backup_assets.core.manifest import MANIFEST_SUFFIX, read_manifest
from backup_assets.core.outcome import Outcome
from backup_assets.core.repository import LocalRepository, StoredBackup
from backup_assets.core.verify.readable import (_naming, _pg_restore_for, _readable_outcome, _readable_pass,
                                                _roles_readable, _sqlite_readable, _unlisted, archive_readable)
from backup_assets.core.verify.restore_drill import _postgres_drill, _roles_drill, _sqlite_drill, restore_drill


def find_backup(catalog: Catalog, source: str, group: str, tier: str, partition: str) -> StoredBackup:
    """The newest complete backup of a partition: found by its manifest (an artifact without one
    is never a backup and hides nothing), read strictly (a damaged or edited manifest is an error,
    not a reason to fall back silently)."""
    repo = repository_for(catalog)
    engine = catalog.sources[source].engine
    folder = repo.folder(engine, tier)
    prefix = f"{source}-{group}-{partition}-"
    manifests = sorted(p for p in folder.glob(prefix + "*" + MANIFEST_SUFFIX)
                       if not p.name.startswith(".")) if folder.is_dir() else []
    if not manifests:
        orphans = [p.name for p in repo.orphans() if p.name.startswith(prefix) and p.parent == folder]
        also = f" ({', '.join(orphans)} has no manifest: not a backup)" if orphans else ""
        raise BackupError(f"no backup of {source}/{group}/{tier} partition {partition} in {folder}{also}")
    path = manifests[-1]
    manifest = read_manifest(path)
    artifact = path.name[: -len(MANIFEST_SUFFIX)]
    if manifest.artifact != artifact:
        raise BackupError(f"manifest {path} describes {manifest.artifact}, not {artifact}")
    if (manifest.source, manifest.group, manifest.tier, manifest.partition) != (source, group, tier, partition):
        raise BackupError(f"manifest {path} describes {manifest.asset_key} partition {manifest.partition}, "
                          f"not {source}/{group}/{tier} partition {partition}")
    return StoredBackup(manifest, path)


def artifact_intact(backup: StoredBackup, identities=None) -> Outcome:
    """Size and SHA-256 match the manifest, and the stream decrypts (when encrypted and the
    identities are given) and decodes to its end. Without identities an encrypted artifact is
    checked by size and SHA-256 (of the ciphertext) only, which needs no key."""
    m, path = backup.manifest, backup.artifact_path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Outcome(False, f"{path}: artifact is missing")
    if size != m.size_bytes:
        return Outcome(False, f"{path}: size {size} bytes differs from the manifest's {m.size_bytes}",
                       {"size_bytes": size, "manifest_size_bytes": m.size_bytes})
    digest, decode_error, decoded = scan_artifact(path, m.raw_size_bytes, identities, encrypted=bool(m.encryption))
    if digest != m.sha256:
        also = f"; {decode_error}" if decode_error else ""
        return Outcome(False, f"{path}: sha256 {digest} differs from the manifest's {m.sha256}{also}",
                       {"sha256": digest, "manifest_sha256": m.sha256})
    if decode_error:
        return Outcome(False, f"{path}: {decode_error}")
    if not decoded:
        return Outcome(True, f"{path.name}: {m.size_human}, sha256 of the encrypted artifact verified (not decrypted: "
                             "no identity here)", {"sha256": m.sha256, "size_bytes": size, "decoded": False})
    return Outcome(True, f"{path.name}: {m.size_human}, sha256 and {'age and ' if m.encryption else ''}zstd stream "
                         "verified", {"sha256": m.sha256, "size_bytes": size, "decoded_bytes": m.raw_size_bytes})


CHECK_NAMES = ("artifact_intact", "archive_readable", "size_anomaly", "restore_drill")


def stream_check(catalog: Catalog, source: str, group: str, names) -> archive_scan.StreamCheck | None:
    """A StreamCheck to hand to the backup about to be written (`run_backup(stream=...)`), when
    its checks can be read from the stream as it is written (the catalog's `checks_while_writing`;
    `auto`: with enough cores, or for an encrypted backup when the identity is not at hand), with
    artifact_intact and archive_readable among `names`. A PostgreSQL dump is read by structure
    (with restore_drill, the plain archive for pg_restore is written at the same time); a SQLite
    copy or the roles' JSON is decoded into a scratch file that the checks then read. Its scratch
    folder goes with `close()`. None when the checks read the artifact afterwards instead."""
    src = catalog.sources.get(source)
    names = set(names)
    if (catalog.checks_while_writing is False or src is None
            or not {"artifact_intact", "archive_readable"} <= names):
        return None
    encryption = catalog.encryption_for(source)
    if catalog.checks_while_writing == "auto" and (os.cpu_count() or 1) < AUTO_STREAM_CPUS:
        # afterwards is as fast here, but an encrypted backup can only be read afterwards with the
        # private key, which a backup host need not have: then it is read while it is written
        if encryption is None or _identity_at_hand(encryption):
            return None
    stack = contextlib.ExitStack()
    try:
        folder = stack.enter_context(repository_for(catalog).scratch("check"))
    except OSError:  # no scratch folder (a full disk, say): the checks read the artifact afterwards
        return None
    return archive_scan.StreamCheck(folder, copy="restore_drill" in names, encrypted=encryption is not None,
                                    plain=src.engine == "sqlite" or group == roles.GROUP, cleanup=stack.close)


def _identity_at_hand(encryption) -> bool:
    """The identity file the catalog names for a source is there and holds usable keys."""
    if not encryption.identity_file_env:
        return False
    try:
        crypto.Identities.load(encryption.identity_file_env)
    except BackupError:
        return False
    return True


def evaluate(catalog: Catalog, backup: StoredBackup, names, *, jobs: int | None = None,
             stream: archive_scan.StreamCheck | None = None) -> dict[str, Outcome]:
    """The outcomes of the named checks. For a PostgreSQL archive, intact and readable come from
    one pass over the artifact (SHA-256, decryption, decoding, the archive's structure and
    fingerprints, pg_restore --list), and a drill restores from the plain copy written by that
    same pass: the artifact is read once, not once per check. Given the `stream` that read the
    backup while it was written (`stream_check`), that pass is not needed: the file on disk is
    only hashed, to prove it holds exactly the bytes that were read."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}")
    m = backup.manifest
    ids = crypto.identities_if_any(catalog, m, artifact=str(backup.artifact_path))
    out: dict[str, Outcome] = {}
    if (stream is not None and stream.artifact == backup.artifact_path
            and {"artifact_intact", "archive_readable"} <= set(names)):
        read = _plain_from_stream if stream.plain else _postgres_from_stream
        out.update(read(catalog, backup, stream, drill="restore_drill" in names, jobs=jobs))
    if (not out and m.engine == "postgres" and m.format != roles.FORMAT
            and {"artifact_intact", "archive_readable"} <= set(names) and (ids is not None or not m.encryption)):
        try:
            out.update(_postgres_in_one_pass(catalog, backup, ids, drill="restore_drill" in names, jobs=jobs))
        except BackupError:  # the shared pass could not run (a full scratch folder, say): each check alone
            out.clear()     # says what it can prove without it, and why not otherwise
    single = {
        "artifact_intact": lambda: artifact_intact(backup, ids),
        "archive_readable": lambda: archive_readable(catalog, backup),
        "size_anomaly": lambda: size_anomaly(repository_for(catalog), backup, catalog.size_anomaly_threshold),
        "restore_drill": lambda: restore_drill(catalog, backup, jobs=jobs),
    }
    for name in names:
        if name not in out:
            try:
                out[name] = single[name]()
            except BackupError as exc:
                out[name] = Outcome.failure(exc, str(exc))
    return {n: out[n] for n in names}


def _postgres_in_one_pass(catalog: Catalog, backup: StoredBackup, ids, *, drill: bool, jobs: int | None) -> dict[str, Outcome]:
    m, path = backup.manifest, backup.artifact_path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return {}  # each check says so itself
    if size != m.size_bytes:
        return {}
    repo = repository_for(catalog)
    repo.sweep()
    out: dict[str, Outcome] = {}
    with repo.scratch("check", need_bytes=m.raw_size_bytes if drill else 0) as tmp:
        raw = tmp / "archive.dump" if drill else None
        digest = hashlib.sha256()
        readable, scanned = _readable_pass(catalog, backup, copy_to=raw, sha256=digest, identities=ids)
        out["archive_readable"] = readable
        if scanned is None:  # it did not decode or parse: say exactly why the artifact is not intact
            out["artifact_intact"] = artifact_intact(backup, ids)
        elif digest.hexdigest() != m.sha256:
            out["artifact_intact"] = Outcome(False, f"{path}: sha256 {digest.hexdigest()} differs from the manifest's "
                                                    f"{m.sha256}", {"sha256": digest.hexdigest(),
                                                                    "manifest_sha256": m.sha256})
        else:
            out["artifact_intact"] = Outcome(
                True, f"{path.name}: {m.size_human}, sha256 and {'age and ' if m.encryption else ''}zstd stream verified",
                {"sha256": m.sha256, "size_bytes": size, "decoded_bytes": scanned.decoded_bytes})
        if drill:
            out["restore_drill"] = _drill_after_pass(catalog, backup, scanned, raw, out, jobs=jobs)
    return out


def _drill_after_pass(catalog: Catalog, backup: StoredBackup, scanned: archive_scan.ArchiveScan | None, raw: Path,
                      out: dict[str, Outcome], *, jobs: int | None) -> Outcome:
    """The drill of a PostgreSQL backup from a pass that decoded it (its scan, the plain copy `raw`),
    attempted when that pass read the archive and found the artifact intact."""
    intact, readable = out["artifact_intact"], out["archive_readable"]
    if scanned is None or not intact.passed:
        why = intact.message if not intact.passed else readable.message
        return Outcome(False, f"restore drill not attempted: {why}")
    try:
        return _postgres_drill(catalog, backup, jobs=jobs, prepared=(scanned, raw))
    except BackupError as exc:  # e.g. the drill server cannot be reached
        return Outcome.failure(exc, str(exc))


def _postgres_from_stream(catalog: Catalog, backup: StoredBackup, stream: archive_scan.StreamCheck, *, drill: bool,
                          jobs: int) -> dict[str, Outcome]:
    """intact, readable (and the drill) of a backup whose stream was read as it was written. Any
    doubt (the stream did not read, the file on disk is not what was written) returns nothing, and
    the checks read the artifact itself, which says exactly what is wrong."""
    m, path = backup.manifest, backup.artifact_path
    scanned = stream.result(m)
    intact = _intact_from_stream(catalog, backup, stream) if scanned is not None else None
    if intact is None:
        return {}
    out = {"artifact_intact": intact}
    try:
        tool = _pg_restore_for(catalog, m)
    except BackupError as exc:
        out["archive_readable"] = Outcome.failure(exc, _naming(path, exc))
    else:
        listed = subprocess.run([str(tool), "--list"], input=stream.head, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        out["archive_readable"] = (_unlisted(path, tool, listed.stderr) if listed.returncode != 0
                                   else _readable_outcome(backup, scanned))
    if drill:
        out["restore_drill"] = (_drill_after_pass(catalog, backup, scanned, stream.copy_to, out, jobs=jobs)
                                if stream.copy_to is not None and stream.copy_to.exists()
                                else restore_drill(catalog, backup, jobs=jobs))
    return out


def _intact_from_stream(catalog: Catalog, backup: StoredBackup, stream: archive_scan.StreamCheck) -> Outcome | None:
    """artifact_intact of a backup whose zstd stream decoded to its end while it was written: the
    file on disk is exactly what was written (and, encrypted, decrypts to exactly what was read
    when the identity is at hand). None on any doubt: the artifact is then read again."""
    m, path = backup.manifest, backup.artifact_path
    try:
        if path.stat().st_size != m.size_bytes or sha256_file(path) != m.sha256:
            return None
    except OSError:
        return None
    meta = {"sha256": m.sha256, "size_bytes": m.size_bytes, "decoded_bytes": stream.decoded_bytes,
            "read_while_written": True}
    how = "sha256 verified on disk; the zstd stream decoded to its end (frame checksum verified) as it was written"
    if m.encryption:
        ids = crypto.identities_if_any(catalog, m, artifact=str(path))
        if ids is None:
            how = ("sha256 of the encrypted artifact verified on disk; the zstd stream inside decoded to its end "
                   "(frame checksum verified) as it was written, before encryption (not decrypted: no identity here)")
            meta["decrypted"] = False
        elif stream.inner_sha256 is None or _decrypted_sha256(path, ids) != stream.inner_sha256.hexdigest():
            return None
        else:
            how = ("sha256 verified on disk; it decrypts to exactly the zstd stream that was decoded to its end "
                   "(frame checksum verified) as it was written")
            meta["decrypted"] = True
    return Outcome(True, f"{path.name}: {m.size_human}, {how}", meta)


def _plain_from_stream(catalog: Catalog, backup: StoredBackup, stream: archive_scan.StreamCheck, *, drill: bool,
                       jobs: int) -> dict[str, Outcome]:
    """intact, readable (and the drill) of a SQLite copy or a roles backup whose stream was decoded
    into a scratch file while it was written; any doubt reads the artifact again instead."""
    m = backup.manifest
    copy = stream.copy_to
    intact = _intact_from_stream(catalog, backup, stream) if stream.decoded(m) and copy and copy.exists() else None
    if intact is None:
        return {}
    out = {"artifact_intact": intact}
    if m.format == roles.FORMAT:
        try:
            saved = roles.Globals.from_bytes(copy.read_bytes(), where=str(backup.artifact_path))
        except BackupError as exc:  # it names the artifact
            out["archive_readable"] = Outcome.failure(exc, str(exc))
        else:
            out["archive_readable"] = _roles_readable(backup, saved)
            if drill and out["archive_readable"].passed:
                out["restore_drill"] = _roles_drill(catalog, backup, saved)
    else:
        out["archive_readable"] = _sqlite_readable(backup, copy)
        if drill and out["archive_readable"].passed:
            out["restore_drill"] = _sqlite_drill(catalog, backup, decoded=copy)
    if drill and "restore_drill" not in out:
        out["restore_drill"] = Outcome(False, f"restore drill not attempted: {out['archive_readable'].message}")
    return out


def _decrypted_sha256(path: Path, ids) -> str | None:
    """The SHA-256 of what an encrypted artifact decrypts to (None when it does not decrypt)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            reader = crypto.DecryptingReader(fh, ids, what=str(path))
            try:
                while chunk := reader.read(1 << 20):
                    digest.update(chunk)
            finally:
                reader.close()
    except (BackupError, OSError):
        return None
    return digest.hexdigest()


def size_anomaly(repo: LocalRepository, backup: StoredBackup, threshold: float) -> Outcome:
    m = backup.manifest
    earlier = [b for b in repo.backups(source=m.source, group=m.group, tier=m.tier) if b.manifest.partition < m.partition]
    if not earlier:
        return Outcome(True, f"{backup.artifact_path.name}: first partition of {m.asset_key}, nothing to compare with",
                       {"previous_partition": None})
    prev = earlier[-1].manifest
    change = (m.size_bytes - prev.size_bytes) / prev.size_bytes if prev.size_bytes else float("inf")
    meta = {"previous_partition": prev.partition, "previous_size_bytes": prev.size_bytes,
            "size_bytes": m.size_bytes, "change_pct": round(change * 100, 1), "threshold_pct": round(threshold * 100, 1)}
    if abs(change) > threshold:
        return Outcome(False, f"{backup.artifact_path.name}: compressed size {m.size_human} changed by {change:+.0%} "
                              f"against partition {prev.partition} ({prev.size_human}); threshold {threshold:.0%}",
                       meta, warn=True)
    return Outcome(True, f"{backup.artifact_path.name}: size changed by {change:+.1%} against {prev.partition}", meta)
