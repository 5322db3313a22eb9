"""Key rotation: re-encrypt existing backups to a new set of recipients, in every repository.

The artifact's zstd stream is read from its repository (a local file or an S3 object), decrypted
with the current identity and encrypted to the new recipients as one stream (pipes, never
plaintext on disk), hashed as it is written into a 0700 scratch folder, and put into the
repository under a name of its own (its backup time plus one microsecond), checked on arrival.
Plain (unencrypted) backups are encrypted the same way.

A backup is re-encrypted once, in the first repository that holds it (local before S3, so a
backup that exists only in S3 is re-encrypted there); every other repository holding it then
receives that same new artifact, so the copies stay byte-identical. A kill at any moment leaves a
good backup: only once the new artifact and its manifest are complete is the old copy removed
(manifest and artifact in one request on S3). A kill in between leaves two complete backups of the
partition (the newer is used) or an orphan artifact (swept), never a backup that does not verify.

A re-run after an interruption finishes the rotation instead of starting it again: a backup whose
successor (the name one microsecond later, complete, encrypted to exactly the new recipients)
exists in any repository is never re-encrypted; every copy of it is replaced by the successor's
bytes, so all repositories hold the same artifact. A complete backup's artifact is never written
over, and old copies an interruption left without their manifest are removed by the re-run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace

from backup_assets.catalog import Catalog
from backup_assets.core import BackupError, crypto, failpoints
from backup_assets.core.artifact import CHUNK, FILE_MODE, _HashingSink, human_size
from backup_assets.core.backup.take import repository_for
from backup_assets.core.manifest import MANIFEST_SUFFIX, Manifest
from backup_assets.core.repository import CHECKS_SUFFIX, STAMP, BackupRef, Repository

__all__ = ["Candidate", "Leftover", "Rekeyed", "leftovers", "rekey", "select"]


@dataclass
class Rekeyed:
    old: str
    new: str
    size_bytes: int
    seconds: float
    also_in: list[str]
    resumed: bool = False  # an interrupted rotation finished: the new artifact existed, copied instead
    pending: dict[str, str] = field(default_factory=dict)  # repositories whose copy could not be replaced: why


@dataclass
class Candidate:
    repo: Repository
    ref: BackupRef
    manifest: Manifest
    others: list[Repository]  # the other repositories that hold the same backup
    # the backup an earlier, interrupted rotation already made of this one (its repository, ref and manifest):
    # every copy of the old one is replaced by *that* artifact, never re-encrypted again
    successor: tuple[Repository, BackupRef, Manifest] | None = None


@dataclass
class Leftover:
    """An artifact without its manifest whose rotation is done (its successor is complete): a kill between
    the old copy's deletes left it, still encrypted to the retired key."""
    repo: Repository
    key: str
    successor: str


def _next_name(name: str) -> str:
    """The artifact's name with its backup time one microsecond later (and .age at the end)."""
    stem, sep, rest = name.rpartition("Z.")
    head, _, stamp = stem.rpartition("-")
    when = dt.datetime.strptime(stamp + "Z", STAMP) + dt.timedelta(microseconds=1)
    rest = rest if rest.endswith(crypto.SUFFIX) else rest + crypto.SUFFIX
    return f"{head}-{when.strftime(STAMP)}.{rest}"


def _new_key(key: str) -> str:
    return key.rsplit("/", 1)[0] + "/" + _next_name(key.rsplit("/", 1)[-1])


def select(repos: list[Repository], *, source: str | None = None, group: str | None = None, tier: str | None = None,
           older_than_days: float | None = None, recipients: list[str]) -> list[Candidate]:
    """The backups to re-encrypt: matching the filters and not already encrypted to exactly
    `recipients`, each once, in the first repository that holds it. A backup whose rotation was
    interrupted carries the successor it already has (the same name one microsecond later,
    complete, encrypted to exactly `recipients`), wherever that is."""
    now = dt.datetime.now(dt.timezone.utc)
    wanted = sorted(crypto.fingerprint(r) for r in recipients)
    listed = [(repo, repo.refs(source=source, group=group, tier=tier)) for repo in repos]
    holders: dict[str, list[tuple[Repository, BackupRef]]] = {}
    for repo, refs in listed:
        for ref in refs:
            holders.setdefault(ref.key, []).append((repo, ref))
    chosen: dict[str, Candidate] = {}
    for repo, refs in listed:
        untrusted = repo.untrusted()
        for ref in refs:
            if ref.key in chosen:
                chosen[ref.key].others.append(repo)
                continue
            if ref.key in untrusted or (older_than_days is not None
                                        and (now - ref.created).total_seconds() < older_than_days * 86400):
                continue
            m = repo.manifest(ref)
            if _fingerprints(m) != wanted:
                chosen[ref.key] = Candidate(repo, ref, m, [], _successor(holders.get(_new_key(ref.key), []), wanted))
    return list(chosen.values())


def _fingerprints(m: Manifest) -> list[str]:
    return sorted(r["fingerprint"] for r in (m.encryption or {}).get("recipients", []))


def _successor(found: list[tuple[Repository, BackupRef]], wanted: list[str]):
    for repo, ref in found:
        try:
            m = repo.manifest(ref)
        except BackupError:
            continue
        if _fingerprints(m) == wanted:
            return repo, ref, m
    return None


def leftovers(repos: list[Repository], recipients: list[str]) -> list[Leftover]:
    """Artifacts without a manifest, in any repository, whose successor is a complete backup encrypted to
    exactly `recipients`: what an interrupted rotation left of an old copy (an upload in progress has no
    successor, so it is never one)."""
    wanted = sorted(crypto.fingerprint(r) for r in recipients)
    complete: dict[str, list[tuple[Repository, BackupRef]]] = {}
    for repo in repos:
        for ref in repo.refs():
            complete.setdefault(ref.key, []).append((repo, ref))
    found = []
    for repo in repos:
        for key in repo.orphan_keys():
            if _successor(complete.get(_new_key(key), []), wanted) is not None:
                found.append(Leftover(repo, key, _new_key(key).rsplit("/", 1)[-1]))
    return found


def rekey(catalog: Catalog, c: Candidate, recipients: list[str], *, identity_env: str | None = None,
          say=lambda _m: None) -> Rekeyed:
    from backup_assets.core.replica import copy_backup

    repo, ref, m = c.repo, c.ref, c.manifest
    local = repository_for(catalog)  # its scratch: where bytes pass between two replicas
    started = time.monotonic()
    if c.successor is not None:
        return _finish(c, say=say, started=started, local=local)
    for r in recipients:
        try:
            crypto.parse_recipient(r)
        except ValueError as exc:
            raise BackupError(f"recipient {crypto.fingerprint(r) if r.strip() else '(empty)'}: {exc}") from None
    where = repo.storage.uri(ref.key)
    identities = crypto.identities_for(catalog, m, artifact=where) if m.encryption else None
    new_key = _new_key(ref.key)
    for holder in (repo, *c.others):  # never write over a complete backup's artifact
        if holder.storage.head(new_key + MANIFEST_SUFFIX) is not None:
            raise BackupError(f"{holder.storage.uri(new_key)}: a complete backup already has the name this rotation "
                              f"would give {ref.name}, encrypted to other keys; rotate that one first")
    source_hash = hashlib.sha256()
    with repository_for(catalog).scratch("rekey") as tmp_dir:
        tmp = tmp_dir / "artifact"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with repo.storage.open(ref.key) as fh, os.fdopen(fd, "wb") as out:
            sink = _HashingSink(out)
            writer = crypto.EncryptingWriter(sink, recipients)

            class _Hashed:
                def read(self, size=CHUNK):
                    data = fh.read(size)
                    source_hash.update(data)
                    return data

            reader = crypto.DecryptingReader(_Hashed(), identities, what=where) if identities else _Hashed()
            try:
                while chunk := reader.read(CHUNK):
                    writer.write(chunk)
                    failpoints.point("rekey.streaming")
            finally:
                if identities:
                    reader.close()
            writer.close()
            out.flush()
            os.fsync(out.fileno())
        if source_hash.hexdigest() != m.sha256:
            raise BackupError(f"{where}: sha256 {source_hash.hexdigest()} differs from the manifest's {m.sha256}; "
                              "not re-encrypted")
        digest = sink.sha256.hexdigest()
        # checked on arrival: read back from disk, or S3's checksums and metadata
        put = repo.storage.put_file
        put(tmp, new_key, sha256=digest, **({"move": True} if repo.storage.where == "local" else {}))
    failpoints.point("rekey.new_artifact")
    manifest = replace(m, artifact=new_key.rsplit("/", 1)[-1], sha256=digest, size_bytes=sink.size,
                       size_human=human_size(sink.size),
                       encryption={"format": "age", "recipients": crypto.describe(recipients),
                                   "identity_file_env": identity_env or (m.encryption or {}).get("identity_file_env")})
    try:
        repo.storage.put_bytes(json.dumps(manifest.to_json(), indent=2, sort_keys=True).encode(), new_key + MANIFEST_SUFFIX)
    except BaseException:
        repo.storage.delete([new_key])
        raise
    record = repo.check_record(ref)
    if record:  # what was checked of the content still holds: the content is the same
        repo.storage.put_bytes(json.dumps(record, indent=2, sort_keys=True).encode(), new_key + CHECKS_SUFFIX)
    failpoints.point("rekey.new_manifest")
    # the new backup is complete: the old one goes (manifest first, then it no longer counts)
    repo.delete(ref)
    failpoints.point("rekey.old_deleted")
    also, pending = [], {}
    for other in c.others:  # an outage here leaves the old copy there; the next run copies these bytes
        try:
            copy_backup(manifest, new_key, repo, other, say=say, scratch=local)
            failpoints.point("rekey.other_copied")
            _drop_old(other, ref)
        except BackupError as exc:
            pending[other.name] = str(exc)
            continue
        also.append(other.name)
    return Rekeyed(ref.name, new_key.rsplit("/", 1)[-1], sink.size, round(time.monotonic() - started, 3), also,
                   pending=pending)


def _finish(c: Candidate, *, say, started: float, local: Repository) -> Rekeyed:
    """An interrupted rotation of this backup, finished: every repository that still holds the old copy
    receives the successor's very bytes (copied, not encrypted again), then loses the old copy."""
    from backup_assets.core.replica import copy_backup

    srepo, sref, sman = c.successor
    also, pending = [], {}
    for holder in (c.repo, *c.others):
        try:
            if holder is not srepo:
                copy_backup(sman, sref.key, srepo, holder, say=say, scratch=local)
                failpoints.point("rekey.other_copied")
            _drop_old(holder, c.ref)
        except BackupError as exc:
            pending[holder.name] = str(exc)
            continue
        also.append(holder.name)
    return Rekeyed(c.ref.name, sref.name, sman.size_bytes, round(time.monotonic() - started, 3), also, resumed=True,
                   pending=pending)


def _drop_old(repo, ref) -> None:
    """The old-key copy goes; one S3 Object Lock still holds is reported as pending (a later rekey removes it once
    the lock has expired), never as done."""
    held = repo.delete(ref)
    if held:
        until = max(u for _k, u in held)
        raise BackupError(f"{ref.name} (old key) is locked in {repo.name} until {until:%Y-%m-%d %H:%M} UTC; removed "
                          "by a rekey after that date")

